"""When a built-in probe returns its picture (``image_every``), with the step of its last one kept in its declared
state."""

from __future__ import annotations

from typing import Any

import numpy as np

from probes.probe import Probe


class ImageCadence:
    """When a probe returns its picture: at its first measurement (the initialization), then at the first
    measurement at or after each multiple of ``every`` steps (with a cadence that divides ``every``: exactly
    at steps 0, every, 2 every, ...); ``every=None`` at every measurement.

    ``every`` is validated here, so a bad option fails at construction with the probe's name.
    """

    def __init__(self, probe: str, every: int | None = None, option: str = "image_every") -> None:
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or int(every) < 1:
                raise ValueError(
                    f"{probe}: option {option!r} must be a positive int (steps between images) or None, got {every!r}"
                )
            every = int(every)
        self.every = every
        self.last: int | None = None

    def due(self, step: int) -> bool:
        """Whether to draw at ``step``; records the step when it is due."""
        step = int(step)
        if self.every is None or self.last is None or step < self.last or step // self.every > self.last // self.every:
            self.last = step
            return True
        return False


def declare_image_state(probe: Probe) -> None:
    """Declare ``last_image`` (the step of the last image, None before the first): checkpointed, so that a resumed
    run draws its images at the steps where the unbroken run draws them."""
    probe.add_state("last_image", None, reduce=None, window=False)


def image_due(probe: Probe, cadence: ImageCadence, step: int) -> bool:
    """``cadence.due(step)`` reading and updating the probe's ``last_image`` state.

    Args:
        probe: a probe that called ``declare_image_state``.
        cadence: its ``ImageCadence`` (the ``image_every`` option).
        step: the step of the measurement.

    Returns:
        Whether to draw the image at ``step``.
    """
    state: Any = probe  # ``last_image`` is a declared state (``add_state``), set on the instance
    cadence.last = state.last_image
    due = cadence.due(step)
    state.last_image = cadence.last
    return due
