"""Line charts: log and compact ticks, the few-lines-and-an-others-band rule, one-point axes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: dots per inch of every figure: sizes below are in pixels
from probes.app.render.canvas import LEVELS, PLAIN, _styled, frame, new_figure, pixels, plain


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


def _others_band(ax: Any, rest: Sequence[tuple[str, Any, Any]]) -> list[Any]:
    """The range (min to max at each step) of the series in ``rest``, as one grey band (returned in a list;
    none without a finite value)."""
    xs = np.unique(np.concatenate([np.asarray(x, dtype=np.float64) for _, x, _ in rest]))
    ys = []
    for _, x, y in rest:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y)
        if ok.sum():
            ys.append(np.interp(xs, x[ok], y[ok], left=np.nan, right=np.nan))
    if not ys:
        return []
    with np.errstate(all="ignore"):
        stack = np.vstack(ys)
        lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    return [ax.fill_between(xs, lo, hi, color="#999999", alpha=0.35, lw=0, label=f"{len(rest)} others (min to max)")]


def line_axes(
    ax: Any,
    series: Sequence[tuple[str, Any, Any]],
    *,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
    markers: bool | None = None,
    title_size: float | None = None,
    max_lines: int = MAX_LINES,
) -> None:
    """Draw ``series = [(label, x, y), ...]`` in ``ax`` with a grid and a legend when there is more than one
    series (and the title and axis labels when given); labels and titles are drawn as they are (``PLAIN``).

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
    clean: list[tuple[str, np.ndarray, np.ndarray]] = []
    empty: list[tuple[str, np.ndarray, np.ndarray]] = []
    for label, x, y in series:
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        (clean if np.isfinite(y).any() else empty).append((label, x, y))
    last = lambda s: s[2][np.isfinite(s[2])][-1]  # noqa: E731
    lines, rest = clean, []
    if len(clean) > max_lines:
        ranked = sorted(clean, key=last, reverse=True)
        lines, rest = ranked[:max_lines], ranked[max_lines:]
    handles = _draw_lines(ax, lines, markers)
    if rest:
        handles += _others_band(ax, rest)
    _set_limits(ax, clean, logx, logy, ylim)
    if title is not None:
        ax.set_title(title, fontsize=title_size, **PLAIN) if title_size else ax.set_title(title, **PLAIN)
    if xlabel is not None:
        ax.set_xlabel(xlabel, **PLAIN)
    if ylabel is not None:
        ax.set_ylabel(ylabel, **PLAIN)
    ax.grid(alpha=0.3, which="major")
    _note_missing(ax, clean, empty)
    if len(handles) > 1:  # the handles given: a label that starts with "_" (a site "_orig_mod.fc") is kept too
        plain(*ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.8).get_texts())


#: the colours of the lines of ``line_axes``, in order
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _draw_lines(ax: Any, lines: Sequence[tuple[str, np.ndarray, np.ndarray]], markers: bool | None) -> list[Any]:
    """One line per ``(label, x, y)`` in ``COLORS`` order; their legend handles."""
    handles = []
    for i, (label, x, y) in enumerate(lines):
        dots = markers if markers is not None else x.size < 40
        handles += ax.plot(
            x,
            y,
            lw=1.4,
            marker="." if dots or x.size == 1 else None,
            ms=5 if x.size > 1 else 9,
            label=str(label),
            color=COLORS[i % len(COLORS)],
        )
    return handles


def _set_limits(
    ax: Any,
    clean: Sequence[tuple[str, np.ndarray, np.ndarray]],
    logx: bool,
    logy: bool,
    ylim: tuple[float, float] | None,
) -> None:
    """Scales and limits of ``line_axes``: log ticks, ``ylim``, and a readable range for a single x or y value."""
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


def _note_missing(
    ax: Any, clean: Sequence[tuple[str, np.ndarray, np.ndarray]], empty: Sequence[tuple[str, np.ndarray, np.ndarray]]
) -> None:
    """Say in words what ``line_axes`` could not draw: every point, or the series without a finite value."""
    if not clean:
        n = sum(y.size for _, _, y in empty)
        ax.text(
            0.5,
            0.5,
            f"no finite value to draw: all {n} points are NaN or infinite",
            transform=ax.transAxes,
            ha="center",
            va="center",
            wrap=True,
            **PLAIN,
        )
        ax.set_yticks([])
    elif empty:
        names = ", ".join(str(label) for label, _, _ in empty[:3]) + (" ..." if len(empty) > 3 else "")
        ax.text(
            0.01,
            0.01,
            f"only NaN / inf, not drawn: {names}",
            transform=ax.transAxes,
            fontsize=9,
            color="#777777",
            **PLAIN,
        )


@_styled
def line_plot(
    series: Sequence[tuple[str, Any, Any]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    width: int = 560,
    height: int = 400,
) -> np.ndarray:
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
