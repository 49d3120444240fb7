"""TensorBoard sink: scalars, pre-binned histograms (``add_histogram_raw``), images and a custom-scalars layout.

Shares a user's ``SummaryWriter`` when one is given (and then leaves closing it to them).

Images are drawn and encoded off the training thread, fed by a bounded queue (``queue_size`` images): a
measurement hands over the picture data (``probes.records.Matrix``, ``Trails``, ...: host arrays and strings) and
training goes on; it waits only when the queue is full. The sink's thread takes the images from the queue and asks
its renderer (``probes.records.Renderer``, given as ``renderer=`` or ``probes.records.default_renderer()``) for
their pixels and PNG: with ``draw_in="process"`` (the default, ``"auto"``, on POSIX systems) the renderer draws
them in its drawing process (``probes.app.render.background``: a fresh interpreter started with ``subprocess``,
never a fork of the training process, ending when this process ends) shared by the sinks of the process, so
matplotlib never holds the training process's interpreter lock; ``draw_in="thread"`` draws every image in the
thread (holding the interpreter lock while it draws; benchmarks/figures.py measures what that costs). Without
matplotlib there is no renderer: picture data is left out, with one notice naming the ``plots`` extra, and every
scalar and histogram is written.
``flush()`` and ``close()`` wait until every queued image is written. An error while drawing is reported
once, as a ``RuntimeWarning`` at the next write, flush or close (the count of failed images goes to the log at
close), and costs only that image.
Images are written as PNG; one with at most 256 colours (every figure of ``probes.app.render``) as a palette PNG,
a third of the size of the RGB one, and still lossless.

The custom-scalars layout (``SummaryWriter.add_custom_scalars``; TensorBoard's "Custom Scalars" dashboard)
puts related scalars in one multi-line chart: every chart group the attached probes declare
(``Probe.charts``, handed over with ``declare``), then one quantity of every site, ``<probe>/<site>/<quantity>``
(``layout_for``). It is built from the scalar tags this sink has written and written again only when a new
chart appears (TensorBoard shows the latest one), so a run has its layout after its first measurement.
``layout=False`` turns it off (e.g. when you write your own layout to a shared writer).

TensorBoard colours lines by run, never by tag: every line of one run has the run's colour. So that the sites of a
per-site chart can be told apart, each per-site scalar ``<probe>/<site>/<quantity>`` (of a quantity with at least
two sites) is also written to the site's own run, the directory ``site=<site>`` inside the logdir (TensorBoard's
run ``<run>/site=<site>``), as ``<probe>/per_site/<quantity>``, and the per-site chart shows those copies: one
colour per site, named in the run list and in every tooltip; the Scalars and Time Series dashboards show the
same copies as one card per quantity. The run's own tags are unchanged (``site_runs=False`` leaves the copies
out; a writer that is not PyTorch's ``SummaryWriter`` never gets them). The lines of a declared chart more than
``SCALE_RATIO`` times above its median line (latest values, when the layout is written) get a chart of their own
(TensorBoard's default "ignore outliers" y range, 5% to 95% of all the chart's points, would cut them off).

A writer that fails (a full disk, a deleted logdir: ``SummaryWriter`` writes its event file in a background thread,
so the error comes out at a later write, flush or close) raises from this sink's next ``write``, ``flush`` or
``close``, in the training thread (an image written by the drawing thread included), and the session reports it
as this sink's failure (``probes.engine.output``). The event file keeps every record written before the failure
(a record cut short by it ends the file, and TensorBoard reads up to it). At its next ``write`` the sink starts
again: a writer it made opens a new event file in the logdir once the logdir takes a small file again (the logdir
is made again if it was deleted; an event file that could not be started is removed, so a disk that stays full
gains no files), and a shared writer is simply called again. Images that come while the writer is failed are
left out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from probes import _torch
from probes.records import Chart, Histogram, Image, Record, Renderer, Scalar
from probes.sinks.base import Sink

log = logging.getLogger("probes")

#: images waiting to be drawn before a measurement waits for the drawing thread
QUEUE_SIZE = 16

#: bytes a logdir must take (in a file written and removed at once) before a writer that failed starts again
ROOM_CHECK_BYTES = 64 * 1024


def _is_summary_writer(writer: Any) -> bool:
    """Whether ``writer`` is PyTorch's ``SummaryWriter`` (the site runs need its logdir and event-file options)."""
    from torch.utils.tensorboard import SummaryWriter

    return isinstance(writer, SummaryWriter)


