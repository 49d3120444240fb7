"""Progress of a long kernel computation: a line on ``logging.getLogger("probes")`` at INFO every few seconds.

``start(who)`` opens a measurement; ``report(stage, done, total)`` is called in the loops (once per chunk of
samples or per layer, never per element) and logs ``"<who>: <stage> <done>/<total> (<pct>%), <s> s so far"`` when
``INTERVAL`` seconds have passed since the start or the last line. It reads the host clock only: no device
synchronisation is added.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("probes")

#: seconds between two progress lines (and before the first)
INTERVAL = 5.0

_state = {"who": "ntk", "t0": 0.0, "last": 0.0}


def start(who: str) -> None:
    """Open a measurement named ``who``: the clock of ``report`` starts now.

    Args:
        who: the name progress lines start with.
    """
    now = time.monotonic()
    _state.update(who=who, t0=now, last=now)


def elapsed() -> float:
    """Seconds since the last ``start``."""
    return time.monotonic() - _state["t0"]


def report(stage: str, done: int, total: int | None) -> None:
    """Log ``done / total`` of ``stage`` (``done`` alone when ``total`` is None) if ``INTERVAL`` seconds passed
    since the last line.

    Args:
        stage: what is being counted ("per-sample factors, samples").
        done: units done so far.
        total: units in all, or None when not known in advance.
    """
    now = time.monotonic()
    if now - _state["last"] < INTERVAL:
        return
    _state["last"] = now
    where = f"{done}" if total is None else f"{done}/{total} ({100.0 * done / max(total, 1):.0f}%)"
    log.info("%s: %s %s, %.0f s so far", _state["who"], stage, where, now - _state["t0"])
