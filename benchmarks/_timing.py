"""Shared timing helpers for the benchmarks: interleaved rounds, medians, a ratio table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def samples(cases: dict[str, Callable[[], None]], rounds: int = 7, repeat: int = 1,
            warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each case in every round, measured round-robin so drift hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            out[name].append((time.perf_counter() - t0) / repeat)
    return out


def interleaved(cases: dict[str, Callable[[], None]], rounds: int = 7, repeat: int = 1,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each case, measured round-robin so drift hits all cases alike."""
    return {name: statistics.median(v) for name, v in samples(cases, rounds, repeat, warmup).items()}


def paired_ratios(measured: dict[str, list[float]], anchor: str) -> dict[str, float]:
    """Median over rounds of ``case / anchor`` within each round: robust to slow drifts of the machine."""
    return {name: statistics.median(a / b for a, b in zip(v, measured[anchor])) for name, v in measured.items()}


def table(times: dict[str, float], anchor: str, title: str, unit: str = "ms",
          ratios: dict[str, float] | None = None) -> str:
    """Times and ratios against ``anchor`` (``ratios`` given: the paired per-round medians)."""
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    ratios = ratios or {name: t / times[anchor] for name, t in times.items()}
    width = max(len(k) for k in times)
    lines = [title, f"{'case':<{width}}  {'time (' + unit + ')':>12}  {'ratio vs ' + anchor:>16}"]
    for name, t in times.items():
        lines.append(f"{name:<{width}}  {t * scale:>12.3f}  {ratios[name]:>16.3f}x")
    return "\n".join(lines)
