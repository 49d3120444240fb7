"""The renderer the sinks ask for pixels: picture data drawn here or in the shared drawing process
(``probes.app.render.background``)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

from probes.app.render.canvas import encode_png
from probes.app.render.figure import as_uint8, draw
from probes.records import Figure

if TYPE_CHECKING:
    from probes.app.render.background import DrawingProcess

log = logging.getLogger("probes")


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

    def _drawing_process(self) -> DrawingProcess | None:
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
