"""Records: what a probe returns. Sinks turn them into TensorBoard events, lists, ...

A record carries a tag ``probe/site/quantity``; the session stamps the step when it
hands records to the sinks. Values may stay on the model's device: the sink moves
them to the host once, when it writes, so a probe never forces a host sync.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import threading
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, Union, cast, runtime_checkable

import numpy as np
import torch

Number = Union[float, int, torch.Tensor]


class _HistogramArrays(TypedDict):
    """What ``Histogram.to_numpy`` gives: the arguments of ``add_histogram_raw`` plus ``nonfinite``."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    nonfinite: int
    bucket_counts: np.ndarray
    bucket_limits: np.ndarray


DEFAULT_BINS = 64


@dataclass
class Scalar:
    """One number, ``tag = probe/site/quantity``.

    Attributes:
        tag: ``probe/site/quantity``.
        value: a number, or a 0-d tensor on any device (moved to the host in one transfer per device).
        step: the step, when the record carries its own.
    """

    tag: str
    value: Number
    step: int | None = None

    def item(self) -> float:
        v = self.value
        return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


@dataclass
class Histogram:
    """A histogram already binned (on the values' device) with ``Histogram.of``.

    ``counts[i]`` counts finite values in ``[edges[i], edges[i+1])`` (the last bin is
    closed). Non-finite values are left out of the bins and counted in ``nonfinite``;
    the TensorBoard sink writes them as the scalar ``<tag>/nonfinite``.

    Attributes:
        tag: ``probe/site/quantity``.
        counts: per bin.
        edges: the ``bins + 1`` bin edges.
        num, sum, sum_squares, min, max: of the finite values.
        nonfinite: how many values were NaN or infinite.
        step: the step, when the record carries its own.
    """

    tag: str
    counts: torch.Tensor
    edges: torch.Tensor
    num: torch.Tensor
    sum: torch.Tensor
    sum_squares: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    nonfinite: torch.Tensor
    step: int | None = None

    @classmethod
    def of(cls, tag: str, values: torch.Tensor, bins: int = DEFAULT_BINS) -> Histogram:
        """Bin ``values`` on their own device: ``bins`` equal bins between min and max.

        Args:
            tag: the record's tag.
            values: any tensor (flattened).
            bins: the number of bins.

        Returns:
            The histogram, its tensors on the values' device.
        """
        v = values.detach().reshape(-1)
        if not v.is_floating_point():
            v = v.double()
        v = v.to(torch.float64) if v.dtype == torch.float64 else v.float()
        finite = torch.isfinite(v)
        nonfinite = (~finite).sum()
        fv = v[finite] if v.numel() else v
        if fv.numel() == 0:
            zero = torch.zeros((), dtype=v.dtype, device=v.device)
            return cls(
                tag,
                torch.zeros(bins, device=v.device),
                torch.linspace(0, 1, bins + 1, device=v.device),
                zero.clone(),
                zero.clone(),
                zero.clone(),
                zero.clone(),
                zero.clone(),
                nonfinite,
            )
        lo, hi = fv.min(), fv.max()
        # widen a degenerate range so that every value falls in a bin (by 1, or a little more for values so large
        # that 1 would vanish in them, without overflowing the dtype)
        top = torch.finfo(v.dtype).max
        span = torch.where(hi > lo, hi - lo, torch.clamp(lo.abs() * 2.0**-20, min=1.0))
        hi_e = torch.where(hi > lo, hi, torch.clamp(lo + span, max=top))
        # halves: hi - lo itself may overflow; a range that cannot be widened (0 / 0) puts every value in bin 0
        frac = (fv * 0.5 - lo * 0.5) / (hi_e * 0.5 - lo * 0.5)
        t = torch.linspace(0, 1, bins + 1, device=v.device, dtype=v.dtype)
        width = hi_e - lo
        edges = torch.where(torch.isfinite(width), lo + width * t, lo * (1 - t) + hi_e * t)
        idx = torch.nan_to_num(frac * bins, nan=0.0).floor().clamp_(0, bins - 1).long()
        counts = torch.bincount(idx, minlength=bins).to(v.dtype)
        return cls(
            tag,
            counts,
            edges,
            torch.tensor(fv.numel(), device=v.device, dtype=v.dtype),
            fv.sum(),
            (fv * fv).sum(),
            lo,
            hi,
            nonfinite,
        )

    def to_numpy(self) -> _HistogramArrays:
        """Host copy (one transfer): the arguments of ``add_histogram_raw`` plus ``nonfinite``."""
        n = self.counts.numel()
        stats = torch.stack(
            [
                torch.as_tensor(getattr(self, k), device=self.counts.device).double().reshape(())
                for k in ("min", "max", "num", "sum", "sum_squares", "nonfinite")
            ]
        )
        host = (
            torch.cat(
                [
                    self.counts.detach().double().reshape(-1),
                    self.edges.detach().double().reshape(-1).to(self.counts.device),
                    stats,
                ]
            )
            .cpu()
            .numpy()
        )
        return {
            "min": float(host[-6]),
            "max": float(host[-5]),
            "num": float(host[-4]),
            "sum": float(host[-3]),
            "sum_squares": float(host[-2]),
            "nonfinite": int(host[-1]),
            "bucket_counts": host[:n],
            "bucket_limits": host[n + 1 : 2 * n + 1],
        }

    def on_host(self) -> Histogram:
        """The same histogram with every tensor on the CPU (one transfer)."""
        h = self.to_numpy()
        t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
        edges = torch.cat([t([h["min"]]), t(h["bucket_limits"])])
        return Histogram(
            self.tag,
            t(h["bucket_counts"]),
            edges,
            t(h["num"]),
            t(h["sum"]),
            t(h["sum_squares"]),
            t(h["min"]),
            t(h["max"]),
            torch.as_tensor(h["nonfinite"]),
            self.step,
        )


