"""The failure policy: a probe that raises is reported once and switched off, and training goes on (with
``strict=True`` the error is re-raised); notices are said once per probe and subject, on rank 0 only."""

from __future__ import annotations

import logging
import traceback
import warnings

log = logging.getLogger("probes")


class ProbeFailedWarning(RuntimeWarning):
    """A probe raised; it is switched off and training goes on."""


class ProbesNoticeWarning(UserWarning):
    """Something a user should know once: a probe that sees nothing on this model, a window without training."""


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
            if hasattr(exc, "add_note"):
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
