"""Checks of probe options at construction: every message names the probe and the option."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["integer", "number", "choice", "flag", "names"]


def integer(probe: str, option: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """An int (not a bool, not a float) ``>= minimum``; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{probe}: option {option!r} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{probe}: option {option!r} must be >= {minimum}, got {value}")
    return int(value)


def number(probe: str, option: str, value: Any, *, minimum: float | None = None, positive: bool = False,
           optional: bool = False) -> float | None:
    """A finite real number (int or float, not a bool or a string) in range; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{probe}: option {option!r} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{probe}: option {option!r} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{probe}: option {option!r} must be >= {minimum}, got {value}")
    return float(value)


def choice(probe: str, option: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{probe}: option {option!r} must be one of {allowed}, got {value!r}")
    return value


def flag(probe: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{probe}: option {option!r} must be True or False, got {value!r}")
    return value


def names(probe: str, option: str, value: Any) -> list[str] | None:
    """None, one name / fnmatch pattern, or a sequence of them."""
    if value is None:
        return None
    items: Sequence[Any] = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
        raise TypeError(f"{probe}: option {option!r} must be site names or fnmatch patterns, got {value!r}")
    return list(items)
