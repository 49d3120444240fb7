"""Cadence: which probes are due at a step, and the overhead budget that spaces out costly ones.

Time is read from ``clock`` (``time.perf_counter``), a module attribute that tests replace with a fake clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from probes.engine import distributed
from probes.engine.failures import Failures
from probes.probe import Probe
from probes.schedules import Schedule, as_schedule, check_answer, every

#: the engine's clock (seconds); tests replace it
clock: Callable[[], float] = time.perf_counter

#: ``attach(overhead="auto")``: probes left at their default cadence keep within this fraction of training time,
AUTO_OVERHEAD = 0.1
#: once their measurements have taken this many seconds in all (short runs and tests keep the default cadences)
AUTO_GRACE_SECONDS = 2.0


def now() -> float:
    """The current time of the engine's clock."""
    return clock()


def round_up_125(k: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``k``."""
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= k:
                return m * scale
        scale *= 10


def check_overhead(overhead: Any) -> float | None:
    """``attach(overhead=...)`` as a fraction, or None; raises on anything else."""
    if isinstance(overhead, str) and overhead == "auto":
        return AUTO_OVERHEAD
    if overhead is not None and (
        isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead < 1
    ):
        raise ValueError(
            f"attach(overhead=...) must be 'auto', None or a fraction of training time in (0, 1), got {overhead!r}"
        )
    return None if overhead is None else float(overhead)


class Cadence:
    """The probes' schedules and the overhead budget.

    Args:
        probes: the attached probes by name; a cadence set on the instance (``every=``) counts as given.
        overhead: ``attach(overhead=...)``.
        failures: the session's failure policy (for the notices).
        agree: under a sharded model, a function that takes the per-probe proposals of this rank and returns the
            widest of every rank (one all-reduce); None otherwise.
    """

    def __init__(
        self,
        probes: Mapping[str, Probe],
        overhead: Any,
        failures: Failures,
        agree: Callable[[list[int]], list[int]] | None = None,
    ) -> None:
        self.schedules: dict[str, Schedule] = {n: as_schedule(p.every, who=f"probe {n!r}") for n, p in probes.items()}
        self.broken: set[str] = set()  # probes whose schedule raised: no longer asked
        self.given = {n for n, p in probes.items() if "every" in vars(p)}
        self.auto = isinstance(overhead, str) and overhead == "auto"
        self.overhead = check_overhead(overhead)
        self.failures, self.agree = failures, agree
        self.cost: dict[str, float] = {}  # seconds of the last measurement (its share of the pass included)
        self.spent: dict[str, float] = {}  # seconds of all measurements so far
        self.train_seconds, self.train_steps = 0.0, 0
        self._last_step_at: float | None = None

    def due(self, names: list[str], step: int) -> list[str]:
        """The probes of ``names`` whose schedule says ``step``. A schedule that raises or returns something other
        than a bool is its probe's failure (``Failures.fail``: said once, the probe switched off and its schedule no
        longer asked; under ``strict`` the error is raised), and the other probes go on."""
        out = []
        for name in names:
            if name in self.broken:
                continue
            schedule = self.schedules[name]
            try:
                answer = schedule(step)  # a bool, checked without building a message unless it is not one
                if answer is True or (answer is not False and check_answer(answer, schedule, step, f"probe {name!r}")):
                    out.append(name)
            except Exception as exc:  # noqa: BLE001 - the user's schedule: reported, probe switched off
                self.broken.add(name)
                if not (isinstance(exc, TypeError) and str(exc).startswith(f"probe {name!r}: option 'every'")):
                    error = RuntimeError(
                        f"probe {name!r}: option 'every': the schedule {schedule!r} raised {exc!r} at step {step}"
                    )
                    error.__cause__ = exc
                    exc = error
                self.failures.fail(name, exc, step)
        return out

    def moved(self, old: int, new: int) -> None:
        """The step went from ``old`` to ``new``: the time since the last move (probe work excluded) was training."""
        if self.overhead is not None and self._last_step_at is not None and new > old:
            self.train_seconds += now() - self._last_step_at
            self.train_steps += new - old

    def rested(self) -> None:
        """The probe work of this step is done: training time counts from now."""
        if self.overhead is not None:
            self._last_step_at = now()

    def charge(self, name: str, seconds: float) -> None:
        self.cost[name] = seconds
        self.spent[name] = self.spent.get(name, 0.0) + seconds

    def space_out(self, names: list[str], active: int) -> None:
        """Widen ``every(k)`` cadences of ``names`` so that the ``active`` probes together cost at most ``overhead``
        of the training time, an equal share each; ``k`` is rounded up to 1, 2 or 5 times a power of ten. With
        ``overhead="auto"`` only default cadences are widened, once they have spent ``AUTO_GRACE_SECONDS``."""
        if self.overhead is None:
            return
        per_step = self.train_seconds / self.train_steps if self.train_steps else 0.0
        budget = self.overhead / max(1, active)
        proposals: dict[str, int] = {}
        for name in names:
            schedule, cost = self.schedules[name], self.cost.get(name)
            if not isinstance(schedule, every):
                continue
            if self.auto and (name in self.given or self.spent.get(name, 0.0) < AUTO_GRACE_SECONDS):
                continue
            if cost is not None and per_step > 0 and cost / (schedule.k * per_step) > budget:
                proposals[name] = round_up_125(max(schedule.k + 1, math.ceil(cost / (budget * per_step))))
        if self.agree is not None:
            agreed = self.agree([proposals.get(n, 0) for n in names])
            proposals = {n: k for n, k in zip(names, agreed) if k > 0}
        for name, k in proposals.items():
            old, cost = self.schedules[name], self.cost.get(name)
            old_k = old.k if isinstance(old, every) else k  # only ``every`` cadences are widened
            self.schedules[name] = every(k)
            share = f"{cost / (old_k * per_step):.0%}" if cost is not None and per_step > 0 else "too much"
            timing = (
                f"takes {cost * 1e3:.3g} ms per measurement against {per_step * 1e3:.3g} ms per training step"
                if cost is not None and per_step > 0
                else "is costly on another rank"
            )
            how = (
                "at its default cadence; give it every=... to keep a cadence, or attach(overhead=None)"
                if self.auto
                else f"overhead={self.overhead:g}"
            )
            self.failures.notice(
                name,
                "overhead",
                f"probe {name!r} {timing}: measuring every {old_k} steps would "
                f"cost {share} of training (its share is {budget:.1%}: {self.overhead:.0%} for all "
                f"active probes, {how}); it now measures every {k} steps",
            )


def rank_agreement(device: Any) -> Callable[[list[int]], list[int]]:
    """The widest proposal of every rank, per probe (one all-reduce)."""

    def agree(proposals: list[int]) -> list[int]:
        widest, _ = distributed.max_and_min(proposals, device)
        return list(widest)

    return agree


class OptimizerStep:
    """The optimizer's step hook: steps the session. A copied or pickled optimizer carries no session."""

    def __init__(self, session: Any) -> None:
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
