"""``probes report LOGDIR``: one self-contained HTML page from TensorBoard event files.

For people who want a file to share rather than a server. The event files are read with
TensorBoard's own reader (``EventMultiplexer``, one run per directory that holds event files);
the page has a table of the last value of every scalar, one PNG plot per scalar tag (every run
that logged the tag drawn in the same axes), and the latest image of every image tag. Everything
(plots, images, style) is inlined as base64 data, so the page opens anywhere without the log
directory. Plots use matplotlib (Agg) when it is installed, else ``probes.figures.plot``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

#: most plots on one page; the table still lists every scalar
MAX_PLOTS = 300

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 0.8em; font-family: ui-monospace, monospace; }
img { max-width: 100%; image-rendering: pixelated; }
.note { color: #777; font-size: 0.85em; }
"""


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG (zlib only, no imaging library)."""
    p = np.ascontiguousarray(pixels, dtype=np.uint8)
    if p.ndim == 2:
        p = np.stack([p] * 3, axis=-1)
    h, w = p.shape[:2]
    raw = b"".join(b"\x00" + p[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def read_runs(logdir: str | Path) -> dict[str, dict[str, dict]]:
    """``{run: {"scalars": {tag: (steps, values)}, "images": {tag: (step, png bytes)}}}`` from the event files."""
    from tensorboard.backend.event_processing import event_multiplexer

    logdir = Path(logdir)
    if not logdir.exists():
        raise FileNotFoundError(f"probes report: no such directory {str(logdir)!r}")
    mux = event_multiplexer.EventMultiplexer(size_guidance={"scalars": 0, "images": 1, "histograms": 1,
                                                            "tensors": 1, "compressedHistograms": 1})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    runs: dict[str, dict[str, dict]] = {}
    for run in sorted(mux.Runs()):
        acc = mux.GetAccumulator(run)
        tags = acc.Tags()
        scalars = {}
        for tag in tags.get("scalars", []):
            events = acc.Scalars(tag)
            scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=np.float64))
        images = {}
        for tag in tags.get("images", []):
            events = acc.Images(tag)
            if events:
                images[tag] = (events[-1].step, events[-1].encoded_image_string)
        if scalars or images:
            runs[run] = {"scalars": scalars, "images": images}
    if not runs:
        raise ValueError(f"probes report: no TensorBoard scalars or images under {str(logdir)!r}")
    return runs


def _plot_matplotlib(tag: str, series: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=80)
    for run, steps, values in series:
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, lw=1.2, label=run)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in series])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot_numpy(tag: str, series: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    from probes.figures import plot

    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in series])
    logy = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3)
    return png_bytes(plot([(s, v) for _, s, v in series], logy=logy, width=336, height=224, markers=True))


def _plotter():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _plot_numpy
    return _plot_matplotlib


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.6g}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_report(logdir: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of ``logdir`` to ``output`` (default ``LOGDIR/report.html``); return its path."""
    logdir = Path(logdir)
    runs = read_runs(logdir)
    output = Path(output) if output is not None else logdir / "report.html"
    plotter = _plotter()

    by_tag: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for run, data in runs.items():
        for tag, (steps, values) in data["scalars"].items():
            by_tag.setdefault(tag, []).append((run, steps, values))
    tags = sorted(by_tag)
    sections: dict[str, list[str]] = {}
    for tag in tags:
        sections.setdefault(tag.split("/", 1)[0], []).append(tag)

    out: list[str] = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>probes report: {html.escape(str(logdir))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>probes report: {html.escape(str(logdir))}</h1>",
        f"<p class='note'>{len(runs)} run(s), {len(tags)} scalar tags; written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by <code>probes report</code>.</p>",
        "<h2>Last values</h2><table><tr><th>tag</th><th>run</th><th>step</th><th>value</th></tr>",
    ]
    for tag in tags:
        for run, steps, values in by_tag[tag]:
            if len(steps):
                out.append(f"<tr><td>{html.escape(tag)}</td><td>{html.escape(run)}</td>"
                           f"<td class='num'>{int(steps[-1])}</td><td class='num'>{_fmt(float(values[-1]))}</td></tr>")
    out.append("</table>")

    plotted = 0
    for section, section_tags in sections.items():
        out.append(f"<h2>{html.escape(section)}</h2><div class='grid'>")
        for tag in section_tags:
            if plotted >= MAX_PLOTS:
                break
            png = plotter(tag, by_tag[tag])
            plotted += 1
            out.append(f"<figure><img alt='{html.escape(tag, quote=True)}' src='{_data_uri(png)}'>"
                       f"<figcaption>{html.escape(tag)}</figcaption></figure>")
        out.append("</div>")
    if plotted < len(tags):
        out.append(f"<p class='note'>{len(tags) - plotted} more scalar tags are in the table only "
                   f"(at most {MAX_PLOTS} plots per page).</p>")

    images = [(run, tag, step, png) for run, data in runs.items()
              for tag, (step, png) in sorted(data["images"].items())]
    if images:
        out.append("<h2>Latest images</h2><div class='grid'>")
        for run, tag, step, png in images:
            caption = f"{tag} (step {step}{', ' + run if len(runs) > 1 else ''})"
            out.append(f"<figure><img alt='{html.escape(tag, quote=True)}' src='{_data_uri(png)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(out), encoding="utf-8")
    return output
