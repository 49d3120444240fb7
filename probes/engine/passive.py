"""Passive probes: they observe the activations of training forwards (through the capture's hooks), accumulate
on the device, and write their window at their cadence. Under DDP the declared state of every probe is reduced
over the ranks before it is written (``probes.engine.distributed``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from probes.engine import distributed
from probes.engine.capture import Capture
from probes.engine.context import isolated
from probes.engine.failures import Failures
from probes.engine.measured import Measured
from probes.engine.output import check_records
from probes.engine.probeset import ProbeSet
from probes.engine.run import Run
from probes.probe import Probe, Site


class PassiveProbes:
    """The passive probes of a session; a flush returns their records (``Measured``), which the session writes.

    Args:
        run: the run context (the ranks that reduce together, the device, the step clock for messages).
        probes: the session's probe set (its passive probes are observed here).
        failures: the session's failure policy.
    """

    def __init__(self, run: Run, probes: ProbeSet, failures: Failures) -> None:
        self.run, self.set, self.failures = run, probes, failures
        self.forwards = 0  # completed training forwards seen
        self._observers: dict[str, list[tuple[str, Probe]]] = {}
        self._window: dict[str, tuple[int, int]] = {}  # name -> (step, forwards) of its last flush

    @property
    def probes(self) -> dict[str, Probe]:
        """The passive probes by name."""
        return self.set.passive

    def install(self, capture: Capture, notice: bool = True) -> None:
        """Observe every training forward from now on; say once which probes see no site of this model (with
        ``notice=False`` not at once: ``attach(model, "auto")`` leaves such probes out and says that instead)."""
        if not self.probes:
            return
        capture.on_forward = self._on_training_forward
        keep = frozenset().union(*[p.needs.sites for p in self.probes.values()])  # only what the probes read
        capture.install_passive(self._observe, keep)
        sites = capture.module_sites()
        if sites and notice:
            self._notice_no_site(
                sites, "activation module", "; it writes nothing unless forward calls F.relu or the like"
            )

    def sites_changed(self) -> None:
        """The model's sites changed: each probe decides anew which sites it observes."""
        self._observers.clear()

    def _observe(self, site: Site, pre: torch.Tensor | None, post: torch.Tensor | None) -> None:
        observers = self._observers.get(site.name)
        if observers is None:
            observers = self._observers[site.name] = [(n, p) for n, p in self.probes.items() if p.wants(site)]
        failed = self.failures.failed
        for name, probe in observers:
            if name not in failed:
                try:
                    probe.observe(site, pre, post)  # type: ignore[arg-type]  # a value the probe declared is a tensor
                except Exception as exc:  # noqa: BLE001 - reported, probe disabled
                    self.failures.fail(name, exc, self.run.step)

    def _on_training_forward(self, sites: Callable[[], list[Site]]) -> None:
        self.forwards += 1
        if self.forwards == 1:
            self._notice_no_site(sites(), "site", "; it writes nothing")

    def _notice_no_site(self, sites: list[Site], what: str, consequence: str) -> None:
        kinds = Counter(s.kind for s in sites)
        found = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
        for name, probe in self.probes.items():
            if not any(probe.wants(s) for s in sites):
                self.failures.notice(
                    name,
                    "no-site",
                    f"probe {name!r} observes no {what} of this model (it counts "
                    f"ReLU-family activations; the model has {found}){consequence}",
                )

    def unobserved(self, sites: list[Site]) -> list[tuple[str, str]]:
        """The probes that observe none of ``sites``, each with why (``attach(model, "auto")`` leaves them out)."""
        kinds = ", ".join(sorted({s.kind for s in sites})) or "none"
        return [
            (n, f"no activation of this model is one it observes (the model has: {kinds})")
            for n, p in self.probes.items()
            if not any(p.wants(s) for s in sites)
        ]

    def flushable(self) -> list[str]:
        """Passive probes to flush. Under DDP every rank takes part in every probe's collective, also for a probe
        switched off on this rank only, so that the ranks stay in step and learn of the failure instead of hanging."""
        if self.run.world_size > 1:
            return list(self.probes)
        return [n for n in self.probes if self.failures.enabled(n)]

    def flush(self, names: list[str], step: int, scheduled: bool = False) -> Measured:
        """The windows of ``names`` at ``step`` (their records, to write), and new windows started. A window
        already written at this step with no training forward since is not written again (one point per tag per
        step). The caller's context (autocast, grad or inference mode, modes) is set aside, as for a measurement."""
        with isolated():
            return self._flush(names, step, scheduled)

    def _flush(self, names: list[str], step: int, scheduled: bool) -> Measured:
        result, world = Measured(), self.run.world_size
        for name in names:
            last_step, last_forwards = self._window.get(name, (None, 0))
            if not scheduled and last_step == step and (world > 1 or last_forwards == self.forwards):
                continue  # under DDP decided on the step alone: every rank decides alike
            probe = self.probes[name]
            if world > 1:
                outcome = distributed.reduce_states(
                    probe, not self.failures.enabled(name), self.run.device, step, self.run.rank
                )
                if outcome.reason is not None:  # not reduced: switched off
                    if result.fail(self.failures, name, outcome.reason, step):
                        break
                    continue
            if not self.failures.enabled(name):
                continue
            if self.forwards == (last_forwards if scheduled else 0):
                self.failures.notice(
                    name,
                    "no-forward",
                    f"probe {name!r} saw no training forward before step "
                    f"{step}: passive probes count forwards in train mode with gradients enabled "
                    "(call model.train() and run outside torch.no_grad(), or this is a window "
                    "without training)",
                )
            self._window[name] = (step, self.forwards)
            try:
                probe.settle()
                result.records.append((name, check_records(name, probe.flush(step))))
            except Exception as exc:  # noqa: BLE001
                if result.fail(self.failures, name, exc, step):
                    break
            finally:
                probe.reset_window()
        return result
