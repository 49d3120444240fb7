"""The plugin registry: built-in probes and third-party ones register through the same hooks.

``Registry`` owns a pluggy ``PluginManager`` and its bookkeeping: where each plugin came from and which
plugins failed to load. Plugins are found through the entry-point group ``probes``
(``[project.entry-points.probes]``); ``PROBES_DISABLE_PLUGIN_AUTOLOAD=1`` turns autoload off.

Loading follows pluggy (as pytest uses it): every plugin is registered, then ``check_pending()`` makes a hook
implementation without a hook specification (a misspelled ``probes_add_probe``) an error that names it. A
third-party plugin that fails to import, or fails that check, is reported by name (a ``ProbesPluginWarning``)
and the rest keep working; asking for a probe or sink that no loaded plugin provides names the plugins that
failed and their errors.

The process uses one registry, ``plugins.registry``; the module functions (``available``, ``probe_class``,
``register``, ...) are its methods.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import pluggy

from probes import hookspecs
from probes.hookspecs import PROJECT, hookimpl
from probes.records import Chart

ENTRY_POINT_GROUP = PROJECT
BUILTIN = "builtin"

__all__ = [
    "Registry",
    "registry",
    "hookimpl",
    "ProbeInfo",
    "UnknownProbeError",
    "ProbesPluginWarning",
    "available",
    "probe_class",
    "sink_class",
    "register",
    "reset",
    "probe_table",
    "sink_table",
    "registered_charts",
]


class UnknownProbeError(KeyError):
    """A probe or sink name that no loaded plugin provides.

    The message lists what is available and, when some plugin failed to load, names that plugin and its error
    (it may be the one that provides the name).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProbesPluginWarning(UserWarning):
    """A plugin could not be loaded or returned something that is not a probe."""


@dataclass(frozen=True)
class ProbeInfo:
    """One available probe.

    Attributes:
        name: the name ``attach`` takes.
        description: one line.
        source: ``"builtin"``, ``"registered"``, or the distribution that added it (``"probes-weightnorm 0.1.0"``).
        cls: the probe class.
    """

    name: str
    description: str
    source: str
    cls: type


def _builtin_plugins() -> list[tuple[str, object]]:
    """The built-in plugins, listed explicitly (they use the same hooks as third parties)."""
    import probes.builtin
    import probes.sinks

    return [(BUILTIN, probes.builtin), (BUILTIN + "-sinks", probes.sinks)]


def _distribution(dist: importlib.metadata.Distribution) -> str:
    return f"{dist.metadata['name']} {dist.version}"


