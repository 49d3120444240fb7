"""When a probe measures: a schedule is a callable ``step -> bool``.

``every(k)`` (steps k, 2k, ...), ``log(...)`` (dense early, sparse late: kernels and gates move
fastest at the start of training), ``at([...])`` (listed steps). Any callable ``step -> bool`` works.
A probe's ``every`` option is a positive int (``every(k)``) or a schedule. Step 0 is the
initialization: active probes measure there at attach, and once more at ``close()``,
whatever the schedule says.

The schedule contract:

- it takes the step, a Python ``int`` (1, 2, ... in training), and returns a Python ``bool``, a numpy
  ``bool_`` or a one-element ``torch.bool`` tensor (read with ``bool()``: a host sync for a GPU tensor). Any other
  result (None, an int such as ``step % 10``, whose truth is the opposite of "every 10 steps") is an error;
- it should be a pure function of the step: ``attach`` calls it once on step 1 to check it (so a schedule that
  raises or returns something else fails at attach, naming the probe and the option ``every``); a module, a class
  or any other callable that is not such a function is refused there;
- a schedule that raises (or returns something else) later, in training, is a failure of its probe: reported once
  through the session's failure policy, the probe is switched off and training goes on (``strict=True``: the
  error is raised, from ``optimizer.step()`` or ``session.step()``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Schedule = Callable[[int], bool]

__all__ = ["Schedule", "every", "log", "at", "as_schedule", "is_due", "check_answer"]


def _as_int(value: object) -> int | None:
    """``value`` as a Python int when it is an integer (a numpy integer too, never a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


@dataclass(frozen=True)
class every:  # noqa: N801 - reads as a function: every(10)
    """Steps ``k, 2k, 3k, ...`` (step 0, the initialization, is measured at attach anyway).

    Args:
        k: the period in steps, a positive int.

    Raises:
        ValueError: ``k`` is not a positive int.
    """

    k: int

    def __post_init__(self) -> None:
        k = _as_int(self.k)
        if k is None or k < 1:
            raise ValueError(f"every(k): k must be a positive int, got {self.k!r}")
        object.__setattr__(self, "k", k)

    def __call__(self, step: int) -> bool:
        return step > 0 and step % self.k == 0


@dataclass(frozen=True)
class at:  # noqa: N801
    """Exactly the listed steps.

    Args:
        steps: the steps at which to measure, non-negative ints in any order.

    Raises:
        ValueError: a step is not a non-negative int.
    """

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        given = list(steps)
        values = [_as_int(s) for s in given]
        if any(v is None or v < 0 for v in values):
            raise ValueError(f"at(steps): steps must be non-negative ints, got {given!r}")
        object.__setattr__(self, "steps", frozenset(values))

    def __call__(self, step: int) -> bool:
        return step in self.steps


@dataclass(frozen=True)
class log:  # noqa: N801
    """Log-spaced steps ``max(start, round(10 ** (i / per_decade)))``, ``i = 0, 1, 2, ...``: at most
    ``per_decade`` per decade, dense early when kernels and gates move fastest. The default gives
    1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, 158, ...

    Args:
        per_decade: at most this many steps per factor of ten, a positive int.
        start: no step before this one, a positive int.

    Raises:
        ValueError: ``per_decade`` or ``start`` is not a positive int.
    """

    per_decade: int = 5
    start: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.per_decade, bool) or not isinstance(self.per_decade, int) or self.per_decade < 1:
            raise ValueError(f"log(per_decade): must be a positive int, got {self.per_decade!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 1:
            raise ValueError(f"log(start): must be a positive int, got {self.start!r}")

    def __call__(self, step: int) -> bool:
        if step < self.start:
            return False
        # is step one of the log-spaced points? compare with the nearest exponents around it
        i = math.log10(step) * self.per_decade
        for j in (math.floor(i) - 1, math.floor(i), math.ceil(i), math.ceil(i) + 1):
            if j >= 0 and max(self.start, int(round(10 ** (j / self.per_decade)))) == step:
                return True
        return False


#: the step on which ``as_schedule(..., check=True)`` calls a schedule (the first step asked in training)
CHECK_STEP = 1


def is_due(schedule: Schedule, step: int, who: str = "probe") -> bool:
    """Ask ``schedule`` about ``step`` and check its answer.

    Args:
        schedule: the schedule.
        step: the step.
        who: the name errors start with (the probe's).

    Returns:
        Whether the probe is due at ``step``.

    Raises:
        TypeError: the schedule returned something other than a bool (Python, numpy, or a one-element bool tensor).
        Exception: what the schedule itself raised.
    """
    return check_answer(schedule(step), schedule, step, who)


def check_answer(answer: object, schedule: Schedule, step: int, who: str = "probe") -> bool:
    """A schedule's ``answer`` at ``step`` as a bool (see ``is_due``); raises ``TypeError`` for anything else.

    Args:
        answer: what the schedule returned.
        schedule: the schedule (named in the error).
        step: the step it was asked about.
        who: the probe named in the error.
    """
    if answer is True or answer is False:
        return answer
    if isinstance(answer, (bool, np.bool_)):
        return bool(answer)
    if isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1:
        return bool(answer)
    raise TypeError(
        f"{who}: option 'every': the schedule {schedule!r} returned {answer!r} at step {step}; a "
        "schedule returns a bool (True: measure at this step)"
    )


def as_schedule(value: object, who: str = "probe", *, check: bool = False) -> Schedule:
    """The schedule of a probe's ``every`` option.

    Args:
        value: a positive int, Python or numpy (``every(k)``), or a schedule: a callable ``step -> bool`` (returned
            as it is). An ``nn.Module`` or a class is not a schedule.
        who: the name errors start with (the probe's).
        check: call the schedule once on step 1 (``CHECK_STEP``) and check that it returns a bool (at attach).

    Returns:
        A callable ``step -> bool``.

    Raises:
        TypeError: ``value`` is None, a bool, a float, a module, a class or not callable; or (``check``) the
            schedule does not take one step or returns something other than a bool.
        ValueError: ``value`` is an int below 1; or (``check``) the schedule raised on step 1.
    """
    wanted = "a positive int or a schedule (step -> bool, e.g. probes.schedules.every(10))"
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise TypeError(f"{who}: option 'every' must be {wanted}, got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise ValueError(f"{who}: option 'every' must be a positive number of steps, got {value}")
        return every(int(value))
    if isinstance(value, numbers.Number):
        raise TypeError(f"{who}: option 'every' must be a whole number of steps, got {value!r}")
    if isinstance(value, nn.Module):
        raise TypeError(
            f"{who}: option 'every' must be {wanted}; an nn.Module is not a schedule, got {type(value).__name__}"
        )
    if isinstance(value, type):
        raise TypeError(f"{who}: option 'every' must be {wanted}; got the class {value.__name__}, not a schedule")
    if not callable(value):
        raise TypeError(f"{who}: option 'every' must be {wanted}, got {value!r}")
    schedule: Schedule = value
    if check:
        try:
            is_due(schedule, CHECK_STEP, who)
        except TypeError as exc:
            if str(exc).startswith(f"{who}: option 'every'"):
                raise
            raise TypeError(
                f"{who}: option 'every' must be {wanted}; calling {value!r} on step {CHECK_STEP} raised {exc!r}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - any error of the user's callable
            raise ValueError(
                f"{who}: option 'every': the schedule {value!r} raised {exc!r} on step {CHECK_STEP}"
            ) from exc
    return schedule
