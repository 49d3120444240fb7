"""When a built-in probe draws its image, with the step of its last image kept in its declared state."""

from __future__ import annotations

from probes.figures import ImageCadence
from probes.probe import Probe


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
    cadence.last = probe.last_image
    due = cadence.due(step)
    probe.last_image = cadence.last
    return due
