"""Records on their way to the sinks: checked (type, tag under the probe's name), moved to the host in one
transfer, held back while the at-attach measurement may still be dropped by a resume, and written at most once
per tag and step (the first point of a step wins).

Each sink's ``write``, ``flush`` and ``close`` is its own: a sink that raises (a full disk, a deleted logdir, a
writer that fails) is reported once (``SinkFailedWarning``, naming the sink, where it writes and the error), and
the probes stay on, the other sinks get every record, and training goes on. The failed sink misses records until
it writes again: it is tried again at its next write of a later step (no sooner than ``RETRY_SECONDS`` after its
last try), and says when it does (``ProbesNoticeWarning``); one that never does is named in the log at close,
with the steps it missed. With ``strict=True`` the sink's error is raised instead, after the other sinks got the
records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from probes.engine.failures import Failures, sink_error
from probes.engine.run import Run
from probes.records import Record, to_host
from probes.sink import Sink

log = logging.getLogger("probes")

#: a sink that raised is tried again at its next write of a later step, no sooner than this many seconds after its
#: last try
RETRY_SECONDS = 1.0


def check_records(name: str, records: Any) -> list[Record]:
    """``records`` as a list, each a ``Scalar``/``Histogram``/``Image`` whose tag starts with ``name/``."""
    records = list(records or [])
    for r in records:
        if not isinstance(r, Record.__args__):  # type: ignore[attr-defined]
            raise TypeError(f"probe {name!r} returned {r!r}, not a Scalar/Histogram/Image record")
        if not (r.tag == name or r.tag.startswith(name + "/")):
            raise ValueError(f"probe {name!r} returned tag {r.tag!r}: tags must start with '{name}/'")
    return records


def describe(sink: Sink) -> str:
    """``sink <class> writing to <where>`` for messages (``Sink.where``: its directory or address, if it says)."""
    try:
        where = sink.where
    except Exception:  # noqa: BLE001 - a message must not fail
        where = None
    return f"sink {type(sink).__name__}" + (f" writing to {where}" if where else "")


@dataclass
class _Down:
    """A sink that raised and has not written since."""

    since: int | None  # the step of the first write it missed (None: none yet, it failed in flush or close)
    last: int | None  # the step of the last write it missed
    tried: float  # time.monotonic() of its last try
    tried_at: int | None  # the step of its last try

    def missed(self, step: int) -> None:
        self.since = step if self.since is None else self.since
        self.last = step

    def what(self) -> str:
        """What the sink lacks, for messages."""
        steps = (
            ""
            if self.since is None
            else (f" of step {self.since}" if self.last == self.since else f" of steps {self.since} to {self.last}")
        )
        return (
            f"the records{steps} it was handed, and any it held unwritten when it failed, are not there (the "
            "other sinks have them)"
        )


class Output:
    """The sinks of a session (empty on ranks other than 0) and what is held back for them.

    Args:
        failures: the session's failure policy (it says what a sink's failure is, and whether ``strict``).
        run: the run context (only rank 0 writes); default: a run of one process.
    """

    def __init__(self, failures: Failures | None = None, run: Run | None = None) -> None:
        self.failures = failures if failures is not None else Failures(strict=False)
        self.run = run if run is not None else Run()
        self.sinks: list[Sink] = []
        self.pending: list[tuple[list[Record], int]] = []
        self._last: dict[str, int] = {}  # tag -> step of its last point
        self._down: dict[int, _Down] = {}  # id(sink) -> since when it misses records

    def write_all(self, records: list[tuple[str, list[Record]]], step: int, hold: bool = False) -> None:
        """Write the checked records of each probe (a ``Measured``'s ``records``) at ``step``, in order; on ranks
        other than 0, nothing. ``hold``: the at-attach measurement, held back until the session is first used."""
        for _, some in records:
            self.write(some, step, hold)

    def write(self, records: list[Record], step: int, hold: bool = False) -> None:
        if not records or not self.run.writes:
            return
        if hold:  # the sinks are made once attach has succeeded
            self.pending.append((records, step))
        else:
            self._emit(records, step)

    def release(self) -> None:
        """Write the held-back records."""
        if self.pending:
            pending, self.pending = self.pending, []
            for records, step in pending:
                self._emit(records, step)

    def drop_pending(self) -> None:
        self.pending = []

    def _emit(self, records: list[Record], step: int) -> None:
        fresh = [r for r in records if self._last.get(r.tag) != step]
        if not fresh or not self.sinks:
            return
        for r in fresh:
            self._last[r.tag] = step
        fresh = to_host(fresh)
        error = None
        for sink in self.sinks:
            failed = self._write_to(sink, fresh, step)
            error = error or failed
        if error is not None:  # strict=True: raised once every sink had the records
            raise error

    def _write_to(self, sink: Sink, records: list[Record], step: int) -> BaseException | None:
        down = self._down.get(id(sink))
        if down is not None and (step == down.tried_at or time.monotonic() - down.tried < RETRY_SECONDS):
            down.missed(step)
            return None
        try:
            sink.write(records, step)
        except Exception as exc:  # noqa: BLE001 - the sink's failure, not the probe's whose records these are
            return self._failed(sink, "write", exc, step, self.failures.raises)
        if down is not None:
            del self._down[id(sink)]
            self.failures.sink_back(f"{describe(sink)} writes again from step {step}: {down.what()}")
        return None

    def _failed(self, sink: Sink, what: str, exc: Exception, step: int | None, strict: bool) -> BaseException | None:
        """Note that ``sink`` raised: said once until it writes again; under ``strict`` the error to raise."""
        down = self._down.get(id(sink))
        if down is not None:
            down.tried, down.tried_at = time.monotonic(), step
            if what == "write" and step is not None:
                down.missed(step)
        else:
            at = step if what == "write" else None
            self._down[id(sink)] = _Down(at, at, time.monotonic(), step)
        if strict:
            at_step = f" at step {step}" if step is not None else ""
            return sink_error(
                exc, f"(in {describe(sink)}, in {what}{at_step}; the other sinks got every record; strict=True)"
            )
        if down is not None:  # still failing: said already
            log.debug("%s raised again in %s at step %s", describe(sink), what, step, exc_info=True)
        else:
            self.failures.sink_failed(describe(sink), what, exc, step)
        return None

    def flush(self, step: int | None = None) -> None:
        """Flush every sink that writes (one that raised and has not written since is left alone).

        Args:
            step: the session's step (for messages).

        Raises:
            Exception: a sink's error, under ``strict=True`` (after every other sink was flushed).
        """
        error = None
        for sink in self.sinks:
            if id(sink) in self._down:
                continue
            try:
                sink.flush()
            except Exception as exc:  # noqa: BLE001 - the sink's failure
                error = error or self._failed(sink, "flush", exc, step, self.failures.raises)
        if error is not None:
            raise error

    def close(self, step: int | None = None, strict: bool = False) -> None:
        """Close every sink, each on its own; name in the log the sinks that did not write again.

        Args:
            step: the session's step (for messages).
            strict: raise the first sink error of this close, after every sink was closed.
        """
        error = None
        for sink in self.sinks:
            down = self._down.get(id(sink))
            if down is not None:
                self.failures.sink_back(f"{describe(sink)} did not write again: {down.what()}", warn=False)
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - the sink's failure
                error = error or self._failed(sink, "close", exc, step, strict)
        if error is not None:
            raise error
