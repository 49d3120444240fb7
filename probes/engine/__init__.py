"""The engine, one concern a module:

- ``attach``: the public entry point; ``session``: the ``Session``'s lifecycle and public methods;
- ``spec``: probe and sink specs (shared with the integrations) and the checks of ``attach``'s options;
- ``probe_pass``: the one probe pass (chunks, what each site keeps, eval mode, modes and RNG restored) and the probe
  batch that follows the model's device and dtype;
- ``capture``: where activations come from (module hooks, functional calls, sites, training forwards, masks);
- ``passive``: training forwards observed and flushed; ``measure``: measurements of the active probes;
- ``cadence``: due steps, the overhead budget, a replaceable clock; ``failures``: switched-off probes and notices;
- ``output``: records to the sinks, one point per tag and step; ``distributed``: the rank protocol;
- ``inputs``: probe inputs of any forward signature and the output the probes use.
"""
