"""``Session``: the lifecycle and the public methods; the work is done by the engine's parts (see ``probes.engine``
for them and for the lifecycle's promises)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from probes import plugins
from probes.engine import distributed
from probes.engine.cadence import Cadence, OptimizerStep, rank_agreement
from probes.engine.capture import Capture, unwrap
from probes.engine.context import isolated
from probes.engine.failures import (
    Failures,
    ProbeFailedWarning,
    ProbesClosedError,
    ProbesNoticeWarning,
    SinkFailedWarning,
)
from probes.engine.measure import ActiveProbes
from probes.engine.output import Output, check_records
from probes.engine.passive import PassiveProbes
from probes.engine.probe_pass import ProbeData, ProbePass, check_model, model_placement
from probes.engine.scaler import SkippedSteps
from probes.engine.spec import AUTO, Options, declare_charts, make_sinks, parse_probes, parse_sinks, setup_probes
from probes.probe import Context, Probe
from probes.records import Scalar
from probes.sinks.memory import MemorySink

__all__ = ["Session", "ProbesClosedError", "ProbeFailedWarning", "ProbesNoticeWarning", "SinkFailedWarning"]


class Session:
    """Probes attached to one model. Use ``step()`` (or give ``optimizer``), then ``close()``.

    Args:
        model: the model; probes: the probe spec; options: ``attach``'s keyword options (documented there).
    """

    def __init__(self, model: nn.Module, probes: Any, options: Options) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
        o = self.options = options
        self.model, self.module = model, unwrap(model)
        self.rank, self.world_size = distributed.rank_and_world()
        self.sharded = distributed.is_sharded(self.module)
        self.logdir = o.log_to
        check_model(self.module)
        self.device = model_placement(self.module)[0]
        self.data = ProbeData.from_probe_data(o.probe_data, o.label_key, self.module)
        self.probes: dict[str, Probe] = dict(parse_probes(probes))
        #: ranks measure together: a sharded model (every forward all-gathers), or a probe splitting the probe batch
        #: over the ranks (``sharding="per_sample"``, under DDP too); then every rank runs those probe passes on rank
        #: 0's batch, and the ranks agree on cadences, on setup errors and on failures
        self.collective = self.world_size > 1 and (
            self.sharded or any(p.sharding == "per_sample" for p in self.probes.values() if not p.passive)
        )
        if self.collective:
            self.data.same_on_every_rank(self.device, self.rank)
        self._failures = Failures(o.strict, self.rank)
        self.auto = isinstance(probes, str) and probes == AUTO  # leave out what does not apply, saying why
        for name in [n for n, p in self.probes.items() if not p.passive and p.needs_probe_data]:
            if not self.data.present and not self.auto:
                raise ValueError(f"probe {name!r} runs on a fixed probe batch: pass probe_data=(x, y) to attach")
            if not self.data.present:
                self._leave_out(name, "it measures on a probe batch; pass probe_data=(x, y)")
        self.cadence = Cadence(
            self.probes, o.overhead, self._failures, rank_agreement(self.device) if self.collective else None
        )
        sink_spec = parse_sinks(o.sinks, o.logdir, o.writer) if self.rank == 0 else []
        self._output, self._step, self._closed, self._opt_handle = Output(self._failures), 0, False, None
        self._scaler: SkippedSteps | None = None
        extra = tuple({t for p in self.probes.values() for t in p.site_types})
        classes, names = plugins.registry.activation_types()
        self.capture = Capture(
            self.module,
            extra_sites=extra,
            functional=o.functional,
            extra_names=names,
            mask_key=o.mask,
            activation_types=classes,
        )
        self.capture.on_notice = lambda key, message: self._failures.notice("probes", key, message)
        self._passive = PassiveProbes(
            {n: self.probes[n] for n in self.passive},
            self._failures,
            self._write,
            lambda: self._step,
            self.world_size,
            self.rank,
            self.device,
        )
        probe_pass = ProbePass(self.module, self.capture, o.output, o.probe_batch_size, o.norm_stats)
        self._active = ActiveProbes(
            {n: self.probes[n] for n in self.active},
            self.data,
            probe_pass,
            self._failures,
            self.cadence,
            self._write,
            self.logdir,
            self.rank,
            self.world_size,
            self.sharded,
            self.device,
            o.mask,
            o.label_shift,
            self.collective,
        )
        self._active.on_attach_error = self._leave_out if self.auto else None
        try:
            with isolated():  # attach inside autocast or no_grad measures as at top level
                self._setup(o.optimizer, o.measure_at_attach and o.state is None)
            if o.state is not None:
                self.load_state_dict(o.state)
            self._output.sinks = make_sinks(sink_spec, self.logdir, o.writer)  # files only once all else worked
            declare_charts(self._output.sinks, self.probes)
        except BaseException:
            self._teardown()
            raise

    def _setup(self, optimizer: Any, measure_now: bool) -> None:
        context = self._context()
        setup_probes(
            self.probes,
            context,
            self._failures,
            self._leave_out if self.auto else None,
            self.sharded,
            self.device if self.collective else None,
        )
        self._passive.install(self.capture, notice=not self.auto)  # auto: only the leave-out line
        if optimizer is not None:
            self._opt_handle = optimizer.register_step_post_hook(OptimizerStep(self))
        if self.options.grad_scaler is not None:
            self._scaler = SkippedSteps(self.options.grad_scaler, optimizer, lambda: self._step, self._write_skipped)
        if self.active and measure_now:
            self._active.measure(self.active, self._step, at_attach=True)
        elif self.active:
            self._active.validate(self._step)
        if self.auto:  # passive probes: among the module sites, and the functional ones the probe pass met
            for name, why in self._passive.unobserved(self.capture.module_sites() + self.capture.seen_sites()):
                self._leave_out(name, why)

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
        with isolated():
            self._use("step")
            for _ in range(n):
                self._move_to(self._step + 1)

    def advance_to(self, step: int) -> None:
        """Jump to a step and run what falls due at that step only (integrations that follow a trainer).

        Args:
            step: the trainer's step.
        """
        with isolated():
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
        self._follow_model()
        chosen = self.active if names is None else [n for n in names if n in self.active]
        self._active.measure([n for n in chosen if self.enabled(n)], self._step)

    def flush(self) -> None:
        """Write what passive probes accumulated so far and flush the sinks."""
        with isolated():
            self._use("flush")
            self._passive.flush(self._passive.flushable(), self._step)
            self._output.flush(self._step)

    def detach(self) -> None:
        """Remove every hook; the model is left exactly as it was (``close()`` does this too)."""
        self._teardown()
        self._output.flush(self._step)

    def close(self, _during_error: bool = False) -> None:
        """Flush passive probes, write a last measurement, remove hooks, close the sinks. Harmless twice.

        A sink that fails (a full disk) was reported and left the probes and the other sinks alone; ``close()``
        returns all the same, and with ``strict=True`` raises the error of a sink that failed in this close.

        Args:
            _during_error: the context manager closes on an exception: a probe's error is then only reported.
        """
        if self._closed:
            return
        strict, ended = self._failures.strict, False
        if _during_error:
            self._failures.strict = False  # the user's exception wins; a probe error here is only reported
        try:
            self._use("close")
            self._follow_model()
            self._passive.flush(self._passive.flushable(), self._step)
            self._active.measure([n for n in self._active.stale(self._step) if self.enabled(n)], self._step)
            if self._scaler is not None:
                self._scaler.flush()
            ended = True
        finally:
            self._failures.strict = strict
            self._teardown()
            self._closed = True
            # every sink closes, each on its own; a sink's error raises only under strict, and never over another
            self._output.close(self._step, strict=strict and ended and not _during_error)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_during_error=exc_type is not None)

    def state_dict(self) -> dict[str, Any]:
        """Step counter and probe state, for a checkpoint (``torch.save`` it with the model)."""
        self._use("state_dict", release=False)
        return {
            "step": self._step,
            "probes": {n: p.state_dict() for n, p in self.probes.items()},
            "failures": dict(self.failures),
        }

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
        due_active = self.cadence.due([n for n in self.active if self.enabled(n)], step)
        if due_passive or due_active:
            self._follow_model()
        if due_passive:
            self._passive.flush(due_passive, step, scheduled=True)
        if due_active:
            self._active.measure(due_active, step)
            self.cadence.space_out(due_active, sum(self.enabled(n) for n in self.active))
        self.cadence.rested()

    def _follow_model(self) -> None:
        """Modules added, replaced or removed since attach (or the last look): said once per change, the passive
        probes decide anew which sites they observe, and each active probe is set up again on the model as it is
        (one that no longer applies is switched off, its error naming the module)."""
        self.capture.check_structure()
        if self.capture.observing:
            self.capture.follow_dynamo()  # torch.compile first used after attach
        changes = self.capture.changes()
        if not changes:
            return
        for added, removed, replaced in changes:
            said = [
                f"{what} {', '.join(map(repr, paths))}"
                for what, paths in (
                    ("new site(s)", added),
                    ("replaced site(s)", replaced),
                    ("removed site(s)", removed),
                )
                if paths
            ]
            self._failures.notice(
                "probes",
                f"model-changed:{added}:{removed}:{replaced}",
                (
                    f"the model changed after attach ({'; '.join(said)}): sites follow the model, so new and replaced "
                    "sites are observed under their module paths from the first training forward after the change, "
                    "and removed ones are no longer written"
                ),
            )
        self._passive.sites_changed()
        context = self._context()
        with isolated():  # a setup may run the model (measure() and close() are not isolated as a whole)
            for name in [n for n in self.active if self.enabled(n)]:
                try:
                    self.probes[name].setup(context)
                except Exception as exc:  # noqa: BLE001 - the probe no longer applies to the model
                    self._failures.fail(
                        name,
                        RuntimeError(f"probe {name!r} no longer applies to the model as changed after attach: {exc}"),
                        self._step,
                    )

    def _context(self) -> Context:
        """What a probe's ``setup`` learns: the model, the probe batch as it is now, the session's settings."""
        x, y = self.data.current()
        spec = self._active.probe_pass.output_spec
        return Context(self.module, x, y, self.logdir, self.device, spec, optimizer=self.options.optimizer)

    def _write(self, name: str, records: Any, hold: bool = False) -> None:
        records = check_records(name, records)
        if self.rank == 0:
            self._output.write(records, self._step, hold)

    def _write_skipped(self, count: int) -> None:
        if self.rank == 0:
            self._output.write([Scalar("train/skipped_steps", count)], self._step)

    def _teardown(self) -> None:
        self.capture.remove()
        if self._scaler is not None:
            self._scaler.remove()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
