"""Labelled figures for probe images and reports, drawn with matplotlib (Agg, no display, no pyplot).

Every function returns the pixels of one figure as a uint8 ``(H, W, 3)`` array, what
``probes.records.Image`` carries (``png`` returns encoded bytes for the HTML report). Each figure has a
title, labelled axes and a legend or colour bar where there is more than one series or a colour scale.

Figures are only drawn at a probe's cadence (and, for the images, at its ``image_every``; see
``ImageCadence``), never in a training step. They are kept small: about 560 x 400 pixels at 80 dpi, few
colours for the heat maps (a quantised colour map), so that one PNG in an event file takes a few tens of KB.
matplotlib is imported on the first figure, not when ``probes`` is imported.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
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


def style() -> Any:
    """The context in which every figure here is drawn (``matplotlib.rc_context(STYLE)``)."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def _styled(draw: Any) -> Any:
    """Draw inside ``style()`` (text properties are fixed when artists are created)."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with style():
            return draw(*args, **kwargs)
    return wrapper


def new_figure(width: int = 560, height: int = 400) -> Any:
    """A matplotlib ``Figure`` of ``width x height`` pixels on an Agg canvas (constrained layout); draw it
    inside ``with style():`` for the sizes the probes' figures use."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def pixels(fig: Any, colors: int = 256) -> np.ndarray:
    """Draw ``fig`` and return its RGB pixels, uint8 ``(H, W, 3)``, reduced to at most ``colors`` colours
    (median cut, no dithering: the eye sees no difference on a figure, and the TensorBoard sink then
    writes it as a palette PNG, a third of the size)."""
    from PIL import Image as PILImage

    fig.canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    if colors:
        im = PILImage.fromarray(rgb)
        if im.getcolors(colors) is None:
            im = im.quantize(colors, method=PILImage.Quantize.MEDIANCUT, dither=PILImage.Dither.NONE).convert("RGB")
            rgb = np.asarray(im).copy()
    return rgb


