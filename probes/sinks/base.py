"""The sink interface: receives every record the probes return, with its step."""

from __future__ import annotations

from collections.abc import Sequence

from probes.records import Chart, Record


class Sink:
    """Write records somewhere. Only rank 0 of a distributed run has sinks that write.

    ``declare(charts)`` hands the sink the chart groups the attached probes declare (``Probe.charts``), before
    the first ``write``; a sink that draws charts groups the scalar tags by them and names no probe itself.
    Until ``declare`` is called there are none (``probes.plugins.registered_charts`` has those of every
    registered probe, for a sink used without a session).
    """

    _declared: tuple[Chart, ...] | None = None

    @property
    def charts(self) -> tuple[Chart, ...]:
        """The declared chart groups (none before ``declare``)."""
        return self._declared if self._declared is not None else ()

    def declare(self, charts: Sequence[Chart]) -> None:
        """Take the chart groups of the attached probes (the session calls it once, at attach).

        Args:
            charts: every ``Chart`` the attached probes declare.
        """
        self._declared = tuple(dict.fromkeys(charts))

    def write(self, records: Sequence[Record], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()
