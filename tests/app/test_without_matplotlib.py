"""matplotlib is optional (the ``plots`` extra): without it every scalar and histogram is written, and pictures
are left out with one notice that names the extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys, warnings
sys.modules["matplotlib"] = None  # import matplotlib fails, as where it is not installed
import torch
from torch import nn
import probes

torch.manual_seed(0)
x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
spec = {
    "patterns": {"every": 2, "image": True},
    "pathgram": {"every": 2, "image": "cosine"},
    "ntk": {"every": 2, "image": True},
    "relu_zeros": {"every": 2},
}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    session = probes.attach(model, spec, probe_data=(x, y), logdir=sys.argv[1], sinks=["tensorboard", "memory"],
                            optimizer=opt, overhead=None)
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    session.close()
notices = [str(w.message) for w in caught if "matplotlib" in str(w.message)]
print(json.dumps({"notices": notices, "images": sorted(session.memory.images()),
                  "scalars": sorted(session.memory.scalars()), "histograms": sorted(session.memory.histograms())}))
"""


def test_without_matplotlib_scalars_and_histograms_are_written_and_images_left_out_with_one_notice(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen["notices"]) == 1 and "torch-probes[plots]" in seen["notices"][0], seen["notices"]
    assert {"patterns/1", "pathgram/gram", "ntk/spectrum"} <= set(seen["images"])  # the memory sink keeps the data
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    assert tags["images"] == []
    assert set(seen["scalars"]) <= set(tags["scalars"]) and seen["scalars"]
    assert set(seen["histograms"]) <= set(tags["histograms"]) and seen["histograms"]
