"""Adapters for training frameworks, imported as ``probes.integrations.*``."""

from __future__ import annotations

from typing import Any

from probes import plugins
from probes.probe import Probe


def needs_probe_data(spec: Any) -> bool:
    """Whether the probes of an ``attach`` spec (names, classes, instances, or a ``{name: options}`` mapping)
    include an active probe that measures on a probe batch (so a callback must find one)."""
    keys = [spec] if isinstance(spec, (str, Probe, type)) else list(spec)
    classes = [k if isinstance(k, type) else type(k) if isinstance(k, Probe) else plugins.probe_class(k)
               for k in keys]
    return any(not c.passive and c.needs_probe_data for c in classes)
