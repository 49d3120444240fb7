"""TensorBoard sink: scalars, pre-binned histograms (``add_histogram_raw``), images and a custom-scalars layout.

Shares a user's ``SummaryWriter`` when one is given (and then leaves closing it to them).

Images are drawn and encoded off the training thread, fed by a bounded queue (``queue_size`` images): a
measurement hands over the image (a ``probes.records.Drawing``: the figure function and host copies of its
arrays) and training goes on; it waits only when the queue is full. The sink's thread takes the images from
the queue; with ``draw_in="process"`` (the default, ``"auto"``, on POSIX systems) it has them drawn by one
drawing process (``probes.sinks.drawer``: a fresh interpreter started with ``subprocess``, never a fork of the
training process, ending when this process ends) shared by the sinks of the process, so matplotlib never holds
the training process's interpreter lock; a drawing whose function cannot be named there (a lambda, say) is drawn
in the thread, and ``draw_in="thread"`` draws every image in the thread (holding the interpreter lock while it
draws; benchmarks/figures.py measures what that costs).
``flush()`` and ``close()`` wait until every queued image is written. An error while drawing is reported
once, as a ``RuntimeWarning`` at the next write, flush or close (the count of failed images goes to the log at
close), and costs only that image.
Images are written as PNG; one with at most 256 colours (every figure of ``probes.figures``) as a palette PNG,
a third of the size of the RGB one, and still lossless.

The custom-scalars layout (``SummaryWriter.add_custom_scalars``; TensorBoard's "Custom Scalars" dashboard)
puts related scalars in one multi-line chart: every chart group the attached probes declare
(``Probe.charts``, handed over with ``declare``), then one quantity of every site, ``<probe>/<site>/<quantity>``
(``layout_for``). It is built from the scalar tags this sink has written and written again only when a new
chart appears (TensorBoard shows the latest one), so a run has its layout after its first measurement.
``layout=False`` turns it off (e.g. when you write your own layout to a shared writer).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from probes.figures import encode_png
from probes.records import Chart, Histogram, Image, Record, Scalar
from probes.sinks.base import Sink
from probes.sinks.drawer import Drawer, DrawerStopped, NotDrawable

log = logging.getLogger("probes")

#: images waiting to be drawn before a measurement waits for the drawing thread
QUEUE_SIZE = 16


_DRAWER: Drawer | None = None
_DRAWER_LOCK = threading.Lock()


def _drawing_process() -> Drawer | None:
    """The drawing process that every TensorBoard sink of this process shares (started at the first image of the
    first sink; it imports matplotlib while training goes on), or None where it cannot start."""
    global _DRAWER
    with _DRAWER_LOCK:
        if _DRAWER is not None and _DRAWER.alive:
            return _DRAWER
        try:
            _DRAWER = Drawer()
        except DrawerStopped as exc:
            log.warning("tensorboard sink: no drawing process (%s); images are drawn in a thread", exc)
            _DRAWER = None
        return _DRAWER


def _drop_drawer(drawer: Drawer) -> None:
    """Forget a drawing process that stopped (the next sink starts a new one)."""
    global _DRAWER
    with _DRAWER_LOCK:
        if _DRAWER is drawer:
            _DRAWER = None
    drawer.shutdown()


def _sendable(draw: Callable[..., Any]) -> bool:
    """Whether a drawing function can be named in another process (a module-level function, not a lambda)."""
    qualname = getattr(draw, "__qualname__", "")
    return bool(getattr(draw, "__module__", None)) and qualname and "<" not in qualname


def _draw_png(draw: Callable[..., np.ndarray], args: tuple, kwargs: dict) -> tuple[np.ndarray, bytes]:
    """In the drawing process: the pixels of ``draw(*args, **kwargs)`` and their PNG."""
    pixels = Image("drawing", np.asarray(draw(*args, **kwargs))).as_uint8()
    return pixels, encode_png(pixels)


def layout_for(tags: Iterable[str], charts: Sequence[Chart] = ()) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout ``{category: {title: ["Multiline", [regex]]}}`` for these scalar tags.

    Every declared chart that matches at least two tags (its category: the first component of its tags, the
    probe's name), then one chart per ``<probe>/*/<quantity>`` with at least two sites (``<quantity> per
    site``), leaving out tags that a declared chart matches (their middle component is not a site).

    Args:
        tags: scalar tags.
        charts: chart groups declared by the probes.

    Returns:
        The layout, categories and titles sorted.
    """
    tags = sorted(set(tags))
    layout: dict[str, dict[str, list[Any]]] = {}
    claimed: set[str] = set()
    for chart in charts:
        hit = [t for t in tags if re.match(chart.pattern, t)]
        claimed.update(hit)
        if len(hit) >= 2:
            layout.setdefault(hit[0].split("/")[0], {})[chart.title] = ["Multiline", [chart.pattern]]
    per_site: dict[tuple[str, str], list[str]] = {}
    for t in tags:
        parts = t.split("/")
        if len(parts) != 3 or t in claimed or parts[2] == "nonfinite":
            continue
        per_site.setdefault((parts[0], parts[2]), []).append(parts[1])
    for (probe, quantity), sites in sorted(per_site.items()):
        if len(sites) >= 2:
            regex = f"^{re.escape(probe)}/[^/]+/{re.escape(quantity)}$"
            title = f"{quantity} per site ({probe}/<site>/{quantity})"
            layout.setdefault(probe, {})[title] = ["Multiline", [regex]]
    return {c: dict(sorted(charts.items())) for c, charts in sorted(layout.items())}


