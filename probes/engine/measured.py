"""What a measurement or a flush returns: the records of each probe, the seconds each took, the probes that
``attach(model, "auto")`` leaves out, and under ``strict=True`` the error to raise once the records before it are
written. The caller hands the records to the output and the seconds to the cadence."""

from __future__ import annotations

from dataclasses import dataclass, field

from probes.engine.failures import Failures
from probes.records import Record

__all__ = ["Measured"]


@dataclass
class Measured:
    """The outcome of one measurement (active probes) or flush (passive probes)."""

    records: list[tuple[str, list[Record]]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    left_out: list[tuple[str, Exception]] = field(default_factory=list)
    raised: BaseException | None = None

    def fail(self, failures: Failures, name: str, exc: BaseException, step: int) -> bool:
        """``failures.fail``; under ``strict`` the error is kept to be raised after the records before it are
        written. Returns True when the measurement must stop there (the error was kept)."""
        try:
            failures.fail(name, exc, step)
        except BaseException as error:  # noqa: BLE001 - strict=True: raised by the caller once records are out
            self.raised = error
            return True
        return False

    def extend(self, other: Measured) -> None:
        """Take ``other``'s records, seconds, left-out probes and error (the first error wins)."""
        self.records += other.records
        self.seconds.update(other.seconds)
        self.left_out += other.left_out
        self.raised = self.raised or other.raised
