"""The failure policy: a probe that raises is reported once and switched off, and training goes on (with
``strict=True`` the error is re-raised); notices are said once per probe and subject, on rank 0 only.

A sink that raises is the sink's failure, not the probes': ``probes.engine.output`` keeps the probes on and the
other sinks written, and says so here (``sink_failed``, ``sink_back``); with ``strict=True`` it re-raises the
sink's error (marked with ``sink_error``, so that a probe's measurement that was writing is not blamed for it)."""

from __future__ import annotations

import logging
import traceback
import warnings

log = logging.getLogger("probes")


class ProbeFailedWarning(RuntimeWarning):
    """A probe raised; it is switched off and training goes on."""


class ProbesNoticeWarning(UserWarning):
    """Something a user should know once: a probe that sees nothing on this model, a window without training."""


class SinkFailedWarning(RuntimeWarning):
    """A sink raised (a full disk, a deleted logdir, a writer that fails): it misses records until a later write
    works; the probes stay on and every other sink still gets every record."""


class ProbesClosedError(RuntimeError):
    """The session was closed; only ``close()`` may be called again."""


class Failures:
    """Which probes are switched off and why (``failed``: name -> traceback or message), and the notices said.

    Args:
        strict: re-raise a probe's error instead of switching the probe off.
        rank: this process's rank; only rank 0 speaks.
    """

    def __init__(self, strict: bool, rank: int = 0) -> None:
        self.strict, self.rank = strict, rank
        self.failed: dict[str, str] = {}
        self._said: set[tuple[str, str]] = set()

    def enabled(self, name: str) -> bool:
        return name not in self.failed

    def fail(self, name: str, exc: BaseException, step: int) -> None:
        """Switch ``name`` off and say so once (or re-raise ``exc`` under ``strict``)."""
        if self.strict:
            if hasattr(exc, "add_note") and not is_sink_error(exc):  # a sink's error names the sink already
                exc.add_note(f"(in probe {name!r} at step {step}; strict=True)")
            raise exc
        if name in self.failed:
            return
        self.failed[name] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        msg = f"probe {name!r} raised at step {step} and is switched off; training goes on: {exc!r}"
        log.error(msg)
        warnings.warn(msg, ProbeFailedWarning, stacklevel=4)

    def switch_off(self, name: str, message: str) -> None:
        """Switch ``name`` off for a known reason (every rank does; rank 0 says so)."""
        self.failed[name] = message
        self.notice(name, "off", message)

    def notice(self, name: str, key: str, message: str) -> None:
        """Say ``message`` once per ``(name, key)``, as a log warning and a ``ProbesNoticeWarning``."""
        if (name, key) in self._said or self.rank != 0:
            return
        self._said.add((name, key))
        log.warning(message)
        warnings.warn(message, ProbesNoticeWarning, stacklevel=5)

    def sink_failed(self, sink: str, what: str, exc: BaseException, step: int | None) -> None:
        """Say that ``sink`` (its description: name and path) raised in ``what`` (write, flush, close)."""
        if self.rank != 0:
            return
        at = f" at step {step}" if step is not None else ""
        msg = (f"{sink} raised in {what}{at}: {type(exc).__name__}: {exc}; the probes stay on and every other sink "
               "still gets every record; this sink is tried again at its next write and says when it writes again")
        log.error(msg)
        warnings.warn(msg, SinkFailedWarning, stacklevel=2)

    def sink_back(self, message: str, warn: bool = True) -> None:
        """Say that a sink that raised writes again (a ``ProbesNoticeWarning`` too), or, with ``warn=False``, only
        log what a sink that did not write again missed."""
        if self.rank != 0:
            return
        log.warning(message)
        if warn:
            warnings.warn(message, ProbesNoticeWarning, stacklevel=2)


def sink_error(exc: BaseException, note: str) -> BaseException:
    """Mark ``exc`` as a sink's error (raised under ``strict=True``), with ``note`` saying which sink."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    try:
        exc._probes_sink_error = True  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__
        pass
    return exc


def is_sink_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a sink's error that ``strict=True`` let through (not a probe's)."""
    return bool(getattr(exc, "_probes_sink_error", False))
