"""Picture data to pixels: each kind of ``probes.records.Figure`` drawn by its figure function, here or in the
shared drawing process (``probes.app.render.background``)."""

from __future__ import annotations

import logging
import threading

import numpy as np

from probes.app.render.canvas import encode_png
from probes.app.render.kinds import gates_figure, matrix_figure, particles_figure, spectrum_figure
from probes.app.render.plots import line_plot
from probes.records import Curves, Figure, Gates, Matrix, Spectrum, Trails

log = logging.getLogger("probes")


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


class MatplotlibRenderer:
    """``probes.records.Renderer`` with matplotlib: ``pixels`` here, ``png`` in the shared drawing process (one
    per process, started at the first picture; where it cannot start or stops, pictures are drawn here)."""

    def __init__(self) -> None:
        self._process = None
        self._lock = threading.Lock()
        self._stopped = False

    def pixels(self, figure: Figure) -> np.ndarray:
        """The pixels of ``figure``, drawn in the calling thread."""
        return as_uint8(draw(figure))

    def encode(self, pixels: np.ndarray) -> bytes:
        """PNG bytes (a palette PNG when the pixels have at most 256 colours)."""
        return encode_png(pixels)

    def png(self, figure: Figure, background: bool = True) -> tuple[np.ndarray, bytes]:
        """The pixels of ``figure`` and their PNG: drawn in the drawing process with ``background``, else here."""
        from probes.app.render import background as bg

        process = self._drawing_process() if background else None
        if process is not None:
            try:
                return process.draw(figure)
            except bg.NotSendable:  # data the protocol does not carry (an object array): drawn here
                pass
            except bg.DrawerStopped:
                log.warning("probes: the drawing process stopped; images are drawn in a thread now")
                with self._lock:
                    self._stopped = True
                bg.drop(process)
        pixels = self.pixels(figure)
        return pixels, encode_png(pixels)

    def _drawing_process(self):  # noqa: ANN202 - background.DrawingProcess | None
        from probes.app.render import background as bg

        with self._lock:
            return None if self._stopped else bg.shared()


_RENDERER: MatplotlibRenderer | None = None
_RENDERER_LOCK = threading.Lock()


def renderer() -> MatplotlibRenderer:
    """The renderer every sink of this process shares (so they share one drawing process)."""
    global _RENDERER
    with _RENDERER_LOCK:
        if _RENDERER is None:
            _RENDERER = MatplotlibRenderer()
        return _RENDERER
