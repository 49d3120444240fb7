"""Sinks built from what ``attach`` takes (``sinks=``, ``logdir=``, ``writer=``), through one constructor protocol:
every sink class is made by ``cls.from_run(run, **options)`` (``probes.sinks.base.Sink.from_run``), whether it is
built in, added by a plugin, or named with options (``sinks={"wandb": {"project": "p"}}``). The engine names no
sink: ``attach`` parses the spec here (so a misspelled sink fails at once) and the session builds the sinks from
the plan once all else worked (files are only made then)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from probes.sinks.base import Sink

__all__ = ["SinkPlan", "NamedSink", "plan_sinks"]


@dataclass(frozen=True)
class NamedSink:
    """A sink given by name: its class (from the plugin registry) and the options it is made with."""

    name: str
    cls: type[Sink]
    options: Mapping[str, Any]


@dataclass(frozen=True)
class SinkPlan:
    """The sinks of an ``attach`` call, parsed: instances as given, named sinks to make with ``build``."""

    entries: tuple[Sink | NamedSink, ...] = ()

    def build(self, run: Any, wrap: Callable[[type[Sink]], type[Sink]] | None = None) -> list[Sink]:
        """Make the named sinks (``cls.from_run(run, **options)``) and return them with the given instances, in
        order; a sink that fails to be made closes those made before it.

        Args:
            run: what a sink is made for: an object with ``logdir`` and ``writer`` (``probes.engine.run.Run``).
            wrap: makes another class of each named sink's class before it is made (the Lightning callback writes
                through a subclass at the logger's steps).
        """
        made: list[Sink] = []
        try:
            for entry in self.entries:
                if isinstance(entry, Sink):
                    made.append(entry)
                else:
                    cls = wrap(entry.cls) if wrap is not None else entry.cls
                    made.append(cls.from_run(run, **entry.options))
        except BaseException:
            for sink in made:
                if not any(sink is e for e in self.entries):
                    sink.close()
            raise
        return made


def plan_sinks(sinks: Any, logdir: str | None, writer: Any, sink_class: Callable[[str], type[Sink]]) -> SinkPlan:
    """Check an ``attach`` sink spec: names, ``probes.sinks.Sink`` instances, or ``{name: options}``. Default: the
    TensorBoard sink with a ``logdir`` or ``writer`` (added when not given), else the memory sink.

    Args:
        sinks, logdir, writer: what ``attach`` was given.
        sink_class: the class of a sink name (``probes.plugins.sink_class``: built-in and plugin sinks; the
            registry imports this package, so it is handed in).

    Raises:
        TypeError: a sink that is neither a name nor a ``Sink``, or options that are not a mapping.
        probes.plugins.UnknownProbeError: a sink name that no plugin provides.
    """
    logs = logdir is not None or writer is not None
    if sinks is None:
        sinks = ["tensorboard"] if logs else ["memory"]
    elif isinstance(sinks, (str, Sink)):
        sinks = [sinks]
    elif not isinstance(sinks, (list, tuple, Mapping)):
        raise TypeError(
            f"attach(sinks=...) takes a list of sinks or {{name: options}}; a sink is a name or a probes.sinks.Sink, "
            f"got {sinks!r}"
        )
    items = list(sinks.items()) if isinstance(sinks, Mapping) else [(s, None) for s in sinks]
    entries: list[Sink | NamedSink] = []
    for s, options in items:
        if isinstance(s, Sink):
            entries.append(s)
        elif isinstance(s, str):
            if options is not None and not isinstance(options, Mapping):
                raise TypeError(f"options of sink {s!r} must be a mapping, got {options!r}")
            entries.append(NamedSink(s, sink_class(s), dict(options or {})))
        else:
            raise TypeError(f"a sink is a name or a probes.sinks.Sink, got {s!r}")
    tensorboard = sink_class("tensorboard")
    if logs and not any(
        isinstance(e, tensorboard) or (isinstance(e, NamedSink) and e.cls is tensorboard) for e in entries
    ):
        entries.append(NamedSink("tensorboard", tensorboard, {}))
    return SinkPlan(tuple(entries))
