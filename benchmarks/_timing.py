"""Shared helpers for the benchmarks: interleaved rounds, medians, a ratio table, resident memory."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def samples(
    cases: dict[str, Callable[[], None]], rounds: int = 7, repeat: int = 1, warmup: int = 1
) -> dict[str, list[float]]:
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


def interleaved(
    cases: dict[str, Callable[[], None]], rounds: int = 7, repeat: int = 1, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each case, measured round-robin so drift hits all cases alike."""
    return {name: statistics.median(v) for name, v in samples(cases, rounds, repeat, warmup).items()}


def paired_ratios(measured: dict[str, list[float]], anchor: str) -> dict[str, float]:
    """Median over rounds of ``case / anchor`` within each round: robust to slow drifts of the machine."""
    return {name: statistics.median(a / b for a, b in zip(v, measured[anchor])) for name, v in measured.items()}


def table(
    times: dict[str, float], anchor: str, title: str, unit: str = "ms", ratios: dict[str, float] | None = None
) -> str:
    """Times and ratios against ``anchor`` (``ratios`` given: the paired per-round medians)."""
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    ratios = ratios or {name: t / times[anchor] for name, t in times.items()}
    width = max(len(k) for k in times)
    lines = [title, f"{'case':<{width}}  {'time (' + unit + ')':>12}  {'ratio vs ' + anchor:>16}"]
    for name, t in times.items():
        lines.append(f"{name:<{width}}  {t * scale:>12.3f}  {ratios[name]:>16.3f}x")
    return "\n".join(lines)


@dataclass
class Case:
    """One timed case for ``rotated_rounds``: ``run`` is timed; ``enter`` and ``leave`` run untimed around each block
    (attach a session and take a warm step, detach it), so that other cases' blocks run without it."""

    run: Callable[[], None]
    enter: Callable[[], None] | None = None
    leave: Callable[[], None] | None = None


def rotated_rounds(
    cases: Mapping[str, Case | Callable[[], None]],
    rounds: int = 7,
    repeat: int = 1,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each case in every round, like ``samples``, with these additions.

    Each case's block of ``repeat`` calls runs between its own ``enter`` and ``leave`` (untimed), and the order of
    the cases rotates by one from round to round, so no case always runs right after the same neighbour. ``sync``
    (``torch.cuda.synchronize`` on a GPU) runs before the clock starts and before it stops. ``warmup`` whole
    blocks of each case run first, untimed (0: none). The garbage collector is off while the clock runs.
    """
    named = {name: c if isinstance(c, Case) else Case(c) for name, c in cases.items()}

    def block(case: Case) -> float:
        if case.enter is not None:
            case.enter()
        collecting = gc.isenabled()
        try:
            if sync is not None:
                sync()
            gc.disable()  # as timeit does: a collection (of a detached session, say) falls outside the block
            t0 = time.perf_counter()
            for _ in range(repeat):
                case.run()
            if sync is not None:
                sync()
            return (time.perf_counter() - t0) / repeat
        finally:
            if collecting:
                gc.enable()
            if case.leave is not None:
                case.leave()

    for case in named.values():
        for _ in range(warmup):
            block(case)
    out: dict[str, list[float]] = {name: [] for name in named}
    order = list(named)
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            out[name].append(block(named[name]))
    return out


def rss_now() -> float:
    """Resident memory of this process now, in bytes (Linux ``/proc``; the peak where that is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return rss_peak()


def rss_peak() -> float:
    """Peak resident memory of this process, in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
