"""Probe specs: what ``attach(probes=...)`` accepts, parsed once into probe instances (``ProbeSpec``); the
integrations parse their specs here too and hand the parsed spec to ``attach``. (Sink specs: ``probes.sinks.build``.)"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from probes import legacy
from probes.engine import distributed
from probes.engine.failures import Failures
from probes.engine.needs import check_declared
from probes.inputs import check_output_option
from probes.probe import Context, Probe
from probes.schedules import as_schedule

if TYPE_CHECKING:
    from probes.sink import Sink

__all__ = [
    "parse_probes",
    "ProbeSpec",
    "make_probe",
    "named",
    "Options",
    "setup_probes",
    "declare_charts",
]


def make_probe(cls: type[Probe], name: str, options: Mapping[str, Any]) -> Probe:
    opts = dict(options or {})
    given = "every" in opts  # an explicit every=None is refused, as any other value that is not a cadence
    every = opts.pop("every", None)
    # checked before the probe is built; a schedule is called once, on step 1, and must answer a bool
    as_schedule(every if given else cls.every, who=f"probe {name!r}", check=True)
    mixed = legacy.contract_error(cls, name)
    if mixed is not None:
        raise mixed
    try:
        probe = cls(**opts)
    except TypeError as exc:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        raise TypeError(
            f"probe {name!r}: bad options {sorted(opts)} ({exc}); it accepts: every, "
            f"{', '.join(params) or '(no other options)'}"
        ) from exc
    except (ValueError, KeyError) as exc:
        raise named(exc, name) from exc
    if given:
        probe.every = every
    return probe


def named(exc: BaseException, name: str) -> BaseException:
    """``exc`` with a message that names the probe (unchanged when it already does)."""
    text = str(exc)
    if text.startswith((f"{name}:", f"{name} ", f"probe {name!r}")):
        return exc
    try:
        new = type(exc)(f"probe {name!r}: {text}")
    except Exception:  # noqa: BLE001 - an exception class with an unusual constructor
        if hasattr(exc, "add_note"):
            exc.add_note(f"(in probe {name!r})")
        return exc
    return new


#: ``attach(model, "auto")``: every available probe that applies to the model
AUTO = "auto"


class Catalog(Protocol):
    """What the engine asks of the plugin registry: ``probes.plugins.registry`` is one, handed in by ``attach`` and
    the integrations (the engine imports no registry)."""

    def available(self) -> Any:
        """Every available probe: items with ``name`` and ``cls``."""
        ...

    def probe_class(self, name: str) -> type:
        """The class of the probe called ``name`` (``probes.plugins.UnknownProbeError`` when none is)."""
        ...

    def sink_class(self, name: str) -> type:
        """The class of the sink called ``name``."""
        ...

    def activation_types(self) -> tuple[tuple[type, ...], frozenset[str]]:
        """The activation module types and functional names that plugins add."""
        ...


def parse_probes(probes: Any, catalog: Catalog) -> list[tuple[str, Probe]]:
    """``(name, probe)`` pairs of an ``attach`` spec: names, classes, instances, a ``{name: options}`` mapping, or
    ``"auto"`` (every available probe at its defaults; the session leaves out those that do not apply).

    Args:
        probes: the spec.
        catalog: where probe names are looked up (``probes.plugins.registry``).

    Returns:
        The probes in the order given.

    Raises:
        TypeError: a spec of the wrong type; ValueError: a probe given twice or bad options (naming the probe).
    """
    if isinstance(probes, str) and probes == AUTO:
        return [(info.name, make_probe(info.cls, info.name, {})) for info in catalog.available()]
    if isinstance(probes, (str, Probe)) or (isinstance(probes, type) and issubclass(probes, Probe)):
        probes = [probes]
    items: list[tuple[Any, Any]]
    if isinstance(probes, Mapping):
        items = list(probes.items())
    elif isinstance(probes, Iterable):
        items = [(p, None) for p in probes]
    else:
        raise TypeError(f"probes must be a list of names or a {{name: options}} mapping, got {type(probes).__name__}")
    out: list[tuple[str, Probe]] = []
    for key, opts in items:
        if opts is not None and not isinstance(opts, Mapping):
            raise TypeError(f"options of probe {key!r} must be a mapping, got {opts!r}")
        if isinstance(key, Probe):
            if opts:
                raise TypeError(
                    f"probe {key.name!r} is given as an instance with options {dict(opts)!r}: an instance keeps the "
                    f"options it was made with; pass them to its constructor ({type(key).__name__}(...)) or give "
                    f"its class, {{{type(key).__name__}: {{...}}}}"
                )
            as_schedule(key.every, who=f"probe {key.name!r}", check=True)
            out.append((key.name, key))
        elif isinstance(key, type) and issubclass(key, Probe):
            out.append((key.name, make_probe(key, key.name, opts or {})))
        elif isinstance(key, str):
            out.append((key, make_probe(catalog.probe_class(key), key, opts or {})))
        else:
            raise TypeError(f"probe names must be strings, got {key!r}")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"probe(s) {dup} given more than once")
    return out


@dataclass(frozen=True)
class ProbeSpec:
    """An ``attach`` probe spec, parsed once: the probes by name in the order given, and whether it was ``"auto"``.

    ``attach`` takes a ``ProbeSpec`` as it is (an integration parses its spec when the callback is made and hands
    the parsed spec to the run's ``attach``).
    """

    given: Any
    entries: tuple[tuple[str, Probe], ...]
    auto: bool = False
    catalog: Catalog | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, probes: Any, catalog: Catalog) -> ProbeSpec:
        """``probes`` parsed (``parse_probes``, names looked up in ``catalog``), or as it is when it is a
        ``ProbeSpec`` already."""
        if isinstance(probes, ProbeSpec):
            return probes
        auto = isinstance(probes, str) and probes == AUTO
        return cls(probes, tuple(parse_probes(probes, catalog)), auto, catalog)

    def fresh(self) -> ProbeSpec:
        """The same spec with new probe instances (a second run of the same callback starts from scratch; probe
        instances given by the user are theirs and stay as given)."""
        if self.catalog is None:
            raise RuntimeError("ProbeSpec.fresh: this spec was made without a catalog; make it with ProbeSpec.parse")
        return ProbeSpec.parse(self.given, self.catalog)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.entries]

    @property
    def passive(self) -> frozenset[str]:
        """The names of the passive probes."""
        return frozenset(n for n, p in self.entries if p.passive)

    @property
    def needs_probe_batch(self) -> bool:
        """Whether an active probe measures on a probe batch."""
        return any(not p.passive and p.needs.probe_data for _, p in self.entries)


def declare_charts(sinks: list[Sink], probes: Mapping[str, Probe]) -> None:
    """Hand every sink the chart groups that the attached probes declare (``Probe.charts``)."""
    charts = tuple(dict.fromkeys(c for p in probes.values() for c in type(p).charts))
    for sink in sinks:
        sink.declare(charts)


#: samples per chunk of the probe pass (a laptop holds the activations of this many CIFAR images in a ResNet)
DEFAULT_PROBE_BATCH_SIZE = 256


@dataclass(frozen=True)
class Options:
    """The keyword options of ``attach`` (documented there), checked when made: a bad one raises naming it."""

    probe_data: Any = None
    label_key: str | None = None
    output: Any = None
    logdir: str | None = None
    writer: Any = None
    sinks: Any = None
    optimizer: Any = None
    strict: bool = False
    functional: bool | None = None
    measure_at_attach: bool = True
    state: Mapping[str, Any] | None = None
    probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE
    overhead: float | str | None = "auto"
    mask: str | None = "attention_mask"
    norm_stats: str = "running"
    label_shift: int = 0
    grad_scaler: Any = None

    def __post_init__(self) -> None:
        if self.logdir is not None and self.writer is not None:
            raise ValueError(
                "attach: give logdir= or writer=, not both (with a writer, everything goes to writer.get_logdir())"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach(optimizer=...) must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}"
            )
        if not isinstance(self.strict, bool):
            raise TypeError(f"attach(strict=...) must be True or False, got {self.strict!r}")
        check_output_option(self.output)
        n = self.probe_batch_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"attach(probe_batch_size=...) must be a positive int or None, got {n!r}")
        if self.mask is not None and not (isinstance(self.mask, str) and self.mask):
            raise TypeError(
                f"attach(mask=...) must be the name of the attention mask's keyword argument or dict "
                f"entry (default 'attention_mask'), or None to count padded positions too; got "
                f"{self.mask!r}"
            )
        if self.norm_stats not in ("running", "batch"):
            raise ValueError(
                f"attach(norm_stats=...) must be 'running' (eval mode: the running statistics of batch "
                f"norm layers) or 'batch' (the statistics of the probe batch), got {self.norm_stats!r}"
            )
        shift = self.label_shift
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(
                f"attach(label_shift=...) must be an int >= 0 (1 for a causal language model, whose "
                f"features at position t predict the label at t + 1), got {shift!r}"
            )

    @property
    def log_to(self) -> str | None:
        """Where the session writes: ``logdir``, or the user's writer's folder."""
        return (
            str(self.logdir)
            if self.logdir is not None
            else (self.writer.get_logdir() if self.writer is not None else None)
        )


def setup_probes(
    probes: Mapping[str, Probe],
    context: Context,
    failures: Failures,
    leave_out: Callable[[str, Exception], None] | None = None,
    sharded: bool = False,
    agree_on: torch.device | None = None,
) -> None:
    """At attach, what each probe declares in ``needs`` (``probes.engine.needs``) and the old contract's ``setup``,
    where a probe raises when it cannot apply to the model (its ``check`` follows on the at-attach batch).

    Args:
        probes: the attached probes by name.
        context: what the probes learn at attach.
        failures: the session's failure policy (a probe needing whole parameters of a sharded model is switched off).
        leave_out: ``attach(model, "auto")``: called for a probe whose checks raised, instead of raising.
        sharded: whether the model is sharded (FSDP).
        agree_on: under several ranks of a sharded model, the device of the agreement: no rank goes on into a probe
            pass that another rank skips.

    Raises:
        Exception: the first probe's error, with a message naming the probe.
    """
    failed: tuple[str, Exception] | None = None
    for name, probe in list(probes.items()):
        if sharded and probe.needs.sharding is None:
            failures.switch_off(
                name,
                f"probe {name!r} needs direct access to whole parameters, which a sharded "
                "(FSDP) model does not give; it is switched off on every rank",
            )
            continue
        if sharded and probe.needs.sharding != "activations" and distributed.legacy_sharded(context.model):
            failures.switch_off(
                name,
                f"probe {name!r} gathers whole parameters one FSDP2 unit at a time "
                f"(sharding={probe.needs.sharding!r}), which the legacy FullyShardedDataParallel "
                "wrapper does not give (use FSDP2's fully_shard); it is switched off on every "
                "rank",
            )
            continue
        try:
            check_declared(name, probe, context.x, context.y)
            if legacy.uses_setup(probe):
                probe.setup(context)
        except Exception as exc:
            if leave_out is None:
                failed = (name, exc)
                break
            leave_out(name, exc)
    if agree_on is not None:
        distributed.raise_if_failed_elsewhere(failed is not None, agree_on)
    if failed is not None:
        raise named(failed[1], failed[0]) from failed[1]
