"""The plugin manager: built-in probes and third-party ones register through the same hooks.

Entry-point group ``probes``; ``PROBES_DISABLE_PLUGIN_AUTOLOAD=1`` turns autoload off.
A plugin that fails to load is reported by name (a ``ProbesPluginWarning``) and the
rest keep working.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass

import pluggy

from probes import hookspecs

hookimpl = pluggy.HookimplMarker("probes")
ENTRY_POINT_GROUP = "probes"


class UnknownProbeError(KeyError):
    """A probe or sink name that no plugin provides; the message lists what is available."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProbesPluginWarning(UserWarning):
    """A plugin could not be loaded or returned something that is not a probe."""


@dataclass(frozen=True)
class ProbeInfo:
    name: str
    description: str
    source: str  # "builtin" or the distribution (and entry point) that added it
    cls: type


_manager: pluggy.PluginManager | None = None
failed_plugins: dict[str, str] = {}


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in eps:
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            dist = getattr(ep, "dist", None)
            pm._probes_sources[ep.name] = f"{dist.name} {dist.version}" if dist else ep.value  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - any failure of a third party is reported, not raised
            failed_plugins[ep.name] = repr(exc)
            warnings.warn(f"probes: plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}; "
                          "the other probes keep working", ProbesPluginWarning, stacklevel=2)


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("probes")
        pm.add_hookspecs(hookspecs)
        pm._probes_sources = {}  # type: ignore[attr-defined]
        import probes.builtin
        import probes.sinks

        pm.register(probes.builtin, name="builtin")
        pm.register(probes.sinks, name="builtin-sinks")
        if not os.environ.get("PROBES_DISABLE_PLUGIN_AUTOLOAD"):
            _load_entrypoints(pm)
        _manager = pm
    return _manager


def reset() -> None:
    """Forget the manager (tests, or after installing a plugin in a running process)."""
    global _manager
    _manager = None
    failed_plugins.clear()


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module by hand (a notebook's own probe, say)."""
    pm = manager()
    pm.register(plugin, name=name)
    pm._probes_sources[pm.get_name(plugin)] = "registered"  # type: ignore[attr-defined]


def _source(pm: pluggy.PluginManager, impl_plugin: object) -> str:
    name = pm.get_name(impl_plugin) or "?"
    if name in ("builtin", "builtin-sinks"):
        return "builtin"
    return pm._probes_sources.get(name, name)  # type: ignore[attr-defined]


def probe_table() -> dict[str, ProbeInfo]:
    """Every probe by name, with its description and where it came from."""
    pm = manager()
    table: dict[str, ProbeInfo] = {}
    for impl in reversed(pm.hook.probes_add_probes.get_hookimpls()):
        try:
            classes = impl.function() or []
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"probes: plugin {impl.plugin_name!r} failed to list its probes: {exc!r}",
                          ProbesPluginWarning, stacklevel=2)
            continue
        for cls in classes:
            name = getattr(cls, "name", "")
            if not name:
                warnings.warn(f"probes: plugin {impl.plugin_name!r} returned {cls!r} without a name",
                              ProbesPluginWarning, stacklevel=2)
                continue
            if name in table:
                warnings.warn(f"probes: probe {name!r} from {_source(pm, impl.plugin)} is shadowed by "
                              f"{table[name].source}", ProbesPluginWarning, stacklevel=2)
                continue
            doc = getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0]
            table[name] = ProbeInfo(name, doc, _source(pm, impl.plugin), cls)
    return table


def sink_table() -> dict[str, type]:
    pm = manager()
    table: dict[str, type] = {}
    for result in reversed(pm.hook.probes_add_sinks()):
        for name, cls in (result or {}).items():
            table.setdefault(name, cls)
    return table


def available() -> list[ProbeInfo]:
    """Every available probe, sorted by name."""
    return sorted(probe_table().values(), key=lambda p: p.name)


def probe_class(name: str) -> type:
    table = probe_table()
    if name in table:
        return table[name].cls
    close = difflib.get_close_matches(name, table, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownProbeError(f"unknown probe {name!r}.{hint} Available: {', '.join(sorted(table))}")


def sink_class(name: str) -> type:
    table = sink_table()
    if name in table:
        return table[name]
    raise UnknownProbeError(f"unknown sink {name!r}; available: {', '.join(sorted(table))}")
