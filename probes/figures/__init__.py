"""Labelled figures for probe images and reports, drawn with matplotlib (Agg, no display, no pyplot).

Every figure function returns the pixels of one figure as a uint8 ``(H, W, 3)`` array, what
``probes.records.Image`` carries (``png`` returns encoded bytes for the HTML report). Each figure has a
title, labelled axes and a legend or colour bar where there is more than one series or a colour scale.

Figures are only drawn at a probe's cadence (and, for the images, at its ``image_every``; see
``ImageCadence``), and a probe hands them to the sinks as a ``probes.records.Drawing`` (the function and
host copies of its arrays), so the TensorBoard sink draws them in its drawing process (or thread) while
training goes on.

They are drawn cheaply. Each kind keeps one figure per layout (a probe's site: its sizes, groups and labels)
and updates its artists; the still parts (axes, ticks, labels, legends, colour bars) are drawn once and kept
as a background while they stay the same, and each image then draws only its data and title over it
(limits move in steps so that this holds over many measurements). Margins are fixed in pixels instead of a
layout engine (text that would not fit is wrapped), names (tags, sites, labels) are drawn as they are, never as
mathtext or TeX (``PLAIN``, ``literal``), log axes have no minor ticks over wide ranges and plain
text tick labels, figures are about 560 x 400 pixels at 80 dpi with few colours, so that one PNG in an event
file takes a few tens of KB. Drawing holds one lock (``style()``): matplotlib's settings are global.
matplotlib is imported on the first figure, not when ``probes`` is imported.
"""

from __future__ import annotations

from probes.figures.cadence import (  # noqa: F401
    ImageCadence,
)
from probes.figures.canvas import (  # noqa: F401
    _KEPT,
    _LAST_PALETTE,
    _LOCK,
    CHAR,
    DPI,
    LEVELS,
    LINE,
    MAX_KEPT,
    NEGATIVE,
    PLAIN,
    POSITIVE,
    STYLE,
    TEACHER,
    UNSIGNED,
    _after_fork_in_child,
    _blit,
    _buffer,
    _compact,
    _kept,
    _set_ticks,
    _signature,
    _styled,
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
from probes.figures.kinds import (  # noqa: F401
    _group_lines,
    _group_ticks,
    gates_figure,
    matrix_figure,
    particles_figure,
    spectrum_figure,
)
from probes.figures.plots import (  # noqa: F401
    _SUPERSCRIPT,
    MAX_LINES,
    _cmap,
    _finite_positive,
    _log_ticks,
    _nice_ceil,
    _others_band,
    _power_of_ten,
    _single_point_axis,
    line_axes,
    line_plot,
)