class TensorBoardSink(Sink):
    """Write records to TensorBoard event files.

    Args:
        logdir: where a new ``SummaryWriter`` writes (when ``writer`` is None).
        writer: a ``SummaryWriter`` (or one with its methods) to share; left open at ``close``.
        layout: write the custom-scalars layout.
        queue_size: images waiting for the drawing thread before a ``write`` waits (0: draw in ``write``).
        draw_in: ``"process"`` (the shared drawing process), ``"thread"`` (the sink's thread), or ``"auto"``:
            the process on POSIX systems, else the thread.
        **writer_options: passed to ``SummaryWriter``.

    Raises:
        ValueError: neither ``logdir`` nor ``writer``, or an unknown ``draw_in``.
    """

    def __init__(self, logdir: str | None = None, writer: Any = None, layout: bool = True,
                 queue_size: int = QUEUE_SIZE, draw_in: str = "auto", **writer_options: Any) -> None:
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
        self._pool: Any = None
        self._errors: list[str] = []
        self._reported = False
        self._closed = False

    @property
    def logdir(self) -> str:
        return self.writer.get_logdir()

    def declare(self, charts: Sequence[Chart]) -> None:
        """Take the probes' chart groups; the layout is rewritten when they change it."""
        super().declare(charts)
        if self._scalar_tags and self.layout:
            self._write_layout()

    def write(self, records: Sequence[Record], step: int) -> None:
        """Write scalars and histograms now, queue images for the drawing thread.

        Args:
            records: the records of one step.
            step: their step.

        Raises:
            TypeError: something that is not a record.
        """
        self._report_errors()
        w = self.writer
        new_tags = False
        for r in records:
            if isinstance(r, Scalar):
                w.add_scalar(r.tag, r.item(), global_step=step)
                if r.tag not in self._scalar_tags:
                    self._scalar_tags.add(r.tag)
                    new_tags = True
            elif isinstance(r, Histogram):
                h = r.to_numpy()
                if h["nonfinite"]:
                    w.add_scalar(f"{r.tag}/nonfinite", h["nonfinite"], global_step=step)
                if h["num"] > 0:
                    w.add_histogram_raw(r.tag, min=h["min"], max=h["max"], num=h["num"], sum=h["sum"],
                                        sum_squares=h["sum_squares"], bucket_limits=h["bucket_limits"].tolist(),
                                        bucket_counts=h["bucket_counts"].tolist(), global_step=step)
            elif isinstance(r, Image):
                self._queue_image(r.at(step))
            else:
                raise TypeError(f"tensorboard sink: not a record: {r!r}")
        if new_tags and self.layout:
            self._write_layout()

    # -- images, on the drawing thread -----------------------------------------------------------------
    def _queue_image(self, image: Image) -> None:
        if self._queue_size == 0:
            self._draw(image)
            return
        if self._thread is None or not self._thread.is_alive():
            if self._process and self._pool is None:
                self._pool = _drawing_process()
            self._queue = queue.Queue(maxsize=self._queue_size)
            self._thread = threading.Thread(target=self._drain, name="probes-tensorboard-images", daemon=True)
            self._thread.start()
        self._queue.put(image)  # waits only when the queue is full

    def _drain(self) -> None:
        q = self._queue
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
            drawing = image.drawing
            if drawing is not None and self._pool is not None and _sendable(drawing.draw):
                try:
                    pixels, png = self._pool.submit(_draw_png, drawing.draw, drawing.args, drawing.kwargs).result()
                except NotDrawable:  # a function that process cannot load: drawn here
                    self._write_image(image.tag, image.as_uint8(), image.step)
                    return
                except DrawerStopped:  # the process ended: this sink's thread draws from now on
                    log.warning("tensorboard sink: the drawing process stopped; images are drawn in a thread now")
                    _drop_drawer(self._pool)
                    self._pool = None
                    self._write_image(image.tag, image.as_uint8(), image.step)
                    return
                drawing.resolve(pixels)  # the other sinks (a memory sink) get these pixels
                self._write_image(image.tag, pixels, image.step, png)
            else:
                self._write_image(image.tag, image.as_uint8(), image.step)
        except Exception as exc:  # noqa: BLE001 - one image lost, reported once; scalars go on
            self._errors.append(f"{image.tag} at step {image.step}: {exc!r}")
            log.debug("tensorboard sink: image %s at step %s failed", image.tag, image.step, exc_info=True)

    def _write_image(self, tag: str, pixels: np.ndarray, step: int | None, png: bytes | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = self.writer
        if not isinstance(w, SummaryWriter):  # another writer (tensorboardX, ...): its own encoder
            w.add_image(tag, pixels, global_step=step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, wd = pixels.shape[:2]
        png = png if png is not None else encode_png(pixels)
        image = Summary.Image(height=h, width=wd, colorspace=3, encoded_image_string=png)
        w._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def _wait_for_images(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def _report_errors(self) -> None:
        """One warning for the first image that failed to draw (and a count at close if more did)."""
        if self._errors and not self._reported:
            self._reported = True
            warnings.warn(f"tensorboard sink: an image could not be drawn and was left out (scalars and other "
                          f"images are written): {self._errors[0]}", RuntimeWarning, stacklevel=3)

    # -- layout -----------------------------------------------------------------------------------------
    def _write_layout(self) -> None:
        layout = layout_for(self._scalar_tags, self.charts)
        if layout and layout != self._written_layout and hasattr(self.writer, "add_custom_scalars"):
            self.writer.add_custom_scalars(layout)
            self._written_layout = layout

    def flush(self) -> None:
        """Wait until every queued image is written, then flush the writer."""
        self._wait_for_images()
        self._report_errors()
        self.writer.flush()

    def close(self) -> None:
        """Write every queued image, stop the drawing thread, flush (and close a writer this sink made)."""
        if self._closed:
            return
        self._wait_for_images()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._pool = None  # the drawing process stays for the next sink
        self._report_errors()
        if len(self._errors) > 1:  # warned once already: the count goes to the log
            log.warning("tensorboard sink: %d images could not be drawn in all; the first: %s", len(self._errors),
                        self._errors[0])
        self._closed = True
        self.writer.flush()
        if self._owns:
            self.writer.close()
