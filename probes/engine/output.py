"""Records on their way to the sinks: checked (type, tag under the probe's name), moved to the host in one
transfer, held back while the at-attach measurement may still be dropped by a resume, and written at most once
per tag and step (the first point of a step wins)."""

from __future__ import annotations

from typing import Any

from probes.records import Record, to_host
from probes.sinks.base import Sink


def check_records(name: str, records: Any) -> list[Record]:
    """``records`` as a list, each a ``Scalar``/``Histogram``/``Image`` whose tag starts with ``name/``."""
    records = list(records or [])
    for r in records:
        if not isinstance(r, Record.__args__):  # type: ignore[attr-defined]
            raise TypeError(f"probe {name!r} returned {r!r}, not a Scalar/Histogram/Image record")
        if not (r.tag == name or r.tag.startswith(name + "/")):
            raise ValueError(f"probe {name!r} returned tag {r.tag!r}: tags must start with '{name}/'")
    return records


class Output:
    """The sinks of a session (empty on ranks other than 0) and what is held back for them."""

    def __init__(self) -> None:
        self.sinks: list[Sink] = []
        self.pending: list[tuple[list[Record], int]] = []
        self._last: dict[str, int] = {}  # tag -> step of its last point

    def write(self, records: list[Record], step: int, hold: bool = False) -> None:
        if not records:
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
        for sink in self.sinks:
            sink.write(fresh, step)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
