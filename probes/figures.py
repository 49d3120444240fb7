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
layout engine (text that would not fit is wrapped), log axes have no minor ticks over wide ranges and plain
text tick labels, figures are about 560 x 400 pixels at 80 dpi with few colours, so that one PNG in an event
file takes a few tens of KB. Drawing holds one lock (``style()``): matplotlib's settings are global.
matplotlib is imported on the first figure, not when ``probes`` is imported.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import textwrap
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

#: dots per inch of every figure: sizes below are in pixels
DPI = 80
#: levels of the quantised colour maps (PNG compresses a few colours far better than 256)
LEVELS = 32
POSITIVE = "#d62728"  # red: a_j >= 0
NEGATIVE = "#1f77b4"  # blue: a_j < 0
UNSIGNED = "#9467bd"
TEACHER = "#000000"


#: text sizes (points; 1 pt = 1.1 pixels at 80 dpi) large enough to read when TensorBoard shrinks an image
STYLE = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "xtick.labelsize": 10.5,
         "ytick.labelsize": 10.5, "legend.fontsize": 10, "figure.facecolor": "white", "axes.titlelocation": "left"}
#: pixels of one line of 12 pt text, and of an average character (DejaVu Sans), for the fixed margins
LINE = 17
CHAR = 7.6

_LOCK = threading.RLock()


