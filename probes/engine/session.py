"""``attach()`` and ``Session``: lifecycle, cadence, probe-batch passes, failure policy.

Passive probes observe the training forwards (``model.training``) through the capture's hooks;
active probes run at their cadence on the fixed probe batch, in one extra pass in eval mode that
all probes due at that step share, after which the modules' modes (through their own ``train()``)
and the RNG state are restored. A probe that raises is reported once and switched off (re-raised
with ``strict=True``). Under ``torch.distributed`` declared state is reduced over ranks
(``probes.engine.distributed``), active probes run on rank 0 (on every rank for a sharded model), and
only rank 0 writes.

Lifecycle: ``attach`` either returns a working session or raises and leaves nothing behind (no
hook, no writer, no file). The at-attach measurement (step 0) is held back until the session is
first used, so that ``load_state_dict`` right after ``attach`` (a resumed run) drops it instead of
writing a second step-0 point. After ``close()`` every method but ``close()`` raises
``ProbesClosedError``.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from probes import plugins
from probes.engine import distributed, inputs
from probes.engine.capture import Capture, unwrap
from probes.engine.spec import named, parse_probes, parse_sinks
from probes.probe import Activation, Context, Probe, ProbeBatch, Site
from probes.records import Record, to_host
from probes.schedules import Schedule, as_schedule, every
from probes.sinks.base import Sink
from probes.sinks.memory import MemorySink

log = logging.getLogger("probes")

#: samples per chunk of the probe pass (a laptop holds the activations of this many CIFAR images in a ResNet)
DEFAULT_PROBE_BATCH_SIZE = 256
#: ``attach(overhead="auto")``: probes left at their default cadence keep within this fraction of training time,
AUTO_OVERHEAD = 0.1
#: once its measurements have taken this many seconds in all (short runs, tests, keep the default cadences exactly)
AUTO_GRACE_SECONDS = 2.0

__all__ = ["attach", "Session", "ProbesClosedError", "ProbeFailedWarning", "ProbesNoticeWarning"]


class ProbeFailedWarning(RuntimeWarning):
    """A probe raised; it is switched off and training goes on."""


class ProbesNoticeWarning(UserWarning):
    """Something a user should know once: a probe that sees nothing on this model, a window without training."""


class ProbesClosedError(RuntimeError):
    """The session was closed; only ``close()`` may be called again."""








def _round_up_125(k: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``k``."""
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= k:
                return m * scale
        scale *= 10


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _restore_modes(root: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    """Put every module back in its mode through its own ``train()`` (overrides run), parents first."""
    root.train(modes[0][1])
    for m, training in modes[1:]:
        if m.training != training:
            m.train(training)




class Session:
    """Probes attached to one model. Use ``step()`` (or give ``optimizer``), then ``close()``."""

    def __init__(self, model: nn.Module, probes: Any, *, probe_data: Any = None, label_key: str | None = None,
                 output: Any = None, logdir: str | None = None, writer: Any = None, sinks: Any = None,
                 optimizer: torch.optim.Optimizer | None = None, strict: bool = False,
                 functional: bool | None = None, measure_at_attach: bool = True,
                 state: Mapping[str, Any] | None = None,
                 probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE, overhead: float | str | None = "auto"
                 ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
        if logdir is not None and writer is not None:
            raise ValueError("attach: give logdir= or writer=, not both (with a writer, everything goes to "
                             "writer.get_logdir())")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach(optimizer=...) must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(strict, bool):
            raise TypeError(f"attach(strict=...) must be True or False, got {strict!r}")
        inputs.check_output_option(output)
        if probe_batch_size is not None and (isinstance(probe_batch_size, bool) or not isinstance(
                probe_batch_size, int) or probe_batch_size < 1):
            raise ValueError(f"attach(probe_batch_size=...) must be a positive int or None, got {probe_batch_size!r}")
        self.probe_batch_size = probe_batch_size
        self._overhead_auto = isinstance(overhead, str) and overhead == "auto"
        if not self._overhead_auto and overhead is not None and (
                isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead < 1):
            raise ValueError(f"attach(overhead=...) must be 'auto', None or a fraction of training time in (0, 1), "
                             f"got {overhead!r}")
        self.overhead = AUTO_OVERHEAD if self._overhead_auto else None if overhead is None else float(overhead)
        self._spent: dict[str, float] = {}
        self._train_seconds, self._train_steps, self._last_step_at = 0.0, 0, None
        self._cost: dict[str, float] = {}
        self.model = model
        self.module = unwrap(model)
        self.strict = strict
        self.output_spec = output
        self.rank, self.world_size = distributed.rank_and_world()
        self.sharded = distributed.is_sharded(self.module)
        self.logdir = str(logdir) if logdir is not None else (writer.get_logdir() if writer is not None else None)
        param = next(self.module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.x, self.y = self._prepare_probe_data(probe_data, label_key)
        if self.sharded and self.world_size > 1:  # every rank runs the probe pass: on rank 0's batch
            self.x, self.y, replaced = distributed.same_probe_batch(self.x, self.y, self.device)
            if replaced and self.rank == 0:
                warnings.warn("probe_data differs between the ranks of this sharded model; every rank uses rank "
                              "0's probe batch", ProbesNoticeWarning, stacklevel=3)
        self.entries = parse_probes(probes)
        self.probes: dict[str, Probe] = dict(self.entries)
        self.schedules: dict[str, Schedule] = {n: as_schedule(p.every, who=f"probe {n!r}") for n, p in self.entries}
        self._given_cadence = {n for n, p in self.entries if "every" in vars(p)}  # set on the instance: given
        self.passive = [n for n, p in self.entries if p.passive]
        self.active = [n for n, p in self.entries if not p.passive]
        for name in self.active:
            if self.probes[name].needs_probe_data and self.x is None:
                raise ValueError(f"probe {name!r} runs on a fixed probe batch: pass probe_data=(x, y) to attach")
        self._sink_spec = parse_sinks(sinks, logdir, writer) if self.rank == 0 else []
        self._writer, self.sinks = writer, []
        self.failures: dict[str, str] = {}
        self._step = 0
        self._measured_at: dict[str, int] = {}
        self._observers: dict[str, list[tuple[str, Probe]]] = {}
        self._pending: list[tuple[str, list[Record], int]] = []
        self._notices: set[tuple[str, str]] = set()
        self._forwards = 0
        self._forwards_at_flush: dict[str, int] = dict.fromkeys(self.passive, 0)
        self._closed = False
        self._opt_handle: Any = None
        extra = tuple({t for p in self.probes.values() for t in getattr(p, "site_types", ())})
        classes, names = plugins.registry.activation_types()
        self.capture = Capture(self.module, extra_sites=extra + classes, functional=functional, extra_names=names)
        try:
            self._setup(optimizer, measure_at_attach and state is None)
            if state is not None:
                self.load_state_dict(state)
            for spec in self._sink_spec:  # files and writers only once everything else has worked
                self.sinks.append(spec if isinstance(spec, Sink) else self._make_sink(*spec))
        except BaseException:
            self._teardown()
            raise

    # -- set-up ---------------------------------------------------------------------
    def _prepare_probe_data(self, probe_data: Any, label_key: str | None) -> tuple[Any, Any]:
        """Split, move to the model's device, cast floating inputs to its dtype, and check the probe batch."""
        x, y = inputs.split_probe_data(probe_data, label_key)
        if x is None:
            return None, None
        dtype = inputs.model_dtype(self.module)

        def to_model(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

        x = inputs.map_tensors(x, to_model)
        y = y.to(self.device) if isinstance(y, torch.Tensor) else (torch.as_tensor(y, device=self.device)
                                                                  if y is not None else None)
        n = inputs.sample_count(x)
        if n == 0:
            raise ValueError("probe_data: the probe batch is empty (0 samples)")
        for where, t in inputs.iter_tensors(x):
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"probe_data: {where} has {bad} NaN or infinite values; the probe batch must be "
                                 "finite")
        if y is not None:
            if y.ndim == 0 or y.shape[0] != n:
                raise ValueError(f"probe_data: x has {n} samples but y has shape {tuple(y.shape)}")
            if y.is_floating_point() and not torch.isfinite(y).all():
                raise ValueError("probe_data: y has NaN or infinite values")
        return x, y

    def _setup(self, optimizer: Any, measure_now: bool) -> None:
        context = Context(self.module, self.x, self.y, self.logdir, self.device, self.output_spec)
        failed: tuple[str, Exception] | None = None
        for name, probe in self.probes.items():
            if self.sharded and not getattr(probe, "supports_sharding", True):
                self._switch_off(name, f"probe {name!r} needs direct access to whole parameters, which a sharded "
                                       "(FSDP) model does not give; it is switched off on every rank")
                continue
            try:
                probe.setup(context)
            except Exception as exc:
                failed = (name, exc)
                break
        if self.sharded and self.world_size > 1 and distributed.broadcast_flag(failed is not None, self.device) \
                and failed is None:  # the other ranks must not go on into a probe pass that rank skips
            raise RuntimeError("attach failed on another rank of this sharded model (a probe's setup raised there; "
                               "that rank's error says which)")
        if failed is not None:
            raise named(failed[1], failed[0]) from failed[1]
        if self.passive:
            self.capture.on_forward = self._on_training_forward
            self.capture.install_passive(self._observe)
            self._check_module_sites()
        if optimizer is not None:
            self._opt_handle = optimizer.register_step_post_hook(_OptimizerStep(self))
        if self.active and measure_now:
            self._measure(self.active, pending=True)

    def _make_sink(self, name: str, cls: type) -> Sink:
        if name == "tensorboard" or cls is plugins.sink_class("tensorboard"):
            return cls(logdir=None if self._writer is not None else self.logdir, writer=self._writer)
        return cls()

    def _switch_off(self, name: str, message: str) -> None:
        self.failures[name] = message  # every rank switches it off; one message (rank 0) says so
        self._notice(name, "off", message)

    def _teardown(self) -> None:
        self.capture.remove()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None

    def _notice(self, name: str, key: str, message: str) -> None:
        if (name, key) in self._notices or self.rank != 0:
            return
        self._notices.add((name, key))
        log.warning(message)
        warnings.warn(message, ProbesNoticeWarning, stacklevel=4)

    def _check_module_sites(self) -> None:
        """At attach: a passive probe that wants none of the model's activation modules is told so once (functional
        calls such as ``F.relu`` inside ``forward`` are seen only at the first training forward, and still count)."""
        sites = self.capture.module_sites()
        if sites:
            self._notice_no_site(sites, "activation module", "; it will write nothing unless forward calls F.relu "
                                                              "or the like")

    def _on_training_forward(self, sites: list[Site]) -> None:
        self._forwards += 1
        if self._forwards == 1:
            self._notice_no_site(sites, "site", "; it will write nothing")

    def _notice_no_site(self, sites: list[Site], what: str, consequence: str) -> None:
        kinds = Counter(s.kind for s in sites)
        found = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
        for name in self.passive:
            if not any(self.probes[name].wants(s) for s in sites):
                self._notice(name, "no-site", f"probe {name!r} observes no {what} of this model: it counts "
                             f"ReLU-family activations and the model has {found}{consequence}")

    # -- public ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    @property
    def global_step(self) -> int:
        return self._step

    @property
    def memory(self) -> MemorySink:
        """The first memory sink (``sinks=["memory"]``, or the default without a logdir)."""
        self._release()
        for s in self.sinks:
            if isinstance(s, MemorySink):
                return s
        raise AttributeError("this session has no memory sink; attach with sinks=['memory', ...]")

    def enabled(self, name: str) -> bool:
        return name in self.probes and name not in self.failures

    def step(self, n: int = 1) -> None:
        """Advance the step counter by ``n``; flush/measure the probes that fall due at each step."""
        self._check_open("step")
        self._release()
        for _ in range(n):
            self._move_to(self._step + 1)

    def advance_to(self, step: int) -> None:
        """Jump to ``step`` and run what falls due at that step only (integrations that follow a trainer)."""
        self._check_open("advance_to")
        self._release()
        if step != self._step:
            self._move_to(int(step))

    def _move_to(self, step: int) -> None:
        """Set the counter to ``step`` and run what falls due there; under an overhead budget, the time since the
        last call (training, the probe work excluded) counts for the steps moved forward."""
        if self.overhead is not None and self._last_step_at is not None and step > self._step:
            self._train_seconds += time.perf_counter() - self._last_step_at
            self._train_steps += step - self._step
        self._step = step
        self._run_due()
        if self.overhead is not None:
            self._last_step_at = time.perf_counter()

    def set_step(self, step: int) -> None:
        """Jump the counter to ``step``, forward or backward; nothing is measured or flushed for the steps between."""
        self._check_open("set_step")
        self._release()
        self._step = int(step)

    def measure(self, names: Iterable[str] | None = None) -> None:
        """Measure the given (default: all) active probes now, at the current step."""
        self._check_open("measure")
        self._release()
        chosen = self.active if names is None else [n for n in names if n in self.active]
        self._measure([n for n in chosen if self.enabled(n)])

    def flush(self) -> None:
        """Write what passive probes accumulated so far and flush the sinks."""
        self._check_open("flush")
        self._release()
        self._flush(self._flushable())
        for s in self.sinks:
            s.flush()

    def detach(self) -> None:
        """Remove every hook; the model is left exactly as it was (``close()`` does this too)."""
        self._teardown()
        for sink in self.sinks:
            sink.flush()

    def close(self, _during_error: bool = False) -> None:
        """Flush passive probes, write a last measurement, remove hooks, close the sinks. Harmless twice."""
        if self._closed:
            return
        strict = self.strict
        if _during_error:
            self.strict = False  # the user's exception wins; a probe error here is only reported
        try:
            self._release()
            self._flush(self._flushable())
            stale = [n for n in self.active if self._measured_at.get(n) != self._step and self.enabled(n)]
            if stale:
                self._measure(stale)
        finally:
            self.strict = strict
            self._teardown()
            for s in self.sinks:
                s.close()
            self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_during_error=exc_type is not None)

    def state_dict(self) -> dict[str, Any]:
        """Step counter and probe state, for a checkpoint (``torch.save`` it with the model)."""
        self._check_open("state_dict")
        return {"step": self._step, "probes": {n: p.state_dict() for n, p in self.probes.items()},
                "failures": dict(self.failures)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the step and probe state. Right after ``attach`` this also drops the held-back
        at-attach measurement, so a resumed run writes no second step-0 point."""
        self._check_open("load_state_dict")
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError("load_state_dict: expected what Session.state_dict() returned (a dict with 'step')")
        self._pending = []
        self._step = int(state["step"])
        self._measured_at = dict.fromkeys(self.active, self._step)
        for name, sub in state.get("probes", {}).items():
            if name in self.probes:
                self.probes[name].load_state_dict(sub)

    # -- internals --------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ProbesClosedError(f"Session.{what}(): this probes session is closed; attach again to measure more")

    def _release(self) -> None:
        """Write the held-back at-attach records."""
        if self._pending:
            pending, self._pending = self._pending, []
            for _name, records, step in pending:
                self._emit(records, step)

    def _run_due(self) -> None:
        s = self._step
        due_passive = [p for p in self._flushable() if self.schedules[p](s)]
        if due_passive:
            self._flush(due_passive, scheduled=True)
        due_active = [p for p in self.active if self.enabled(p) and self.schedules[p](s)]
        if due_active:
            self._measure(due_active)
            if self.overhead is not None:
                self._space_out(due_active)

    def _space_out(self, names: list[str]) -> None:
        """Widen ``every(k)`` cadences so that the active probes together cost at most ``overhead`` of the
        training time, an equal share each.

        The new ``k`` is rounded up to 1, 2 or 5 times a power of ten. With ``overhead="auto"`` only probes at
        their default cadence are widened, and only once they have spent ``AUTO_GRACE_SECONDS``. Under a sharded
        model every rank runs the probe pass, so the ranks take the widest ``k`` of any rank (one all-reduce).
        """
        per_step = self._train_seconds / self._train_steps if self._train_steps else 0.0
        budget = self.overhead / max(1, sum(self.enabled(n) for n in self.active))  # an equal share per probe
        proposals: dict[str, int] = {}
        for name in names:
            schedule, cost = self.schedules[name], self._cost.get(name)
            if not isinstance(schedule, every):
                continue
            if self._overhead_auto and (name in self._given_cadence
                                        or self._spent.get(name, 0.0) < AUTO_GRACE_SECONDS):
                continue
            if cost is not None and per_step > 0 and cost / (schedule.k * per_step) > budget:
                proposals[name] = _round_up_125(max(schedule.k + 1, math.ceil(cost / (budget * per_step))))
        if self.sharded and self.world_size > 1:
            agreed, _ = distributed._max_and_min([proposals.get(n, 0) for n in names], self.device)
            proposals = {n: k for n, k in zip(names, agreed) if k > 0}
        for name, k in proposals.items():
            old, cost = self.schedules[name], self._cost.get(name)
            self.schedules[name] = every(k)
            share = f"{cost / (old.k * per_step):.0%}" if cost is not None and per_step > 0 else "too much"
            timing = (f"takes {cost * 1e3:.3g} ms per measurement against {per_step * 1e3:.3g} ms per training step"
                      if cost is not None and per_step > 0 else "is costly on another rank")
            how = ("at its default cadence; give it every=... to keep a cadence, or attach(overhead=None)"
                   if self._overhead_auto else f"overhead={self.overhead:g}")
            self._notice(name, "overhead", f"probe {name!r} {timing}: measuring every {old.k} steps would cost "
                         f"{share} of training (its share is {budget:.1%}: {self.overhead:.0%} for all active probes, "
                         f"{how}); it now measures every {k} steps")

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

    def _check_records(self, name: str, records: Any) -> list[Record]:
        records = list(records or [])
        for r in records:
            if not isinstance(r, Record.__args__):  # type: ignore[attr-defined]
                raise TypeError(f"probe {name!r} returned {r!r}, not a Scalar/Histogram/Image record")
            if not (r.tag == name or r.tag.startswith(name + "/")):
                raise ValueError(f"probe {name!r} returned tag {r.tag!r}: tags must start with '{name}/'")
        return records

    def _write(self, name: str, records: Any, pending: bool = False) -> None:
        records = self._check_records(name, records)
        if not records or self.rank != 0:
            return
        if pending:
            self._pending.append((name, records, self._step))
        else:
            self._emit(records, self._step)

    def _emit(self, records: list[Record], step: int) -> None:
        if not self.sinks:
            return
        records = to_host(records)
        for sink in self.sinks:
            sink.write(records, step)

    def _flushable(self) -> list[str]:
        """Passive probes to flush. Under DDP every rank takes part in every probe's collective,
        also for a probe switched off on this rank only, so that the ranks stay in step and
        the others learn of the failure (and switch the probe off too) instead of hanging."""
        if self.world_size > 1:
            return list(self.passive)
        return [p for p in self.passive if self.enabled(p)]

    def _flush(self, names: list[str], scheduled: bool = False) -> None:
        for name in names:
            probe = self.probes[name]
            if self.world_size > 1:
                outcome = distributed.reduce_states(probe, name in self.failures, self.device, self._step, self.rank)
                if not outcome.ok:
                    self._fail(name, outcome.reason)
                    continue
            if name in self.failures:
                continue
            if self._forwards == (self._forwards_at_flush.get(name, 0) if scheduled else 0):
                self._notice(name, "no-forward", f"probe {name!r} saw no training-mode forward before step "
                             f"{self._step}: passive probes count forwards while model.training is True "
                             "(call model.train() to count, or this is a window without training)")
            self._forwards_at_flush[name] = self._forwards
            try:
                probe.settle()
                self._write(name, probe.flush(self._step))
            except Exception as exc:  # noqa: BLE001
                self._fail(name, exc)
            finally:
                probe.reset_window()

    def _probe_pass(self, module: nn.Module, names: list[str]
                    ) -> tuple[torch.Tensor, dict[str, Activation], list[Any], bool]:
        """The probe batch through the model, in chunks of ``probe_batch_size``, keeping what the due probes need."""
        due = [self.probes[n] for n in names if self.probes[n].needs_sites]
        P = inputs.sample_count(self.x)
        chunk = self.probe_batch_size or P
        if chunk >= P:
            raw, activations, calls = self._forward(module, self.x, due)
            return self._select(raw), activations, calls, isinstance(raw, torch.Tensor)
        # chunked: every kept tensor goes straight into its place in one preallocated tensor per site
        output: torch.Tensor | None = None
        activations = {}
        raw_is_tensor = True
        for start in range(0, P, chunk):
            stop = min(start + chunk, P)
            raw, chunk_acts, calls = self._forward(module, inputs.take(self.x, slice(start, stop)), due)
            out = self._select(raw)
            raw_is_tensor = isinstance(raw, torch.Tensor)
            output = _place(output, out, "output", start, stop, P)
            for name, act in chunk_acts.items():
                whole = activations.get(name)
                activations[name] = Activation(act.site, _place(whole.pre if whole else None, act.pre, name, start,
                                                                stop, P),
                                               _place(whole.post if whole else None, act.post, name, start, stop, P))
            del raw, chunk_acts, out
        return output, activations, calls, raw_is_tensor

    def _forward(self, module: nn.Module, x: Any, due: list[Probe]) -> tuple[Any, dict[str, Activation], list[Any]]:
        """``module(x)`` without gradients, recording what the due probes keep (nothing when none reads sites)."""
        with torch.no_grad():
            if not due:
                return inputs.call_model(module, x), {}, []
            with self.capture.recording(keep=_keeper(due)) as rec:
                raw = inputs.call_model(module, x)
        return raw, rec.activations, rec.calls

    def _select(self, raw: Any) -> torch.Tensor:
        try:
            return inputs.select_output(raw, self.output_spec)
        except (TypeError, ValueError) as exc:
            raise _OutputError(str(exc)) from exc

    def _measure(self, names: list[str], pending: bool = False) -> None:
        """Measure ``names`` (those not switched off). For a sharded model every rank measures, and the ranks
        then agree on which probes failed anywhere, so that the next pass runs the same probes on every rank."""
        names = [n for n in names if n not in self.failures]  # e.g. switched off at attach (supports_sharding)
        if not self.sharded or not names:
            return self._measure_here(names, pending)
        sharded_before, before, error = distributed.sharded_now(self.module), set(self.failures), None
        try:
            self._measure_here(names, pending)
        except Exception as exc:  # strict=True re-raised a probe's error: the other ranks must still learn of it
            error = exc
        distributed.reshard(sharded_before)  # FSDP2 keeps the root gathered after a forward without backward
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        here = {n for n in names if n in self.failures and n not in before} | (set(names) if error else set())
        elsewhere = distributed.failed_anywhere(names, here, self.device) - here
        for name in [n for n in names if n in elsewhere]:
            self._fail(name, RuntimeError(f"probe {name!r} raised on another rank during the probe pass at step "
                                          f"{self._step}; it is switched off on every rank, so that all ranks "
                                          "keep running the same probe passes"))
        if error is not None:
            raise error

    def _measure_here(self, names: list[str], pending: bool = False) -> None:
        for n in names:
            self._measured_at[n] = self._step
        if not names or (self.rank != 0 and not self.sharded):
            return
        module = self.module
        modes = [(m, m.training) for m in module.modules()]
        rng = _rng_state()
        started = time.perf_counter()
        try:
            module.eval()
            output, activations, calls = None, {}, []
            raw_is_tensor = True
            if self.x is not None:
                try:
                    output, activations, calls, raw_is_tensor = self._probe_pass(module, names)
                except _OutputError as exc:
                    if pending:
                        raise exc.__cause__ from None
                    for name in names:
                        self._fail(name, exc.__cause__)
                    return
                except Exception as exc:  # noqa: BLE001 - the pass itself failed: every due probe is off
                    for name in names:
                        self._fail(name, exc)
                    return
            batch = ProbeBatch(module, self.x, self.y, output, activations, self._step, self.logdir, calls,
                               self.output_spec, tensor_output=raw_is_tensor, writes=self.rank == 0,
                               chunk_size=self.probe_batch_size)
            shared = (time.perf_counter() - started) / len(names)  # the pass, shared by the due probes
            for name in names:
                t0 = time.perf_counter()
                try:
                    self._write(name, self.probes[name].measure(batch), pending=pending)
                except Exception as exc:  # noqa: BLE001
                    self._fail(name, exc)
                self._cost[name] = shared + time.perf_counter() - t0
                self._spent[name] = self._spent.get(name, 0.0) + self._cost[name]
        finally:
            _restore_modes(module, modes)
            _set_rng_state(rng)


class _OutputError(Exception):
    """The model's output cannot be reduced to one tensor (the cause says why)."""


def _keeper(due: list[Probe]) -> Any:
    """``site -> what to keep``: the union of what the due probes that read the site need of it."""
    cache: dict[str, frozenset[str]] = {}

    def keep(site: Site) -> frozenset[str]:
        want = cache.get(site.name)
        if want is None:
            want = frozenset().union(*[p.site_values for p in due if p.wants_site(site)])
            cache[site.name] = want
        return want

    return keep


def _place(whole: torch.Tensor | None, part: torch.Tensor | None, site_name: str, start: int, stop: int,
           total: int) -> torch.Tensor | None:
    """Copy the rows ``start:stop`` of a chunked pass into ``whole`` (allocated at the first chunk)."""
    if part is None:
        return None
    if part.ndim == 0 or part.shape[0] != stop - start:
        raise ValueError(f"probe_batch_size: site {site_name!r} has shape {tuple(part.shape)} for a chunk of "
                         f"{stop - start} samples; chunked probe passes need the samples along the first axis of "
                         "every site (pass probe_batch_size=None to run the probe batch in one pass)")
    if whole is None:
        whole = torch.empty((total, *part.shape[1:]), dtype=part.dtype, device=part.device)
    whole[start:stop] = part
    return whole


class _OptimizerStep:
    """The optimizer's step hook: steps the session. A copied or pickled optimizer carries no session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.session.closed:
            self.session.step()

    def __reduce__(self) -> Any:
        return (_noop_step_hook, ())

    def __deepcopy__(self, memo: Any) -> Any:
        return _noop_step_hook()


class _noop_step_hook:  # noqa: N801
    def __call__(self, *args: Any) -> None:
        return None


def attach(model: nn.Module, probes: Any, *, probe_data: Any = None, label_key: str | None = None,
           output: Any = None, logdir: str | None = None, writer: Any = None, sinks: Any = None,
           optimizer: torch.optim.Optimizer | None = None, strict: bool = False, functional: bool | None = None,
           measure_at_attach: bool = True, state: Mapping[str, Any] | None = None,
           probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE, overhead: float | str | None = "auto"
           ) -> Session:
    """Attach probes to ``model`` and return the ``Session`` (or raise and leave nothing behind).

    Args:
        model: any ``nn.Module`` (DDP, ``torch.compile`` and FSDP2-sharded models too).
        probes: a list of names, or ``{name: options}``; ``every`` (an int or a schedule from
            ``probes.schedules``) sets a probe's cadence.
        probe_data: the fixed probe batch of active probes: ``(x, y)`` or ``x``, with ``x`` a tensor
            (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``); or a dict batch with the
            labels inside under ``label_key``. The samples are the leading dimension of every tensor. Tensors
            move to the model's device; floating ones are cast to the model's parameter dtype.
        label_key: the key of the labels in a dict ``probe_data`` (Hugging Face batches: ``"labels"``).
        output: which tensor of what the model returns the probes use: a key or attribute name, or a callable
            ``output -> tensor`` (default: a tensor itself, ``logits`` of a ModelOutput/dict, the first tensor
            of a tuple).
        logdir / writer: TensorBoard output (one or the other; a user's ``SummaryWriter`` is shared, not closed).
        sinks: more sinks by name or instance (default ``memory`` when there is no logdir).
        optimizer: step automatically after every ``optimizer.step()``.
        strict: re-raise a probe's error instead of switching the probe off.
        functional: catch functional activations (``F.relu`` in ``forward``); default auto.
        measure_at_attach: measure the active probes once now, the initialization (step 0).
        state: a ``Session.state_dict()`` to resume from (no step-0 measurement is written).
        probe_batch_size: the probe pass runs the probe batch in chunks of this many samples, keeping of each
            site only what the due probes read (gates as bits for ``patterns``); None: one pass.
        overhead: a fraction of training time (e.g. 0.05) for the active probes together: a probe whose
            measurements would cost more than its equal share at its ``every(k)`` cadence measures less often
            (``k`` rounded up to 1, 2, 5 x 10^n), timed on its own measurements; said once. "auto" (default): 10%,
            for probes left at their default cadence only, once they have spent 2 s measuring; a cadence you give
            is kept. None: every cadence exactly as it is.

    Returns:
        The ``Session``: ``step()``, ``close()`` (or use it as a context manager), ``state_dict()``.
    """
    return Session(model, probes, probe_data=probe_data, label_key=label_key, output=output, logdir=logdir,
                   writer=writer, sinks=sinks, optimizer=optimizer, strict=strict, functional=functional,
                   measure_at_attach=measure_at_attach, state=state, probe_batch_size=probe_batch_size,
                   overhead=overhead)
