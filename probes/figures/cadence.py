"""When a probe draws its images: ``image_every``."""

from __future__ import annotations

import numpy as np

#: dots per inch of every figure: sizes below are in pixels


# -- when images are drawn ---------------------------------------------------------------------------
class ImageCadence:
    """When a probe draws its image: at its first measurement (the initialization), then at the first
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
