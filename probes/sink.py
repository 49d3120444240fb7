"""The sink contract: ``Sink`` receives every record the probes return, with its step (the engine writes to it;
the sinks in ``probes.sinks`` and third parties' implement it). See ``docs/sinks.md``."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

from probes.records import PLOTS_EXTRA, Chart, Record, Renderer, default_renderer

_NOTICE_LOCK = threading.Lock()
_NOTICED = False


def notice_no_renderer() -> None:
    """Say once per process that pictures are left out for want of matplotlib (scalars and histograms are not)."""
    global _NOTICED
    with _NOTICE_LOCK:
        if _NOTICED:
            return
        _NOTICED = True
    warnings.warn(
        f"probes: matplotlib is not installed, so images are left out (every scalar and histogram is written); "
        f"for images: {PLOTS_EXTRA}",
        RuntimeWarning,
        stacklevel=3,
    )


class Sink:
    """Write records somewhere. Only rank 0 of a distributed run has sinks that write.

    A sink that raises in ``write``, ``flush`` or ``close`` (a full disk, a deleted logdir) fails alone: the session
    says so once, naming the sink and its ``where``, keeps the probes on and the other sinks written, and calls
    ``write`` again at a later step (a sink that can recover, recovers there: the TensorBoard sink opens a new event
    file). ``strict=True`` raises the error instead.

    ``declare(charts)`` hands the sink the chart groups the attached probes declare (``Probe.charts``), before
    the first ``write``; a sink that draws charts groups the scalar tags by them and names no probe itself.
    Until ``declare`` is called there are none (``probes.plugins.registered_charts`` has those of every
    registered probe, for a sink used without a session).
    """

    _declared: tuple[Chart, ...] | None = None
    #: what draws pictures (``probes.records.Renderer``): given at construction, else loaded at the first picture
    renderer: Renderer | None = None
    _renderer_loaded = False

    def _pictures(self, notice: bool = True) -> Renderer | None:
        """The renderer: the one given, else ``default_renderer()`` (loaded once); None without matplotlib, after
        one notice (with ``notice``)."""
        if self.renderer is None and not self._renderer_loaded:
            self._renderer_loaded = True
            self.renderer = default_renderer()
        if self.renderer is None and notice:
            notice_no_renderer()
        return self.renderer

    @classmethod
    def from_run(cls, run: Any, **options: Any) -> Sink:
        """The one constructor protocol (``probes.sinks.build``): the sink for ``run`` (an object with ``logdir``
        and ``writer``, ``probes.engine.run.Run``), made with ``options`` (``attach(sinks={name: options})``).
        By default ``cls(**options)``; a sink that writes files next to the run's overrides it.

        Args:
            run: the run the sink writes for.
            **options: the sink's own keyword options.
        """
        return cls(**options)

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

    @property
    def where(self) -> str | None:
        """Where this sink writes (a directory, an address), named in messages about it; None: nowhere to name."""
        return None

    def write(self, records: Sequence[Record], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()
