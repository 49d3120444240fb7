"""TensorBoard sink: scalars, pre-binned histograms (``add_histogram_raw``), images and a custom-scalars layout.

Shares a user's ``SummaryWriter`` when one is given (and then leaves closing it to them).

Images are written as PNG; one with at most 256 colours (every figure of ``probes.figures``) as a palette
PNG, a third of the size of the RGB one, and still lossless.

The custom-scalars layout (``SummaryWriter.add_custom_scalars``; TensorBoard's "Custom Scalars" dashboard)
puts one quantity of every site in one multi-line chart: ``relu_zeros/<site>/fraction`` of all sites
together, the NTK's top eigenvalues, ``alignment/<site>/cka``, the ``linear_region`` flip fractions of
every perturbation size, ... (``layout_for``). It is built from the scalar tags this sink has written and
written again only when a new chart appears (TensorBoard shows the latest one), so a run has its layout
after its first measurement. ``layout=False`` turns it off (e.g. when you write your own layout to a shared
writer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from probes.figures import encode_png
from probes.records import Histogram, Image, Record, Scalar
from probes.sinks.base import Sink

#: charts across tags that are not ``probe/<site>/<quantity>``: (category, title, regex); category None = probe
CHARTS: list[tuple[str | None, str, str]] = [
    ("ntk", "NTK top eigenvalues (ntk/eig_top/<k>, k = 1 largest)", r"^ntk/eig_top/\d+$"),
    ("linear_region", "fraction of samples whose gates flip, per input perturbation size eps",
     r"^linear_region/flip_fraction_eps_[^/]+$"),
    ("linear_region", "fraction of samples whose gates flip, per parameter perturbation size delta",
     r"^linear_region/flip_fraction_delta_[^/]+$"),
    ("linear_region", "fraction of gate bits that flip, per input perturbation size eps",
     r"^linear_region/gate_flip_rate_eps_[^/]+$"),
    ("linear_region", "fraction of gate bits that flip, per parameter perturbation size delta",
     r"^linear_region/gate_flip_rate_delta_[^/]+$"),
]
#: ``probe/<x>/<quantity>`` tags left out of the per-site charts (``x`` is not a site there)
NOT_SITES = {"ntk", "linear_region"}


def layout_for(tags: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout ``{category: {title: ["Multiline", [regex]]}}`` for these scalar tags.

    Every chart of ``CHARTS`` that matches at least two tags, then one chart per ``<probe>/*/<quantity>``
    with at least two sites (``<quantity> per site``); categories are the probes' names.
    """
    tags = sorted(set(tags))
    layout: dict[str, dict[str, list[Any]]] = {}
    claimed: set[str] = set()
    for category, title, regex in CHARTS:
        hit = [t for t in tags if re.match(regex, t)]
        if len(hit) >= 2:
            layout.setdefault(category or hit[0].split("/")[0], {})[title] = ["Multiline", [regex]]
            claimed.update(hit)
    per_site: dict[tuple[str, str], list[str]] = {}
    for t in tags:
        parts = t.split("/")
        if len(parts) != 3 or t in claimed or parts[0] in NOT_SITES or parts[2] == "nonfinite":
            continue
        per_site.setdefault((parts[0], parts[2]), []).append(parts[1])
    for (probe, quantity), sites in sorted(per_site.items()):
        if len(sites) >= 2:
            regex = f"^{re.escape(probe)}/[^/]+/{re.escape(quantity)}$"
            title = f"{quantity} per site ({probe}/<site>/{quantity})"
            layout.setdefault(probe, {})[title] = ["Multiline", [regex]]
    return {c: dict(sorted(charts.items())) for c, charts in sorted(layout.items())}


class TensorBoardSink(Sink):
    def __init__(self, logdir: str | None = None, writer: Any = None, layout: bool = True,
                 **writer_options: Any) -> None:
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

    @property
    def logdir(self) -> str:
        return self.writer.get_logdir()

    def write(self, records: Sequence[Record], step: int) -> None:
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
                self._write_image(r.tag, r.as_uint8(), step)
            else:
                raise TypeError(f"tensorboard sink: not a record: {r!r}")
        if new_tags and self.layout:
            self._write_layout()

    def _write_image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = self.writer
        if not isinstance(w, SummaryWriter):  # another writer (tensorboardX, ...): its own encoder
            w.add_image(tag, pixels, global_step=step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, wd = pixels.shape[:2]
        image = Summary.Image(height=h, width=wd, colorspace=3, encoded_image_string=encode_png(pixels))
        w._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def _write_layout(self) -> None:
        layout = layout_for(self._scalar_tags)
        if layout and layout != self._written_layout and hasattr(self.writer, "add_custom_scalars"):
            self.writer.add_custom_scalars(layout)
            self._written_layout = layout

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self._owns:
            self.writer.close()