def _after_fork_in_child() -> None:
    """A forked process (a data loader's worker that draws, say) starts with a free
    drawing lock and no kept figures: another thread may have held the one or been drawing into the others."""
    global _LOCK
    _LOCK = threading.RLock()
    _KEPT.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The context in which every figure here is drawn: ``matplotlib.rc_context(STYLE)`` under the drawing
    lock (matplotlib's settings are global, and the sinks draw on their own thread)."""
    import matplotlib

    with _LOCK, matplotlib.rc_context(STYLE):
        yield


def _styled(draw: Any) -> Any:
    """Draw inside ``style()`` (text properties are fixed when artists are created)."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with style():
            return draw(*args, **kwargs)
    return wrapper


def new_figure(width: int = 560, height: int = 400) -> Any:
    """A matplotlib ``Figure`` of ``width x height`` pixels on an Agg canvas, without a layout engine (place
    axes with ``frame``); draw it inside ``with style():`` for the sizes the probes' figures use."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def wrap(text: str, pixels: float, size: float = 1.0) -> str:
    """``text`` broken into lines of at most ``pixels`` wide (estimated from the average character width of
    the style's 12 pt text, times ``size``); existing line breaks are kept."""
    width = max(8, int(pixels / (CHAR * size)))
    return "\n".join(textwrap.fill(line, width, break_long_words=True, break_on_hyphens=False) or line
                     for line in str(text).split("\n"))


def place(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, *, left: float = 78, right: float = 16,
          bottom: float = 48, top_extra: float = 0) -> None:
    """Place ``ax`` at fixed margins (pixels) that leave room for the title (wrapped to the figure's width),
    the tick labels and the axis labels (the y label wrapped to the axes' height), and set those texts.

    Args:
        fig: the figure.
        ax: its axes.
        title: the title (left-aligned with the figure's edge).
        xlabel: the x label.
        ylabel: the y label.
        left: pixels left of the axes for the y tick labels and one line of y label.
        right: pixels right of the axes.
        bottom: pixels under the axes for the x tick labels and one line of x label.
        top_extra: pixels between the title and the axes.
    """
    W, H = fig.bbox.width, fig.bbox.height
    title = wrap(title, W - 16)
    top = 10 + LINE * (title.count("\n") + 1) + top_extra
    ylabel = wrap(ylabel, H - top - bottom)
    left += LINE * ylabel.count("\n")
    xlabel = wrap(xlabel, W - left - right)
    bottom += LINE * xlabel.count("\n")
    ax.set_position((left / W, bottom / H, max(W - left - right, 10) / W, max(H - bottom - top, 10) / H))
    # the centre title (``ax.title``, one artist to redraw), placed at the figure's left edge
    ax.set_title(title, loc="center", x=-(left - 8) / max(W - left - right, 10), y=1.0, pad=6,
                 horizontalalignment="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def frame(fig: Any, title: str, xlabel: str, ylabel: str, **margins: float) -> Any:
    """New axes in ``fig`` placed by ``place`` (same arguments); returns the axes."""
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    place(fig, ax, title, xlabel, ylabel, **margins)
    return ax


#: figures kept between draws (one per kind and size): their artists get new data instead of being built again
_KEPT: dict[tuple, dict[str, Any]] = {}
#: most figures kept at once (the least recently used is dropped): a ResNet-18 has 17 gate sites
MAX_KEPT = 32


def _kept(key: tuple, build: Any) -> dict[str, Any]:
    """The kept figure of ``key`` (``build()`` makes it the first time: a dict of the figure and its artists)."""
    entry = _KEPT.pop(key, None)
    if entry is None:
        entry = build()
        while len(_KEPT) >= MAX_KEPT:
            _KEPT.pop(next(iter(_KEPT)))
    _KEPT[key] = entry  # most recent last
    return entry


def kept_axes(key: str, title: str, xlabel: str, ylabel: str, *, width: int = 560, height: int = 400,
              **margins: float) -> tuple[Any, Any]:
    """A kept figure (one per ``key`` and size) with one empty axes, placed by ``place``: what was drawn there
    before is removed and the scales, limits and tick locators are reset, so drawing many charts does not build
    a figure, its axes and their ticks for each. Draw inside ``with style():``.

    Args:
        key: which kept figure (charts of one kind share it).
        title: the title.
        xlabel: the x label.
        ylabel: the y label.
        width: pixels.
        height: pixels.
        **margins: ``place``'s margins.

    Returns:
        ``(figure, axes)``.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

    def build() -> dict[str, Any]:
        fig = new_figure(width, height)
        return {"fig": fig, "ax": fig.add_axes((0.1, 0.1, 0.8, 0.8))}

    k = _kept(("axes", key, width, height), build)
    fig, ax = k["fig"], k["ax"]
    for artist in [*ax.lines, *ax.collections, *ax.patches, *ax.texts, *ax.images]:
        artist.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.set_xscale("linear")
    ax.set_yscale("linear")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))  # few tick labels: each costs
        axis.set_major_formatter(FuncFormatter(_compact))  # no offset text over the title: 3e-14, not 3 and 1e-14
        axis.set_minor_locator(NullLocator())
        axis.set_tick_params(labelsize=STYLE["xtick.labelsize"])
    ax.grid(False)
    ax.relim()
    ax.set_autoscale_on(True)
    ax.set_xlim(auto=True)
    ax.set_ylim(auto=True)
    ax.set_prop_cycle(None)
    place(fig, ax, title, xlabel, ylabel, **margins)
    return fig, ax


def _set_ticks(axis: Any, centres: Sequence[float] | None, names: Sequence[str] = ()) -> None:
    """Fixed ticks with ``names`` at ``centres``, or (None) matplotlib's automatic integer ticks again."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, ScalarFormatter

    if centres is None:
        axis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_tick_params(labelsize=STYLE["xtick.labelsize"])
    else:
        axis.set_major_locator(FixedLocator(list(centres)))
        axis.set_major_formatter(FixedFormatter(list(names)))
        axis.set_tick_params(labelsize=STYLE["xtick.labelsize"] if len(names) <= 12 else "x-small")


def pixels(fig: Any, colors: int = 256) -> np.ndarray:
    """Draw ``fig`` and return its RGB pixels, uint8 ``(H, W, 3)``, reduced to at most ``colors`` colours
    (fast octree, no dithering: the eye sees no difference on a figure, and the TensorBoard sink then
    writes it as a palette PNG, a third of the size).

    Args:
        fig: the figure.
        colors: the most colours kept (0: all).

    Returns:
        uint8 ``(H, W, 3)``.
    """
    fig.canvas.draw()
    return _buffer(fig, colors)


#: the last colour-reduced pixels and their palette image, which ``encode_png`` writes as they are
_LAST_PALETTE: list[Any] = [None, None]


def _buffer(fig: Any, colors: int = 256) -> np.ndarray:
    from PIL import Image as PILImage

    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    if colors:
        im = PILImage.fromarray(rgb)
        if im.getcolors(colors) is None:
            paletted = im.quantize(colors, method=PILImage.Quantize.FASTOCTREE, dither=PILImage.Dither.NONE)
            rgb = np.asarray(paletted.convert("RGB")).copy()
            _LAST_PALETTE[:] = [rgb, paletted]  # these pixels exactly, as a palette image
    return rgb


def _signature(fig: Any) -> tuple:
    """What the still parts of a kept figure look like: axes places, limits, scales, labels, the ticks that the
    locators and formatters will draw, legends and figure texts (not the titles: they are redrawn each time)."""
    sig: list[Any] = [tuple(fig.bbox.bounds), tuple(t.get_text() for t in fig.texts)]
    for ax in fig.axes:
        sig += [ax.get_position().bounds, ax.get_xlim(), ax.get_ylim(), ax.get_xscale(), ax.get_yscale(),
                ax.get_xlabel(), ax.get_ylabel(), ax.get_visible()]
        for axis in (ax.xaxis, ax.yaxis):
            for locator, formatter in ((axis.get_major_locator(), axis.get_major_formatter()),
                                       (axis.get_minor_locator(), axis.get_minor_formatter())):
                locs = tuple(locator())
                sig += [locs, tuple(formatter.format_ticks(list(locs))), axis.get_tick_params().get("labelsize")]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
    for leg in legends:
        if leg is not None and not leg.get_animated():
            sig += [tuple(t.get_text() for t in leg.get_texts()), leg.get_bbox_to_anchor().bounds, leg._loc]
    return tuple(sig)


def _blit(entry: dict[str, Any], dynamic: Sequence[Any], colors: int = 256) -> np.ndarray:
    """The pixels of a kept figure whose ``dynamic`` artists (data, titles) change between draws: the still
    parts are drawn once and kept as a background while their ``_signature`` stays the same; each draw then
    restores it and draws only the ``dynamic`` artists (in their order) and the axes' spines over them."""
    fig = entry["fig"]
    canvas = fig.canvas
    for artist in dynamic:
        artist.set_animated(True)
    signature = _signature(fig)
    if entry.get("signature") != signature:
        canvas.draw()  # the still parts only: animated artists are left out
        entry["background"], entry["signature"] = canvas.copy_from_bbox(fig.bbox), signature
    else:
        canvas.restore_region(entry["background"])
    renderer = canvas.get_renderer()
    for artist in dynamic:
        if artist.get_visible():
            artist.draw(renderer)
    for ax in fig.axes:
        for spine in ax.spines.values():
            spine.draw(renderer)
    return _buffer(fig, colors)


def png(fig: Any) -> bytes:
    """Draw ``fig`` and return it as PNG bytes (at most 256 colours, a palette PNG)."""
    return encode_png(pixels(fig))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array: a palette PNG when it has at most 256 colours (lossless, a third
    of the size), else RGB.

    Args:
        pixels: uint8 ``(H, W, 3)`` (or ``(H, W)`` grey).

    Returns:
        The PNG file's bytes.
    """
    from PIL import Image as PILImage

    last, paletted = _LAST_PALETTE
    if last is not None and last is pixels:  # just reduced by ``pixels``: its palette image is these pixels
        buf = io.BytesIO()
        paletted.save(buf, format="PNG", compress_level=3)
        return buf.getvalue()
    p = np.ascontiguousarray(pixels, dtype=np.uint8)
    if p.ndim == 2:
        p = np.stack([p] * 3, axis=-1)
    p = np.ascontiguousarray(p[..., :3])
    im = PILImage.fromarray(p)
    counted = im.getcolors(256)
    if counted is not None:  # at most 256 colours: an exact palette
        palette = np.array(sorted((r << 16) | (g << 8) | b for _, (r, g, b) in counted), dtype=np.uint32)
        flat = (p[..., 0].astype(np.uint32) << 16) | (p[..., 1].astype(np.uint32) << 8) | p[..., 2]
        index = np.searchsorted(palette, flat).astype(np.uint8)
        h, w = p.shape[:2]
        im = PILImage.frombytes("P", (w, h), index.tobytes())
        rgb = np.stack([(palette >> 16) & 255, (palette >> 8) & 255, palette & 255], axis=1).astype(np.uint8)
        im.putpalette(rgb.reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)  # zlib level 3: a third of the time of 6, 7% larger
    return buf.getvalue()


def _cmap(name: str = "viridis", levels: int = LEVELS) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].resampled(levels)


def _finite_positive(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    return v[np.isfinite(v) & (v > 0)]


def _log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Ticks of a log axis labelled as plain text (``10⁻⁵``: no mathtext to parse); over more than a decade and
    a half, major ticks only (minor ticks, their labels and a minor grid cost more to draw than everything
    else and add nothing to read there)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    axis.set_major_locator(LogLocator(base=10, numticks=8))
    axis.set_major_formatter(FuncFormatter(_power_of_ten))
    if hi > 0 and lo > 0 and hi / lo > 30:
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=8))
        axis.set_minor_formatter(FuncFormatter(_power_of_ten))


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_ten(value: float, _pos: Any = None) -> str:
    """A log tick's label as plain text, ``10⁻⁵`` (no mathtext to parse)."""
    if not value > 0 or not np.isfinite(value):
        return ""
    e = np.log10(value)
    if abs(e - round(e)) > 1e-6:
        return f"{value:.2g}"
    return "10" + str(int(round(e))).translate(_SUPERSCRIPT)


def _compact(value: float, _pos: Any = None) -> str:
    """A tick label that carries its own scale (``0.25``, ``3e-14``, ``1.2e+06``): no offset text."""
    return f"{value:.4g}" if value else "0"


def _nice_ceil(x: float) -> float:
    """The smallest of 1, 1.5, 2, 3, 4, 5, 6, 8 times a power of ten that is >= ``x`` (> 0): limits that grow
    in steps keep a kept figure's background over many measurements."""
    base = 10.0 ** np.floor(np.log10(x))
    for m in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if m * base >= x * (1 - 1e-12):
            return float(m * base)
    return float(10 * base)


def _single_point_axis(ax: Any, xs: np.ndarray) -> None:
    """A sensible x axis when every point has the same x: from 0 (or -1) to twice it, integer ticks."""
    from matplotlib.ticker import MaxNLocator

    x = float(xs[0])
    lo, hi = (0.0, 2 * x) if x > 0 else ((2 * x, 0.0) if x < 0 else (-1.0, 1.0))
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))


