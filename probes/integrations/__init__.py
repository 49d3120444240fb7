"""Adapters for training frameworks, imported as ``probes.integrations.*``.

``lightning`` and ``transformers`` hold one callback each; both run on ``core.CallbackCore`` (spec parsing, the
probe batch, the session's life and its checkpoint state).
"""

from __future__ import annotations

from typing import Any

from probes.engine.spec import ProbeSpec
from probes.plugins import registry


def needs_probe_data(spec: Any) -> bool:
    """Whether the probes of an ``attach`` spec include an active probe that measures on a probe batch.

    Args:
        spec: names, classes, instances, or a ``{name: options}`` mapping.

    Returns:
        True when a callback must find a probe batch for these probes.

    Raises:
        probes.plugins.UnknownProbeError: a name no plugin provides.
        TypeError: a spec of another form, or options a probe does not take.
    """
    return ProbeSpec.parse(spec, registry).needs_probe_batch
