"""Progress of a long kernel computation: a line on ``logging.getLogger("probes")`` at INFO every few seconds.

``measuring(who)`` opens a measurement (outside one, ``report`` says nothing: the plan's own checks run the
same loops); ``report(stage, done, total)`` is called in the loops (once per chunk of
samples or per layer, never per element) and logs ``"<who>: <stage> <done>/<total> (<pct>%), <s> s so far"`` when
``INTERVAL`` seconds have passed since the start or the last line. It reads the host clock only: no device
synchronisation is added.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("probes")

#: seconds between two progress lines (and before the first)
INTERVAL = 5.0

_state: dict = {"who": "ntk", "t0": None, "last": 0.0}


@contextlib.contextmanager
def measuring(who: str) -> Iterator[None]:
    """Within the block, ``report`` logs progress lines named ``who``, timed from the block's start.

    Args:
        who: the name progress lines start with.

    Yields:
        Nothing.
    """
    now = time.monotonic()
    saved = dict(_state)
    _state.update(who=who, t0=now, last=now)
    try:
        yield
    finally:
        _state.update(saved)


def report(stage: str, done: int, total: int | None) -> None:
    """Log ``done / total`` of ``stage`` (``done`` alone when ``total`` is None) if ``INTERVAL`` seconds passed
    since the last line.

    Args:
        stage: what is being counted ("per-sample factors, samples").
        done: units done so far.
        total: units in all, or None when not known in advance.
    """
    if _state["t0"] is None:
        return
    now = time.monotonic()
    if now - _state["last"] < INTERVAL:
        return
    _state["last"] = now
    where = f"{done}" if total is None else f"{done}/{total} ({100.0 * done / max(total, 1):.0f}%)"
    log.info("%s: %s %s, %.0f s so far", _state["who"], stage, where, now - _state["t0"])
