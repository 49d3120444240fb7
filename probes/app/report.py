"""``probes report LOGDIR``: one self-contained HTML page from TensorBoard event files.

For people who want a file to share rather than a server. The event files are read with
TensorBoard's own reader (``EventMultiplexer``, one run per directory that holds event files).
The page has one section per run (event files in the logdir itself: the run is named by the folder; the site
runs ``<run>/site=<site>`` of the TensorBoard sink are copies of their run's per-site scalars and are left out):
a table of the last value of every scalar; a table of the tags written once (a training's one-off summary such
as ``train_runtime``); one line for each series that never changes, instead of a chart; the scalars plotted
(matplotlib, ``probes.app.render``) with one chart per quantity, where the sites of one quantity share one
chart and so one scale (the charts of the run's custom-scalars layout: the chart groups the probes declare,
and one quantity across sites); the final-step shape of every histogram; and the first and the latest image
of every image tag. A chart of many series draws the few with the largest last values and one band for the
others; a chart without a finite value says so. All charts are drawn in one kept figure. Everything (plots,
images, style) is inlined as base64 data, so the page opens anywhere without the log directory; the charts
share the page's width.

Names (tags, sites, runs) come from whoever wrote the event files: the page shows them HTML-escaped and the
charts draw them as they are (never as mathtext or TeX: ``probes.render.PLAIN``). A chart that still fails to
draw is named in its place with the reason (and a ``ReportWarning``), and the rest of the page is written.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from probes.app import render

#: most plots on one page; the tables still list every scalar
MAX_PLOTS = 300
#: plot size in pixels
PLOT_SIZE = (560, 340)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 2px solid #bbb; }
h3 { font-size: 1.05em; margin-top: 1.4em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 14px; }
.grid.images { grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); }
figure { margin: 0; min-width: 0; } figcaption { font-size: 0.8em; font-family: ui-monospace, monospace; }
.grid figure img { width: 100%; height: auto; }
img { max-width: 100%; }
.note { color: #777; font-size: 0.85em; }
details { margin: 0.6em 0; } summary { cursor: pointer; }
p.failed { box-sizing: border-box; margin: 0; padding: 10px 20px; border: 1px dashed #c33; color: #a22;
           font-size: 0.85em; overflow-wrap: anywhere; }
ul.constant { font-size: 0.85em; margin: 0.4em 0; } ul.constant code { font-family: ui-monospace, monospace; }
"""

#: the longest reason given for a chart that was not drawn (characters)
REASON_CHARS = 300


#: one scalar tag's series: its steps and its values (float64)
Series = tuple[np.ndarray, np.ndarray]


class RunData(TypedDict):
    """What ``read_runs`` reads of one run: ``scalars`` (tag -> steps, values), ``images`` (tag -> the first and the
    last ``(step, png bytes)``), ``histograms`` (tag -> the last ``(step, min, bucket limits, counts)``) and
    ``layout`` (the custom-scalars charts, ``(title, [regex, ...])``, or None)."""

    scalars: dict[str, Series]
    images: dict[str, list[tuple[int, bytes]]]
    histograms: dict[str, tuple[int, float, np.ndarray, np.ndarray]]
    layout: list[tuple[str, list[str]]] | None


