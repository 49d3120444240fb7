"""``attach()`` and ``Session``: hook lifecycle, cadence, probe-batch passes, sinks.

Passive probes observe the training forwards (``model.training``) through the capture's
hooks; active probes run at their cadence on the fixed probe batch, in one extra pass in
eval mode that all probes due at that step share, after which the model's modes and the
RNG state are restored. A probe that raises is reported once and switched off (re-raised
with ``strict=True``). Under ``torch.distributed`` passive counts are summed over ranks,
active probes run on rank 0, and only rank 0 writes.
"""

from __future__ import annotations

import inspect
import logging
import traceback
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from probes import plugins
from probes.capture import Capture, unwrap
from probes.probe import Context, Probe, ProbeBatch, Site
from probes.records import Record, to_host
from probes.sinks.base import Sink
from probes.sinks.memory import MemorySink

log = logging.getLogger("probes")


class ProbeFailedWarning(RuntimeWarning):
    """A probe raised; it is switched off and training goes on."""


def _dist() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _make_probe(cls: type[Probe], name: str, options: Mapping[str, Any]) -> tuple[Probe, int]:
    opts = dict(options or {})
    every = opts.pop("every", None)
    every = int(every) if every is not None else int(cls.every)
    if every < 1:
        raise ValueError(f"probe {name!r}: every must be a positive number of steps, got {every}")
    try:
        probe = cls(**opts)
    except TypeError as exc:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        raise TypeError(f"probe {name!r}: bad options {sorted(opts)} ({exc}); it accepts: every, "
                        f"{', '.join(params) or '(no other options)'}") from exc
    return probe, every


def _normalise_spec(probes: Any) -> list[tuple[str, Probe, int]]:
    if isinstance(probes, (str, Probe)):
        probes = [probes]
    items: list[tuple[str, Any]]
    if isinstance(probes, Mapping):
        items = list(probes.items())
    elif isinstance(probes, Iterable):
        items = [(p, None) for p in probes]
    else:
        raise TypeError(f"probes must be a list of names or a {{name: options}} mapping, got {type(probes).__name__}")
    out: list[tuple[str, Probe, int]] = []
    for key, opts in items:
        if isinstance(key, Probe):
            out.append((key.name, key, int(type(key).every)))
            continue
        if opts is not None and not isinstance(opts, Mapping):
            raise TypeError(f"options of probe {key!r} must be a mapping, got {opts!r}")
        if isinstance(key, type) and issubclass(key, Probe):
            probe, every = _make_probe(key, key.name, opts or {})
            out.append((key.name, probe, every))
            continue
        if not isinstance(key, str):
            raise TypeError(f"probe names must be strings, got {key!r}")
        probe, every = _make_probe(plugins.probe_class(key), key, opts or {})
        out.append((key, probe, every))
    names = [n for n, _, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"probe(s) {sorted(dup)} given more than once")
    return out


