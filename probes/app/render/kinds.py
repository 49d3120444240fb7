"""The probes' figure kinds: the NTK spectrum, mean-field particles, gate patterns, matrices (the path gram)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: dots per inch of every figure: sizes below are in pixels
from probes.app.render.canvas import (
    LEVELS,
    LINE,
    NEGATIVE,
    PLAIN,
    POSITIVE,
    TEACHER,
    UNSIGNED,
    _blit,
    _kept,
    _set_ticks,
    _styled,
    new_figure,
    place,
    wrap,
)
from probes.app.render.plots import _cmap, _finite_positive, _log_ticks, _nice_ceil


@_styled
def spectrum_figure(
    now: Any,
    init: Any = None,
    *,
    step: int | None = None,
    init_step: int | None = None,
    title: str = "NTK spectrum",
    ylabel: str = "eigenvalue",
    width: int = 560,
    height: int = 400,
) -> np.ndarray:
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
#: pixels kept free between the figure's edges and the axis labels of ``particles_figure``
EDGE = 4.0


def _right_edge(renderer: Any, labels: Sequence[Any], lim: float) -> float:
    """The rightmost pixel of the x tick ``labels`` drawn on axes ``[-lim, lim]`` (others exist, not drawn)."""
    edges = [
        t.get_window_extent(renderer).x1
        for t in labels
        if t.get_visible() and t.get_text() and abs(t.get_position()[0]) <= lim * (1 + 1e-9)
    ]
    return float(max(edges)) if edges else 0.0


@_styled
def particles_figure(
    current: np.ndarray,
    trails: np.ndarray,
    sign: np.ndarray | None,
    teacher: np.ndarray,
    teacher_sign: np.ndarray | None,
    limit: float,
    *,
    title: str,
    axis_labels: tuple[str, str] = ("x", "y"),
    size: int = 480,
    legend: bool = True,
) -> np.ndarray:
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

    def build() -> dict[str, Any]:
        fig = new_figure(size, size)
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        ax.axhline(0.0, color="#dddddd", lw=0.8, zorder=0)
        ax.axvline(0.0, color="#dddddd", lw=0.8, zorder=0)
        trail = ax.add_collection(LineCollection([], linewidths=0.8, alpha=0.3, zorder=1), autolim=False)
        tlines = ax.add_collection(LineCollection([], linewidths=1.0, zorder=2), autolim=False)
        rings = ax.scatter(
            np.zeros(0), np.zeros(0), s=90, facecolors="white", edgecolors=TEACHER, linewidths=1.5, zorder=3
        )
        dots = ax.scatter(np.zeros(0), np.zeros(0), s=14, edgecolors="none", zorder=4)
        ax.set_aspect("auto")
        return {"fig": fig, "ax": ax, "trail": trail, "tlines": tlines, "rings": rings, "dots": dots, "legend": None}

    k = _kept(("particles", size, tuple(axis_labels), legend), build)
    fig, ax = k["fig"], k["ax"]
    lim = _nice_ceil(float(limit)) if limit > 0 and np.isfinite(limit) else 1.0
    handles = _set_particles(k, current, trails, sign, teacher, teacher_sign, lim)
    legend_rows = -(-len(handles) // 2) if legend else 0
    _fit_square_axes(fig, ax, title, axis_labels, size, legend_rows, lim)
    if k["legend"] is not None:
        k["legend"].remove()
        k["legend"] = None
    if legend:
        k["legend"] = fig.legend(
            handles=handles, loc="lower center", ncol=2, fontsize="small", frameon=False, bbox_to_anchor=(0.5, 0.0)
        )
    return _blit(k, [k["trail"], k["tlines"], k["rings"], k["dots"], ax.title])


def _set_particles(
    k: dict[str, Any],
    current: np.ndarray,
    trails: np.ndarray,
    sign: np.ndarray | None,
    teacher: np.ndarray,
    teacher_sign: np.ndarray | None,
    lim: float,
) -> list[Any]:
    """Set the kept particles figure's data artists (trails, teacher lines and rings, dots); the legend handles."""
    from matplotlib.lines import Line2D

    cur = np.asarray(current, dtype=np.float64).reshape(-1, 2)
    m = cur.shape[0]
    teacher = np.asarray(teacher, dtype=np.float64).reshape(-1, 2)
    colors = (
        np.array([UNSIGNED] * m, dtype=object)
        if sign is None
        else np.where(np.asarray(sign, dtype=bool), POSITIVE, NEGATIVE).astype(object)
    )
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
        tcol = (
            list(np.where(np.asarray(teacher_sign, dtype=bool)[ok], "#7f1010", "#0f3b5a"))
            if teacher_sign is not None
            else [TEACHER] * int(ok.sum())
        )
        k["tlines"].set_segments([np.array([[-ex, -ey], [ex, ey]]) for ex, ey in ends])
        k["tlines"].set_color(tcol)
        handles.append(
            Line2D([], [], color=TEACHER, lw=1, marker="o", mfc="white", ms=8, label="teacher line (ring: unit)")
        )
    else:
        k["tlines"].set_segments([])
    k["rings"].set_offsets(teacher)
    ok = np.isfinite(cur).all(axis=1)
    k["dots"].set_offsets(cur[ok])
    k["dots"].set_facecolor(list(colors[ok]))
    if sign is None:
        handles.append(Line2D([], [], ls="", marker="o", color=UNSIGNED, label="hidden unit j"))
    else:
        handles += [
            Line2D([], [], ls="", marker="o", color=POSITIVE, label="a_j >= 0"),
            Line2D([], [], ls="", marker="o", color=NEGATIVE, label="a_j < 0"),
        ]
    return handles


