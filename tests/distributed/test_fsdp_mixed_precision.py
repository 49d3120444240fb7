"""FSDP2 with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` on 2 gloo ranks: every probe measures, none is
switched off, and the session says once (rank 0) in which dtype the probe passes compute."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_distributed import data, make_model
from test_fsdp import PER_RANK, STEPS, WORLD, fully_shard, pytestmark, start  # noqa: F401 - skipped alike

import probes
from probes.testing import leave_group, run_ranks

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy
except ImportError:  # torch without FSDP2 (the module is skipped then)
    MixedPrecisionPolicy = None

EVERY = 2
SPEC = {
    "relu_zeros": {"every": EVERY},
    "patterns": {"every": EVERY},
    "alignment": {"every": EVERY},
    "margin": {"every": EVERY},
    "pathgram": {"every": EVERY, "image": None},
    "ntk": {"every": EVERY, "spectrum": "topk", "top_k": 3, "image": False},
}


def _worker(rank: int, root: str) -> None:
    mesh = start(rank, root)
    try:
        x, y, probe_data = data()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session = probes.attach(model, SPEC, probe_data=probe_data, sinks=["memory"])
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for s in range(STEPS):
                part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
                F.cross_entropy(model(x[s, part]), y[s, part]).backward()
                opt.step()
                opt.zero_grad()
                session.step()
            session.close()
        mem = session.memory.scalars() if session.sinks else {}
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "failures": session.failures,
                    "tags": sorted(mem),
                    "finite": all(
                        torch.isfinite(torch.tensor([v for _, v in pts])).all().item() for pts in mem.values()
                    ),
                    "messages": [str(w.message) for w in caught],
                },
                f,
            )
    finally:
        leave_group()


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_mp")
    run_ranks(_worker, (str(root),), world=WORLD)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_every_probe_measures_under_bf16_mixed_precision(mixed_run):
    zero, one = mixed_run
    assert zero["failures"] == {} and one["failures"] == {}
    for name in SPEC:
        assert any(t.startswith(name + "/") for t in zero["tags"]), name
    assert zero["finite"]
    assert one["tags"] == []  # only rank 0 writes


def test_the_dtype_measured_in_is_said_once_on_rank_zero(mixed_run):
    zero, one = mixed_run
    said = [m for m in zero["messages"] if "bfloat16" in m and "mixed precision" in m]
    assert len(said) == 1, zero["messages"]
    assert "float64" in said[0]
    assert not [m for m in one["messages"] if "mixed precision" in m]
