"""Picture data to its figure: each kind of ``probes.records.Figure`` drawn by its figure function."""

from __future__ import annotations

import numpy as np

from probes.app.render.kinds import gates_figure, matrix_figure, particles_figure, spectrum_figure
from probes.app.render.plots import line_plot
from probes.records import Curves, Figure, Gates, Matrix, Spectrum, Trails


def draw(figure: Figure) -> np.ndarray:
    """The pixels of ``figure``, uint8 ``(H, W, 3)``, drawn now by its kind's figure function.

    Raises:
        TypeError: not picture data.
    """
    if isinstance(figure, Matrix):
        return matrix_figure(
            figure.values,
            figure.starts,
            figure.names,
            title=figure.title,
            colorbar_label=figure.colorbar_label,
            xlabel=figure.xlabel,
            ylabel=figure.ylabel,
            vmin=figure.vmin,
            vmax=figure.vmax,
        )
    if isinstance(figure, Gates):
        return gates_figure(
            figure.values,
            figure.starts,
            figure.names,
            title=figure.title,
            unit_label=figure.unit_label,
            total=figure.total,
            padding=figure.padding,
        )
    if isinstance(figure, Trails):
        return particles_figure(
            figure.current,
            figure.trails,
            figure.sign,
            figure.teacher,
            figure.teacher_sign,
            figure.limit,
            title=figure.title,
            axis_labels=figure.axis_labels,
            size=figure.size,
            legend=figure.legend,
        )
    if isinstance(figure, Spectrum):
        return spectrum_figure(
            figure.values,
            figure.reference,
            step=figure.step,
            init_step=figure.reference_step,
            title=figure.title,
            ylabel=figure.ylabel,
        )
    if isinstance(figure, Curves):
        return line_plot(
            figure.series,
            title=figure.title,
            xlabel=figure.xlabel,
            ylabel=figure.ylabel,
            logx=figure.logx,
            logy=figure.logy,
        )
    raise TypeError(f"not picture data: {figure!r}")


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as uint8 ``(H, W, 3)`` (floats in [0, 1] scaled, grey stacked, alpha dropped)."""
    p = np.asarray(pixels)
    if p.dtype != np.uint8:
        p = (np.clip(p, 0.0, 1.0) * 255).round().astype(np.uint8)
    if p.ndim == 2:
        p = np.stack([p] * 3, axis=-1)
    return p[..., :3] if p.shape[-1] == 4 else p
