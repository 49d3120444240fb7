"""Iterations that a ``GradScaler`` skipped: ``attach(grad_scaler=scaler)`` counts them as ``train/skipped_steps``.

``session.global_step`` follows real optimizer steps. ``scaler.step(opt)`` does not call ``opt.step()`` when the
scaled gradients hold an inf or NaN, so such an iteration is no step: the probes' step and the user's loop counter
(or an LR scheduler stepped every iteration) drift apart by the skipped iterations. To count them, the scaler's
``step`` is shadowed on that instance only by a bound method that calls the class's own ``step`` and notes whether
the session's optimizer stepped. Pickling or copying the scaler carries nothing of the session: the bound method
pickles as ``getattr(scaler, "step")``, which on the fresh object is the class's plain ``step``, and a deep copy is
bound to the copy, which no session counts.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

__all__ = ["SkippedSteps"]

#: scaler -> its counter, for the scalers of open sessions (a scaler that is collected drops out)
_COUNTERS: weakref.WeakKeyDictionary[Any, SkippedSteps] = weakref.WeakKeyDictionary()


def step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """``GradScaler.step``, counting the calls that did not step the session's optimizer."""
    counter = _COUNTERS.get(self)
    if counter is None:  # a copy, or a scaler whose session closed
        return type(self).step(self, optimizer, *args, **kwargs)
    before = counter.clock.step
    out = type(self).step(self, optimizer, *args, **kwargs)
    if optimizer is counter.optimizer:
        counter.after(stepped=counter.clock.step != before)
    return out


class SkippedSteps:
    """Counts the iterations ``scaler`` skipped for ``optimizer``; ``write(count)`` is called at the next real step
    (after the session stepped) and at ``close()`` whenever the count changed.

    Args:
        scaler: a ``torch.amp.GradScaler`` (or anything with a ``step(optimizer, ...)`` method).
        optimizer: the session's optimizer; clock: the session's step clock (``probes.engine.run.StepClock``).
        write: ``write(count)`` hands the cumulative count to the session's output.
    """

    def __init__(self, scaler: Any, optimizer: Any, clock: Any, write: Any) -> None:
        if not callable(getattr(scaler, "step", None)):
            raise TypeError(f"attach(grad_scaler=...) must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if optimizer is None:
            raise ValueError(
                "attach(grad_scaler=...) needs optimizer=...: the skipped steps are the iterations in "
                "which scaler.step(optimizer) did not step it"
            )
        if scaler in _COUNTERS:
            raise ValueError("attach(grad_scaler=...): this scaler is already counted by another open session")
        self.scaler, self.optimizer, self.clock, self.write = scaler, optimizer, clock, write
        self.skipped, self._written = 0, 0
        _COUNTERS[scaler] = self
        scaler.step = types.MethodType(step, scaler)

    def after(self, stepped: bool) -> None:
        if not stepped:
            self.skipped += 1
        elif self.skipped != self._written:
            self.flush()

    def flush(self) -> None:
        """Write the count if it changed since it was last written."""
        if self.skipped != self._written:
            self._written = self.skipped
            self.write(self.skipped)

    def remove(self) -> None:
        """Give the scaler its own ``step`` back."""
        if _COUNTERS.get(self.scaler) is self:
            del _COUNTERS[self.scaler]
        bound = self.scaler.__dict__.get("step")
        if isinstance(bound, types.MethodType) and bound.__func__ is step:
            del self.scaler.__dict__["step"]