#: the tag component that stands for the site in a site run's copy of a per-site scalar (``<probe>/per_site/<q>``)
SITE_TAG = "per_site"
#: the directory (inside the run's logdir) of the site run of site ``s``: TensorBoard's run ``<run>/site=<s>``
SITE_RUN = "site="
#: a declared chart's lines more than this factor above the median line (latest values) get a chart of their own
SCALE_RATIO = 20.0


def _per_site(
    tags: Sequence[str], charts: Sequence[Chart]
) -> tuple[list[tuple[Chart, list[str]]], dict[tuple[str, str], list[str]]]:
    """The declared charts with the tags each matches, and the sites of every ``<probe>/<site>/<quantity>`` that
    no declared chart claims, by ``(probe, quantity)``."""
    declared: list[tuple[Chart, list[str]]] = []
    claimed: set[str] = set()
    for chart in charts:
        hit = [t for t in tags if re.match(chart.pattern, t)]
        claimed.update(hit)
        declared.append((chart, hit))
    per_site: dict[tuple[str, str], list[str]] = {}
    for t in tags:
        parts = t.split("/")
        if len(parts) != 3 or t in claimed or parts[2] == "nonfinite" or parts[1] == SITE_TAG:
            continue
        per_site.setdefault((parts[0], parts[2]), []).append(parts[1])
    return declared, per_site


def site_series(tags: Iterable[str], charts: Sequence[Chart] = ()) -> dict[str, tuple[str, str]]:
    """``{tag: (site, tag in the site run)}`` for every scalar of a per-site chart (a quantity of at least two
    sites): ``<probe>/<site>/<quantity>`` goes to the site run ``site=<site>`` as ``<probe>/per_site/<quantity>``.

    Args:
        tags: scalar tags.
        charts: chart groups declared by the probes (their tags are not per site).

    Returns:
        The site and the site run's tag of each per-site tag.
    """
    _, per_site = _per_site(sorted(set(tags)), charts)
    return {
        f"{probe}/{site}/{quantity}": (site, f"{probe}/{SITE_TAG}/{quantity}")
        for (probe, quantity), sites in per_site.items()
        if len(sites) >= 2
        for site in sites
    }


def site_run_dir(logdir: str, site: str) -> str:
    """The directory of a site's run inside ``logdir`` (path separators in the site's name become ``_``)."""
    return os.path.join(logdir, SITE_RUN + re.sub(r"[/\\]", "_", site))


def _by_scale(tags: list[str], last: Mapping[str, float]) -> list[list[str]]:
    """The tags whose latest value is more than ``SCALE_RATIO`` times the median of the chart's latest values (in
    size), then the others; one group where there are none such (tags without a finite latest value stay with
    the others)."""
    sizes = {t: abs(last[t]) for t in tags if math.isfinite(last.get(t, math.nan))}
    if len(sizes) < 3:
        return [tags]
    median = float(np.median(list(sizes.values())))
    top = [t for t in tags if t in sizes and sizes[t] > SCALE_RATIO * median]
    return [top, [t for t in tags if t not in top]] if top else [tags]


def _scale_title(title: str, group: list[str], members: list[str]) -> str:
    """The title of one scale's part of a split chart: the chart's title and what tells its tags apart."""
    prefix = os.path.commonprefix(members)
    prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else prefix
    return f"{title}: {', '.join(t[len(prefix) :] or t for t in group)}"