def _fit_square_axes(
    fig: Any, ax: Any, title: str, axis_labels: Sequence[str], size: int, legend_rows: int, lim: float
) -> None:
    """Place square axes ``[-lim, lim]^2`` under the title and above ``legend_rows`` legend rows, moved in by what
    long tick labels need to stay inside the figure."""
    title_lines = wrap(title, size - 16).count("\n") + 1
    side = max(size - 48 - LINE * legend_rows - 10 - LINE * title_lines, 60)  # the axes stay square
    left = max(56.0, (size - side) / 2)
    place(
        fig,
        ax,
        title,
        axis_labels[0],
        axis_labels[1],
        left=left,
        right=size - left - side,
        bottom=48 + LINE * legend_rows,
    )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    # long tick labels (small or large limits: "-0.015", "-15000") push the y label past the left edge and the
    # last x tick label past the right one: move the axes' left side right, their right side left, by what is
    # missing, and shrink them by as much from the top, so that they stay square
    renderer = fig.canvas.get_renderer()
    into_left = into_right = 0.0
    for _ in range(3):  # smaller axes may get other ticks: measure again
        # the axes' tight boxes place the labels and ticks where a draw would (not before); the x axis's box
        # leaves out a tick label centred on the axes' edge, so the drawn x tick labels are measured themselves
        need_left = EDGE - ax.yaxis.get_tightbbox(renderer).x0
        ax.xaxis.get_tightbbox(renderer)
        need_right = _right_edge(renderer, ax.get_xticklabels(), lim) - (size - EDGE)
        if need_left <= 0 and need_right <= 0:
            break
        into_left += float(np.ceil(max(need_left, 0.0)))
        into_right += float(np.ceil(max(need_right, 0.0)))
        place(
            fig,
            ax,
            title,
            axis_labels[0],
            axis_labels[1],
            left=left + into_left,
            right=size - left - side + into_right,
            bottom=48 + LINE * legend_rows,
            top_extra=into_left + into_right,
        )


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


#: the colour of padded gates (attention mask 0) in ``gates_figure``: a grey, far from every open-to-closed shade
PADDING = "#b4b4b4"