# -- line plots --------------------------------------------------------------------------------------
#: at most this many series get a line of their own; the rest become one "others" band (``line_axes``)
MAX_LINES = 6


def _others_band(ax: Any, rest: Sequence[tuple[str, Any, Any]]) -> None:
    """The range (min to max at each step) of the series in ``rest``, as one grey band."""
    xs = np.unique(np.concatenate([np.asarray(x, dtype=np.float64) for _, x, _ in rest]))
    ys = []
    for _, x, y in rest:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y)
        if ok.sum():
            ys.append(np.interp(xs, x[ok], y[ok], left=np.nan, right=np.nan))
    if not ys:
        return
    with np.errstate(all="ignore"):
        stack = np.vstack(ys)
        lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    ax.fill_between(xs, lo, hi, color="#999999", alpha=0.35, lw=0, label=f"{len(rest)} others (min to max)")


def line_axes(ax: Any, series: Sequence[tuple[str, Any, Any]], *, title: str | None = None,
              xlabel: str | None = None, ylabel: str | None = None, logx: bool = False, logy: bool = False,
              ylim: tuple[float, float] | None = None, markers: bool | None = None,
              title_size: float | None = None, max_lines: int = MAX_LINES) -> None:
    """Draw ``series = [(label, x, y), ...]`` in ``ax`` with a grid and a legend when there is more than one
    series (and the title and axis labels when given).

    More than ``max_lines`` series: the ``max_lines`` with the largest last finite value get a line each (in
    distinct colours), the others one grey band from their minimum to their maximum. Series without any
    finite value are named in a note instead of drawn; a chart without any says so in words. When every
    point has the same x, the x axis runs from 0 to twice it.

    Args:
        ax: matplotlib axes.
        series: ``(label, x, y)`` triples.
        title: the axes' title (None: leave it).
        xlabel: the x label (None: leave it).
        ylabel: the y label (None: leave it).
        logx: log x axis.
        logy: log y axis.
        ylim: y limits.
        markers: a dot on every point (None: on series of fewer than 40 points).
        title_size: the title's font size.
        max_lines: series drawn as lines before the rest become a band.
    """
    clean, empty = [], []
    for label, x, y in series:
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        (clean if np.isfinite(y).any() else empty).append((label, x, y))
    last = lambda s: s[2][np.isfinite(s[2])][-1]  # noqa: E731
    lines, rest = clean, []
    if len(clean) > max_lines:
        ranked = sorted(clean, key=last, reverse=True)
        lines, rest = ranked[:max_lines], ranked[max_lines:]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]
    for i, (label, x, y) in enumerate(lines):
        dots = markers if markers is not None else x.size < 40
        ax.plot(x, y, lw=1.4, marker="." if dots or x.size == 1 else None, ms=5 if x.size > 1 else 9, label=label,
                color=colors[i % len(colors)])
    if rest:
        _others_band(ax, rest)
    if logx:
        ax.set_xscale("log")
    finite = np.concatenate([y[np.isfinite(y)] for _, _, y in clean]) if clean else np.zeros(0)
    if logy:
        ax.set_yscale("log")
        pos = finite[finite > 0]
        if pos.size:
            _log_ticks(ax.yaxis, float(pos.min()), float(pos.max()))
    if ylim is not None:
        ax.set_ylim(*ylim)
    xs = np.concatenate([x[np.isfinite(x)] for _, x, _ in clean]) if clean else np.zeros(0)
    if xs.size and np.all(xs == xs[0]):
        _single_point_axis(ax, xs)
    if finite.size and np.all(finite == finite[0]) and ylim is None and not logy:
        v = float(finite[0])
        d = max(abs(v) * 0.5, 0.5) if v else 0.5
        ax.set_ylim(v - d, v + d)
    if title is not None:
        ax.set_title(title, fontsize=title_size) if title_size else ax.set_title(title)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="major")
    if not clean:
        n = sum(y.size for _, _, y in empty)
        ax.text(0.5, 0.5, f"no finite value to draw: all {n} points are NaN or infinite", transform=ax.transAxes,
                ha="center", va="center", wrap=True)
        ax.set_yticks([])
    elif empty:
        names = ", ".join(label for label, _, _ in empty[:3]) + (" ..." if len(empty) > 3 else "")
        ax.text(0.01, 0.01, f"only NaN / inf, not drawn: {names}", transform=ax.transAxes, fontsize=9,
                color="#777777")
    if len(lines) + bool(rest) > 1:
        ax.legend(loc="best", fontsize=9, framealpha=0.8)


