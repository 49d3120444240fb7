"""Shared timing helpers for the benchmarks: interleaved rounds, medians, a ratio table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(cases: dict[str, Callable[[], None]], rounds: int = 7, repeat: int = 1,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each case, measured round-robin so drift hits all cases alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            samples[name].append((time.perf_counter() - t0) / repeat)
    return {name: statistics.median(v) for name, v in samples.items()}


def table(times: dict[str, float], anchor: str, title: str, unit: str = "ms") -> str:
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    width = max(len(k) for k in times)
    lines = [title, f"{'case':<{width}}  {'time (' + unit + ')':>12}  {'ratio vs ' + anchor:>16}"]
    for name, t in times.items():
        lines.append(f"{name:<{width}}  {t * scale:>12.3f}  {t / times[anchor]:>16.3f}x")
    return "\n".join(lines)