def png(fig: Any) -> bytes:
    """Draw ``fig`` and return it as PNG bytes (at most 256 colours, a palette PNG)."""
    return encode_png(pixels(fig))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array: a palette PNG when it has at most 256 colours (lossless, a third
    of the size), else RGB."""
    from PIL import Image as PILImage

    p = np.ascontiguousarray(pixels, dtype=np.uint8)
    if p.ndim == 2:
        p = np.stack([p] * 3, axis=-1)
    h, w = p.shape[:2]
    im = None
    if h * w <= 16_000_000:
        flat = (p[..., 0].astype(np.uint32) << 16) | (p[..., 1].astype(np.uint32) << 8) | p[..., 2]
        palette, index = np.unique(flat.reshape(-1), return_inverse=True)
        if palette.size <= 256:
            im = PILImage.frombytes("P", (w, h), index.astype(np.uint8).tobytes())
            rgb = np.stack([(palette >> 16) & 255, (palette >> 8) & 255, palette & 255], axis=1).astype(np.uint8)
            im.putpalette(rgb.reshape(-1).tolist())
    if im is None:
        im = PILImage.fromarray(np.ascontiguousarray(p[..., :3]))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _cmap(name: str = "viridis", levels: int = LEVELS) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].resampled(levels)


def _finite_positive(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    return v[np.isfinite(v) & (v > 0)]


# -- line plots --------------------------------------------------------------------------------------
def line_axes(ax: Any, series: Sequence[tuple[str, Any, Any]], *, title: str, xlabel: str, ylabel: str,
              logx: bool = False, logy: bool = False, ylim: tuple[float, float] | None = None,
              markers: bool | None = None, title_size: float | None = None) -> None:
    """Draw ``series = [(label, x, y), ...]`` in ``ax`` with a title, axis labels, a grid and a legend when
    there is more than one series. ``markers=None`` puts a dot on every point of short series."""
    for label, x, y in series:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        dots = markers if markers is not None else x.size < 40
        ax.plot(x, y, lw=1.4, marker="." if dots else None, ms=5, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=title_size) if title_size else ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if logy else "major")
    if len(series) > 1:
        ax.legend(loc="best")


@_styled
def line_plot(series: Sequence[tuple[str, Any, Any]], *, title: str, xlabel: str, ylabel: str,
              logx: bool = False, logy: bool = False, width: int = 560, height: int = 400) -> np.ndarray:
    """Pixels of a line plot of ``series = [(label, x, y), ...]`` (legend when more than one)."""
    fig = new_figure(width, height)
    line_axes(fig.add_subplot(), series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy)
    return pixels(fig)


@_styled
def spectrum_figure(now: Any, init: Any = None, *, step: int | None = None, init_step: int | None = None,
                    title: str = "NTK spectrum", ylabel: str = "eigenvalue", width: int = 560,
                    height: int = 400) -> np.ndarray:
    """Eigenvalues against their rank (1 = largest), log y: ``now`` and, when given, ``init``.

    Only positive eigenvalues can be drawn on a log axis; the legend says how many each curve has.
    """
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    drawn = 0
    for values, what, s, style in ((now, "now", step, "-"), (init, "initialization", init_step, "--")):
        if values is None:
            continue
        v = np.sort(_finite_positive(values))[::-1]
        n = np.asarray(values).size
        at = f"step {s}, " if s is not None else ""
        label = f"{what} ({at}{v.size} of {n} > 0)"
        if v.size:
            ax.plot(np.arange(1, v.size + 1), v, style, lw=1.6, label=label)
            drawn += 1
    ax.set_yscale("log")
    ax.set_xlabel("rank k (1 = largest eigenvalue)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no positive eigenvalue", transform=ax.transAxes, ha="center")
    return pixels(fig)


# -- particles ---------------------------------------------------------------------------------------
@_styled
def particles_figure(current: np.ndarray, trails: np.ndarray, sign: np.ndarray | None, teacher: np.ndarray,
                     teacher_sign: np.ndarray | None, limit: float, *, title: str,
                     axis_labels: tuple[str, str] = ("x", "y"), size: int = 480, legend: bool = True) -> np.ndarray:
    """Particles ``current`` (m x 2) as dots, their ``trails`` (k x m x 2, time first) as faint lines,
    teacher rows (M x 2) as black lines through the origin with a ring at each row, axes ``[-limit, limit]``.

    ``sign`` (m bools, ``a_j >= 0``) colours particles red / blue (None: one colour); ``teacher_sign`` colours
    the teacher lines the same way (None: black).
    """
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    fig = new_figure(size, size)
    ax = fig.add_subplot()
    lim = float(limit) if limit > 0 and np.isfinite(limit) else 1.0
    cur = np.asarray(current, dtype=np.float64).reshape(-1, 2)
    m = cur.shape[0]
    if sign is None:
        colors = np.array([UNSIGNED] * m, dtype=object)
    else:
        colors = np.where(np.asarray(sign, dtype=bool), POSITIVE, NEGATIVE).astype(object)
    ax.axhline(0.0, color="#dddddd", lw=0.8, zorder=0)
    ax.axvline(0.0, color="#dddddd", lw=0.8, zorder=0)
    handles: list[Any] = []
    hist = np.asarray(trails, dtype=np.float64).reshape(-1, m, 2) if m else np.zeros((0, 0, 2))
    path = np.concatenate([hist, cur[None]], axis=0) if hist.shape[0] else cur[None]
    if path.shape[0] > 1 and m:
        lines = [path[:, j] for j in range(m)]
        ax.add_collection(LineCollection(lines, colors=list(colors), linewidths=0.8, alpha=0.3, zorder=1))
        handles.append(Line2D([], [], color="#999999", lw=1, label="trail since attach"))
    teacher = np.asarray(teacher, dtype=np.float64).reshape(-1, 2)
    if teacher.shape[0]:
        norm = np.linalg.norm(teacher, axis=1)
        ok = norm > 0
        ends = teacher[ok] / norm[ok, None] * lim * 1.5
        if teacher_sign is not None:
            tcol = np.where(np.asarray(teacher_sign, dtype=bool)[ok], "#7f1010", "#0f3b5a")
        else:
            tcol = np.array([TEACHER] * int(ok.sum()))
        for (ex, ey), c in zip(ends, tcol):
            ax.plot([-ex, ex], [-ey, ey], color=c, lw=1.0, zorder=2)
        ax.scatter(teacher[:, 0], teacher[:, 1], s=90, facecolors="white", edgecolors=TEACHER, linewidths=1.5,
                   zorder=3)
        handles.append(Line2D([], [], color=TEACHER, lw=1, marker="o", mfc="white", ms=8,
                              label="teacher line (ring: unit)"))
    ok = np.isfinite(cur).all(axis=1)
    ax.scatter(cur[ok, 0], cur[ok, 1], s=14, c=list(colors[ok]), edgecolors="none", zorder=4)
    if sign is None:
        handles.append(Line2D([], [], ls="", marker="o", color=UNSIGNED, label="hidden unit j"))
    else:
        handles += [Line2D([], [], ls="", marker="o", color=POSITIVE, label="a_j >= 0"),
                    Line2D([], [], ls="", marker="o", color=NEGATIVE, label="a_j < 0")]
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    if legend:
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small", frameon=False)
    return pixels(fig)


# -- matrices ----------------------------------------------------------------------------------------
def _mark_groups(ax: Any, starts: Sequence[int], names: Sequence[str], n: int, axis: str, color: str) -> None:
    """Lines between label groups along ``axis`` ("x" or "y") and a tick with the group's name at its centre."""
    edges = [0, *starts, n]
    centres = [(a + b) / 2 - 0.5 for a, b in zip(edges[:-1], edges[1:])]
    for s in starts:
        (ax.axvline if axis == "x" else ax.axhline)(s - 0.5, color=color, lw=1.0)
    if names and len(names) == len(centres) and len(names) <= 40:
        setter = ax.set_xticks if axis == "x" else ax.set_yticks
        setter(centres, list(names), fontsize=None if len(names) <= 12 else "x-small")