class ReportWarning(UserWarning):
    """A chart of the report was not drawn (the page names it and says why; the rest is written)."""


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG (``probes.render.encode_png``)."""
    return render.encode_png(pixels)


def read_runs(logdir: str | Path) -> dict[str, RunData]:
    """``{run: {"scalars": {tag: (steps, values)}, "images": {tag: [(step, png bytes), ...]},
    "histograms": {tag: (step, limits, counts)}, "layout": [(title, [regex, ...]), ...] or None}}`` from the
    event files: every scalar, the first and the last image of each tag, the last histogram of each tag, and
    the charts of the custom-scalars layout the TensorBoard sink wrote (None without one).

    Args:
        logdir: a directory of runs (or one run).

    Returns:
        The runs, by name.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: no scalars or images in it.
    """
    from tensorboard.backend.event_processing import event_multiplexer

    logdir = Path(logdir)
    if not logdir.exists():
        raise FileNotFoundError(f"probes report: no such directory {str(logdir)!r}")
    mux = event_multiplexer.EventMultiplexer(
        size_guidance={"scalars": 0, "images": 0, "histograms": 1, "tensors": 1, "compressedHistograms": 1}
    )
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    runs: dict[str, RunData] = {}
    names = set(mux.Runs())
    for run in sorted(names):
        if _is_site_run(run, names):  # the copies of a run's per-site scalars, for TensorBoard's colours
            continue
        acc = mux.GetAccumulator(run)
        tags = acc.Tags()
        scalars: dict[str, Series] = {}
        for tag in tags.get("scalars", []):
            events = acc.Scalars(tag)
            scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=np.float64))
        images: dict[str, list[tuple[int, bytes]]] = {}
        for tag in tags.get("images", []):
            events = acc.Images(tag)
            if events:
                keep = [events[0], events[-1]] if len(events) > 1 else [events[-1]]
                images[tag] = [(e.step, e.encoded_image_string) for e in keep]
        layout = _layout(acc, tags)
        histograms: dict[str, tuple[int, float, np.ndarray, np.ndarray]] = {}
        for tag in tags.get("histograms", []):
            events = acc.Histograms(tag)
            if events:
                h = events[-1].histogram_value
                histograms[tag] = (
                    events[-1].step,
                    float(h.min),
                    np.array(h.bucket_limit, dtype=np.float64),
                    np.array(h.bucket, dtype=np.float64),
                )
        if scalars or images or histograms:
            runs[_run_name(run, logdir)] = RunData(scalars=scalars, images=images, histograms=histograms, layout=layout)
    if not runs:
        raise ValueError(f"probes report: no TensorBoard scalars or images under {str(logdir)!r}")
    return runs


def _is_site_run(run: str, runs: set[str]) -> bool:
    """Whether ``run`` is the site run (``<run>/site=<site>``) of another of ``runs``."""
    from probes.sinks.tensorboard import SITE_RUN

    parent, _, last = run.replace("\\", "/").rpartition("/")
    return last.startswith(SITE_RUN) and (parent or ".") in {r.replace("\\", "/") for r in runs}


def _run_name(run: str, logdir: Path) -> str:
    """A run's name: its directory under ``logdir``, and the folder's own name for event files in ``logdir``
    itself (TensorBoard calls that run ``.``)."""
    return logdir.resolve().name or str(logdir) if run in (".", "") else run


def _layout(acc: Any, tags: dict) -> list[tuple[str, list[str]]] | None:
    """The charts ``[(title, [regex, ...]), ...]`` of the last custom-scalars layout in a run, if any."""
    if "custom_scalars__config__" not in tags.get("tensors", []):
        return None
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return [
        (chart.title, list(chart.multiline.tag))
        for category in layout.category
        for chart in category.chart
        if chart.HasField("multiline")
    ]


def group_scalars(tags: list[str], layout: list[tuple[str, list[str]]] | None = None) -> list[tuple[str, list[str]]]:
    """Charts ``[(title, [tag, ...]), ...]``: the charts of the run's custom-scalars layout (the chart groups
    the probes declared and one quantity across sites), computed as the TensorBoard sink does when the run has
    none, then every other tag alone; by probe, then tag.

    Args:
        tags: the run's scalar tags.
        layout: ``[(title, [regex, ...]), ...]`` from the run (``read_runs``), or None.

    Returns:
        The charts.
    """
    from probes.plugins import registered_charts
    from probes.sinks.tensorboard import layout_for

    if layout is None:
        layout = [
            (title, regexes)
            for category in layout_for(tags, registered_charts()).values()
            for title, (_, regexes) in category.items()
        ]
    charts: list[tuple[str, list[str]]] = []
    claimed: set[str] = set()
    for title, regexes in layout:
        members = [
            t for t in tags if t not in claimed and any(re.match(r, t) or re.match(r, _as_site_tag(t)) for r in regexes)
        ]
        if members:
            charts.append((title, members))
            claimed.update(members)
    charts += [(t, [t]) for t in tags if t not in claimed]
    return sorted(charts, key=lambda c: (c[1][0].split("/")[0], c[1][0]))


def _as_site_tag(tag: str) -> str:
    """The tag a per-site scalar ``<probe>/<site>/<quantity>`` has in its site run (which a per-site chart of the
    layout names): ``<probe>/per_site/<quantity>``."""
    from probes.sinks.tensorboard import SITE_TAG

    parts = tag.split("/")
    return f"{parts[0]}/{SITE_TAG}/{parts[2]}" if len(parts) == 3 else tag


def _series_label(tag: str, members: list[str]) -> str:
    """What tells the lines of one chart apart: the part of the tag that differs."""
    if len(members) == 1:
        return tag
    parts = tag.split("/")
    common = [p for p in parts if all(p in m.split("/") for m in members)]
    rest = [p for p in parts if p not in common]
    return "/".join(rest) or tag


def _ylabel(members: list[str]) -> str:
    """The quantity a chart shows: the last tag component its lines share (``cka``, ``eig_top``, ...), else the
    words the last components start with (``rate_at`` of ``rate_at_0.1`` and ``rate_at_1``)."""
    parts = [m.split("/") for m in members]
    shared = [p for p in parts[0][1:] if all(p in q[1:] for q in parts)]
    if shared:
        return shared[-1]
    last = [q[-1] for q in parts]
    prefix = last[0][: len(os.path.commonprefix(last))]
    if len(members) > 1 and "_" in prefix:
        prefix = prefix[: prefix.rindex("_")]
    return prefix.strip("_") or "value"


def _scalar_plot(title: str, members: list[str], scalars: dict) -> bytes:
    """A chart of ``members``: at most ``render.MAX_LINES`` lines and a band for the rest, a note where values
    are all NaN, sensible axes for one point (``render.line_axes``)."""
    series = [(_series_label(t, members), *scalars[t]) for t in members]
    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in series]) if series else np.zeros(0)
    logy = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3)
    with render.style():
        fig, ax = render.kept_axes(
            "report chart", title, "training step", _ylabel(members), width=PLOT_SIZE[0], height=PLOT_SIZE[1]
        )
        render.line_axes(ax, series, logy=logy)
        return render.png(fig)


def _histogram_plot(tag: str, step: int, lo: float, limits: np.ndarray, counts: np.ndarray) -> bytes:
    """The histogram's last step as bars: TensorBoard stores right bucket edges, the first left edge is min."""
    with render.style():
        return _draw_histogram(tag, step, np.concatenate([[lo], limits]), counts)