def _host(value: Any) -> Any:
    """A host copy of an array argument (a tensor becomes a numpy array), so that later in-place changes by the
    probe cannot reach a figure that is drawn later; tuples and lists element by element; other values as they
    are."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (tuple, list)):
        return tuple(_host(v) for v in value)
    return value


class _HostData:
    """Data of a picture: every field a host value (numpy arrays, numbers, strings, tuples of them), copied when
    the probe measures, so that a sink can draw it on another thread (or process) while training goes on."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(cast(Any, self)):  # every subclass is a dataclass
            object.__setattr__(self, f.name, _host(getattr(self, f.name)))


@dataclass(frozen=True)
class Matrix(_HostData):
    """A matrix shown as a heat map with a labelled colour scale (e.g. the path gram ``H``).

    Attributes:
        values: ``n x m`` entries.
        starts: positions (rows and columns) where a label group begins; ``names`` the groups' labels.
        title: the figure's title.
        colorbar_label: what the colours mean (the quantity and its unit).
        xlabel, ylabel: what the columns and the rows are.
        vmin, vmax: the colour scale's ends (None: the smallest / largest finite entry, rounded out).
    """

    values: np.ndarray
    starts: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    title: str = ""
    colorbar_label: str = ""
    xlabel: str = "probe sample j"
    ylabel: str = "probe sample i"
    vmin: float | None = None
    vmax: float | None = None


@dataclass(frozen=True)
class Gates(_HostData):
    """A gate pattern: a ``P x units`` matrix of open (1) and closed (0) gates, or open fractions of blocks of
    gates, samples in the order shown.

    Attributes:
        values: ``P x units`` in [0, 1].
        starts: sample positions where a label group begins; ``names`` the groups' labels.
        title: the figure's title.
        unit_label: what a row is.
        total: the number of gates when rows are blocks of gates (None: one gate a row).
        padding: ``P x units`` booleans, true at gates of padded positions (attention mask 0), or None.
    """

    values: np.ndarray
    starts: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    title: str = ""
    unit_label: str = "unit"
    total: int | None = None
    padding: np.ndarray | None = None


@dataclass(frozen=True)
class Trails(_HostData):
    """Points in the plane with the trails they left (e.g. the particles of a two-layer net), and teacher
    directions drawn as lines through the origin.

    Attributes:
        current: ``m x 2`` positions now.
        trails: ``k x m x 2`` earlier positions, oldest first.
        sign: ``m`` booleans that colour the points (None: one colour).
        teacher: ``M x 2`` teacher rows (``0 x 2``: none).
        teacher_sign: ``M`` booleans that colour the teacher lines (None: black).
        limit: half the width of the square shown.
        title: the figure's title.
        axis_labels: the x and y labels.
        size: pixels of the square figure.
        legend: draw the legend.
    """

    current: np.ndarray
    trails: np.ndarray
    sign: np.ndarray | None = None
    teacher: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))
    teacher_sign: np.ndarray | None = None
    limit: float = 1.0
    title: str = ""
    axis_labels: tuple[str, str] = ("x", "y")
    size: int = 480
    legend: bool = True