def _new_gates_figure(width: int, height: int, padded: bool) -> dict[str, Any]:
    """A new gates figure: the image, the group lines and the legend (with padding's entry when ``padded``)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    closed, open_ = "#2b2b50", "#f2d64b"
    fig = new_figure(width, height)
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    c0, c1 = np.array([0x2B, 0x2B, 0x50]) / 255, np.array([0xF2, 0xD6, 0x4B]) / 255
    # masked cells (the padded gates) take the "bad" colour
    cmap = ListedColormap(c0 + (c1 - c0) * np.linspace(0, 1, LEVELS)[:, None]).with_extremes(bad=PADDING)
    im = ax.imshow(np.zeros((2, 2)), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1, origin="lower")
    groups = ax.add_collection(LineCollection([], colors="white", linewidths=1.0), autolim=False)
    handles = [Patch(color=open_, label="open (pre > 0)"), Patch(color=closed, label="closed")]
    if padded:
        handles.append(Patch(color=PADDING, label="padding (mask 0)"))
    legend = fig.legend(handles=handles, loc="upper right", frameon=False)
    return {"fig": fig, "ax": ax, "im": im, "groups": groups, "legend": legend}


@_styled
def gates_figure(
    gates: np.ndarray,
    starts: Sequence[int] = (),
    names: Sequence[str] = (),
    *,
    title: str,
    unit_label: str = "unit",
    width: int = 640,
    height: int = 360,
    total: int | None = None,
    padding: np.ndarray | None = None,
) -> np.ndarray:
    """A ``P x units`` 0/1 gate matrix drawn units (y) by samples (x), samples in the given order; ``starts``
    are the sample positions where a new label group begins (a white line), ``names`` the groups' labels.
    Values between 0 and 1 (open fractions of blocks of gates, ``total`` gates in all) shade between the two.
    Cells where ``padding`` is true (gates of padded positions, attention mask 0) are drawn in a colour of
    their own, neither open nor closed, with a legend entry. The figure is kept and its artists updated at the
    next call.

    Args:
        gates: ``P x units`` in [0, 1].
        starts: sample positions where a label group begins.
        names: the groups' labels.
        title: the title.
        unit_label: what a row is (the y label says how many).
        width: pixels.
        height: pixels.
        total: the number of gates (when rows are blocks of gates).
        padding: ``P x units`` booleans, true at padded gates (shaped like ``gates``), or None.

    Returns:
        uint8 ``(height, width, 3)``.
    """

    shape = np.asarray(gates).shape
    pad = None if padding is None else np.asarray(padding, dtype=bool).reshape(shape[0], -1)
    padded = pad is not None and bool(pad.any())

    # one kept figure per site (its sizes and groups), so that its still parts are drawn once
    k = _kept(
        (
            "gates",
            width,
            height,
            shape[0],
            int(np.prod(shape[1:])),
            tuple(starts),
            tuple(names),
            unit_label,
            total,
            padded,
        ),
        lambda: _new_gates_figure(width, height, padded),
    )
    fig, ax = k["fig"], k["ax"]
    g = np.asarray(gates, dtype=np.float32).reshape(np.asarray(gates).shape[0], -1)
    P, rows = g.shape
    U = total if total is not None else rows
    xlabel = f"probe sample ({P}, grouped by label)" if starts or names else f"probe sample ({P})"
    place(fig, ax, title, xlabel, f"{unit_label} ({U})", right=150)
    k["im"].set_data(np.ma.masked_array(g.T, mask=pad.T) if padded and pad is not None else g.T)
    k["im"].set_extent((-0.5, P - 0.5, -0.5, rows - 0.5))
    k["groups"].set_segments(_group_lines(starts, "x"))
    _group_ticks(ax.xaxis, starts, names, P)
    _set_ticks(ax.yaxis, None)
    ax.set_xlim(-0.5, P - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    k["legend"].set_bbox_to_anchor(
        (1.0, 1 - (10 + LINE * (wrap(title, width - 16).count("\n") + 1)) / height), transform=fig.transFigure
    )
    return _blit(k, [k["im"], k["groups"], ax.title])


@_styled
def matrix_figure(
    matrix: np.ndarray,
    starts: Sequence[int] = (),
    names: Sequence[str] = (),
    *,
    title: str,
    colorbar_label: str,
    xlabel: str = "probe sample j",
    ylabel: str = "probe sample i",
    vmin: float | None = None,
    vmax: float | None = None,
    width: int = 500,
    height: int = 420,
) -> np.ndarray:
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

    k = _kept(
        ("matrix", width, height, np.shape(matrix), tuple(starts), tuple(names), xlabel, ylabel, colorbar_label), build
    )
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
    k["bar"].set_label(wrap(colorbar_label, h * height), **PLAIN)
    return _blit(k, [k["im"], k["xg"], k["yg"], ax.title])
