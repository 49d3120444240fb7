"""The sink interface: receives every record the probes return, with its step."""

from __future__ import annotations

from collections.abc import Sequence

from probes.records import Record


class Sink:
    """Write records somewhere. Only rank 0 of a distributed run has sinks that write."""

    def write(self, records: Sequence[Record], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()