@_styled
def line_plot(series: Sequence[tuple[str, Any, Any]], *, title: str, xlabel: str, ylabel: str,
              logx: bool = False, logy: bool = False, width: int = 560, height: int = 400) -> np.ndarray:
    """Pixels of a line plot of ``series = [(label, x, y), ...]`` (legend when more than one; see
    ``line_axes``).

    Args:
        series: ``(label, x, y)`` triples.
        title: the title.
        xlabel: the x label.
        ylabel: the y label.
        logx: log x axis.
        logy: log y axis.
        width: pixels.
        height: pixels.

    Returns:
        uint8 ``(height, width, 3)``.
    """
    fig = new_figure(width, height)
    line_axes(frame(fig, title, xlabel, ylabel), series, logx=logx, logy=logy)
    return pixels(fig)


@_styled
def spectrum_figure(now: Any, init: Any = None, *, step: int | None = None, init_step: int | None = None,
                    title: str = "NTK spectrum", ylabel: str = "eigenvalue", width: int = 560,
                    height: int = 400) -> np.ndarray:
    """Eigenvalues against their rank (1 = largest), log y: ``now`` and, when given, ``init``.

    Only positive eigenvalues can be drawn on a log axis; the legend says how many each curve has. The figure
    is kept and its lines updated at the next call.

    Args:
        now: the eigenvalues now.
        init: the eigenvalues at the first measurement (dashed), or None.
        step: the step of ``now``.
        init_step: the step of ``init``.
        title: the title.
        ylabel: the y label.
        width: pixels.
        height: pixels.

    Returns:
        uint8 ``(height, width, 3)``.
    """
    def build() -> dict[str, Any]:
        fig = new_figure(width, height)
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        lines = [ax.plot([], [], dash, lw=1.6)[0] for dash in ("-", "--")]
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="major")
        note = ax.text(0.5, 0.5, "no positive eigenvalue", transform=ax.transAxes, ha="center")
        return {"fig": fig, "ax": ax, "lines": lines, "note": note}

    k = _kept(("spectrum", width, height, ylabel), build)
    fig, ax = k["fig"], k["ax"]
    place(fig, ax, title, "rank k (1 = largest eigenvalue)", ylabel)
    handles, lo, hi = [], np.inf, 0.0
    for line, (values, what, s) in zip(k["lines"], ((now, "now", step), (init, "initialization", init_step))):
        v = np.sort(_finite_positive(values))[::-1] if values is not None else np.zeros(0)
        line.set_data(np.arange(1, v.size + 1), v)
        line.set_visible(bool(v.size))
        line.set_marker("." if 0 < v.size < 3 else "None")
        if v.size:
            at = f"step {s}, " if s is not None else ""
            line.set_label(f"{what} ({at}{v.size} of {np.asarray(values).size} > 0)")
            handles.append(line)
            lo, hi = min(lo, float(v[-1])), max(hi, float(v[0]))
    k["note"].set_visible(not handles)
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        n = max(len(line.get_xdata()) for line in handles)
        ax.set_xlim(0.5 - 0.02 * n, n + 0.5 + 0.02 * n)
        # even powers of ten: the axis (and so the kept background) stays the same over many measurements
        ax.set_ylim(10.0 ** (2 * np.floor((np.log10(lo) - 0.02) / 2)), 10.0 ** (2 * np.ceil((np.log10(hi) + 0.02) / 2)))
        _log_ticks(ax.yaxis, lo, hi)
        ax.legend(handles=handles, loc="upper right")
    else:
        ax.set_xlim(0, 1)
        ax.set_ylim(0.1, 10)
        _log_ticks(ax.yaxis, 0.1, 10)
    return _blit(k, [*k["lines"], k["note"], ax.title, *([ax.get_legend()] if ax.get_legend() else [])])


