"""When a probe measures: a schedule is a callable ``step -> bool``.

``every(k)`` (steps k, 2k, ...), ``log(...)`` (dense early, sparse late: kernels and gates move
fastest at the start of training), ``at([...])`` (listed steps). Any callable ``step -> bool`` works.
A probe's ``every`` option is a positive int (``every(k)``) or a schedule. Step 0 is the
initialization: active probes measure there at attach, and once more at ``close()``,
whatever the schedule says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Schedule = Callable[[int], bool]

__all__ = ["Schedule", "every", "log", "at", "as_schedule"]


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
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"every(k): k must be a positive int, got {self.k!r}")

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
        values = list(steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
            raise ValueError(f"at(steps): steps must be non-negative ints, got {values!r}")
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


def as_schedule(value: object, who: str = "probe") -> Schedule:
    """The schedule of a probe's ``every`` option.

    Args:
        value: a positive int (``every(k)``) or a callable ``step -> bool`` (returned as it is).
        who: the name errors start with (the probe's).

    Returns:
        A callable ``step -> bool``.

    Raises:
        TypeError: ``value`` is None, a bool, a float or not callable.
        ValueError: ``value`` is an int below 1.
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{who}: option 'every' must be a positive int or a schedule (step -> bool), got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{who}: option 'every' must be a positive number of steps, got {value}")
        return every(value)
    if isinstance(value, float):
        raise TypeError(f"{who}: option 'every' must be a whole number of steps, got {value!r}")
    if callable(value):
        return value  # type: ignore[return-value]
    raise TypeError(f"{who}: option 'every' must be a positive int or a schedule (step -> bool), got {value!r}")
