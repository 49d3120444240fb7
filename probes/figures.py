"""Small numpy-only rasteriser for probe images (matplotlib stays optional).

``heatmap`` turns a matrix into RGB pixels; ``Canvas`` draws points, polylines and
axes-free line plots in data coordinates. Everything returns uint8 (H, W, 3) arrays,
what ``probes.records.Image`` carries.
"""

from __future__ import annotations

import numpy as np

# viridis, sampled at 9 points (public colour map by van der Walt & Smith); linear in between
_VIRIDIS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64) / 255.0
# blue - white - red for signed matrices
_DIVERGING = np.array([[0.23, 0.30, 0.75], [1.0, 1.0, 1.0], [0.71, 0.02, 0.15]])

PALETTE = np.array([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=np.uint8)


def colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] to RGB floats with a piecewise-linear colour map."""
    table = _DIVERGING if name == "diverging" else _VIRIDIS
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    pos = v * (len(table) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(table) - 1)
    t = (pos - lo)[..., None]
    return table[lo] * (1 - t) + table[hi] * t


def heatmap(matrix, lo: float | None = None, hi: float | None = None, cmap: str = "viridis",
            max_side: int = 512) -> np.ndarray:
    """RGB image of a 2-D array (rows top to bottom), values scaled to [lo, hi].

    Larger matrices are block-averaged down to at most ``max_side`` pixels a side; smaller
    ones are repeated up to at least 64 pixels so that TensorBoard shows them legibly.
    ``cmap="diverging"`` centres zero (blue negative, red positive).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {m.shape}")
    for axis in (0, 1):
        n = m.shape[axis]
        if n > max_side:
            k = int(np.ceil(n / max_side))
            pad = (-n) % k
            if pad:
                widths = [(0, 0), (0, 0)]
                widths[axis] = (0, pad)
                m = np.pad(m, widths, mode="edge")
            shape = list(m.shape)
            shape[axis:axis + 1] = [shape[axis] // k, k]
            m = m.reshape(shape).mean(axis=axis + 1)
    finite = m[np.isfinite(m)]
    if cmap == "diverging":
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        lo, hi = (-bound, bound) if lo is None and hi is None else (lo, hi)
    if lo is None:
        lo = float(finite.min()) if finite.size else 0.0
    if hi is None:
        hi = float(finite.max()) if finite.size else 1.0
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    rgb = (colormap(scaled, cmap) * 255).round().astype(np.uint8)
    rep = max(1, int(np.ceil(64 / max(1, min(rgb.shape[:2])))))
    rep = min(rep, max(1, 512 // max(rgb.shape[:2])))
    if rep > 1:
        rgb = rgb.repeat(rep, axis=0).repeat(rep, axis=1)
    return rgb


class Canvas:
    """A white RGB canvas with a data-to-pixel transform (y up), for points and lines."""

    def __init__(self, width: int = 480, height: int = 360, xlim=(0.0, 1.0), ylim=(0.0, 1.0),
                 logx: bool = False, logy: bool = False, margin: int = 12) -> None:
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)
        self.logx, self.logy, self.margin = logx, logy, margin
        self.xlim = tuple(self._tx(np.asarray(xlim, dtype=np.float64), logx))
        self.ylim = tuple(self._tx(np.asarray(ylim, dtype=np.float64), logy))

    @staticmethod
    def _tx(v: np.ndarray, log: bool) -> np.ndarray:
        return np.log10(np.maximum(v, 1e-300)) if log else v

    def to_pixels(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.pixels.shape[:2]
        m = self.margin
        x = self._tx(np.asarray(x, dtype=np.float64), self.logx)
        y = self._tx(np.asarray(y, dtype=np.float64), self.logy)
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        px = m + (x - x0) / ((x1 - x0) or 1.0) * (w - 1 - 2 * m)
        py = (h - 1 - m) - (y - y0) / ((y1 - y0) or 1.0) * (h - 1 - 2 * m)
        return px, py

    def points(self, x, y, color=(0, 0, 0), radius: int = 2) -> Canvas:
        px, py = self.to_pixels(x, y)
        h, w = self.pixels.shape[:2]
        ok = np.isfinite(px) & np.isfinite(py)
        px, py = np.round(px[ok]).astype(int), np.round(py[ok]).astype(int)
        col = np.asarray(color, dtype=np.uint8)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy > radius * radius:
                    continue
                xx, yy = px + dx, py + dy
                keep = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
                self.pixels[yy[keep], xx[keep]] = col if col.ndim == 1 else col[keep]
        return self

    def line(self, x, y, color=(0, 0, 0)) -> Canvas:
        """A polyline through the points (x[i], y[i])."""
        px, py = self.to_pixels(x, y)
        h, w = self.pixels.shape[:2]
        col = np.asarray(color, dtype=np.uint8)
        for i in range(len(px) - 1):
            a, b, c, d = px[i], py[i], px[i + 1], py[i + 1]
            if not np.all(np.isfinite([a, b, c, d])):
                continue
            n = int(max(abs(c - a), abs(d - b), 1)) + 1
            n = min(n, 4 * (w + h))
            t = np.linspace(0.0, 1.0, n)
            xx = np.round(a + (c - a) * t).astype(int)
            yy = np.round(b + (d - b) * t).astype(int)
            keep = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            self.pixels[yy[keep], xx[keep]] = col
        return self

    def frame(self, color=(160, 160, 160)) -> Canvas:
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        lx = (lambda v: 10.0 ** v) if self.logx else (lambda v: v)
        ly = (lambda v: 10.0 ** v) if self.logy else (lambda v: v)
        self.line([lx(x0), lx(x1), lx(x1), lx(x0), lx(x0)], [ly(y0), ly(y0), ly(y1), ly(y1), ly(y0)], color)
        return self


def plot(series, logx: bool = False, logy: bool = False, width: int = 480, height: int = 360,
         markers: bool = False) -> np.ndarray:
    """Line plot of ``series = [(x, y), ...]`` (one colour each), axes fitted to the data."""
    xs = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x, _ in series])
    ys = np.concatenate([np.asarray(y, dtype=np.float64).ravel() for _, y in series])
    okx = np.isfinite(xs) & ((xs > 0) if logx else True)
    oky = np.isfinite(ys) & ((ys > 0) if logy else True)
    xr = (xs[okx].min(), xs[okx].max()) if okx.any() else (1.0, 10.0)
    yr = (ys[oky].min(), ys[oky].max()) if oky.any() else (1.0, 10.0)
    canvas = Canvas(width, height, xr, yr, logx, logy).frame()
    for i, (x, y) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        canvas.line(x, y, color)
        if markers:
            canvas.points(x, y, color, radius=1)
    return canvas.pixels