class Registry:
    """Probes, sinks and activation classes contributed by plugins, loaded on first use.

    Args:
        autoload: load the ``probes`` entry points; default: unless ``PROBES_DISABLE_PLUGIN_AUTOLOAD`` is set.

    Attributes:
        failed: entry-point name -> why that plugin did not load (its import error, or the hook check).
    """

    def __init__(self, autoload: bool | None = None) -> None:
        self._autoload = autoload
        self._pm: pluggy.PluginManager | None = None
        self.failed: dict[str, str] = {}
        self._failed_from: dict[str, str] = {}  # entry-point name -> "<distribution> <version>, <module>"
        self._sources: dict[str, str] = {}  # plugin name -> where it came from
        self._registered: set[str] = set()

    # -- loading ----------------------------------------------------------------------
    @property
    def manager(self) -> pluggy.PluginManager:
        """The pluggy ``PluginManager``, built (and the entry points loaded) on first use.

        Raises:
            pluggy.PluginValidationError: a built-in plugin implements a hook that has no specification.
        """
        if self._pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(hookspecs)
            for name, plugin in _builtin_plugins():
                pm.register(plugin, name=name)
                self._sources[name] = BUILTIN
            pm.check_pending()
            self._pm = pm  # before the entry points: a plugin that asks the registry at import finds this one
            autoload = (
                self._autoload if self._autoload is not None else not os.environ.get("PROBES_DISABLE_PLUGIN_AUTOLOAD")
            )
            if autoload:
                self._load_entrypoints(pm)
        return self._pm

    def _load_entrypoints(self, pm: pluggy.PluginManager) -> None:
        """Import and register each plugin of the entry-point group; one that fails is reported and skipped."""
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                    continue
                try:
                    plugin = ep.load()
                    self._register_checked(pm, plugin, ep.name)
                except Exception as exc:  # noqa: BLE001 - a third party's failure is reported, not raised
                    pm.set_blocked(ep.name)
                    self.failed[ep.name] = repr(exc)
                    self._failed_from[ep.name] = f"{_distribution(dist)}, {ep.value}"
                    warnings.warn(
                        f"probes: plugin {ep.name!r} ({self._failed_from[ep.name]}) failed to load: "
                        f"{exc!r}; the other probes keep working",
                        ProbesPluginWarning,
                        stacklevel=4,
                    )
                    continue
                self._sources[ep.name] = _distribution(dist)

    @staticmethod
    def _register_checked(pm: pluggy.PluginManager, plugin: object, name: str | None) -> str:
        """``pm.register`` then ``pm.check_pending``; a plugin that fails the check is unregistered again."""
        name = pm.register(plugin, name=name)
        try:
            pm.check_pending()  # every plugin registered before passed: only this one can fail
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            hooks = [h for h in dir(plugin) if h.startswith(f"{PROJECT}_") and not hasattr(hookspecs, h)]
            raise pluggy.PluginValidationError(
                plugin,
                f"plugin {name!r} implements {', '.join(map(repr, hooks)) or 'a hook'} with no hook "
                f"specification (a misspelling? the hooks are {', '.join(_hook_names())}): {exc}",
            ) from exc
        # pluggy gives None for a blocked name (an entry point that failed to load), returned as it is
        return cast(str, name)

    def reset(self) -> None:
        """Forget what was loaded (after installing a plugin in a running process, or in tests)."""
        self._pm = None
        self.failed = {}
        self._failed_from = {}
        self._sources = {}
        self._registered = set()

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object or module by hand (a notebook's own probe, say).

        Args:
            plugin: a module or object with ``@probes.hookimpl`` functions.
            name: its name (default: pluggy's, from the object).

        Returns:
            The name it is registered under.

        Raises:
            pluggy.PluginValidationError: it implements a hook that has no specification (a misspelled hook name),
                or a hook with arguments its specification does not have; it is left unregistered.
            ValueError: the plugin or its name is registered already.
        """
        name = self._register_checked(self.manager, plugin, name)
        self._registered.add(name)
        self._sources[name] = "registered"
        return name

    def unregister(self, name: str) -> None:
        """Remove the plugin registered under ``name``.

        Args:
            name: what ``register`` returned.
        """
        self.manager.unregister(name=name)
        self._registered.discard(name)
        self._sources.pop(name, None)

    def source(self, plugin: object) -> str:
        """Where a plugin came from.

        Args:
            plugin: a registered plugin object.

        Returns:
            ``"builtin"``, ``"registered"``, ``"<distribution> <version>"``, or its name when none of these.
        """
        name = self.manager.get_name(plugin) or "?"
        return self._sources.get(name, name)

    def failures(self) -> str:
        """The plugins that failed to load, one per line with their errors (empty when none)."""
        self.manager  # noqa: B018 - loading is what fills the failures
        return "\n".join(
            f"  plugin {name!r} ({self._failed_from.get(name, '?')}) failed to load: {err}"
            for name, err in self.failed.items()
        )

    # -- tables -----------------------------------------------------------------------
    def probe_table(self) -> dict[str, ProbeInfo]:
        """Every probe by name, with its description and where it came from (built-ins win ties).

        Returns:
            name -> ``ProbeInfo``.
        """
        pm = self.manager
        table: dict[str, ProbeInfo] = {}
        for impl in reversed(pm.hook.probes_add_probes.get_hookimpls()):
            try:
                classes = cast("list[Any]", impl.function() or [])  # the hook's: probe classes
            except Exception as exc:  # noqa: BLE001
                warnings.warn(
                    f"probes: plugin {impl.plugin_name!r} failed to list its probes: {exc!r}",
                    ProbesPluginWarning,
                    stacklevel=3,
                )
                continue
            for cls in classes:
                name = getattr(cls, "name", "")
                if not name:
                    warnings.warn(
                        f"probes: plugin {impl.plugin_name!r} returned {cls!r} without a name",
                        ProbesPluginWarning,
                        stacklevel=3,
                    )
                    continue
                if name in table:
                    warnings.warn(
                        f"probes: probe {name!r} from {self.source(impl.plugin)} is shadowed by {table[name].source}",
                        ProbesPluginWarning,
                        stacklevel=3,
                    )
                    continue
                doc = getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0]
                table[name] = ProbeInfo(name, doc, self.source(impl.plugin), cls)
        return table

    def sink_table(self) -> dict[str, type]:
        """Every sink class by name (built-ins win ties).

        Returns:
            name -> sink class.
        """
        table: dict[str, type] = {}
        for result in reversed(self.manager.hook.probes_add_sinks()):
            for name, cls in (result or {}).items():
                table.setdefault(name, cls)
        return table

    def activation_types(self) -> tuple[tuple[type, ...], frozenset[str]]:
        """Activation classes and class names that plugins declare as sites.

        Returns:
            ``(classes, class names)``.
        """
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
        """Every available probe, sorted by name.

        Returns:
            The ``ProbeInfo`` of each probe.
        """
        return sorted(self.probe_table().values(), key=lambda p: p.name)

    def probe_class(self, name: str) -> type:
        """The class of the probe called ``name``.

        Args:
            name: a probe name.

        Returns:
            The probe class.

        Raises:
            UnknownProbeError: no loaded plugin provides it; the message names the plugins that failed to load.
        """
        table = self.probe_table()
        if name in table:
            return table[name].cls
        raise UnknownProbeError(self._unknown("probe", name, table))

    def sink_class(self, name: str) -> type:
        """The class of the sink called ``name``.

        Args:
            name: a sink name.

        Returns:
            The sink class.

        Raises:
            UnknownProbeError: no loaded plugin provides it; the message names the plugins that failed to load.
        """
        table = self.sink_table()
        if name in table:
            return table[name]
        raise UnknownProbeError(self._unknown("sink", name, table))

    def _unknown(self, kind: str, name: str, table: Mapping[str, object]) -> str:
        close = difflib.get_close_matches(name, table, n=1)
        text = f"unknown {kind} {name!r}." + (f" Did you mean {close[0]!r}?" if close else "")
        failures = self.failures()
        if failures:
            text += (
                f" No loaded plugin provides it; {len(self.failed)} plugin(s) failed to load (one of them may "
                f"provide it):\n{failures}\n"
            )
        return f"{text} Available: {', '.join(sorted(table))}"


def _hook_names() -> list[str]:
    return sorted(h for h in dir(hookspecs) if h.startswith(f"{PROJECT}_"))


#: the registry of this process
registry = Registry()

available = registry.available
probe_class = registry.probe_class
sink_class = registry.sink_class
probe_table = registry.probe_table
sink_table = registry.sink_table
register = registry.register
reset = registry.reset


def registered_charts() -> tuple[Chart, ...]:
    """The chart groups every registered probe class declares (``Probe.charts``), for a sink used without a
    session's ``declare``; none when the plugins cannot be loaded.

    Returns:
        The charts, each once, in the probes' order.
    """
    try:
        infos = available()
    except Exception:  # noqa: BLE001 - chart grouping never fails a report
        return ()
    return tuple(dict.fromkeys(c for info in infos for c in getattr(info.cls, "charts", ())))
