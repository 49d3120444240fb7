"""``Session``: the lifecycle and the public methods; the work is done by the engine's parts (``probes.engine``).

Lifecycle: ``attach`` either returns a working session or raises and leaves nothing behind (no hook, no writer, no
file). Everything knowable at attach raises there: options, the probe batch, a probe that cannot apply to this
model, labels that do not fit its outputs (the first measurement, or ``Probe.validate`` without one). The at-attach
measurement (step 0) is held back until the session is first used, so that ``load_state_dict`` right after
``attach`` (a resumed run) drops it instead of writing a second step-0 point. After ``close()`` every method but
``close()`` raises ``ProbesClosedError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from probes import plugins
from probes.engine import distributed
from probes.engine.cadence import Cadence, OptimizerStep, rank_agreement
from probes.engine.capture import Capture, unwrap
from probes.engine.failures import Failures, ProbeFailedWarning, ProbesClosedError, ProbesNoticeWarning
from probes.engine.measure import ActiveProbes
from probes.engine.output import Output, check_records
from probes.engine.passive import PassiveProbes
from probes.engine.probe_pass import ProbeData, ProbePass, model_placement
from probes.engine.spec import AUTO, check_attach_options, make_sinks, parse_probes, parse_sinks, setup_probes
from probes.probe import Context, Probe
from probes.sinks.memory import MemorySink

#: samples per chunk of the probe pass (a laptop holds the activations of this many CIFAR images in a ResNet)
DEFAULT_PROBE_BATCH_SIZE = 256

__all__ = ["Session", "ProbesClosedError", "ProbeFailedWarning", "ProbesNoticeWarning", "DEFAULT_PROBE_BATCH_SIZE"]


class Session:
    """Probes attached to one model. Use ``step()`` (or give ``optimizer``), then ``close()``.

    Args:
        model: the model; probes: the probe spec; the keyword options are ``attach``'s (documented there).
    """

    def __init__(self, model: nn.Module, probes: Any, *, probe_data: Any = None, label_key: str | None = None,
                 output: Any = None, logdir: str | None = None, writer: Any = None, sinks: Any = None,
                 optimizer: torch.optim.Optimizer | None = None, strict: bool = False,
                 functional: bool | None = None, measure_at_attach: bool = True,
                 state: Mapping[str, Any] | None = None,
                 probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE, overhead: float | str | None = "auto",
                 mask: str | None = "attention_mask", norm_stats: str = "running", label_shift: int = 0) -> None:
        check_attach_options(model, logdir, writer, optimizer, strict, output, probe_batch_size, mask, norm_stats,
                             label_shift)
        self.model, self.module = model, unwrap(model)
        self.rank, self.world_size = distributed.rank_and_world()
        self.sharded = distributed.is_sharded(self.module)
        self.logdir = str(logdir) if logdir is not None else (writer.get_logdir() if writer is not None else None)
        self.device = model_placement(self.module)[0]
        self.data = ProbeData.from_probe_data(probe_data, label_key, self.module)
        if self.sharded and self.world_size > 1:  # every rank runs the probe pass, on rank 0's batch
            self.data.same_on_every_rank(self.device, self.rank)
        self.probes: dict[str, Probe] = dict(parse_probes(probes))
        self._failures = Failures(strict, self.rank)
        self.auto = isinstance(probes, str) and probes == AUTO  # leave out what does not apply, saying why
        for name in [n for n, p in self.probes.items() if not p.passive and p.needs_probe_data]:
            if not self.data.present and not self.auto:
                raise ValueError(f"probe {name!r} runs on a fixed probe batch: pass probe_data=(x, y) to attach")
            if not self.data.present:
                self._leave_out(name, "it measures on a probe batch; pass probe_data=(x, y)")
        self.cadence = Cadence(self.probes, overhead, self._failures,
                               rank_agreement(self.device) if self.sharded and self.world_size > 1 else None)
        sink_spec = parse_sinks(sinks, logdir, writer) if self.rank == 0 else []
        self._output, self._step, self._closed, self._opt_handle = Output(), 0, False, None
        extra = tuple({t for p in self.probes.values() for t in p.site_types})
        classes, names = plugins.registry.activation_types()
        self.capture = Capture(self.module, extra_sites=extra + classes, functional=functional, extra_names=names,
                               mask_key=mask)
        self._passive = PassiveProbes({n: self.probes[n] for n in self.passive}, self._failures, self._write,
                                      lambda: self._step, self.world_size, self.rank, self.device)
        probe_pass = ProbePass(self.module, self.capture, output, probe_batch_size, norm_stats)
        self._active = ActiveProbes({n: self.probes[n] for n in self.active}, self.data, probe_pass, self._failures,
                                    self.cadence, self._write, self.logdir, self.rank, self.world_size, self.sharded,
                                    self.device, mask, label_shift)
        self._active.on_attach_error = self._leave_out if self.auto else None
        try:
            self._setup(optimizer, measure_at_attach and state is None)
            if state is not None:
                self.load_state_dict(state)
            self._output.sinks = make_sinks(sink_spec, self.logdir, writer)  # files only once all else worked
        except BaseException:
            self._teardown()
            raise

    def _setup(self, optimizer: Any, measure_now: bool) -> None:
        x, y = self.data.current()
        context = Context(self.module, x, y, self.logdir, self.device, self._active.probe_pass.output_spec)
        setup_probes(self.probes, context, self._failures, self._leave_out if self.auto else None, self.sharded,
                     self.device if self.sharded and self.world_size > 1 else None)
        self._passive.install(self.capture)
        if optimizer is not None:
            self._opt_handle = optimizer.register_step_post_hook(OptimizerStep(self))
        if self.active and measure_now:
            self._active.measure(self.active, self._step, at_attach=True)
        elif self.active:
            self._active.validate(self._step)
        if self.auto:  # passive probes: among the module sites, and the functional ones the probe pass met
            sites = self.capture.module_sites() + self.capture.seen_sites()
            kinds = ", ".join(sorted({s.kind for s in sites})) or "none"
            for name in [n for n in self.passive if not any(self.probes[n].wants(s) for s in sites)]:
                self._leave_out(name, f"no activation of this model is one it observes (the model has: {kinds})")

    def _leave_out(self, name: str, why: Any) -> None:
        """``attach(model, "auto")``: drop a probe that does not apply, saying why in one line."""
        for part in (self, getattr(self, "_active", None), getattr(self, "_passive", None)):
            if part is not None:
                part.probes.pop(name, None)
        reason = str(why).splitlines()[0] if str(why) else type(why).__name__
        self._failures.notice(name, "auto", f"attach('auto') leaves out probe {name!r}: {reason}")

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    @property
    def global_step(self) -> int:
        """The session's step counter."""
        return self._step

    @property
    def passive(self) -> list[str]:
        """Names of the passive probes."""
        return [n for n, p in self.probes.items() if p.passive]

    @property
    def active(self) -> list[str]:
        """Names of the active probes."""
        return [n for n, p in self.probes.items() if not p.passive]

    @property
    def failures(self) -> dict[str, str]:
        """Switched-off probes: name -> the traceback or reason."""
        return self._failures.failed

    @property
    def schedules(self) -> dict[str, Any]:
        """Each probe's cadence (a schedule), as the overhead budget has left it."""
        return self.cadence.schedules

    @property
    def sinks(self) -> list[Any]:
        """The sinks this session writes to (none on ranks other than 0)."""
        return self._output.sinks

    @property
    def x(self) -> Any:
        """The probe inputs as the model takes them now (its current device and dtype)."""
        return self.data.current()[0]

    @property
    def y(self) -> torch.Tensor | None:
        """The probe labels on the model's current device (None without labels)."""
        return self.data.current()[1]

    @property
    def memory(self) -> MemorySink:
        """The first memory sink (``sinks=["memory"]``, or the default without a logdir)."""
        self._output.release()
        for s in self.sinks:
            if isinstance(s, MemorySink):
                return s
        raise AttributeError("this session has no memory sink; attach with sinks=['memory', ...]")

    def enabled(self, name: str) -> bool:
        """Whether a probe is attached and not switched off.

        Args:
            name: the probe's name.
        """
        return name in self.probes and self._failures.enabled(name)

    def step(self, n: int = 1) -> None:
        """Advance the step counter; flush and measure the probes that fall due at each step.

        Args:
            n: how many steps to advance.
        """
        self._use("step")
        for _ in range(n):
            self._move_to(self._step + 1)

    def advance_to(self, step: int) -> None:
        """Jump to a step and run what falls due at that step only (integrations that follow a trainer).

        Args:
            step: the trainer's step.
        """
        self._use("advance_to")
        if step != self._step:
            self._move_to(int(step))

    def set_step(self, step: int) -> None:
        """Set the counter, forward or backward; nothing is measured or flushed for the steps between.

        Args:
            step: the new step.
        """
        self._use("set_step")
        self._step = int(step)

    def measure(self, names: Iterable[str] | None = None) -> None:
        """Measure active probes now, at the current step.

        Args:
            names: the probes to measure (default: every active probe).
        """
        self._use("measure")
        chosen = self.active if names is None else [n for n in names if n in self.active]
        self._active.measure([n for n in chosen if self.enabled(n)], self._step)

    def flush(self) -> None:
        """Write what passive probes accumulated so far and flush the sinks."""
        self._use("flush")
        self._passive.flush(self._passive.flushable(), self._step)
        self._output.flush()

    def detach(self) -> None:
        """Remove every hook; the model is left exactly as it was (``close()`` does this too)."""
        self._teardown()
        self._output.flush()

    def close(self, _during_error: bool = False) -> None:
        """Flush passive probes, write a last measurement, remove hooks, close the sinks. Harmless twice.

        Args:
            _during_error: the context manager closes on an exception: a probe's error is then only reported.
        """
        if self._closed:
            return
        strict = self._failures.strict
        if _during_error:
            self._failures.strict = False  # the user's exception wins; a probe error here is only reported
        try:
            self._use("close")
            self._passive.flush(self._passive.flushable(), self._step)
            measured = self._active.measured_at
            stale = [n for n in self.active if measured.get(n) != self._step and self.enabled(n)]
            if stale:
                self._active.measure(stale, self._step)
        finally:
            self._failures.strict = strict
            self._teardown()
            self._output.close()
            self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_during_error=exc_type is not None)

    def state_dict(self) -> dict[str, Any]:
        """Step counter and probe state, for a checkpoint (``torch.save`` it with the model)."""
        self._use("state_dict", release=False)
        return {"step": self._step, "probes": {n: p.state_dict() for n, p in self.probes.items()},
                "failures": dict(self.failures)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the step and probe state. Right after ``attach`` this also drops the held-back
        at-attach measurement, so a resumed run writes no second step-0 point.

        Args:
            state: what ``state_dict()`` returned.

        Raises:
            ValueError: ``state`` is not a session's state.
        """
        self._use("load_state_dict", release=False)
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError("load_state_dict: expected what Session.state_dict() returned (a dict with 'step')")
        self._output.drop_pending()
        self._step = int(state["step"])
        self._active.measured_at = dict.fromkeys(self.active, self._step)
        for name, sub in state.get("probes", {}).items():
            if name in self.probes:
                self.probes[name].load_state_dict(sub)

    def _use(self, what: str, release: bool = True) -> None:
        """Every public method starts here: a closed session raises; a forward that an interrupt left unfinished
        is forgotten; held-back records are written."""
        if self._closed:
            raise ProbesClosedError(f"Session.{what}(): this probes session is closed; attach again to measure more")
        self.capture.recover()
        if release:
            self._output.release()

    def _move_to(self, step: int) -> None:
        self.cadence.moved(self._step, step)
        self._step = step
        due_passive = self.cadence.due(self._passive.flushable(), step)
        if due_passive:
            self._passive.flush(due_passive, step, scheduled=True)
        due_active = self.cadence.due([n for n in self.active if self.enabled(n)], step)
        if due_active:
            self._active.measure(due_active, step)
            self.cadence.space_out(due_active, sum(self.enabled(n) for n in self.active))
        self.cadence.rested()

    def _write(self, name: str, records: Any, hold: bool = False) -> None:
        records = check_records(name, records)
        if self.rank == 0:
            self._output.write(records, self._step, hold)

    def _teardown(self) -> None:
        self.capture.remove()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