# -- particles ---------------------------------------------------------------------------------------
@_styled
def particles_figure(current: np.ndarray, trails: np.ndarray, sign: np.ndarray | None, teacher: np.ndarray,
                     teacher_sign: np.ndarray | None, limit: float, *, title: str,
                     axis_labels: tuple[str, str] = ("x", "y"), size: int = 480, legend: bool = True) -> np.ndarray:
    """Particles ``current`` (m x 2) as dots, their ``trails`` (k x m x 2, time first) as faint lines,
    teacher rows (M x 2) as black lines through the origin with a ring at each row, axes ``[-limit, limit]``.

    ``sign`` (m bools, ``a_j >= 0``) colours particles red / blue (None: one colour); ``teacher_sign`` colours
    the teacher lines the same way (None: black). The figure is kept and its artists updated at the next call.

    Args:
        current: m x 2 positions.
        trails: k x m x 2 earlier positions, oldest first.
        sign: m bools, or None.
        teacher: M x 2 teacher rows.
        teacher_sign: M bools, or None.
        limit: half the width of the square shown.
        title: the title.
        axis_labels: the x and y labels.
        size: pixels of the square figure.
        legend: draw the legend under the axes.

    Returns:
        uint8 ``(size, size, 3)``.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    def build() -> dict[str, Any]:
        fig = new_figure(size, size)
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        ax.axhline(0.0, color="#dddddd", lw=0.8, zorder=0)
        ax.axvline(0.0, color="#dddddd", lw=0.8, zorder=0)
        trail = ax.add_collection(LineCollection([], linewidths=0.8, alpha=0.3, zorder=1), autolim=False)
        tlines = ax.add_collection(LineCollection([], linewidths=1.0, zorder=2), autolim=False)
        rings = ax.scatter(np.zeros(0), np.zeros(0), s=90, facecolors="white", edgecolors=TEACHER, linewidths=1.5,
                           zorder=3)
        dots = ax.scatter(np.zeros(0), np.zeros(0), s=14, edgecolors="none", zorder=4)
        ax.set_aspect("auto")
        return {"fig": fig, "ax": ax, "trail": trail, "tlines": tlines, "rings": rings, "dots": dots, "legend": None}

    k = _kept(("particles", size, tuple(axis_labels), legend), build)
    fig, ax = k["fig"], k["ax"]
    cur = np.asarray(current, dtype=np.float64).reshape(-1, 2)
    m = cur.shape[0]
    teacher = np.asarray(teacher, dtype=np.float64).reshape(-1, 2)
    lim = _nice_ceil(float(limit)) if limit > 0 and np.isfinite(limit) else 1.0
    colors = np.array([UNSIGNED] * m, dtype=object) if sign is None else \
        np.where(np.asarray(sign, dtype=bool), POSITIVE, NEGATIVE).astype(object)
    handles: list[Any] = []
    hist = np.asarray(trails, dtype=np.float64).reshape(-1, m, 2) if m else np.zeros((0, 0, 2))
    path = np.concatenate([hist, cur[None]], axis=0) if hist.shape[0] else cur[None]
    if path.shape[0] > 1 and m:
        k["trail"].set_segments([path[:, j] for j in range(m)])
        k["trail"].set_color(list(colors))
        handles.append(Line2D([], [], color="#999999", lw=1, label="trail since attach"))
    else:
        k["trail"].set_segments([])
    if teacher.shape[0]:
        norm = np.linalg.norm(teacher, axis=1)
        ok = norm > 0
        ends = teacher[ok] / norm[ok, None] * lim * 1.5
        tcol = list(np.where(np.asarray(teacher_sign, dtype=bool)[ok], "#7f1010", "#0f3b5a")) \
            if teacher_sign is not None else [TEACHER] * int(ok.sum())
        k["tlines"].set_segments([np.array([[-ex, -ey], [ex, ey]]) for ex, ey in ends])
        k["tlines"].set_color(tcol)
        handles.append(Line2D([], [], color=TEACHER, lw=1, marker="o", mfc="white", ms=8,
                              label="teacher line (ring: unit)"))
    else:
        k["tlines"].set_segments([])
    k["rings"].set_offsets(teacher)
    ok = np.isfinite(cur).all(axis=1)
    k["dots"].set_offsets(cur[ok])
    k["dots"].set_facecolor(list(colors[ok]))
    if sign is None:
        handles.append(Line2D([], [], ls="", marker="o", color=UNSIGNED, label="hidden unit j"))
    else:
        handles += [Line2D([], [], ls="", marker="o", color=POSITIVE, label="a_j >= 0"),
                    Line2D([], [], ls="", marker="o", color=NEGATIVE, label="a_j < 0")]
    legend_rows = -(-len(handles) // 2) if legend else 0
    title_lines = wrap(title, size - 16).count("\n") + 1
    side = max(size - 48 - LINE * legend_rows - 10 - LINE * title_lines, 60)  # the axes stay square
    left = max(56.0, (size - side) / 2)
    place(fig, ax, title, axis_labels[0], axis_labels[1], left=left, right=size - left - side,
          bottom=48 + LINE * legend_rows)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    if k["legend"] is not None:
        k["legend"].remove()
        k["legend"] = None
    if legend:
        k["legend"] = fig.legend(handles=handles, loc="lower center", ncol=2, fontsize="small", frameon=False,
                                 bbox_to_anchor=(0.5, 0.0))
    return _blit(k, [k["trail"], k["tlines"], k["rings"], k["dots"], ax.title])


# -- matrices ----------------------------------------------------------------------------------------
def _group_lines(starts: Sequence[int], axis: str) -> list[np.ndarray]:
    """Segments between label groups along ``axis`` ("x": vertical lines), in data units, long enough to cross
    any axes."""
    big = 1e9
    if axis == "x":
        return [np.array([[s - 0.5, -big], [s - 0.5, big]]) for s in starts]
    return [np.array([[-big, s - 0.5], [big, s - 0.5]]) for s in starts]


def _group_ticks(axis: Any, starts: Sequence[int], names: Sequence[str], n: int) -> None:
    """A tick with the group's name at the centre of each label group (automatic ticks without names)."""
    edges = [0, *starts, n]
    centres = [(a + b) / 2 - 0.5 for a, b in zip(edges[:-1], edges[1:])]
    if names and len(names) == len(centres) and len(names) <= 40:
        _set_ticks(axis, centres, names)
    else:
        _set_ticks(axis, None)


