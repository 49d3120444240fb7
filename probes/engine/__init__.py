"""The engine: attach and the session's lifecycle, the one probe pass, capture of activation sites,
cadence and overhead spacing, the failure policy, the rank protocol and the probe inputs."""
