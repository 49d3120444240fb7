"""Hook specifications: how built-in and third-party packages add probes and sinks.

A plugin module implements these with ``@probes.hookimpl`` and is found through the
``probes`` entry-point group (``[project.entry-points.probes]`` in its pyproject.toml).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("probes")


@hookspec
def probes_add_probes() -> list:
    """Return probe classes (subclasses of ``probes.Probe`` with a ``name``)."""


@hookspec
def probes_add_sinks() -> dict:
    """Return ``{name: sink class}``; a sink class takes keyword options and writes records."""