@_styled
def gates_figure(gates: np.ndarray, starts: Sequence[int] = (), names: Sequence[str] = (), *, title: str,
                 unit_label: str = "unit", width: int = 640, height: int = 360, total: int | None = None
                 ) -> np.ndarray:
    """A ``P x units`` 0/1 gate matrix drawn units (y) by samples (x), samples in the given order; ``starts``
    are the sample positions where a new label group begins (a white line), ``names`` the groups' labels.
    Values between 0 and 1 (open fractions of blocks of gates, ``total`` gates in all) shade between the two.
    The figure is kept and its artists updated at the next call.

    Args:
        gates: ``P x units`` in [0, 1].
        starts: sample positions where a label group begins.
        names: the groups' labels.
        title: the title.
        unit_label: what a row is (the y label says how many).
        width: pixels.
        height: pixels.
        total: the number of gates (when rows are blocks of gates).

    Returns:
        uint8 ``(height, width, 3)``.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    closed, open_ = "#2b2b50", "#f2d64b"

    def build() -> dict[str, Any]:
        fig = new_figure(width, height)
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        c0, c1 = np.array([0x2b, 0x2b, 0x50]) / 255, np.array([0xf2, 0xd6, 0x4b]) / 255
        cmap = ListedColormap(c0 + (c1 - c0) * np.linspace(0, 1, LEVELS)[:, None])
        im = ax.imshow(np.zeros((2, 2)), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
                       origin="lower")
        groups = ax.add_collection(LineCollection([], colors="white", linewidths=1.0), autolim=False)
        legend = fig.legend(handles=[Patch(color=open_, label="open (pre > 0)"), Patch(color=closed, label="closed")],
                            loc="upper right", frameon=False)
        return {"fig": fig, "ax": ax, "im": im, "groups": groups, "legend": legend}

    # one kept figure per site (its sizes and groups), so that its still parts are drawn once
    shape = np.asarray(gates).shape
    k = _kept(("gates", width, height, shape[0], int(np.prod(shape[1:])), tuple(starts), tuple(names), unit_label,
               total), build)
    fig, ax = k["fig"], k["ax"]
    g = np.asarray(gates, dtype=np.float32).reshape(np.asarray(gates).shape[0], -1)
    P, rows = g.shape
    U = total if total is not None else rows
    xlabel = f"probe sample ({P}, grouped by label)" if starts or names else f"probe sample ({P})"
    place(fig, ax, title, xlabel, f"{unit_label} ({U})", right=150)
    k["im"].set_data(g.T)
    k["im"].set_extent((-0.5, P - 0.5, -0.5, rows - 0.5))
    k["groups"].set_segments(_group_lines(starts, "x"))
    _group_ticks(ax.xaxis, starts, names, P)
    _set_ticks(ax.yaxis, None)
    ax.set_xlim(-0.5, P - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    k["legend"].set_bbox_to_anchor((1.0, 1 - (10 + LINE * (wrap(title, width - 16).count("\n") + 1)) / height),
                                   transform=fig.transFigure)
    return _blit(k, [k["im"], k["groups"], ax.title])


@_styled
def matrix_figure(matrix: np.ndarray, starts: Sequence[int] = (), names: Sequence[str] = (), *, title: str,
                  colorbar_label: str, xlabel: str = "probe sample j", ylabel: str = "probe sample i",
                  vmin: float | None = None, vmax: float | None = None, width: int = 500,
                  height: int = 420) -> np.ndarray:
    """A matrix as a heat map (rows top to bottom; a square one in square axes) with a labelled colour bar;
    ``starts`` / ``names`` mark label groups on both axes. The figure is kept and its artists updated at the
    next call.

    Args:
        matrix: ``n x m``.
        starts: positions where a label group begins.
        names: the groups' labels.
        title: the title.
        colorbar_label: what the colours mean.
        xlabel: the x label.
        ylabel: the y label.
        vmin: the colour scale's low end (None: the smallest finite entry).
        vmax: its high end (None: the largest).
        width: pixels.
        height: pixels.

    Returns:
        uint8 ``(height, width, 3)``.
    """
    from matplotlib.collections import LineCollection

    def build() -> dict[str, Any]:
        fig = new_figure(width, height)
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        im = ax.imshow(np.zeros((2, 2)), interpolation="nearest", cmap=_cmap(), aspect="auto")
        xg = ax.add_collection(LineCollection([], colors="white", linewidths=1.0), autolim=False)
        yg = ax.add_collection(LineCollection([], colors="white", linewidths=1.0), autolim=False)
        cax = fig.add_axes((0.9, 0.1, 0.02, 0.8))
        bar = fig.colorbar(im, cax=cax)
        return {"fig": fig, "ax": ax, "im": im, "xg": xg, "yg": yg, "cax": cax, "bar": bar}

    k = _kept(("matrix", width, height, np.shape(matrix), tuple(starts), tuple(names), xlabel, ylabel,
               colorbar_label), build)
    fig, ax = k["fig"], k["ax"]
    m = np.asarray(matrix, dtype=np.float64)
    n, cols = m.shape[0], m.shape[1]
    place(fig, ax, title, xlabel, ylabel, right=90 + LINE * wrap(colorbar_label, height - 110).count("\n"))
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if not hi > lo:
        hi = lo + 1.0
    # a free end rounded out to a quarter of a power of ten: the colour bar stays the same over many measurements
    step = 10.0 ** np.ceil(np.log10(hi - lo)) / 4
    lo = lo if vmin is not None else float(np.floor(lo / step) * step)
    hi = hi if vmax is not None else float(np.ceil(hi / step) * step)
    k["im"].set_data(m)
    k["im"].set_extent((-0.5, cols - 0.5, n - 0.5, -0.5))
    k["im"].set_clim(lo, hi)
    k["xg"].set_segments(_group_lines(starts, "x"))
    k["yg"].set_segments(_group_lines(starts, "y"))
    _group_ticks(ax.xaxis, starts, names, cols)
    _group_ticks(ax.yaxis, starts, names, n)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    x0, y0, w, h = ax.get_position().bounds
    if n == cols:  # a square matrix in square axes, under the title
        side = min(w * width, h * height)
        y0, w, h = y0 + h - side / height, side / width, side / height
        ax.set_position((x0, y0, w, h))
    k["cax"].set_position((x0 + w + 12 / width, y0, 14 / width, h))
    k["bar"].set_label(wrap(colorbar_label, h * height))
    return _blit(k, [k["im"], k["xg"], k["yg"], ax.title])


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
                raise ValueError(f"{probe}: option {option!r} must be a positive int (steps between images) or None, "
                                 f"got {every!r}")
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