def _draw_histogram(tag: str, step: int, edges: np.ndarray, counts: np.ndarray) -> bytes:
    size = {"width": PLOT_SIZE[0], "height": PLOT_SIZE[1]}
    if edges.size == counts.size + 1 and np.isfinite(edges).all() and np.abs(edges).max() < 1e300:
        fig, ax = render.kept_axes("report chart", f"{tag}, step {step}", tag.split("/")[-1], "count", **size)
        ax.stairs(counts, edges, fill=True, alpha=0.7, color="#1f77b4")
    else:  # edges TensorBoard filled with +-DBL_MAX: bucket index instead
        fig, ax = render.kept_axes(
            "report chart", f"{tag}, step {step}", f"{tag.split('/')[-1]} (bucket)", "count", **size
        )
        ax.bar(np.arange(counts.size), counts, width=1.0, color="#1f77b4")
    ax.grid(alpha=0.3)
    return render.png(fig)


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.6g}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, alt: str, caption: str) -> str:
    return (
        f"<figure><img alt='{html.escape(alt, quote=True)}' src='{_data_uri(png)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _reason(exc: BaseException) -> str:
    """An exception in one line: its type and its message's words, at most ``REASON_CHARS`` characters."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _not_drawn(title: str, caption: str, reason: str) -> str:
    """What stands in a chart's place when it could not be drawn: its name and why."""
    return (
        f"<figure><p class='failed'>chart {html.escape(title)} not drawn: {html.escape(reason)}</p>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _chart(failed: list[str], run: str, title: str, caption: str, draw: Callable[..., bytes], *args: Any) -> str:
    """The figure of one chart (``draw(*args)`` gives its PNG), or, where drawing it raises, a note naming it and
    the reason (its title appended to ``failed``, and a ``ReportWarning``): one chart never takes the page with
    it."""
    try:
        png = draw(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of one chart is reported in its place
        reason = _reason(exc)
        failed.append(title)
        warnings.warn(f"chart {title!r} of run {run!r} not drawn ({reason})", ReportWarning, stacklevel=3)
        return _not_drawn(title, caption, reason)
    return _figure(png, title, caption)


def _constant(values: np.ndarray) -> float | None:
    """The one value of a series of at least two points that never changes (NaN for all NaN), else None."""
    if values.size < 2:
        return None
    if np.isnan(values).all():
        return math.nan
    return float(values[0]) if np.array_equal(values, np.full_like(values, values[0])) else None


def _sections(
    charts: list[tuple[str, list[str]]], scalars: dict
) -> tuple[list[str], dict[str, tuple[list[tuple[str, list[str]]], list[str]]]]:
    """The tags of one point each (a training's one-off summary: a table, not charts), and by probe the charts
    to draw and one HTML line for each series that never changes (instead of a flat chart)."""
    singles: list[str] = []
    sections: dict[str, tuple[list[tuple[str, list[str]]], list[str]]] = {}
    for title, members in charts:
        if all(scalars[t][0].size == 1 for t in members):
            singles += members
            continue
        drawn, constant = sections.setdefault(members[0].split("/")[0], ([], []))
        values = [v for v in (_constant(scalars[t][1]) for t in members) if v is not None]
        if len(values) < len(members):  # a series that changes: the chart is drawn
            drawn.append((title, members))
            continue
        for tag, v in zip(members, values):
            steps = scalars[tag][0]
            constant.append(
                f"<code>{html.escape(tag)}</code>: {_fmt(v)} at every one of its {steps.size} points "
                f"(steps {int(steps[0])} to {int(steps[-1])})"
            )
    return singles, sections


def _singles_table(tags: list[str], scalars: dict) -> str:
    """The table of the scalars written once (``train_runtime``, ``total_flos``, ...)."""
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td class='num'>{int(scalars[t][0][0])}</td>"
        f"<td class='num'>{_fmt(float(scalars[t][1][0]))}</td></tr>"
        for t in sorted(tags)
    )
    return (
        "<h3>values written once</h3><table class='singles'><tr><th>tag</th><th>step</th><th>value</th></tr>"
        f"{rows}</table>"
    )


@dataclass
class _Page:
    """What the page has drawn so far: the plot budget (``MAX_PLOTS``) and the charts that failed to draw."""

    plotted: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def _header(logdir: Path, runs: dict[str, RunData]) -> list[str]:
    """The page's head, title, summary line and (for several runs) the links to each run."""
    n_tags = len({t for data in runs.values() for t in data["scalars"]})
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>probes report: {html.escape(str(logdir))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>probes report: {html.escape(str(logdir))}</h1>",
        f"<p class='note'>{len(runs)} run(s), {n_tags} scalar tags; written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by <code>probes report</code>. One section per "
        "run; in each, one chart per quantity (the sites of a quantity share a chart and its scale), the "
        "final shape of each histogram, and the first and the latest image of each image tag.</p>",
    ]
    if len(runs) > 1:
        out.append(
            "<p>Runs: " + ", ".join(f"<a href='#run-{i}'>{html.escape(r)}</a>" for i, r in enumerate(runs)) + "</p>"
        )
    return out


def _last_values(scalars: dict[str, Series]) -> list[str]:
    """The folded table of every scalar's last step and value (one line per row)."""
    rows = [
        f"<tr><td>{html.escape(tag)}</td><td class='num'>{int(steps[-1])}</td>"
        f"<td class='num'>{_fmt(float(values[-1]))}</td></tr>"
        for tag, (steps, values) in sorted(scalars.items())
        if len(steps)
    ]
    return [
        f"<details><summary>Last values ({len(scalars)} scalars)</summary>"
        "<table><tr><th>tag</th><th>step</th><th>value</th></tr>",
        *rows,
        "</table></details>",
    ]


def _scalar_sections(run: str, data: RunData, page: _Page) -> list[str]:
    """The table of values written once, then per probe: its constant series as lines, its charts as a grid."""
    scalars = data["scalars"]
    singles, sections = _sections(group_scalars(sorted(scalars), data["layout"]), scalars)
    out = [_singles_table(singles, scalars)] if singles else []
    for probe, (charts, constant) in sections.items():
        out.append(f"<h3>{html.escape(probe)}</h3>")
        if constant:
            out.append("<ul class='constant'>" + "".join(f"<li>{line}</li>" for line in constant) + "</ul>")
        if not charts:
            continue
        out.append("<div class='grid'>")
        for title, members in charts:
            if page.plotted >= MAX_PLOTS:
                page.skipped += 1
                continue
            page.plotted += 1
            out.append(_chart(page.failed, run, title, ", ".join(members), _scalar_plot, title, members, scalars))
        out.append("</div>")
    return out


def _histograms_and_images(run: str, data: RunData, page: _Page) -> list[str]:
    """The final-step shape of each histogram, then the first and the latest image of each image tag."""
    out = []
    if data["histograms"]:
        out.append("<h3>histograms (final step)</h3><div class='grid'>")
        for tag, (step, lo, limits, counts) in sorted(data["histograms"].items()):
            caption = f"{tag} (step {step})"
            out.append(_chart(page.failed, run, tag, caption, _histogram_plot, tag, step, lo, limits, counts))
        out.append("</div>")
    if data["images"]:
        out.append("<h3>images (first and latest)</h3><div class='grid'>")
        for tag, shots in sorted(data["images"].items()):
            out += [_figure(png, tag, f"{tag} (step {step})") for step, png in shots]
        out.append("</div>")
    return out


def write_report(logdir: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of ``logdir`` to ``output`` (default ``LOGDIR/report.html``); return its path.

    A chart that fails to draw is named on the page with the reason, in its place, and warned about
    (``ReportWarning``, one per chart); the rest of the page is still written.
    """
    logdir = Path(logdir)
    runs = read_runs(logdir)
    output = Path(output) if output is not None else logdir / "report.html"
    out = _header(logdir, runs)
    notes_at = len(out)  # where the note on charts not drawn goes
    page = _Page()
    for i, (run, data) in enumerate(runs.items()):
        out.append(f"<h2 id='run-{i}'>run: {html.escape(run)}</h2>")
        out += _last_values(data["scalars"])
        out += _scalar_sections(run, data, page)
        out += _histograms_and_images(run, data, page)
    if page.skipped:
        out.append(
            f"<p class='note'>{page.skipped} more charts are in the tables only (at most {MAX_PLOTS} plots per "
            "page).</p>"
        )
    if page.failed:
        out.insert(
            notes_at,
            f"<p class='note'>{len(page.failed)} chart(s) could not be drawn: "
            f"{html.escape(', '.join(page.failed))}; each says why in its place.</p>",
        )
    out.append("</body></html>")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(out), encoding="utf-8")
    return output
