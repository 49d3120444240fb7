"""The pixels of the built-in probes' pictures, drawn now by the matplotlib renderer (the tests' ``*_image``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from probes.app.render import draw
from probes.builtin.ntk import spectrum_drawing
from probes.builtin.patterns import gate_drawing


def gate_image(
    gates: torch.Tensor,
    order: torch.Tensor,
    starts: list[int],
    names: Sequence[str] = (),
    title: str = "gates on the probe batch",
    ndim: int = 2,
    real: torch.Tensor | None = None,
) -> np.ndarray:
    """The pixels of ``gate_drawing``."""
    return draw(gate_drawing(gates, order, starts, names, title, ndim, real))


def spectrum_image(
    eigs: torch.Tensor,
    reference: torch.Tensor | None = None,
    step: int | None = None,
    reference_step: int | None = None,
    reduction: str = "sum",
    mode: str = "trace",
    of: int | None = None,
) -> np.ndarray:
    """The pixels of ``spectrum_drawing``."""
    return draw(spectrum_drawing(eigs, reference, step, reference_step, reduction, mode, of))
