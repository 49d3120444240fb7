"""The plugin registry: built-in probes and third-party ones register through the same hooks.

``Registry`` owns a pluggy ``PluginManager`` and its bookkeeping: where each plugin came from
(pluggy's ``list_plugin_distinfo`` for entry points) and which plugins failed to load. Entry-point
group ``probes``; ``PROBES_DISABLE_PLUGIN_AUTOLOAD=1`` turns autoload off. A plugin that fails to
load is reported by name (a ``ProbesPluginWarning``) and the rest keep working.

The process uses one registry, ``plugins.registry``; the module functions (``available``,
``probe_class``, ``register``, ...) are its methods.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass

import pluggy

from probes import hookspecs
from probes.hookspecs import PROJECT, hookimpl

ENTRY_POINT_GROUP = PROJECT
BUILTIN = "builtin"

__all__ = ["Registry", "registry", "hookimpl", "ProbeInfo", "UnknownProbeError", "ProbesPluginWarning",
           "available", "probe_class", "sink_class", "register", "reset", "probe_table", "sink_table"]


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
    source: str  # "builtin", "registered", or the distribution that added it ("probes-weightnorm 0.1.0")
    cls: type


def _builtin_plugins() -> list[tuple[str, object]]:
    """The built-in plugins, listed explicitly (they use the same hooks as third parties)."""
    import probes.builtin
    import probes.sinks

    return [(BUILTIN, probes.builtin), (BUILTIN + "-sinks", probes.sinks)]


class Registry:
    """Probes, sinks and activation classes contributed by plugins, loaded on first use."""

    def __init__(self, autoload: bool | None = None) -> None:
        self._autoload = autoload
        self._pm: pluggy.PluginManager | None = None
        self.failed: dict[str, str] = {}  # entry-point name -> error
        self._registered: set[str] = set()

    # -- loading ----------------------------------------------------------------------
    @property
    def manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(hookspecs)
            for name, plugin in _builtin_plugins():
                pm.register(plugin, name=name)
            self._pm = pm
            autoload = self._autoload if self._autoload is not None else \
                not os.environ.get("PROBES_DISABLE_PLUGIN_AUTOLOAD")
            if autoload:
                self._load_entrypoints(pm)
        return self._pm

    def _load_entrypoints(self, pm: pluggy.PluginManager) -> None:
        """pluggy's ``load_setuptools_entrypoints``, continued past a plugin that fails to import."""
        for _ in range(1000):
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
                return
            except Exception as exc:  # noqa: BLE001 - any failure of a third party is reported, not raised
                ep = self._first_unloaded(pm)
                if ep is None:
                    warnings.warn(f"probes: loading plugins failed: {exc!r}", ProbesPluginWarning, stacklevel=3)
                    return
                pm.set_blocked(ep.name)
                self.failed[ep.name] = repr(exc)
                warnings.warn(f"probes: plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}; "
                              "the other probes keep working", ProbesPluginWarning, stacklevel=3)

    @staticmethod
    def _first_unloaded(pm: pluggy.PluginManager) -> importlib.metadata.EntryPoint | None:
        # the order in which pluggy walks the entry points: the first one neither loaded nor blocked raised
        for dist in list(importlib.metadata.distributions()):
            for ep in dist.entry_points:
                if ep.group == ENTRY_POINT_GROUP and pm.get_plugin(ep.name) is None and not pm.is_blocked(ep.name):
                    return ep
        return None

    def reset(self) -> None:
        """Forget what was loaded (after installing a plugin in a running process, or in tests)."""
        self._pm = None
        self.failed = {}
        self._registered = set()

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object or module by hand (a notebook's own probe, say); returns its name."""
        pm = self.manager
        name = pm.register(plugin, name=name)
        self._registered.add(name)
        return name

    def unregister(self, name: str) -> None:
        self.manager.unregister(name=name)
        self._registered.discard(name)

    def source(self, plugin: object) -> str:
        """Where a plugin came from: ``builtin``, ``registered``, or ``<distribution> <version>``."""
        pm = self.manager
        name = pm.get_name(plugin) or "?"
        if name.startswith(BUILTIN):
            return BUILTIN
        if name in self._registered:
            return "registered"
        for p, dist in pm.list_plugin_distinfo():
            if p is plugin:
                return f"{dist.project_name} {dist.version}"
        return name

    # -- tables -----------------------------------------------------------------------
    def probe_table(self) -> dict[str, ProbeInfo]:
        """Every probe by name, with its description and where it came from (built-ins win ties)."""
        pm = self.manager
        table: dict[str, ProbeInfo] = {}
        for impl in reversed(pm.hook.probes_add_probes.get_hookimpls()):
            try:
                classes = impl.function() or []
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"probes: plugin {impl.plugin_name!r} failed to list its probes: {exc!r}",
                              ProbesPluginWarning, stacklevel=3)
                continue
            for cls in classes:
                name = getattr(cls, "name", "")
                if not name:
                    warnings.warn(f"probes: plugin {impl.plugin_name!r} returned {cls!r} without a name",
                                  ProbesPluginWarning, stacklevel=3)
                    continue
                if name in table:
                    warnings.warn(f"probes: probe {name!r} from {self.source(impl.plugin)} is shadowed by "
                                  f"{table[name].source}", ProbesPluginWarning, stacklevel=3)
                    continue
                doc = getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0]
                table[name] = ProbeInfo(name, doc, self.source(impl.plugin), cls)
        return table

    def sink_table(self) -> dict[str, type]:
        table: dict[str, type] = {}
        for result in reversed(self.manager.hook.probes_add_sinks()):
            for name, cls in (result or {}).items():
                table.setdefault(name, cls)
        return table

    def activation_types(self) -> tuple[tuple[type, ...], frozenset[str]]:
        """Activation classes and class names that plugins declare as sites."""
        classes: list[type] = []
        names: set[str] = set()
        for result in self.manager.hook.probes_add_activations():
            for item in result or []:
                if isinstance(item, str):
                    names.add(item)
                elif isinstance(item, type):
                    classes.append(item)
        return tuple(classes), frozenset(names)

    def available(self) -> list[ProbeInfo]:
        """Every available probe, sorted by name."""
        return sorted(self.probe_table().values(), key=lambda p: p.name)

    def probe_class(self, name: str) -> type:
        table = self.probe_table()
        if name in table:
            return table[name].cls
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownProbeError(f"unknown probe {name!r}.{hint} Available: {', '.join(sorted(table))}")

    def sink_class(self, name: str) -> type:
        table = self.sink_table()
        if name in table:
            return table[name]
        raise UnknownProbeError(f"unknown sink {name!r}; available: {', '.join(sorted(table))}")


#: the registry of this process
registry = Registry()

available = registry.available
probe_class = registry.probe_class
sink_class = registry.sink_class
probe_table = registry.probe_table
sink_table = registry.sink_table
register = registry.register
reset = registry.reset