@_styled
def gates_figure(gates: np.ndarray, starts: Sequence[int] = (), names: Sequence[str] = (), *, title: str,
                 unit_label: str = "unit", width: int = 640, height: int = 360, total: int | None = None
                 ) -> np.ndarray:
    """A ``P x units`` 0/1 gate matrix drawn units (y) by samples (x), samples in the given order; ``starts``
    are the sample positions where a new label group begins (a white line), ``names`` the groups' labels.
    Values between 0 and 1 (open fractions of blocks of gates, ``total`` gates in all) shade between the two."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch

    g = np.asarray(gates, dtype=np.float32).reshape(np.asarray(gates).shape[0], -1)
    P, U = g.shape
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    closed, open_ = "#2b2b50", "#f2d64b"
    ax.imshow(g.T, aspect="auto", interpolation="nearest", cmap=LinearSegmentedColormap.from_list(
              "gates", [closed, open_]), vmin=0, vmax=1, origin="lower", extent=(-0.5, P - 0.5, -0.5, U - 0.5))
    U = total if total is not None else U
    _mark_groups(ax, starts, names, P, "x", "white")
    ax.set_xlabel(f"probe sample ({P}, grouped by label)" if starts or names else f"probe sample ({P})")
    ax.set_ylabel(f"{unit_label} ({U})")
    ax.set_title(title)
    fig.legend(handles=[Patch(color=open_, label="open (pre > 0)"), Patch(color=closed, label="closed")],
               loc="outside right upper")
    return pixels(fig)


@_styled
def matrix_figure(matrix: np.ndarray, starts: Sequence[int] = (), names: Sequence[str] = (), *, title: str,
                  colorbar_label: str, xlabel: str = "probe sample j", ylabel: str = "probe sample i",
                  vmin: float | None = None, vmax: float | None = None, width: int = 500,
                  height: int = 420) -> np.ndarray:
    """A square matrix as a heat map (rows top to bottom) with a labelled colour bar; ``starts`` / ``names``
    mark label groups on both axes."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if not hi > lo:
        hi = lo + 1.0
    im = ax.imshow(m, interpolation="nearest", cmap=_cmap(), vmin=lo, vmax=hi,
                   extent=(-0.5, m.shape[1] - 0.5, n - 0.5, -0.5))
    _mark_groups(ax, starts, names, m.shape[1], "x", "white")
    _mark_groups(ax, starts, names, n, "y", "white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    bar = fig.colorbar(im, ax=ax, shrink=0.9)
    bar.set_label(colorbar_label)
    return pixels(fig)


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
