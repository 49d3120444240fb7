"""``Session``: the lifecycle and the public methods; the work is done by the engine's parts (see ``probes.engine``
for them and for the lifecycle's promises)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

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
from probes.engine.measured import Measured
from probes.engine.output import Output
from probes.engine.passive import PassiveProbes
from probes.engine.probe_pass import ProbeData, ProbePass, check_model, model_placement
from probes.engine.probeset import ProbeSet
from probes.engine.resume import check_state, measures_at_attach
from probes.engine.run import Run
from probes.engine.scaler import SkippedSteps
from probes.engine.spec import Catalog, Options, ProbeSpec, declare_charts, setup_probes
from probes.legacy import uses_setup
from probes.probe import Context
from probes.records import Scalar

__all__ = ["Session", "ProbesClosedError", "ProbeFailedWarning", "ProbesNoticeWarning", "SinkFailedWarning"]


class Session:
    """Probes attached to one model. Use ``step()`` (or give ``optimizer``), then ``close()``.

    The parts are wired by data: one run context (``self.run``: ranks, device, sharding, logdir, mask key, label
    shift, strictness and the step clock) and one probe set (``self.probes``), both shared by reference by the
    active and passive drivers and the output; measurements return their records and seconds, which the session
    hands to the output and the cadence.

    Args:
        model: the model; probes: the probe spec (or a parsed ``ProbeSpec``); options: ``attach``'s keyword
            options (documented there).
        sinks: how the sinks are planned: ``sinks(spec, logdir, writer, sink_class)`` checks ``attach``'s sink
            spec and returns a plan whose ``build(run)`` makes them once all else worked (``plan_sinks`` of
            ``probes.sinks``; the engine names no sink); called on rank 0 only. None: no sinks.
        catalog: where probe and sink names, and the activation types plugins add, are looked up
            (``probes.plugins.registry``, handed in by ``attach``: the engine imports no registry).
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Any,
        options: Options,
        sinks: Callable[..., Any] | None = None,
        *,
        catalog: Catalog,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
        o = self.options = options
        self.model, self.module = model, unwrap(model)
        check_model(self.module)
        self.data = ProbeData.from_probe_data(o.probe_data, o.label_key, self.module)
        self.catalog = catalog
        spec = ProbeSpec.parse(probes, catalog)
        self.auto = spec.auto  # leave out what does not apply, saying why
        self.run = run = self._make_run(spec)
        if run.collective:
            self.data.same_on_every_rank(run.device, run.rank)
        self._failures = Failures(o.strict, run.rank)
        self.probes = ProbeSet(spec.entries, self._failures)
        for name in [n for n, p in self.probes.active.items() if p.needs.probe_data]:
            if not self.data.present and not self.auto:
                raise ValueError(f"probe {name!r} runs on a fixed probe batch: pass probe_data=(x, y) to attach")
            if not self.data.present:
                self._leave_out(name, "it measures on a probe batch; pass probe_data=(x, y)")
        self.cadence = Cadence(
            self.probes, o.overhead, self._failures, rank_agreement(run.device) if run.collective else None
        )
        plan = sinks(o.sinks, o.logdir, o.writer, catalog.sink_class) if sinks is not None and run.writes else None
        self._output, self._closed, self._opt_handle = Output(self._failures, run), False, None
        self._scaler: SkippedSteps | None = None
        self.capture = self._make_capture()
        self._passive = PassiveProbes(run, self.probes, self._failures)
        probe_pass = ProbePass(self.module, self.capture, o.output, o.probe_batch_size, o.norm_stats)
        self._active = ActiveProbes(run, self.probes, self.data, probe_pass, self._failures)
        try:
            with isolated():  # attach inside autocast or no_grad measures as at top level
                self._setup(o.optimizer, measures_at_attach(o.measure_at_attach, o.state))
            if o.state is not None:
                self.load_state_dict(o.state)
            if plan is not None:  # files only once all else worked
                self._output.sinks = plan.build(run)
            declare_charts(self._output.sinks, self.probes)
        except BaseException:
            self._teardown()
            raise

    def _make_run(self, spec: ProbeSpec) -> Run:
        """The run context: this process's rank, the model's placement and sharding, the options it measures by."""
        o = self.options
        rank, world_size = distributed.rank_and_world()
        sharded = distributed.is_sharded(self.module)
        #: ranks measure together: a sharded model (every forward all-gathers), or a probe splitting the probe batch
        #: over the ranks (``sharding="per_sample"``, under DDP too); then every rank runs those probe passes on rank
        #: 0's batch, and the ranks agree on cadences, on setup errors and on failures
        collective = world_size > 1 and (
            sharded or any(p.needs.sharding == "per_sample" for _, p in spec.entries if not p.passive)
        )
        return Run(
            rank=rank,
            world_size=world_size,
            device=model_placement(self.module)[0],
            sharded=sharded,
            collective=collective,
            logdir=o.log_to,
            writer=o.writer,
            mask_key=o.mask,
            label_shift=o.label_shift,
            strict=o.strict,
            optimizer=o.optimizer,
        )

    def _make_capture(self) -> Capture:
        o = self.options
        extra = tuple({t for p in self.probes.values() for t in p.needs.site_types})
        classes, names = self.catalog.activation_types()
        capture = Capture(
            self.module,
            extra_sites=extra,
            functional=o.functional,
            extra_names=names,
            mask_key=o.mask,
            activation_types=classes,
        )
        capture.on_notice = lambda key, message: self._failures.notice("probes", key, message)
        return capture

    def _setup(self, optimizer: Any, measure_now: bool) -> None:
        context = self._context()
        setup_probes(
            self.probes,
            context,
            self._failures,
            self._leave_out if self.auto else None,
            self.run.sharded,
            self.run.device if self.run.collective else None,
        )
        passive = dict(self.probes.passive)  # passive probes see no probe pass
        self._take(self._active.check_without_pass(list(passive), self.step_now, passive, leave_out=self.auto))
        self._passive.install(self.capture, notice=not self.auto)  # auto: only the leave-out line
        if optimizer is not None:
            self._opt_handle = optimizer.register_step_post_hook(OptimizerStep(self))
        if self.options.grad_scaler is not None:
            self._scaler = SkippedSteps(self.options.grad_scaler, optimizer, self.run.clock, self._write_skipped)
        if self.active and measure_now:
            self._measure(self.active, at_attach=True)
        elif self.active:
            self._take(self._active.check(self.step_now, leave_out=self.auto))
        if self.auto:  # passive probes: among the module sites, and the functional ones the probe pass met
            for name, why in self._passive.unobserved(self.capture.module_sites() + self.capture.seen_sites()):
                self._leave_out(name, why)

    def _leave_out(self, name: str, why: Any) -> None:
        """``attach(model, "auto")``: drop a probe that does not apply, saying why in one line."""
        self.probes.leave_out(name)
        reason = str(why).splitlines()[0] if str(why) else type(why).__name__
        self._failures.notice(name, "auto", f"attach('auto') leaves out probe {name!r}: {reason}")

    @property
    def step_now(self) -> int:
        """The session's step (``global_step``), read from the run's clock."""
        return self.run.clock.step

    def _measure(self, names: list[str], at_attach: bool = False) -> None:
        """Measure the active probes ``names`` at the current step and hand on what the measurement returned."""
        step = self.step_now
        self._take(self._active.measure(names, step, at_attach, leave_out=at_attach and self.auto), hold=at_attach)

    def _take(self, result: Measured, hold: bool = False) -> None:
        """Hand a measurement's or a flush's outcome on: its records to the output, its seconds to the cadence,
        the probes it left out out of the set; then raise its error (``strict=True``), if any."""
        try:
            self._output.write_all(result.records, self.step_now, hold)
        finally:
            for name, seconds in result.seconds.items():
                self.cadence.charge(name, seconds)
            for name, exc in result.left_out:
                self._leave_out(name, exc)
        if result.raised is not None:
            raise result.raised

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    @property
    def global_step(self) -> int:
        """The session's step counter."""
        return self.run.clock.step

    @property
    def rank(self) -> int:
        """This process's rank (``run.rank``)."""
        return self.run.rank

    @property
    def world_size(self) -> int:
        """The number of ranks (``run.world_size``)."""
        return self.run.world_size

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (FSDP; ``run.sharded``)."""
        return self.run.sharded

    @property
    def device(self) -> torch.device:
        """The model's device at attach (``run.device``)."""
        return self.run.device

    @property
    def logdir(self) -> str | None:
        """Where the session writes (``run.logdir``)."""
        return self.run.logdir

    @property
    def passive(self) -> list[str]:
        """Names of the passive probes."""
        return list(self.probes.passive)

    @property
    def active(self) -> list[str]:
        """Names of the active probes."""
        return list(self.probes.active)

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
    def memory(self) -> Any:
        """The first memory sink (``sinks=["memory"]``, or the default without a logdir)."""
        self._output.release()
        memory = self.catalog.sink_class("memory")
        for s in self.sinks:
            if isinstance(s, memory):
                return s
        raise AttributeError("this session has no memory sink; attach with sinks=['memory', ...]")

    def enabled(self, name: str) -> bool:
        """Whether a probe is attached and not switched off.

        Args:
            name: the probe's name.
        """
        return self.probes.on(name)

    def step(self, n: int = 1) -> None:
        """Advance the step counter; flush and measure the probes that fall due at each step.

        Args:
            n: how many steps to advance.
        """
        with isolated():
            self._use("step")
            for _ in range(n):
                self._move_to(self.step_now + 1)

    def advance_to(self, step: int) -> None:
        """Jump to a step and run what falls due at that step only (integrations that follow a trainer).

        Args:
            step: the trainer's step.
        """
        with isolated():
            self._use("advance_to")
            if step != self.step_now:
                self._move_to(int(step))

    def set_step(self, step: int) -> None:
        """Set the counter, forward or backward; nothing is measured or flushed for the steps between.

        Args:
            step: the new step.
        """
        self._use("set_step")
        self.run.clock.step = int(step)

    def measure(self, names: Iterable[str] | None = None) -> None:
        """Measure active probes now, at the current step.

        Args:
            names: the probes to measure (default: every active probe).
        """
        self._use("measure")
        self._follow_model()
        chosen = self.active if names is None else [n for n in names if n in self.probes.active]
        self._measure([n for n in chosen if self.enabled(n)])

    def flush(self) -> None:
        """Write what passive probes accumulated so far and flush the sinks."""
        with isolated():
            self._use("flush")
            self._take(self._passive.flush(self._passive.flushable(), self.step_now))
            self._output.flush(self.step_now)

    def detach(self) -> None:
        """Remove every hook; the model is left exactly as it was (``close()`` does this too)."""
        self._teardown()
        self._output.flush(self.step_now)

    def close(self, _during_error: bool = False) -> None:
        """Flush passive probes, write a last measurement, remove hooks, close the sinks. Harmless twice.

        A sink that fails (a full disk) was reported and left the probes and the other sinks alone; ``close()``
        returns all the same, and with ``strict=True`` raises the error of a sink that failed in this close.

        Args:
            _during_error: the context manager closes on an exception: a probe's error is then only reported.
        """
        if self._closed:
            return
        ended = False
        lenient = self._failures.reporting_only() if _during_error else contextlib.nullcontext()
        try:
            with lenient:  # on the user's exception, a probe error here is only reported: the user's error wins
                self._use("close")
                self._follow_model()
                self._take(self._passive.flush(self._passive.flushable(), self.step_now))
                self._measure([n for n in self._active.stale(self.step_now) if self.enabled(n)])
                if self._scaler is not None:
                    self._scaler.flush()
            ended = True
        finally:
            self._teardown()
            self._closed = True
            # every sink closes, each on its own; a sink's error raises only under strict, and never over another
            self._output.close(self.step_now, strict=self.run.strict and ended and not _during_error)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_during_error=exc_type is not None)

    def state_dict(self) -> dict[str, Any]:
        """Step counter and probe state, for a checkpoint (``torch.save`` it with the model)."""
        self._use("state_dict", release=False)
        return {
            "step": self.step_now,
            "probes": {n: p.state_dict() for n, p in self.probes.items()},
            "failures": dict(self.failures),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the step and probe state. Right after ``attach`` this also drops the held-back
        at-attach measurement, so a resumed run writes no second step-0 point (``probes.engine.resume``).

        Args:
            state: what ``state_dict()`` returned.

        Raises:
            ValueError: ``state`` is not a session's state.
        """
        self._use("load_state_dict", release=False)
        check_state(state)
        self._output.drop_pending()
        self.run.clock.step = step = int(state["step"])
        self._active.resumed(step)
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
        self.cadence.moved(self.step_now, step)
        self.run.clock.step = step
        due_passive = self.cadence.due(self._passive.flushable(), step)
        due_active = self.cadence.due(self.probes.active_on(), step)
        if due_passive or due_active:
            self._follow_model()
        if due_passive:
            self._take(self._passive.flush(due_passive, step, scheduled=True))
        if due_active:
            self._measure(due_active)
            self.cadence.space_out(due_active, len(self.probes.active_on()))
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
        with isolated():  # a check may run the model (measure() and close() are not isolated as a whole)
            for name in self.probes.active_on():
                try:
                    if uses_setup(self.probes[name]):
                        self.probes[name].setup(context)
                    else:
                        self._active.check_one(name, self._active.bare_batch(self.step_now), old_validate=False)
                except Exception as exc:  # noqa: BLE001 - the probe no longer applies to the model
                    self._failures.fail(
                        name,
                        RuntimeError(f"probe {name!r} no longer applies to the model as changed after attach: {exc}"),
                        self.step_now,
                    )

    def _context(self) -> Context:
        """What a probe's ``setup`` learns: the model, the probe batch as it is now, the session's settings."""
        x, y = self.data.current()
        spec = self._active.probe_pass.output_spec
        return Context(self.module, x, y, self.run.logdir, self.run.device, spec, optimizer=self.options.optimizer)

    def _write_skipped(self, count: int) -> None:
        self._output.write([Scalar("train/skipped_steps", count)], self.step_now)

    def _teardown(self) -> None:
        self.capture.remove()
        if self._scaler is not None:
            self._scaler.remove()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
