"""The renderer: picture data (``probes.records.Matrix``, ``Gates``, ``Trails``, ``Spectrum``, ``Curves``) to
labelled figures, drawn with matplotlib (Agg, no display, no pyplot; the ``plots`` extra).

``renderer()`` is what sinks ask for pixels (``probes.records.Renderer``): ``pixels(figure)`` draws in the calling
thread, ``png(figure)`` in one drawing process shared by the process's sinks (``probes.app.render.background``: a
fresh interpreter, fed plain arrays and strings), so matplotlib never holds the training process's interpreter
lock. Every figure function returns the pixels of one figure as a uint8 ``(H, W, 3)`` array (``png`` returns
encoded bytes for the HTML report). Each figure has a title, labelled axes and a legend or colour bar where there
is more than one series or a colour scale.

They are drawn cheaply. Each kind keeps one figure per layout (a probe's site: its sizes, groups and labels)
and updates its artists; the still parts (axes, ticks, labels, legends, colour bars) are drawn once and kept
as a background while they stay the same, and each image then draws only its data and title over it
(limits move in steps so that this holds over many measurements). Margins are fixed in pixels instead of a
layout engine (text that would not fit is wrapped), names (tags, sites, labels) are drawn as they are, never as
mathtext or TeX (``PLAIN``, ``literal``), log axes have no minor ticks over wide ranges and plain
text tick labels, figures are about 560 x 400 pixels at 80 dpi with few colours, so that one PNG in an event
file takes a few tens of KB. Drawing holds one lock (``style()``): matplotlib's settings are global.
matplotlib is imported on the first figure, not when this package is imported.
"""

from __future__ import annotations

from probes.app.render.canvas import (
    DPI,
    LEVELS,
    NEGATIVE,
    PLAIN,
    POSITIVE,
    STYLE,
    TEACHER,
    UNSIGNED,
    encode_png,
    frame,
    kept_axes,
    literal,
    new_figure,
    pixels,
    place,
    plain,
    png,
    style,
    wrap,
)
from probes.app.render.figure import draw
from probes.app.render.kinds import gates_figure, matrix_figure, particles_figure, spectrum_figure
from probes.app.render.plots import MAX_LINES, line_axes, line_plot
from probes.app.render.renderer import MatplotlibRenderer, renderer

__all__ = [
    "DPI",
    "LEVELS",
    "MAX_LINES",
    "NEGATIVE",
    "PLAIN",
    "POSITIVE",
    "STYLE",
    "TEACHER",
    "UNSIGNED",
    "MatplotlibRenderer",
    "draw",
    "encode_png",
    "frame",
    "gates_figure",
    "kept_axes",
    "line_axes",
    "line_plot",
    "literal",
    "matrix_figure",
    "new_figure",
    "particles_figure",
    "pixels",
    "place",
    "plain",
    "png",
    "renderer",
    "spectrum_figure",
    "style",
    "wrap",
]