@dataclass(frozen=True)
class Spectrum(_HostData):
    """Eigenvalues against their rank (1 = largest) on a log scale, now and (dashed) at a reference step.

    Attributes:
        values: the eigenvalues now (only the positive ones can be shown).
        reference: the eigenvalues at ``reference_step`` (the first measurement), or None.
        step, reference_step: their steps.
        title: the figure's title.
        ylabel: what the eigenvalues are (and their unit).
    """

    values: np.ndarray
    reference: np.ndarray | None = None
    step: int | None = None
    reference_step: int | None = None
    title: str = "spectrum"
    ylabel: str = "eigenvalue"


@dataclass(frozen=True)
class Curves(_HostData):
    """Curves ``y(x)``, one per ``(label, x, y)`` of ``series``, with a legend when there is more than one.

    Attributes:
        series: ``((label, x, y), ...)``.
        title, xlabel, ylabel: the figure's texts (the labels with their units).
        logx, logy: log scales.
    """

    series: tuple[tuple[str, np.ndarray, np.ndarray], ...]
    title: str = ""
    xlabel: str = "x"
    ylabel: str = "y"
    logx: bool = False
    logy: bool = False


#: the data of a picture, which a renderer (``Renderer``) turns into pixels
Figure = Union[Matrix, Gates, Trails, Spectrum, Curves]
#: every kind of picture data, by name (the names a renderer and its drawing process agree on)
FIGURE_KINDS: dict[str, type] = {k.__name__: k for k in (Matrix, Gates, Trails, Spectrum, Curves)}


@runtime_checkable
class Renderer(Protocol):
    """What turns picture data into pixels (``probes.app.render.Renderer`` with matplotlib). A sink receives
    one at construction, or loads the default (``default_renderer``) at its first picture."""

    def pixels(self, figure: Figure) -> np.ndarray:
        """The figure's pixels, uint8 ``(H, W, 3)``, drawn in the calling thread."""

    def png(self, figure: Figure, background: bool = True) -> tuple[np.ndarray, bytes]:
        """The figure's pixels and their PNG, drawn in the renderer's drawing process with ``background``."""

    def encode(self, pixels: np.ndarray) -> bytes:
        """PNG bytes of uint8 ``(H, W, 3)`` pixels."""


#: what to install for pictures, named in every message about a missing renderer
PLOTS_EXTRA = "pip install 'torch-probes[plots]' (matplotlib and Pillow)"


def default_renderer() -> Renderer | None:
    """The matplotlib renderer of ``probes.app.render``, loaded by name on the first call, or None where
    matplotlib is not installed (pictures are then left out; scalars and histograms are written all the same)."""
    try:
        if importlib.util.find_spec("matplotlib") is None:
            return None
        return importlib.import_module("probes.app.render").renderer()
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return None


class _Picture:
    """The pixels of one image, given or drawn once from its data and shared by every copy of the ``Image``."""

    __slots__ = ("figure", "_pixels", "_error", "_lock")

    def __init__(self, source: np.ndarray | Figure) -> None:
        data = isinstance(source, tuple(FIGURE_KINDS.values()))
        self.figure: Figure | None = cast("Figure", source) if data else None
        self._pixels: np.ndarray | None = None if data else cast(np.ndarray, source)
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._pixels is not None or self._error is not None

    def result(self, renderer: Renderer | None = None) -> np.ndarray:
        with self._lock:
            if not self.done:
                try:
                    renderer = renderer if renderer is not None else default_renderer()
                    if renderer is None:
                        raise ImportError(f"drawing a picture needs matplotlib: {PLOTS_EXTRA}")
                    # not done: the image is data (given pixels are done from the start)
                    self._pixels = np.asarray(renderer.pixels(cast("Figure", self.figure)))
                except Exception as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error
            assert self._pixels is not None  # done, and no error
            return self._pixels

    def resolve(self, pixels: np.ndarray) -> None:
        with self._lock:
            if not self.done:
                self._pixels = np.asarray(pixels)