def layout_for(
    tags: Iterable[str], charts: Sequence[Chart] = (), site_runs: bool = False, last: Mapping[str, float] | None = None
) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout ``{category: {title: ["Multiline", [regex]]}}`` for these scalar tags.

    Every declared chart that matches at least two tags (its category: the first component of its tags, the
    probe's name), then one chart per ``<probe>/*/<quantity>`` with at least two sites (``<quantity> per
    site``), leaving out tags that a declared chart matches (their middle component is not a site).

    TensorBoard colours a chart's lines by run, so the lines of one run all share one colour. With
    ``site_runs``, a per-site chart shows the site runs' copies (``site_series``: one run, and so one colour,
    per site) instead of the run's own tags. With ``last`` (the latest value of each tag), the lines of a declared
    chart more than ``SCALE_RATIO`` times above its median line get a chart of their own, since TensorBoard's
    default "ignore outliers" y range (5% to 95% of all the chart's points) would cut them off.

    Args:
        tags: scalar tags.
        charts: chart groups declared by the probes.
        site_runs: the per-site tags are also written to site runs (``site_series``).
        last: the latest value of each tag.

    Returns:
        The layout, categories and titles sorted.
    """
    tags = sorted(set(tags))
    layout: dict[str, dict[str, list[Any]]] = {}
    declared, per_site = _per_site(tags, charts)
    for chart, hit in declared:
        if len(hit) < 2:
            continue
        category = layout.setdefault(hit[0].split("/")[0], {})
        groups = _by_scale(hit, last) if last is not None else [hit]
        if len(groups) == 1:
            category[chart.title] = ["Multiline", [chart.pattern]]
            continue
        for group in groups:
            regex = "^(?:" + "|".join(re.escape(t) for t in group) + ")$"
            category[_scale_title(chart.title, group, hit)] = ["Multiline", [regex]]
    for (probe, quantity), sites in sorted(per_site.items()):
        if len(sites) >= 2:
            middle = re.escape(SITE_TAG) if site_runs else "[^/]+"
            regex = f"^{re.escape(probe)}/{middle}/{re.escape(quantity)}$"
            title = f"{quantity} per site ({probe}/<site>/{quantity})"
            layout.setdefault(probe, {})[title] = ["Multiline", [regex]]
    return {c: dict(sorted(charts.items())) for c, charts in sorted(layout.items())}


class TensorBoardSink(Sink):
    """Write records to TensorBoard event files.

    Args:
        logdir: where a new ``SummaryWriter`` writes (when ``writer`` is None).
        writer: a ``SummaryWriter`` (or one with its methods) to share; left open at ``close``.
        layout: write the custom-scalars layout.
        site_runs: also write every per-site scalar to its site's run (``site_series``), so that TensorBoard gives
            each site a colour of its own; only with a ``torch.utils.tensorboard.SummaryWriter``.
        queue_size: images waiting for the drawing thread before a ``write`` waits (0: draw in ``write``).
        draw_in: ``"process"`` (the renderer's drawing process), ``"thread"`` (the sink's thread), or ``"auto"``:
            the process on POSIX systems, else the thread.
        renderer: what draws the pictures (``probes.records.Renderer``; None: ``default_renderer()``, loaded at
            the first picture; without matplotlib pictures are left out after one notice).
        **writer_options: passed to ``SummaryWriter``.

    Raises:
        ValueError: neither ``logdir`` nor ``writer``, or an unknown ``draw_in``.
    """

    @classmethod
    def from_run(cls, run: Any, **options: Any) -> TensorBoardSink:
        """The sink of a run: on the user's ``writer`` when there is one (not closed here), else on ``logdir``
        (``logdir=``/``writer=`` among ``options`` win)."""
        writer = options.pop("writer", run.writer)
        logdir = options.pop("logdir", None if writer is not None else run.logdir)
        return cls(logdir=logdir, writer=writer, **options)

    def __init__(
        self,
        logdir: str | None = None,
        writer: Any = None,
        layout: bool = True,
        queue_size: int = QUEUE_SIZE,
        draw_in: str = "auto",
        site_runs: bool = True,
        renderer: Renderer | None = None,
        **writer_options: Any,
    ) -> None:
        if draw_in not in ("auto", "process", "thread"):
            raise ValueError(f"tensorboard sink: draw_in must be 'auto', 'process' or 'thread', got {draw_in!r}")
        if writer is None:
            if logdir is None:
                raise ValueError("tensorboard sink: give a logdir or a SummaryWriter")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(logdir), **writer_options)
            self._owns = True
        else:
            self._owns = False
        self.writer = writer
        self.layout = bool(layout)
        self._scalar_tags: set[str] = set()
        self._written_layout: dict | None = None
        self._queue_size = max(0, int(queue_size))
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._process = draw_in == "process" or (draw_in == "auto" and os.name == "posix")
        self.renderer = renderer
        self._errors: list[str] = []
        self._reported = False
        self._closed = False
        self._lock = threading.Lock()  # the writer's state, between the training thread and the drawing thread
        self._broken: BaseException | None = None  # the writer failed: the next write starts again
        self._thread_error: BaseException | None = None  # the drawing thread's write error, raised in training's
        self._left_out = 0  # images not written because the writer had failed
        self._layout_due = False  # a new event file: the layout again
        self._last: dict[str, float] = {}  # the latest value of each scalar tag (the layout's split by scale)
        self._site_runs = bool(site_runs) and _is_summary_writer(writer)
        self._site_map: dict[str, tuple[str, str]] = {}  # per-site tag -> (site, its tag in the site run)
        self._site_writers: dict[str, Any] = {}  # site -> the FileWriter of its run

    @property
    def logdir(self) -> str:
        return self.writer.get_logdir()

    @property
    def where(self) -> str | None:
        """The logdir, for messages."""
        try:
            return str(self.logdir)
        except Exception:  # noqa: BLE001 - a writer without get_logdir
            return None

    def declare(self, charts: Sequence[Chart]) -> None:
        """Take the probes' chart groups; the layout is rewritten when they change it."""
        super().declare(charts)
        self._site_map = site_series(self._scalar_tags, self.charts) if self._site_runs else {}
        if self._scalar_tags and self.layout:
            self._write_layout()

    def write(self, records: Sequence[Record], step: int) -> None:
        """Write scalars and histograms now, queue images for the drawing thread.

        Args:
            records: the records of one step.
            step: their step.

        Raises:
            TypeError: something that is not a record.
            Exception: the writer's error (a full disk, ...): the writer failed, here or in the drawing thread since
                the last call; the next ``write`` starts again (see the module's docstring).
        """
        for r in records:
            if not isinstance(r, (Scalar, Histogram, Image)):
                raise TypeError(f"tensorboard sink: not a record: {r!r}")
        self._report_errors()
        self._raise_thread_error()
        self._start_again()
        w = self.writer
        new_tags = self._layout_due
        try:
            for r in records:
                if isinstance(r, Scalar):
                    w.add_scalar(r.tag, r.item(), global_step=step)
                    self._last[r.tag] = r.item()
                    if r.tag not in self._scalar_tags:
                        self._scalar_tags.add(r.tag)
                        new_tags = True
                elif isinstance(r, Histogram):
                    h = r.to_numpy()
                    if h["nonfinite"]:
                        w.add_scalar(f"{r.tag}/nonfinite", h["nonfinite"], global_step=step)
                    if h["num"] > 0:
                        w.add_histogram_raw(
                            r.tag,
                            min=h["min"],
                            max=h["max"],
                            num=h["num"],
                            sum=h["sum"],
                            sum_squares=h["sum_squares"],
                            bucket_limits=h["bucket_limits"].tolist(),
                            bucket_counts=h["bucket_counts"].tolist(),
                            global_step=step,
                        )
                elif not r.pending or self._pictures() is not None:
                    self._queue_image(r.at(step))
            if self._site_runs:
                self._write_site_runs(records, step, new_tags)
            if new_tags and self.layout:
                self._layout_due = False
                self._write_layout()
        except Exception as exc:
            self._break(exc)
            raise
        self._raise_thread_error()  # an image drawn in this call (queue_size=0) whose write failed

    # -- site runs --------------------------------------------------------------------------------------
    def _write_site_runs(self, records: Sequence[Record], step: int, new_tags: bool) -> None:
        """Copy this step's per-site scalars to their sites' runs (``logdir/site=<site>``)."""
        from torch.utils.tensorboard.summary import scalar

        if new_tags:
            self._site_map = site_series(self._scalar_tags, self.charts)
        for r in records:
            if isinstance(r, Scalar) and r.tag in self._site_map:
                site, tag = self._site_map[r.tag]
                self._site_writer(site).add_summary(scalar(tag, self._last[r.tag]), step)

    def _site_writer(self, site: str) -> Any:
        fw = self._site_writers.get(site)
        if fw is None:
            from torch.utils.tensorboard.writer import FileWriter

            w = self.writer
            fw = FileWriter(
                site_run_dir(w.get_logdir(), site),
                getattr(w, "max_queue", 10),
                getattr(w, "flush_secs", 120),
                getattr(w, "filename_suffix", ""),
            )
            self._site_writers[site] = fw
        return fw

    def _drop_site_writers(self) -> None:
        """Close the site runs' event files, errors ignored (the next copy opens new ones)."""
        writers, self._site_writers = self._site_writers, {}
        for fw in writers.values():
            try:
                fw.close()
            except Exception:  # noqa: BLE001 - it failed with the writer; what it wrote stays
                log.debug("tensorboard sink: closing a site run's event file raised", exc_info=True)

    # -- images, on the drawing thread -----------------------------------------------------------------
    def _queue_image(self, image: Image) -> None:
        if self._queue_size == 0:
            self._draw(image)
            return
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue(maxsize=self._queue_size)
            self._thread = threading.Thread(target=self._drain, name="probes-tensorboard-images", daemon=True)
            self._thread.start()
        assert self._queue is not None  # made with the thread
        self._queue.put(image)  # waits only when the queue is full

    def _drain(self) -> None:
        q = self._queue
        assert q is not None  # made before the thread starts
        while True:
            image = q.get()
            try:
                if image is None:
                    return
                self._draw(image)
            finally:
                q.task_done()

    def _draw(self, image: Image) -> None:
        try:
            if image.pending:
                renderer, figure = self._pictures(), image.figure
                if renderer is None:  # an image of data is queued only once there is a renderer
                    raise RuntimeError("tensorboard sink: no renderer to draw a picture with")
                assert figure is not None  # pending: an image of data
                pixels, png = renderer.png(figure, background=self._process)
                image.resolve(pixels)  # the other sinks (a memory sink) get these pixels
                self._write_image(image.tag, pixels, image.step, png)
            else:
                self._pictures(notice=False)  # raw pixels: written with the renderer's encoder where there is one
                self._write_image(image.tag, image.as_uint8(), image.step)
        except Exception as exc:  # noqa: BLE001 - one image lost, reported once; scalars go on
            self._errors.append(f"{image.tag} at step {image.step}: {exc!r}")
            log.debug("tensorboard sink: image %s at step %s failed", image.tag, image.step, exc_info=True)

    def _write_image(self, tag: str, pixels: np.ndarray, step: int | None, png: bytes | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        w, renderer = self.writer, self.renderer
        if not isinstance(w, SummaryWriter) or (png is None and renderer is None):  # its own encoder
            self._to_writer(lambda: w.add_image(tag, pixels, global_step=step, dataformats="HWC"))
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, wd = pixels.shape[:2]
        if png is None:
            assert renderer is not None  # else written with the writer's own encoder above
            png = renderer.encode(pixels)
        image = Summary.Image(height=h, width=wd, colorspace=3, encoded_image_string=png)
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        self._to_writer(lambda: _torch.file_writer(w).add_summary(summary, step))

    # -- a writer that fails -----------------------------------------------------------------------------
    def _to_writer(self, add: Callable[[], Any]) -> None:
        """Hand one image to the writer (either thread): left out while the writer has failed; the writer's error
        is kept for the training thread, which raises it at its next call."""
        with self._lock:
            if self._broken is not None:
                self._left_out += 1
                return
            try:
                add()
            except Exception as exc:  # noqa: BLE001 - raised in the training thread (_raise_thread_error)
                self._broken = self._thread_error = exc
                self._left_out += 1

    def _raise_thread_error(self) -> None:
        if self._thread_error is None:  # the usual case, without waiting for the drawing thread's lock
            return
        with self._lock:
            error, self._thread_error = self._thread_error, None
        if error is not None:
            raise error

    def _break(self, exc: BaseException) -> None:
        """The writer raised ``exc``: images are left out until the next ``write`` starts again."""
        with self._lock:
            if self._broken is None:
                self._broken = exc

    def _start_again(self) -> None:
        """After a failure: a writer this sink made gets a new event file (raises if that fails too); a shared one
        is called again."""
        if self._broken is None:  # the usual case, without waiting for the drawing thread's lock
            return
        with self._lock:
            if self._broken is None:
                return
            self._drop_site_writers()
            if self._owns:
                self._drop_event_file()
                self._check_room()  # a disk still full raises here, before an event file and its thread are made
                w = self.writer
                before = self._event_files()
                try:
                    _torch.file_writer(w)  # a new event file (SummaryWriter makes the logdir again if it is gone)
                except Exception:
                    w.file_writer = w.all_writers = None
                    for name in self._event_files() - before:  # ours, started and cut short by the failure
                        if f".{os.getpid()}." in name:
                            with contextlib.suppress(OSError):
                                os.remove(os.path.join(w.log_dir, name))
                    raise
            self._broken = self._thread_error = None
            self._written_layout, self._layout_due = None, bool(self._scalar_tags)  # into the new event file

    def _drop_event_file(self) -> None:
        """Forget the failed event file of a writer this sink made (its thread and file closed, errors ignored)."""
        w = self.writer
        dead, w.file_writer, w.all_writers = w.file_writer, None, None
        if dead is not None:
            try:
                dead.close()
            except Exception:  # noqa: BLE001 - it failed already; what it wrote stays
                log.debug("tensorboard sink: closing the failed event file raised", exc_info=True)

    def _check_room(self) -> None:
        """Raise unless the logdir (made again if it is gone) takes ``ROOM_CHECK_BYTES`` in a file removed at once."""
        logdir = self.writer.log_dir
        os.makedirs(logdir, exist_ok=True)
        path = os.path.join(logdir, f".probes-room-check.{os.getpid()}")
        try:
            with open(path, "wb") as f:
                f.write(bytes(ROOM_CHECK_BYTES))
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def _event_files(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.writer.log_dir) if n.startswith("events.out.tfevents.")}
        except OSError:
            return set()

    def _wait_for_images(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            assert self._queue is not None  # made with the thread
            self._queue.join()

    def _report_errors(self) -> None:
        """One warning for the first image that failed to draw (and a count at close if more did)."""
        if self._errors and not self._reported:
            self._reported = True
            warnings.warn(
                f"tensorboard sink: an image could not be drawn and was left out (scalars and other "
                f"images are written): {self._errors[0]}",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- layout -----------------------------------------------------------------------------------------
    def _write_layout(self) -> None:
        layout = layout_for(self._scalar_tags, self.charts, site_runs=self._site_runs, last=self._last)
        if layout and layout != self._written_layout and hasattr(self.writer, "add_custom_scalars"):
            self.writer.add_custom_scalars(layout)
            self._written_layout = layout

    def flush(self) -> None:
        """Wait until every queued image is written, then flush the writer.

        Raises:
            Exception: the writer's error (it failed since the last call; see ``write``).
        """
        self._wait_for_images()
        self._report_errors()
        self._raise_thread_error()
        if self._broken is not None:  # nothing was written since it failed
            return
        try:
            self.writer.flush()
            for fw in self._site_writers.values():
                fw.flush()
        except Exception as exc:
            self._break(exc)
            raise

    def close(self) -> None:
        """Write every queued image, stop the drawing thread, flush (and close a writer this sink made).

        Raises:
            Exception: the writer's error (it failed since the last call, or in this flush); the sink is closed
                all the same.
        """
        if self._closed:
            return
        self._wait_for_images()
        if self._thread is not None and self._thread.is_alive():
            assert self._queue is not None  # made with the thread
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._report_errors()
        if len(self._errors) > 1:  # warned once already: the count goes to the log
            log.warning(
                "tensorboard sink: %d images could not be drawn in all; the first: %s",
                len(self._errors),
                self._errors[0],
            )
        if self._left_out:
            log.debug("tensorboard sink: %d images were left out while the writer had failed", self._left_out)
        self._closed = True
        with self._lock:
            error, self._thread_error = self._thread_error, None
        if self._broken is None:
            try:
                self.writer.flush()
                if self._owns:
                    self.writer.close()
                for fw in self._site_writers.values():
                    fw.close()
            except Exception as exc:
                error = error or exc
                self._broken = exc
        self._drop_site_writers()
        if self._broken is not None and self._owns:
            self._drop_event_file()
        if error is not None:
            raise error
