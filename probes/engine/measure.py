"""Active probes: a measurement runs the shared probe pass once for the due probes, then each due probe's
``measure`` on the ``ProbeBatch``. Under a sharded model (FSDP2) every rank measures and the ranks then agree on
which probes failed anywhere, so that the next pass runs the same probes everywhere; otherwise rank 0 measures."""

from __future__ import annotations

from typing import Any

import torch

from probes import inputs
from probes.engine import distributed
from probes.engine.cadence import now
from probes.engine.context import isolated
from probes.engine.failures import Failures
from probes.engine.measured import Measured
from probes.engine.output import check_records
from probes.engine.probe_pass import OutputError, ProbeData, ProbePass, keeper, lazy_pending
from probes.engine.probeset import ProbeSet
from probes.engine.run import Run
from probes.engine.spec import named
from probes.legacy import uses_validate
from probes.probe import Pass, Probe, ProbeBatch, ProbeContext

#: a fraction of the probe batch whose predicted class changes between running and batch statistics (or a relative
#: change of the outputs) above which the probe pass measures another model than the one that trains
NORM_STATS_GAP = 0.25


class ActiveProbes:
    """The active probes of a session and their measurements, which return their records and seconds
    (``Measured``): the session hands those to the output and the cadence.

    Args:
        run: the run context (ranks, device, sharding, logdir, mask key, label shift).
        probes: the session's probe set (its active probes are measured here).
        data: the probe batch; probe_pass: the engine's probe pass over the model.
        failures: the session's failure policy.
    """

    def __init__(self, run: Run, probes: ProbeSet, data: ProbeData, probe_pass: ProbePass, failures: Failures) -> None:
        self.run, self.probes, self.data, self.probe_pass, self.failures = run, probes, data, probe_pass, failures
        self._measured_at: dict[str, int] = {}
        self._norms_checked, self._passes = False, 0

    def measure(self, names: list[str], step: int, at_attach: bool = False, leave_out: bool = False) -> Measured:
        """Measure ``names`` (those not switched off) at ``step``. ``at_attach``: the first measurement, whose
        errors raise (attach fails; with ``leave_out``, ``attach(model, "auto")``, the probe is left out instead).
        Nothing of the caller's context (autocast, grad mode, transforms, modes: ``probes.engine.context``) reaches
        the measurement."""
        with isolated():
            return self._measure(names, step, at_attach, leave_out)

    def resumed(self, step: int) -> None:
        """A state was loaded at ``step``: every active probe counts as measured there (``close()`` then measures
        only those measured since)."""
        self._measured_at = dict.fromkeys(self.probes.active, step)

    def _measure(self, names: list[str], step: int, at_attach: bool, leave_out: bool) -> Measured:
        names = [n for n in names if self.failures.enabled(n)]
        if not names:
            return Measured()
        if lazy_pending(self.probe_pass.module):  # a pass now would initialise lazy parameters
            for n in names:
                self.failures.notice(
                    n,
                    "lazy",
                    f"probe {n!r}: the model has uninitialised lazy modules; it "
                    "measures from the first due step after a training forward initialised them "
                    "(run one forward before attach to measure the initialization)",
                )
            return self.check_without_pass(names, step, leave_out=leave_out) if at_attach else Measured()
        run = self.run
        if not run.sharded and not run.collective:
            return self._measure_here(names, step, at_attach, leave_out)
        # measured on every rank: all under a sharded model, else the probes that split the probe batch (DDP)
        together = names if run.sharded else [n for n in names if self.probes[n].needs.sharding == "per_sample"]
        sharded_before, before = distributed.sharded_now(self.probe_pass.module), set(self.failures.failed)
        here = names if run.rank == 0 or run.sharded else together
        result, error = Measured(), None
        try:
            if here:
                result = self._measure_here(here, step, at_attach, leave_out)
                error, result.raised = result.raised, None
        except Exception as exc:  # a raised error: the other ranks must still learn of it
            error = exc
        distributed.reshard(sharded_before)  # FSDP2 keeps the root gathered after a forward without backward
        if run.world_size == 1 or not together:
            result.raised = error
            return result
        failed = {n for n in together if n in self.failures.failed and n not in before} | (
            set(together) if error else set()
        )
        elsewhere = distributed.failed_anywhere(together, failed, run.device) - failed
        if at_attach and elsewhere and error is None:
            raise RuntimeError(
                f"attach failed on another rank (the ranks measure together): probe(s) "
                f"{sorted(elsewhere)} raised there at the first measurement (its error says why)"
            )
        for name in [n for n in together if n in elsewhere]:
            remote = RuntimeError(
                f"probe {name!r} raised on another rank during the probe pass at step {step}; it is switched off "
                "on every rank, so that all ranks keep running the same probe passes"
            )
            if result.fail(self.failures, name, remote, step):
                break
        result.raised = result.raised or error
        return result

    def stale(self, step: int) -> list[str]:
        """The probes whose last measurement is not at ``step`` (``close()`` measures them once more)."""
        return [n for n in self.probes.active if self._measured_at.get(n) != step]

    def check(self, step: int, leave_out: bool = False) -> Measured:
        """At attach without a measurement: the shared pass once, and each probe's ``check`` (errors raise;
        with ``leave_out`` the probe is left out instead). Returns the probes left out."""
        result = Measured()
        active = self.probes.active
        if not active:
            return result
        if not self.data.present or lazy_pending(self.probe_pass.module):
            return self.check_without_pass(list(active), step, leave_out=leave_out)
        before = distributed.sharded_now(self.probe_pass.module) if self.run.sharded else []
        try:
            with self.probe_pass.guarded():  # isolated from the caller's context, as every probe pass
                batch = self._batch(list(active), step)
                for name in list(active):
                    try:
                        self.check_one(name, batch)
                    except Exception as exc:
                        self._attach_error(result, name, exc, leave_out)
        finally:
            distributed.reshard(before)  # as after a measurement: FSDP2 keeps the root gathered after a forward
        return result

    def check_without_pass(
        self, names: list[str], step: int, probes: dict[str, Probe] | None = None, leave_out: bool = False
    ) -> Measured:
        """Each probe's ``check`` on a batch without a probe pass (``output`` None): where no pass can run at attach
        (no probe batch, lazy modules), for passive probes (``probes``), and after the model changed. Returns the
        probes left out (with ``leave_out``; else the first error raises)."""
        probes = dict(self.probes.active) if probes is None else probes
        batch, result = self.bare_batch(step), Measured()
        for name in names:
            try:
                self.check_one(name, batch, probes, old_validate=False)
            except Exception as exc:
                self._attach_error(result, name, exc, leave_out)
        return result

    def check_one(
        self, name: str, batch: ProbeBatch, probes: dict[str, Probe] | None = None, old_validate: bool = True
    ) -> None:
        """The probe's ``check`` (and the old contract's ``validate`` where it defines one) on ``batch``."""
        probe = (self.probes.active if probes is None else probes)[name]
        batch.context.probe = name
        probe.check(batch)
        if old_validate and uses_validate(probe):
            probe.validate(batch)

    def bare_batch(self, step: int) -> ProbeBatch:
        """The probe batch as given, without a probe pass (``output`` None, no activations)."""
        x, y = self.data.current()
        return ProbeBatch(self.probe_pass.module, x, y, None, {}, step, context=self._context(True))

    def _context(self, tensor_output: bool) -> ProbeContext:
        run = self.run
        return ProbeContext(
            self.probe_pass.module,
            rank=run.rank,
            world_size=run.world_size if run.collective else 1,
            sharded=run.sharded,
            label_shift=run.label_shift,
            device=run.device,
            optimizer=run.optimizer,
            writes=run.writes,
            logdir=run.logdir,
            chunk_size=self.probe_pass.chunk_size,
            runner=self.probe_pass.run,
            output_spec=self.probe_pass.output_spec,
            tensor_output=tensor_output,
            notify=self.failures.notice,
        )

    @staticmethod
    def _attach_error(result: Measured, name: str, exc: Exception, leave_out: bool) -> None:
        if not leave_out:
            raise named(exc, name) from exc
        result.left_out.append((name, exc))

    def _batch(self, names: list[str], step: int) -> ProbeBatch:
        x, y = self.data.current()
        shared = Pass(None, {}, [])
        if x is not None:
            due = [self.probes[n] for n in names if self.probes[n].needs.sites]
            shared = self.probe_pass.run(x, keeper(due) if due else None)
            self._check_norms(x, shared.output, step)
            self._say_compute_dtype(shared.output)
        mask = self.data.mask(self.run.mask_key)
        context = self._context(shared.tensor_output)
        return ProbeBatch(
            self.probe_pass.module, x, y, shared.output, shared.activations, step, mask, shared.calls, context
        )

    def _measure_here(self, names: list[str], step: int, at_attach: bool, leave_out: bool) -> Measured:
        result = Measured()
        for n in names:
            self._measured_at[n] = step
        if not self.run.writes and not self.run.collective:
            return result
        started = now()
        with self.probe_pass.guarded():
            try:
                batch = self._batch(names, step)
            except Exception as exc:  # the pass itself failed: every due probe is off (attach raises)
                cause = (exc.__cause__ or exc) if isinstance(exc, OutputError) else exc
                if at_attach:  # a model that cannot run its probe batch: say so now, naming the probes
                    if isinstance(exc, OutputError) or len(names) > 1:
                        raise cause from None
                    raise named(cause, names[0]) from cause
                for name in names:
                    if result.fail(self.failures, name, cause, step):
                        break
                return result
            shared = (now() - started) / len(names)  # the pass, shared by the due probes
            for name in names:
                t0 = now()
                try:
                    if at_attach:
                        self.check_one(name, batch)
                    batch.context.probe = name
                    result.records.append((name, check_records(name, self.probes[name].measure(batch))))
                except Exception as exc:  # noqa: BLE001
                    if at_attach:
                        self._attach_error(result, name, exc, leave_out)
                        continue
                    if result.fail(self.failures, name, exc, step):
                        break
                result.seconds[name] = shared + now() - t0
        return result

    def _say_compute_dtype(self, output: torch.Tensor | None) -> None:
        """Once: the probe pass computed in another dtype than the parameters are stored in (FSDP2's
        ``MixedPrecisionPolicy(param_dtype=...)``, a model casting inside its forward)."""
        stored = inputs.model_dtype(self.probe_pass.module)
        if output is None or not output.is_floating_point() or stored is None or output.dtype == stored:
            return
        self.failures.notice(
            "probes",
            "compute-dtype",
            (
                f"the probe pass computes in {str(output.dtype).removeprefix('torch.')} (the model's output on the "
                f"probe batch; its parameters are stored in {str(stored).removeprefix('torch.')}, e.g. under FSDP2 "
                "mixed precision): activations, gates and outputs are measured at that precision; solves and "
                "eigenvalues are still computed in float64"
            ),
        )

    def _check_norms(self, x: Any, output: torch.Tensor | None, step: int) -> None:
        """When a measurement finds the eval-mode predictions far from those with batch statistics, say so (once).
        Checked at the 1st, 2nd, 4th, 8th, ... measurement: one more forward of the probe batch each time."""
        self._passes += 1
        if self._norms_checked or self._passes & (self._passes - 1):
            return
        gap = self.probe_pass.disagreement(x, output)
        if gap is None:
            self._norms_checked = True
        elif gap > NORM_STATS_GAP:
            self._norms_checked = True
            self.failures.notice(
                "probes",
                "norm-stats",
                (
                    f"the probe pass runs in eval mode, and at step {step} its predictions with the batch-norm running "
                    f"statistics differ from those with batch statistics (training mode) on {gap:.0%} of the probe "
                    "batch: the running statistics do not describe the model as it trains, and the probes measure a "
                    "model other than the trained one; attach(norm_stats='batch') measures with batch statistics and "
                    "leaves the running ones untouched"
                ),
            )