class Image:
    """A picture: RGB pixels, a uint8 array of shape (H, W, 3) (or a float array in [0, 1]), or the data to draw
    them from (a ``Figure``: ``Matrix``, ``Gates``, ``Trails``, ``Spectrum``, ``Curves``).

    A probe returns the data; a sink asks its renderer for the pixels (the TensorBoard sink on its drawing
    thread, in the renderer's drawing process, so a measurement does not wait for matplotlib), or keeps the data
    (the memory sink). The pixels are drawn once and shared by every copy (``at``) of the image.

    Args:
        tag: ``probe/...``.
        pixels: the pixels, or the data of the figure.
        step: the step (stamped by the session).
    """

    __slots__ = ("tag", "step", "_picture")

    def __init__(self, tag: str, pixels: np.ndarray | Figure | _Picture, step: int | None = None) -> None:
        self.tag, self.step = tag, step
        self._picture = pixels if isinstance(pixels, _Picture) else _Picture(pixels)

    @property
    def figure(self) -> Figure | None:
        """The data the pixels are drawn from (None for an image given as pixels)."""
        return self._picture.figure

    @property
    def pending(self) -> bool:
        """Whether the image is data whose pixels are not drawn yet."""
        return self._picture.figure is not None and not self._picture.done

    @property
    def pixels(self) -> np.ndarray:
        """The pixels (drawn now, in the calling thread, by the default renderer, when they are not drawn yet).

        Raises:
            ImportError: they must be drawn and matplotlib is not installed.
        """
        return self._picture.result()

    def draw(self, renderer: Renderer | None) -> np.ndarray:
        """The pixels, drawn by ``renderer`` (None: the default one) when they are not drawn yet.

        Args:
            renderer: what draws the picture data (None: the default renderer).
        """
        return self._picture.result(renderer)

    def resolve(self, pixels: np.ndarray) -> None:
        """Take pixels drawn elsewhere (a sink's drawing process) as this image's, unless they were drawn.

        Args:
            pixels: ``(H, W, 3)`` or ``(H, W)`` pixels.
        """
        self._picture.resolve(pixels)

    def at(self, step: int | None) -> Image:
        """A copy stamped with ``step`` that shares the pixels (or the data still to draw).

        Args:
            step: the step to stamp.
        """
        return Image(self.tag, self._picture, step)

    def as_uint8(self, renderer: Renderer | None = None) -> np.ndarray:
        """The pixels as uint8 ``(H, W, 3)`` (drawn by ``renderer``, None: the default one, when not drawn yet).

        Args:
            renderer: what draws the picture data (None: the default renderer).
        """
        p = np.asarray(self.draw(renderer))
        if p.dtype != np.uint8:
            p = (np.clip(p, 0.0, 1.0) * 255).round().astype(np.uint8)
        if p.ndim == 2:
            p = np.stack([p] * 3, axis=-1)
        if p.shape[-1] == 4:
            p = p[..., :3]
        return p

    def __repr__(self) -> str:
        fig = self.figure
        if fig is not None:
            what = f"{type(fig).__name__} {'drawn' if self._picture.done else 'pending'}"
        else:
            what = f"pixels {getattr(self._picture._pixels, 'shape', '?')}"
        return f"Image(tag={self.tag!r}, {what}, step={self.step!r})"


@dataclass(frozen=True)
class Chart:
    """A chart group a probe declares (``Probe.charts``): the scalar tags that match ``pattern`` (a regular
    expression) share one multi-line chart titled ``title`` in TensorBoard's custom scalars and in the report.

    Args:
        title: the chart's title.
        pattern: a regular expression (``re.match``) over scalar tags.
    """

    title: str
    pattern: str


Record = Union[Scalar, Histogram, Image]


def to_host(records: list[Record]) -> list[Record]:
    """Move every record's values to the host: tensor scalars of one device in one transfer."""
    out: list[Record] = list(records)
    by_device: dict[torch.device, list[int]] = {}
    for i, r in enumerate(out):
        if isinstance(r, Scalar) and isinstance(r.value, torch.Tensor):
            by_device.setdefault(r.value.device, []).append(i)
        elif isinstance(r, Histogram) and r.counts.device.type != "cpu":
            out[i] = r.on_host()
    for idxs in by_device.values():
        tensors = [cast(torch.Tensor, cast(Scalar, out[i]).value) for i in idxs]  # the tensor scalars found above
        values = torch.stack([t.detach().reshape(()).double() for t in tensors]).cpu().tolist()
        for i, v in zip(idxs, values):
            out[i] = Scalar(out[i].tag, v, out[i].step)
    return out
