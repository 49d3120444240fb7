"""TensorBoard sink: scalars, pre-binned histograms (``add_histogram_raw``) and images.

Shares a user's ``SummaryWriter`` when one is given (and then leaves closing it to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probes.records import Histogram, Image, Record, Scalar
from probes.sinks.base import Sink


class TensorBoardSink(Sink):
    def __init__(self, logdir: str | None = None, writer: Any = None, **writer_options: Any) -> None:
        if writer is None:
            if logdir is None:
                raise ValueError("tensorboard sink: give a logdir or a SummaryWriter")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(logdir), **writer_options)
            self._owns = True
        else:
            self._owns = False
        self.writer = writer

    @property
    def logdir(self) -> str:
        return self.writer.get_logdir()

    def write(self, records: Sequence[Record], step: int) -> None:
        w = self.writer
        for r in records:
            if isinstance(r, Scalar):
                w.add_scalar(r.tag, r.item(), global_step=step)
            elif isinstance(r, Histogram):
                h = r.to_numpy()
                if h["nonfinite"]:
                    w.add_scalar(f"{r.tag}/nonfinite", h["nonfinite"], global_step=step)
                if h["num"] > 0:
                    w.add_histogram_raw(r.tag, min=h["min"], max=h["max"], num=h["num"], sum=h["sum"],
                                        sum_squares=h["sum_squares"], bucket_limits=h["bucket_limits"].tolist(),
                                        bucket_counts=h["bucket_counts"].tolist(), global_step=step)
            elif isinstance(r, Image):
                w.add_image(r.tag, r.as_uint8(), global_step=step, dataformats="HWC")
            else:
                raise TypeError(f"tensorboard sink: not a record: {r!r}")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self._owns:
            self.writer.close()
