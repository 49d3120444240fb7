"""Records: what a probe returns. Sinks turn them into TensorBoard events, lists, ...

A record carries a tag ``probe/site/quantity``; the session stamps the step when it
hands records to the sinks. Values may stay on the model's device: the sink moves
them to the host once, when it writes, so a probe never forces a host sync.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

Number = Union[float, int, torch.Tensor]

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

    def to_numpy(self) -> dict[str, np.ndarray | float]:
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


def _host_copy(value: Any) -> Any:
    """A host copy of an array argument (a tensor becomes a numpy array), so that later in-place changes by the
    probe cannot reach a figure that is drawn later; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


class Drawing:
    """A figure to draw later: ``draw(*args, **kwargs)`` returns its pixels, uint8 ``(H, W, 3)``.

    The arguments are host values (numpy arrays, numbers, strings) copied when the probe measures, so a
    sink can draw on another thread while training goes on. The pixels are drawn once, on the first
    ``result()``, and kept (the arguments are then dropped); every copy of an ``Image`` shares them.
    """

    __slots__ = ("draw", "args", "kwargs", "_pixels", "_error", "_lock")

    def __init__(self, draw: Callable[..., np.ndarray], *args: Any, **kwargs: Any) -> None:
        self.draw = draw
        self.args = tuple(_host_copy(a) for a in args)
        self.kwargs = {k: _host_copy(v) for k, v in kwargs.items()}
        self._pixels: np.ndarray | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """Whether the pixels were drawn (or the drawing failed)."""
        return self._pixels is not None or self._error is not None

    def result(self) -> np.ndarray:
        """The pixels, drawn on the first call (in the calling thread).

        Raises:
            Exception: what drawing raised (again on every later call).
        """
        with self._lock:
            if self._pixels is None and self._error is None:
                try:
                    self._pixels = np.asarray(self.draw(*self.args, **self.kwargs))
                except Exception as exc:
                    self._error = exc
                finally:
                    self.args, self.kwargs = (), {}
            if self._error is not None:
                raise self._error
            return self._pixels

    def resolve(self, pixels: np.ndarray) -> None:
        """Take pixels drawn elsewhere (a sink's drawing process) as this drawing's result, unless it was drawn.

        Args:
            pixels: what ``draw(*args, **kwargs)`` returned there.
        """
        with self._lock:
            if self._pixels is None and self._error is None:
                self._pixels = np.asarray(pixels)
                self.args, self.kwargs = (), {}

    def __repr__(self) -> str:
        name = getattr(self.draw, "__qualname__", repr(self.draw))
        return f"Drawing({name}, {'drawn' if self.done else 'pending'})"


class Image:
    """An RGB image, ``pixels`` a uint8 array of shape (H, W, 3) (or a float array in [0, 1]).

    ``pixels`` may be given as a ``Drawing``: the figure is then drawn when a sink (or a reader) first asks
    for the pixels, on the sink's drawing thread for the TensorBoard sink, so a measurement does not wait
    for matplotlib.

    Args:
        tag: ``probe/...``.
        pixels: the pixels, or a ``Drawing`` that returns them.
        step: the step (stamped by the session).
    """

    __slots__ = ("tag", "step", "_source")

    def __init__(self, tag: str, pixels: np.ndarray | Drawing, step: int | None = None) -> None:
        self.tag, self.step = tag, step
        self._source = pixels

    @property
    def drawing(self) -> Drawing | None:
        """The pending ``Drawing`` (None once the pixels are given or drawn)."""
        src = self._source
        return src if isinstance(src, Drawing) and not src.done else None

    @property
    def pixels(self) -> np.ndarray:
        """The pixels (drawn now, in the calling thread, when they were deferred and not drawn yet)."""
        src = self._source
        return src.result() if isinstance(src, Drawing) else src

    @pixels.setter
    def pixels(self, value: np.ndarray | Drawing) -> None:
        self._source = value

    def at(self, step: int | None) -> Image:
        """A copy stamped with ``step`` that shares the pixels (or the pending drawing).

        Args:
            step: the step to stamp.
        """
        return Image(self.tag, self._source, step)

    def as_uint8(self) -> np.ndarray:
        """The pixels as uint8 ``(H, W, 3)``."""
        p = np.asarray(self.pixels)
        if p.dtype != np.uint8:
            p = (np.clip(p, 0.0, 1.0) * 255).round().astype(np.uint8)
        if p.ndim == 2:
            p = np.stack([p] * 3, axis=-1)
        if p.shape[-1] == 4:
            p = p[..., :3]
        return p

    def __repr__(self) -> str:
        src = self._source
        what = repr(src) if isinstance(src, Drawing) else f"pixels {getattr(src, 'shape', '?')}"
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
        values = torch.stack([out[i].value.detach().reshape(()).double() for i in idxs]).cpu().tolist()
        for i, v in zip(idxs, values):
            out[i] = Scalar(out[i].tag, v, out[i].step)
    return out
