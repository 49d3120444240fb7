"""The probe set: the attached probes by name, which are passive or active, and which are on. One object, shared
by reference by the session and its drivers; only ``leave_out`` removes a probe (``attach(model, "auto")``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from probes.engine.failures import Failures
from probes.probe import Probe

__all__ = ["ProbeSet"]


class ProbeSet(Mapping[str, Probe]):
    """The attached probes by name, in the order given (a read-only mapping).

    Args:
        probes: ``(name, probe)`` pairs or a mapping.
        failures: the session's failure policy, which knows the probes switched off.
    """

    def __init__(self, probes: Mapping[str, Probe] | Iterable[tuple[str, Probe]], failures: Failures) -> None:
        self._all: dict[str, Probe] = dict(probes)
        self._failures = failures
        self._split()

    def _split(self) -> None:
        self.passive: dict[str, Probe] = {n: p for n, p in self._all.items() if p.passive}
        self.active: dict[str, Probe] = {n: p for n, p in self._all.items() if not p.passive}

    def __getitem__(self, name: str) -> Probe:
        return self._all[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def on(self, name: str) -> bool:
        """Whether ``name`` is attached and not switched off."""
        return name in self._all and self._failures.enabled(name)

    @property
    def off(self) -> dict[str, str]:
        """The probes switched off: name -> the traceback or reason."""
        return self._failures.failed

    def active_on(self) -> list[str]:
        """The active probes that are on, in order."""
        return [n for n in self.active if self._failures.enabled(n)]

    def leave_out(self, name: str) -> None:
        """Remove ``name`` (``attach(model, "auto")``: a probe that does not apply)."""
        if self._all.pop(name, None) is not None:
            self._split()
