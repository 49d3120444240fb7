"""Records, histograms binned on device, the memory and TensorBoard sinks."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes.records import Histogram, Image, Scalar, to_host
from probes.sinks import MemorySink, TensorBoardSink


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200), st.integers(1, 30))
def test_histogram_matches_numpy(values, bins):
    v = torch.tensor(values, dtype=torch.float64)
    h = Histogram.of("t", v, bins=bins)
    lo, hi = min(values), max(values)
    if hi == lo:
        hi = lo + 1.0
    counts, _ = np.histogram(np.array(values), bins=bins, range=(lo, hi))
    # numpy's last bin is closed as ours; interior edges may differ by rounding for values on an edge
    assert int(h.counts.sum()) == len(values)
    assert np.abs(h.counts.numpy() - counts).sum() <= 2 * sum(1 for x in values if x in (lo, hi)) + 2
    assert float(h.num) == len(values)
    np.testing.assert_allclose(float(h.sum), np.sum(values), rtol=1e-9, atol=1e-6)


def test_histogram_counts_nonfinite_separately():
    v = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0])
    h = Histogram.of("t", v, bins=4)
    assert int(h.nonfinite) == 2 and int(h.counts.sum()) == 3
    d = h.to_numpy()
    assert d["nonfinite"] == 2 and d["num"] == 3 and d["min"] == 1.0 and d["max"] == 3.0
    assert len(d["bucket_limits"]) == len(d["bucket_counts"]) == 4


def test_to_host_converts_tensor_scalars():
    recs = to_host([Scalar("a/x", torch.tensor(2.5)), Scalar("a/y", 1), Histogram.of("a/h", torch.arange(5.0))])
    assert recs[0].value == 2.5 and isinstance(recs[0].value, float)


def test_tensorboard_sink_writes_scalars_histograms_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(logdir=str(tmp_path))
    sink.write(
        [
            Scalar("p/s", torch.tensor(0.25)),
            Histogram.of("p/h", torch.tensor([0.0, 1.0, float("nan")])),
            Image("p/img", np.zeros((4, 5, 3), dtype=np.uint8)),
        ],
        step=7,
    )
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert acc.Scalars("p/s")[0].value == 0.25 and acc.Scalars("p/s")[0].step == 7
    assert acc.Scalars("p/h/nonfinite")[0].value == 1.0
    assert acc.Histograms("p/h")[0].histogram_value.num == 2
    assert acc.Images("p/img")[0].width == 5


def test_shared_summary_writer_is_not_closed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    closes = []
    writer.close, close = (lambda: closes.append(1)), writer.close  # SummaryWriter reopens a closed file writer
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    s = probes.attach(model, {"relu_zeros": {"every": 1}}, writer=writer)
    model(torch.randn(2, 3))
    s.close()
    assert closes == []  # the session left the user's writer open
    writer.add_scalar("user/loss", 1.0, 0)
    close()
    # one event file: a closed writer would have started a second one for user/loss
    (events,) = tmp_path.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events)).Reload()
    assert "user/loss" in acc.Tags()["scalars"] and "relu_zeros/1/zeros" in acc.Tags()["scalars"]


def test_memory_sink_series():
    sink = MemorySink()
    sink.write([Scalar("a/b", 1.0)], step=1)
    sink.write([Scalar("a/b", torch.tensor(2.0))], step=5)
    assert sink.scalars() == {"a/b": [(1, 1.0), (5, 2.0)]}
    assert sink.last("a/b") == 2.0
