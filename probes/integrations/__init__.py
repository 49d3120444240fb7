"""Adapters for training frameworks, imported as ``probes.integrations.*``."""
