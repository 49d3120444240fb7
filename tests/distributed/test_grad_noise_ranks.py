"""``grad_noise`` across ranks: 2 gloo ranks, each the per-sample gradients of its share of the probe batch, write what
one process writes (float64, to rounding), under DDP and under FSDP2 (``fully_shard``, chunks of 2: the per-sample
gradients of the whole parameters); the parameters trained under FSDP2 with the probe equal those without."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import probes
from probes.testing import join_group, leave_group, run_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 2
P = 7  # does not split evenly: rank 1 takes 3 samples, rank 0 takes 4
SPEC = {"grad_noise": {"every": 2}}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6, 4), generator=g)
    px, py = torch.randn(P, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (P,), generator=g)
    return x, y, px, py


def train(model: nn.Module, session, x, y, rank: int | None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(x.shape[0]):
        xb, yb = (x[s], y[s]) if rank is None else (x[s, rank * 2 : rank * 2 + 2], y[s, rank * 2 : rank * 2 + 2])
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        session.step()
    session.close()


def _worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=60)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y, px, py = data()
        session = probes.attach(model, SPEC, probe_data=(px, py), sinks=["memory"], strict=True)
        probe, calls = session.probes["grad_noise"], []
        measure = probe.measure
        probe.measure = lambda batch: (calls.append([batch.world_size, batch.rank]), measure(batch))[1]
        train(model, session, x, y, rank)
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            mem = session.memory.scalars() if session.sinks else {}
            json.dump({"calls": calls, "scalars": mem, "failures": sorted(session.failures)}, f)
    finally:
        leave_group()


def test_ddp_ranks_equal_one_process(tmp_path):
    run_ranks(_worker, (str(tmp_path),), world=WORLD)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    model = make_model()
    x, y, px, py = data()
    single = probes.attach(model, SPEC, probe_data=(px, py), sinks=["memory"], strict=True)
    train(model, single, x, y, None)  # the same global batches: DDP averages the two halves' gradients
    expected = single.memory.scalars()
    assert info[0]["failures"] == info[1]["failures"] == []
    assert info[0]["calls"] == [[WORLD, 0]] * 3 and info[1]["calls"] == [[WORLD, 1]] * 3  # both measure, together
    got = info[0]["scalars"]
    assert info[1]["scalars"] == {}  # only rank 0 writes
    assert {t for t in expected if t.startswith("grad_noise/")} == set(got)
    assert {"grad_noise/noise_scale", "grad_noise/gsnr", "grad_noise/grad_norm", "grad_noise/0/gsnr"} <= set(got)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points] == [0, 2, 4, 6], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-9), tag


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=60)
    try:
        model = shard(make_model())
        x, y, px, py = data()
        session = probes.attach(model, SPEC, probe_data=(px, py), sinks=["memory"], strict=True, probe_batch_size=2)
        train(model, session, x, y, rank)
        plain = shard(make_model())
        opt = torch.optim.SGD(plain.parameters(), lr=0.1)
        for s in range(x.shape[0]):
            F.cross_entropy(plain(x[s, rank * 2 : rank * 2 + 2]), y[s, rank * 2 : rank * 2 + 2]).backward()
            opt.step()
            opt.zero_grad()
        same = all(
            torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), plain.parameters())
        )
        with open(os.path.join(root, f"fsdp{rank}.json"), "w") as f:
            mem = session.memory.scalars() if session.sinks else {}
            json.dump({"failures": sorted(session.failures), "scalars": mem, "unchanged": same}, f)
    finally:
        leave_group()


def test_fsdp2_ranks_equal_one_process_and_train_unchanged(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    run_ranks(_fsdp_worker, (str(tmp_path),), world=WORLD)
    info = [json.loads((tmp_path / f"fsdp{r}.json").read_text()) for r in range(WORLD)]
    assert info[0]["failures"] == info[1]["failures"] == []
    assert info[0]["unchanged"] and info[1]["unchanged"]  # bit-identical parameters with and without the probe
    assert info[1]["scalars"] == {}  # only rank 0 writes
    model = make_model()
    x, y, px, py = data()
    single = probes.attach(model, SPEC, probe_data=(px, py), sinks=["memory"], strict=True)
    train(model, single, x, y, None)
    expected, got = single.memory.scalars(), info[0]["scalars"]
    assert {"grad_noise/noise_scale", "grad_noise/gsnr", "grad_noise/grad_norm", "grad_noise/0/gsnr"} <= set(got)
    assert {t for t in expected if t.startswith("grad_noise/")} == set(got)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points] == [0, 2, 4, 6], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-9), tag
