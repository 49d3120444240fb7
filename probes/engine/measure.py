"""Active probes: a measurement runs the shared probe pass once for the due probes, then each due probe's
``measure`` on the ``ProbeBatch``. Under a sharded model (FSDP2) every rank measures and the ranks then agree on
which probes failed anywhere, so that the next pass runs the same probes everywhere; otherwise rank 0 measures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from probes.engine import distributed, inputs
from probes.engine.cadence import Cadence, now
from probes.engine.context import isolated
from probes.engine.failures import Failures
from probes.engine.probe_pass import OutputError, ProbeData, ProbePass, keeper, lazy_pending
from probes.engine.spec import named
from probes.legacy import uses_validate
from probes.probe import Pass, Probe, ProbeBatch, ProbeContext
from probes.records import Record

#: a fraction of the probe batch whose predicted class changes between running and batch statistics (or a relative
#: change of the outputs) above which the probe pass measures another model than the one that trains
NORM_STATS_GAP = 0.25


class ActiveProbes:
    """The active probes of a session and their measurements.

    Args:
        probes: the active probes by name.
        data: the probe batch; probe_pass: the engine's probe pass over the model.
        failures, cadence: the session's failure policy and cadence (charged with each measurement's time).
        write: ``write(name, records, hold)`` hands a probe's records to the session's output.
        logdir, rank, world_size, sharded, device: where the session writes and how the ranks share the work.
        mask_key: the probe inputs' entry holding the attention mask (``ProbeBatch.mask``).
        label_shift: ``ProbeBatch.label_shift`` (token labels of a causal language model: 1).
        collective: the ranks measure together (a sharded model, or a ``sharding="per_sample"`` probe under DDP):
            the probes measured on every rank agree on their failures after each measurement.
    """

    def __init__(
        self,
        probes: dict[str, Probe],
        data: ProbeData,
        probe_pass: ProbePass,
        failures: Failures,
        cadence: Cadence,
        write: Callable[[str, list[Record], bool], None],
        logdir: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        sharded: bool = False,
        device: torch.device | None = None,
        mask_key: str | None = None,
        label_shift: int = 0,
        collective: bool = False,
    ) -> None:
        self.probes, self.data, self.probe_pass = probes, data, probe_pass
        self.failures, self.cadence, self.write = failures, cadence, write
        self.logdir, self.rank, self.world_size, self.sharded, self.device = logdir, rank, world_size, sharded, device
        self.mask_key, self.label_shift, self.collective = mask_key, label_shift, collective
        self.measured_at: dict[str, int] = {}
        #: the optimizer given to ``attach`` (``batch.context.optimizer``), set by the session
        self.optimizer: Any = None
        #: ``attach(model, "auto")``: called with ``(name, error)`` for a probe whose first measurement or validation
        #: raised, instead of raising (the probe is left out)
        self.on_attach_error: Callable[[str, Exception], None] | None = None
        self._norms_checked, self._passes = False, 0

    def measure(self, names: list[str], step: int, at_attach: bool = False) -> None:
        """Measure ``names`` (those not switched off) at ``step``. ``at_attach``: the first measurement, whose
        errors raise (attach fails) and whose records are held back. Nothing of the caller's context (autocast,
        grad mode, transforms, modes: ``probes.engine.context``) reaches the measurement."""
        with isolated():
            self._measure(names, step, at_attach)

    def _measure(self, names: list[str], step: int, at_attach: bool) -> None:
        names = [n for n in names if self.failures.enabled(n)]
        if not names:
            return
        if lazy_pending(self.probe_pass.module):  # a pass now would initialise lazy parameters
            if at_attach:
                self.check_without_pass(names, step)
            for n in names:
                self.failures.notice(
                    n,
                    "lazy",
                    f"probe {n!r}: the model has uninitialised lazy modules; it "
                    "measures from the first due step after a training forward initialised them "
                    "(run one forward before attach to measure the initialization)",
                )
            return
        if not self.sharded and not self.collective:
            return self._measure_here(names, step, at_attach)
        # measured on every rank: all under a sharded model, else the probes that split the probe batch (DDP)
        together = names if self.sharded else [n for n in names if self.probes[n].needs.sharding == "per_sample"]
        sharded_before, before, error = distributed.sharded_now(self.probe_pass.module), set(self.failures.failed), None
        here = names if self.rank == 0 or self.sharded else together
        try:
            if here:
                self._measure_here(here, step, at_attach)
        except Exception as exc:  # a raised error: the other ranks must still learn of it
            error = exc
        distributed.reshard(sharded_before)  # FSDP2 keeps the root gathered after a forward without backward
        if self.world_size == 1 or not together:
            if error is not None:
                raise error
            return
        failed = {n for n in together if n in self.failures.failed and n not in before} | (
            set(together) if error else set()
        )
        elsewhere = distributed.failed_anywhere(together, failed, self.device) - failed
        if at_attach and elsewhere and error is None:
            raise RuntimeError(
                f"attach failed on another rank (the ranks measure together): probe(s) "
                f"{sorted(elsewhere)} raised there at the first measurement (its error says why)"
            )
        for name in [n for n in together if n in elsewhere]:
            self.failures.fail(
                name,
                RuntimeError(
                    f"probe {name!r} raised on another rank during the probe pass at step {step}; it is switched off "
                    "on every rank, so that all ranks keep running the same probe passes"
                ),
                step,
            )
        if error is not None:
            raise error

    def stale(self, step: int) -> list[str]:
        """The probes whose last measurement is not at ``step`` (``close()`` measures them once more)."""
        return [n for n in self.probes if self.measured_at.get(n) != step]

    def validate(self, step: int) -> None:
        """At attach without a measurement: the shared pass once, and each probe's ``check`` (errors raise)."""
        if not self.probes:
            return
        if not self.data.present or lazy_pending(self.probe_pass.module):
            return self.check_without_pass(list(self.probes), step)
        before = distributed.sharded_now(self.probe_pass.module) if self.sharded else []
        try:
            with self.probe_pass.guarded():  # isolated from the caller's context, as every probe pass
                batch = self._batch(list(self.probes), step)
                for name in list(self.probes):
                    try:
                        self.check_one(name, batch)
                    except Exception as exc:
                        self._attach_error(name, exc)
        finally:
            distributed.reshard(before)  # as after a measurement: FSDP2 keeps the root gathered after a forward

    def check_without_pass(self, names: list[str], step: int, probes: dict[str, Probe] | None = None) -> None:
        """Each probe's ``check`` on a batch without a probe pass (``output`` None): where no pass can run at attach
        (no probe batch, lazy modules), for passive probes (``probes``), and after the model changed."""
        probes = self.probes if probes is None else probes
        batch = self.bare_batch(step)
        for name in names:
            try:
                self.check_one(name, batch, probes, old_validate=False)
            except Exception as exc:
                self._attach_error(name, exc)

    def check_one(
        self, name: str, batch: ProbeBatch, probes: dict[str, Probe] | None = None, old_validate: bool = True
    ) -> None:
        """The probe's ``check`` (and the old contract's ``validate`` where it defines one) on ``batch``."""
        probe = (self.probes if probes is None else probes)[name]
        batch.context.probe = name
        probe.check(batch)
        if old_validate and uses_validate(probe):
            probe.validate(batch)

    def bare_batch(self, step: int) -> ProbeBatch:
        """The probe batch as given, without a probe pass (``output`` None, no activations)."""
        x, y = self.data.current()
        return ProbeBatch(self.probe_pass.module, x, y, None, {}, step, context=self._context(True))

    def _context(self, tensor_output: bool) -> ProbeContext:
        return ProbeContext(
            self.probe_pass.module,
            rank=self.rank,
            world_size=self.world_size if self.collective else 1,
            sharded=self.sharded,
            label_shift=self.label_shift,
            device=self.device,
            optimizer=self.optimizer,
            writes=self.rank == 0,
            logdir=self.logdir,
            runner=self.probe_pass.run,
            output_spec=self.probe_pass.output_spec,
            tensor_output=tensor_output,
            notify=self.failures.notice,
        )

    def _attach_error(self, name: str, exc: Exception) -> None:
        if self.on_attach_error is None:
            raise named(exc, name) from exc
        self.on_attach_error(name, exc)

    def _batch(self, names: list[str], step: int) -> ProbeBatch:
        x, y = self.data.current()
        shared = Pass(None, {}, [])
        if x is not None:
            due = [self.probes[n] for n in names if self.probes[n].needs.sites]
            shared = self.probe_pass.run(x, keeper(due) if due else None)
            self._check_norms(x, shared.output, step)
            self._say_compute_dtype(shared.output)
        mask = self.data.mask(self.mask_key)
        context = self._context(shared.tensor_output)
        return ProbeBatch(
            self.probe_pass.module, x, y, shared.output, shared.activations, step, mask, shared.calls, context
        )

    def _measure_here(self, names: list[str], step: int, at_attach: bool) -> None:
        for n in names:
            self.measured_at[n] = step
        if self.rank != 0 and not self.collective:
            return
        started = now()
        with self.probe_pass.guarded():
            try:
                batch = self._batch(names, step)
            except Exception as exc:  # the pass itself failed: every due probe is off (attach raises)
                cause = exc.__cause__ if isinstance(exc, OutputError) else exc
                if at_attach:  # a model that cannot run its probe batch: say so now, naming the probes
                    if isinstance(exc, OutputError) or len(names) > 1:
                        raise cause from None
                    raise named(cause, names[0]) from cause
                for name in names:
                    self.failures.fail(name, cause, step)
                return
            shared = (now() - started) / len(names)  # the pass, shared by the due probes
            for name in names:
                t0 = now()
                try:
                    if at_attach:
                        self.check_one(name, batch)
                    batch.context.probe = name
                    self.write(name, self.probes[name].measure(batch), at_attach)
                except Exception as exc:  # noqa: BLE001
                    if at_attach:
                        self._attach_error(name, exc)
                        continue
                    self.failures.fail(name, exc, step)
                self.cadence.charge(name, shared + now() - t0)

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
