"""Figure canvases: the style and its lock, new and kept figures (drawn once, then blitted), margins in pixels,
and figures to pixels and PNG."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import textwrap
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

#: dots per inch of every figure: sizes below are in pixels

DPI = 80
#: levels of the quantised colour maps (PNG compresses a few colours far better than 256)
LEVELS = 32
POSITIVE = "#d62728"  # red: a_j >= 0
NEGATIVE = "#1f77b4"  # blue: a_j < 0
UNSIGNED = "#9467bd"
TEACHER = "#000000"


#: text sizes (points; 1 pt = 1.1 pixels at 80 dpi) large enough to read when TensorBoard shrinks an image
STYLE: dict[RcKeyType, Any] = {
    "font.size": 12,
    "axes.titlesize": 12,
    "axes.labelsize": 12,
    "xtick.labelsize": 10.5,
    "ytick.labelsize": 10.5,
    "legend.fontsize": 10,
    "figure.facecolor": "white",
    "axes.titlelocation": "left",
    "text.usetex": False,
}  # names are drawn as they are: a matplotlibrc's usetex would send them to LaTeX
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


#: the text properties of every text drawn from a name (a tag, a site, a run, a label, a title): no mathtext and
#: no TeX, so that ``$``, ``_`` and ``^`` are drawn as they are and never parsed (``$\frac{1}{$`` would not parse)
PLAIN = {"parse_math": False, "usetex": False}


def literal(text: Any) -> str:
    """``text`` as a string that matplotlib draws as it is even where mathtext is on: every ``$`` escaped as
    ``\\$`` (matplotlib draws ``\\$`` as ``$`` in text that is not mathtext, and text without an unescaped
    ``$`` is not). For texts that matplotlib makes itself from strings (tick labels); texts made here get
    ``PLAIN`` instead (``plain``)."""
    return str(text).replace("$", r"\$")


def plain(*texts: Any) -> None:
    """Draw these matplotlib ``Text`` objects as they are (``PLAIN``): a legend's texts, say."""
    for text in texts:
        text.set(**PLAIN)


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
    return "\n".join(
        textwrap.fill(line, width, break_long_words=True, break_on_hyphens=False) or line
        for line in str(text).split("\n")
    )


def place(
    fig: Any,
    ax: Any,
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    left: float = 78,
    right: float = 16,
    bottom: float = 48,
    top_extra: float = 0,
) -> None:
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
    ax.set_title(
        title,
        loc="center",
        x=-(left - 8) / max(W - left - right, 10),
        y=1.0,
        pad=6,
        horizontalalignment="left",
        **PLAIN,
    )
    ax.set_xlabel(xlabel, **PLAIN)
    ax.set_ylabel(ylabel, **PLAIN)


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


def _compact(value: float, _pos: Any = None) -> str:
    """A tick label that carries its own scale (``0.25``, ``3e-14``, ``1.2e+06``): no offset text."""
    return f"{value:.4g}" if value else "0"


def kept_axes(
    key: str, title: str, xlabel: str, ylabel: str, *, width: int = 560, height: int = 400, **margins: float
) -> tuple[Any, Any]:
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
    """Fixed ticks with ``names`` (drawn as they are) at ``centres``, or (None) matplotlib's automatic integer
    ticks again."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, ScalarFormatter

    if centres is None:
        axis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_tick_params(labelsize=STYLE["xtick.labelsize"])
    else:
        axis.set_major_locator(FixedLocator(list(centres)))
        axis.set_major_formatter(FixedFormatter([literal(name) for name in names]))  # tick texts are made later
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
        sig += [
            ax.get_position().bounds,
            ax.get_xlim(),
            ax.get_ylim(),
            ax.get_xscale(),
            ax.get_yscale(),
            ax.get_xlabel(),
            ax.get_ylabel(),
            ax.get_visible(),
        ]
        for axis in (ax.xaxis, ax.yaxis):
            for locator, formatter in (
                (axis.get_major_locator(), axis.get_major_formatter()),
                (axis.get_minor_locator(), axis.get_minor_formatter()),
            ):
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
        colours = cast("list[tuple[int, tuple[int, int, int]]]", counted)  # an RGB image's: (count, (r, g, b))
        palette = np.array(sorted((r << 16) | (g << 8) | b for _, (r, g, b) in colours), dtype=np.uint32)
        flat = (p[..., 0].astype(np.uint32) << 16) | (p[..., 1].astype(np.uint32) << 8) | p[..., 2]
        index = np.searchsorted(palette, flat).astype(np.uint8)
        h, w = p.shape[:2]
        im = PILImage.frombytes("P", (w, h), index.tobytes())
        rgb = np.stack([(palette >> 16) & 255, (palette >> 8) & 255, palette & 255], axis=1).astype(np.uint8)
        im.putpalette(rgb.reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)  # zlib level 3: a third of the time of 6, 7% larger
    return buf.getvalue()
