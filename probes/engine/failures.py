"""The failure policy: a probe that raises is reported once and switched off, and training goes on (with
``strict=True`` the error is re-raised); notices are said once per probe and subject, on rank 0 only.

A sink that raises is the sink's failure, not the probes': ``probes.engine.output`` keeps the probes on and the
other sinks written, and says so here (``sink_failed``, ``sink_back``); with ``strict=True`` it re-raises the
sink's error (marked with ``sink_error``, so that a probe's measurement that was writing is not blamed for it).

Everything is said once, on one channel (``say``): a warning whose location is the user's line (the first frame
outside probes and torch), or, when a framework drives the session (``framework_driven``: the Lightning and
Transformers callbacks), a line on ``logging.getLogger("probes")``, since the frame that called would be the
framework's. ``warnings.filterwarnings("ignore", category=probes.ProbesNoticeWarning)`` silences the notices."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from types import FrameType

import torch

from probes.probe import ProbesNoticeWarning

log = logging.getLogger("probes")

#: frames in these folders are not the user's: a warning points at the first frame outside them
_NOT_USERS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (os.path.dirname(os.path.abspath(__file__)), torch.__file__)
)
_FRAMEWORK: contextvars.ContextVar[bool] = contextvars.ContextVar("probes_framework", default=False)


class ProbeFailedWarning(RuntimeWarning):
    """A probe raised; it is switched off and training goes on."""


class SinkFailedWarning(RuntimeWarning):
    """A sink raised (a full disk, a deleted logdir, a writer that fails): it misses records until a later write
    works; the probes stay on and every other sink still gets every record."""


class ProbesClosedError(RuntimeError):
    """The session was closed; only ``close()`` may be called again."""


def _not_users(filename: str) -> bool:
    """Whether a frame of ``filename`` is probes' or torch's own (or code that torch generated: FX graph modules,
    torch.compile's kernels in its cache folder)."""
    return (
        filename.startswith(_NOT_USERS)
        or filename.startswith("<eval_with_key>")
        or f"{os.sep}torchinductor_" in filename
    )


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` called by the caller of this function point at the user's
    code: the first frame whose file is outside the probes package (and outside torch, whose hooks call probes)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and _not_users(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


@contextlib.contextmanager
def framework_driven() -> Iterator[None]:
    """Sessions made inside this context say things as log lines only (a framework's callback makes them)."""
    token = _FRAMEWORK.set(True)
    try:
        yield
    finally:
        _FRAMEWORK.reset(token)


def framework_default() -> bool:
    """Whether sessions made now are driven by a framework (inside ``framework_driven()``): a probe reads it when it
    is made, at attach, to say its notices later as the session does (``say(..., framework=...)``)."""
    return _FRAMEWORK.get()


def say(
    message: str, category: type[Warning] = UserWarning, framework: bool = False, level: int = logging.WARNING
) -> None:
    """Say ``message`` once: a ``category`` warning pointing at the user's line, or with ``framework`` a log line
    at ``level`` on ``logging.getLogger("probes")``."""
    if framework:
        log.log(level, message)
        return
    warnings.warn(message, category, stacklevel=user_stacklevel())


class Failures:
    """Which probes are switched off and why (``failed``: name -> traceback or message), and the notices said.

    Args:
        strict: re-raise a probe's error instead of switching the probe off.
        rank: this process's rank; only rank 0 speaks.
        framework: a framework drives the session (its callbacks call it): say things as log lines, not warnings
            pointing at the framework's code (default: whether the session is made inside ``framework_driven()``).
    """

    def __init__(self, strict: bool, rank: int = 0, framework: bool | None = None) -> None:
        self.strict, self.rank = strict, rank
        self.framework = _FRAMEWORK.get() if framework is None else framework
        self.failed: dict[str, str] = {}
        self._said: set[tuple[str, str]] = set()
        self._lenient = 0  # inside reporting_only()

    def enabled(self, name: str) -> bool:
        return name not in self.failed

    @contextlib.contextmanager
    def reporting_only(self) -> Iterator[None]:
        """Inside: a probe's error is reported and the probe switched off, even under ``strict`` (a session closed
        on the user's exception: the user's error wins)."""
        self._lenient += 1
        try:
            yield
        finally:
            self._lenient -= 1

    @property
    def raises(self) -> bool:
        """Whether an error is raised now (``strict``, outside ``reporting_only()``)."""
        return self.strict and not self._lenient

    def fail(self, name: str, exc: BaseException, step: int) -> None:
        """Switch ``name`` off and say so once (or re-raise ``exc`` under ``strict``)."""
        if self.raises:
            if hasattr(exc, "add_note") and not is_sink_error(exc):  # a sink's error names the sink already
                exc.add_note(f"(in probe {name!r} at step {step}; strict=True)")
            raise exc
        if name in self.failed:
            return
        self.failed[name] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        msg = f"probe {name!r} raised at step {step} and is switched off; training goes on: {exc!r}"
        say(msg, ProbeFailedWarning, self.framework, logging.ERROR)

    def switch_off(self, name: str, message: str) -> None:
        """Switch ``name`` off for a known reason (every rank does; rank 0 says so)."""
        self.failed[name] = message
        self.notice(name, "off", message)

    def notice(self, name: str, key: str, message: str) -> None:
        """Say ``message`` once per ``(name, key)``: a ``ProbesNoticeWarning`` (a log warning when a framework
        drives)."""
        if (name, key) in self._said or self.rank != 0:
            return
        self._said.add((name, key))
        say(message, ProbesNoticeWarning, self.framework)

    def sink_failed(self, sink: str, what: str, exc: BaseException, step: int | None) -> None:
        """Say that ``sink`` (its description: name and path) raised in ``what`` (write, flush, close)."""
        if self.rank != 0:
            return
        at = f" at step {step}" if step is not None else ""
        msg = (
            f"{sink} raised in {what}{at}: {type(exc).__name__}: {exc}; the probes stay on and every other sink "
            "still gets every record; this sink is tried again at its next write and says when it writes again"
        )
        say(msg, SinkFailedWarning, self.framework, logging.ERROR)

    def sink_back(self, message: str, warn: bool = True) -> None:
        """Say that a sink that raised writes again (a ``ProbesNoticeWarning``), or, with ``warn=False``, only log
        what a sink that did not write again missed."""
        if self.rank != 0:
            return
        say(message, ProbesNoticeWarning, self.framework or not warn)


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