def _split_probe_data(probe_data: Any) -> tuple[Any, torch.Tensor | None]:
    if probe_data is None:
        return None, None
    if isinstance(probe_data, (tuple, list)):
        if len(probe_data) == 2:
            return probe_data[0], probe_data[1]
        if len(probe_data) == 1:
            return probe_data[0], None
        raise ValueError(f"probe_data must be x or (x, y), got a sequence of {len(probe_data)} items")
    if isinstance(probe_data, Mapping):
        return probe_data["x"], probe_data.get("y")
    return probe_data, None


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class Session:
    """Probes attached to one model. Use ``step()`` (or give ``optimizer``), then ``close()``."""

    def __init__(self, model: nn.Module, probes: Any, *, probe_data: Any = None, logdir: str | None = None,
                 writer: Any = None, sinks: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 strict: bool = False, functional: bool | None = None, measure_at_attach: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.module = unwrap(model)
        self.strict = strict
        self.rank, self.world_size = _dist()
        self.logdir = str(logdir) if logdir is not None else (writer.get_logdir() if writer is not None else None)
        param = next(self.module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        x, y = _split_probe_data(probe_data)
        self.x, self.y = _to(x, self.device), _to(y, self.device)
        self._check_probe_data()
        self.entries = _normalise_spec(probes)
        self.probes: dict[str, Probe] = {n: p for n, p, _ in self.entries}
        self.every: dict[str, int] = {n: e for n, _, e in self.entries}
        self.passive = [n for n, p, _ in self.entries if p.passive]
        self.active = [n for n, p, _ in self.entries if not p.passive]
        for name in self.active:
            if self.probes[name].needs_probe_data and self.x is None:
                raise ValueError(f"probe {name!r} runs on a fixed probe batch: pass probe_data=(x, y) to attach")
        self.sinks: list[Sink] = self._make_sinks(sinks, logdir, writer) if self.rank == 0 else []
        self.failures: dict[str, str] = {}
        self._step = 0
        self._measured_at: dict[str, int] = {}
        self._observers: dict[str, list[tuple[str, Probe]]] = {}
        self._closed = False
        extra = tuple({t for p in self.probes.values() for t in getattr(p, "site_types", ())})
        self.capture = Capture(self.module, extra_sites=extra, functional=functional)
        context = Context(self.module, self.x, self.y, self.logdir, self.device)
        for probe in self.probes.values():
            probe.setup(context)
        if self.passive:
            self.capture.install_passive(self._observe)
        self._opt_handle = optimizer.register_step_post_hook(self._after_optimizer_step) if optimizer else None
        if self.active and measure_at_attach:
            self._measure(self.active)

    # -- set-up ---------------------------------------------------------------------
    def _check_probe_data(self) -> None:
        tensors = [self.x] if isinstance(self.x, torch.Tensor) else []
        for t in tensors:
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"probe_data: x has {bad} NaN or infinite values; the probe batch must be finite")
        if isinstance(self.x, torch.Tensor) and isinstance(self.y, torch.Tensor) and self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"probe_data: x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")

    @staticmethod
    def _make_sinks(sinks: Any, logdir: str | None, writer: Any) -> list[Sink]:
        out: list[Sink] = []
        if sinks is None:
            sinks = ["tensorboard"] if (logdir is not None or writer is not None) else ["memory"]
        elif isinstance(sinks, (str, Sink)):
            sinks = [sinks]
        for s in sinks:
            if isinstance(s, Sink):
                out.append(s)
            elif s == "tensorboard":
                out.append(plugins.sink_class("tensorboard")(logdir=logdir, writer=writer))
            elif isinstance(s, str):
                out.append(plugins.sink_class(s)())
            else:
                raise TypeError(f"a sink is a name or a probes.sinks.Sink, got {s!r}")
        tensorboard = plugins.sink_class("tensorboard")
        if (logdir is not None or writer is not None) and not any(isinstance(s, tensorboard) for s in out):
            out.append(tensorboard(logdir=logdir, writer=writer))
        return out

    # -- public ---------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self._step

    @property
    def memory(self) -> MemorySink:
        """The first memory sink (``sinks=["memory"]``, or the default without a logdir)."""
        for s in self.sinks:
            if isinstance(s, MemorySink):
                return s
        raise AttributeError("this session has no memory sink; attach with sinks=['memory', ...]")

    def enabled(self, name: str) -> bool:
        return name in self.probes and name not in self.failures

    def step(self, n: int = 1) -> None:
        """Advance the step counter by ``n``; flush/measure the probes that fall due."""
        if self._closed:
            return
        for _ in range(n):
            self._step += 1
            s = self._step
            due_passive = [p for p in self._flushable() if s % self.every[p] == 0]
            if due_passive:
                self._flush(due_passive)
            due_active = [p for p in self.active if s % self.every[p] == 0 and self.enabled(p)]
            if due_active:
                self._measure(due_active)

    def set_step(self, step: int) -> None:
        """Jump the counter (integrations follow the trainer's global step)."""
        if step > self._step:
            self.step(step - self._step)
        else:
            self._step = int(step)

    def measure(self, names: Iterable[str] | None = None) -> None:
        """Measure the given (default: all) active probes now, at the current step."""
        chosen = self.active if names is None else [n for n in names if n in self.active]
        self._measure([n for n in chosen if self.enabled(n)])

    def flush(self) -> None:
        """Write what passive probes accumulated so far and flush the sinks."""
        self._flush(self._flushable())
        for s in self.sinks:
            s.flush()

    def detach(self) -> None:
        """Remove every hook; the model is left exactly as it was."""
        self.capture.remove()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None

    def close(self) -> None:
        """Flush passive probes, write a last measurement, remove hooks, close the sinks."""
        if self._closed:
            return
        try:
            self._flush(self._flushable())
            stale = [n for n in self.active if self._measured_at.get(n) != self._step]
            if stale:
                self.measure(stale)
        finally:
            self.detach()
            for s in self.sinks:
                s.close()
            self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Step counter and probe state, for a checkpoint (``torch.save`` it with the model)."""
        return {"step": self._step, "probes": {n: p.state_dict() for n, p in self.probes.items()},
                "failures": dict(self.failures)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state["step"])
        self._measured_at = {n: self._step for n in self.active}
        for name, sub in state.get("probes", {}).items():
            if name in self.probes:
                self.probes[name].load_state_dict(sub)

    # -- internals --------------------------------------------------------------------
    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step()

    def _fail(self, name: str, exc: BaseException) -> None:
        if self.strict:
            if hasattr(exc, "add_note"):
                exc.add_note(f"(in probe {name!r} at step {self._step}; strict=True)")
            raise exc
        if name in self.failures:
            return
        self.failures[name] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        msg = f"probe {name!r} raised at step {self._step} and is switched off; training goes on: {exc!r}"
        log.error(msg)
        warnings.warn(msg, ProbeFailedWarning, stacklevel=3)

    def _observe(self, site: Site, pre: torch.Tensor, post: torch.Tensor) -> None:
        observers = self._observers.get(site.name)
        if observers is None:
            observers = self._observers[site.name] = [
                (n, self.probes[n]) for n in self.passive if self.probes[n].wants(site)]
        for name, probe in observers:
            if name not in self.failures:
                try:
                    probe.observe(site, pre, post)
                except Exception as exc:  # noqa: BLE001 - reported, probe disabled
                    self._fail(name, exc)

    def _write(self, name: str, records: Any) -> None:
        records = list(records or [])
        for r in records:
            if not isinstance(r, Record.__args__):  # type: ignore[attr-defined]
                raise TypeError(f"probe {name!r} returned {r!r}, not a Scalar/Histogram/Image record")
            if not (r.tag == name or r.tag.startswith(name + "/")):
                raise ValueError(f"probe {name!r} returned tag {r.tag!r}: tags must start with '{name}/'")
        if not records or not self.sinks:
            return
        records = to_host(records)
        for sink in self.sinks:
            sink.write(records, self._step)

    def _flushable(self) -> list[str]:
        """Passive probes to flush. Under DDP every rank takes part in every probe's collective,
        also for a probe switched off on this rank only, so that the ranks stay in step and
        the others learn of the failure (and switch the probe off too) instead of hanging."""
        if self.world_size > 1:
            return list(self.passive)
        return [p for p in self.passive if self.enabled(p)]

    def _flush(self, names: list[str]) -> None:
        if self.world_size > 1:
            names = self._all_reduce(names)
        for name in names:
            try:
                self._write(name, self.probes[name].flush(self._step))
            except Exception as exc:  # noqa: BLE001
                self._fail(name, exc)

    def _all_reduce(self, names: list[str]) -> list[str]:
        """Sum each probe's ``reducible()`` tensors over the ranks; return the probes that may flush.

        The ranks first compare a signature of what they are about to reduce (one small all-reduce
        per probe: failed or not, number of tensors, a checksum of their shapes and dtypes). Ranks whose
        accumulators differ (a rank that saw no forward in the window, a site seen on some ranks only)
        would otherwise pair unrelated tensors, hang, or crash training in the collective; instead the
        probe is switched off on every rank with a message saying so.
        """
        import zlib

        d = torch.distributed
        ok: list[str] = []
        for name in names:
            error: BaseException | None = None
            failed_here = name in self.failures
            try:
                tensors = [] if failed_here else list(self.probes[name].reducible())
            except Exception as exc:  # noqa: BLE001 - reported below, on every rank alike
                tensors, error = [], exc
            layout = ";".join(f"{tuple(t.shape)}/{t.dtype}" for t in tensors)
            sig = torch.tensor([int(error is not None or failed_here), len(tensors), zlib.crc32(layout.encode())],
                               dtype=torch.int64, device=self.device)
            both = torch.cat([sig, -sig])
            d.all_reduce(both, op=d.ReduceOp.MAX)  # max and -min of every entry, in one collective
            hi, lo = both[:3].tolist(), (-both[3:]).tolist()
            if error is not None:
                self._fail(name, error)
                continue
            if hi[0]:
                self._fail(name, RuntimeError(f"probe {name!r} raised on another rank (or was switched off there) "
                                              f"before the all-reduce at step {self._step}"))
                continue
            if hi != lo:
                self._fail(name, RuntimeError(
                    f"probe {name!r}: the ranks hold different accumulators at step {self._step} (rank "
                    f"{self.rank}: {len(tensors)} tensors [{layout or 'none'}]; the ranks hold {lo[1]} to {hi[1]}), "
                    "e.g. a rank ran no training forward in the window or saw other sites; summing them "
                    "would mix unrelated counts"))
                continue
            for t in tensors:
                d.all_reduce(t, op=d.ReduceOp.SUM)
            ok.append(name)
        return ok

    def _measure(self, names: list[str]) -> None:
        for n in names:
            self._measured_at[n] = self._step
        if not names or self.rank != 0:
            return
        module = self.module
        modes = [(m, m.training) for m in module.modules()]
        rng = _rng_state()
        try:
            module.eval()
            output, activations, calls = None, {}, []
            if self.x is not None:
                try:
                    with torch.no_grad(), self.capture.recording() as rec:
                        output = module(self.x)
                except Exception as exc:  # noqa: BLE001 - the pass itself failed: every due probe is off
                    for name in names:
                        self._fail(name, exc)
                    return
                activations, calls = rec["activations"], rec["calls"]
            batch = ProbeBatch(module, self.x, self.y, output, activations, self._step, self.logdir, calls)
            for name in names:
                try:
                    self._write(name, self.probes[name].measure(batch))
                except Exception as exc:  # noqa: BLE001
                    self._fail(name, exc)
        finally:
            for m, training in modes:
                m.training = training
            _set_rng_state(rng)


def attach(model: nn.Module, probes: Any, *, probe_data: Any = None, logdir: str | None = None, writer: Any = None,
           sinks: Any = None, optimizer: torch.optim.Optimizer | None = None, strict: bool = False,
           functional: bool | None = None, measure_at_attach: bool = True) -> Session:
    """Attach probes to ``model`` and return the ``Session``.

    ``probes``: a list of names, or ``{name: options}`` (``every`` sets the cadence in steps).
    ``probe_data``: the fixed probe batch ``(x, y)`` (or ``x``) that active probes measure on.
    ``logdir`` / ``writer``: TensorBoard output (a user's ``SummaryWriter`` is shared, not closed);
    ``sinks``: more sinks by name or instance (default ``memory`` when there is no logdir).
    ``optimizer``: step automatically after every ``optimizer.step()``.
    ``strict``: re-raise a probe's error instead of switching the probe off.
    ``functional``: catch functional activations (``F.relu`` in ``forward``); default auto.
    ``measure_at_attach``: measure the active probes once now, the initialization (step 0); a resumed
    run that loads ``state_dict`` afterwards passes False.
    """
    return Session(model, probes, probe_data=probe_data, logdir=logdir, writer=writer, sinks=sinks,
                   optimizer=optimizer, strict=strict, functional=functional, measure_at_attach=measure_at_attach)
