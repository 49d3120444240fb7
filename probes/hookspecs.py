"""Hook specifications and markers: how built-in and third-party packages add probes and sinks.

A plugin module implements these with ``@probes.hookimpl`` and is found through the ``probes`` entry-point group
(``[project.entry-points.probes]`` in its pyproject.toml). A ``@probes.hookimpl`` function whose name is not one of
these hooks (a misspelling) makes the plugin fail to load, with a message that names it.
"""

from __future__ import annotations

import pluggy

PROJECT = "probes"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def probes_add_probes() -> list:
    """Add probes.

    Returns:
        Probe classes (subclasses of ``probes.Probe`` with a ``name``).
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this body


@hookspec
def probes_add_sinks() -> dict:
    """Add sinks.

    Returns:
        ``{name: sink class}``; a sink class takes keyword options and writes records.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this body


@hookspec
def probes_add_activations() -> list:
    """Add activation sites.

    Returns:
        Extra activation module classes (or class names) to treat as sites, e.g. a library's own GELU.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this body
