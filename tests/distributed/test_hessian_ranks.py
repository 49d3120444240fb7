"""``hessian`` across ranks: 2 gloo ranks, each the Hessian-vector products of its share of the probe batch, write
what one process writes (float64 model, to 1e-8), under DDP and under FSDP2 (``fully_shard``).

The probe batch has P = 7 samples: rank 0 takes 4, rank 1 takes 3. Under DDP the products keep one chunk's graph;
under FSDP2 (each Linear its own unit, then the root) every product gathers the whole parameters
(``probes.autodiff.fsdp.all_gathered``) and runs in chunks of ``probe_batch_size=2``, with Adam (its ``exp_avg_sq``
sharded like the parameters: the preconditioned sharpness). The references are one process on the union of the
data, and the dense Hessian of ``torch.func.hessian``; the parameters trained under FSDP2 with the probe are
bit-identical to those trained without it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import probes
from probes.autodiff.hessian import Chunk, HessianProducts, share, trainable
from probes.testing import join_group, leave_group, run_ranks

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = init_device_mesh = None

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 2
P = 7  # does not split evenly: rank 0 takes 4 samples, rank 1 takes 3
OPTIONS = {"every": 2, "top_k": 2, "trace_samples": 6, "density": False, "max_steps": 60}
ADAM = {"hessian/preconditioned_eig_top/1", "hessian/edge_ratio"}
TAGS = {"hessian/eig_top/1", "hessian/eig_top/2", "hessian/eig_min", "hessian/trace", "hessian/trace_stderr"}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4, 4), generator=g)
    px, py = torch.randn(P, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (P,), generator=g)
    return x, y, px, py


def train(model: nn.Module, adam: bool, rank: int | None, session_of=None):
    """Steps on this rank's half of each global batch (``rank=None``: one process, all of it); the session (made by
    ``session_of(optimizer)``, or none) steps with the optimizer."""
    x, y, px, py = data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if adam else torch.optim.SGD(model.parameters(), lr=0.1)
    session = session_of(opt, px, py) if session_of is not None else None
    for s in range(x.shape[0]):
        xb, yb = (x[s], y[s]) if rank is None else (x[s, rank * 2 : rank * 2 + 2], y[s, rank * 2 : rank * 2 + 2])
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    if session is not None:
        session.close()
    return session


def attach(options: dict, probe_batch_size: int | None = None):
    def make(model: nn.Module):
        def session_of(opt, px, py):
            return probes.attach(
                model,
                {"hessian": options},
                probe_data=(px, py),
                optimizer=opt,
                sinks=["memory"],
                strict=True,
                probe_batch_size=probe_batch_size,
            )

        return session_of

    return make


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def products(model: nn.Module, px: torch.Tensor, py: torch.Tensor, rank: int, v: torch.Tensor) -> torch.Tensor:
    """``H v`` of the FSDP2 model straight from ``HessianProducts``: this rank's share in chunks of 2."""
    part = share(P, rank, WORLD)
    rows = [slice(s, min(s + 2, part.stop)) for s in range(part.start, part.stop, 2)]
    chunks = [Chunk(px[r], py[r]) for r in rows]
    hv = HessianProducts(model, chunks, trainable(model), distributed=True, model=model)
    return torch.stack([hv(v), hv(2 * v)])


def _ddp(rank: int, root: str) -> dict:
    model = nn.parallel.DistributedDataParallel(make_model())
    session = train(model, False, rank, attach(OPTIONS)(model))
    return {"scalars": session.memory.scalars() if session.sinks else {}, "failures": sorted(session.failures)}


def _fsdp(rank: int, root: str) -> dict:
    mesh = init_device_mesh("cpu", (WORLD,))
    model = shard(make_model(), mesh)
    session = train(model, True, rank, attach(OPTIONS, probe_batch_size=2)(model))
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    with_probe = [p.full_tensor() for p in model.parameters()]
    plain = shard(make_model(), mesh)
    train(plain, True, rank)
    without = [p.full_tensor() for p in plain.parameters()]
    _, _, px, py = data()
    fresh = shard(make_model(), mesh)
    v = torch.randn(sum(p.numel() for p in fresh.parameters()), generator=torch.Generator().manual_seed(5))
    hv = products(fresh, px, py, rank, v.double())
    torch.save({"hv": hv, "v": v.double()}, os.path.join(root, f"hv{rank}.pt"))
    return {
        "scalars": session.memory.scalars() if session.sinks else {},
        "failures": sorted(session.failures),
        "kinds": kinds,
        "unchanged": all(torch.equal(a, b) for a, b in zip(with_probe, without)),
        "after": sorted({type(p).__name__ for p in fresh.parameters()}),
    }


def _worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=60)
    try:
        out = {"ddp": _ddp(rank, root)}
        if fully_shard is not None:
            out["fsdp"] = _fsdp(rank, root)
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hessian_ranks")
    run_ranks(_worker, (str(root),), world=WORLD)
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def one_process(adam: bool, probe_batch_size: int | None = None) -> dict:
    model = make_model()
    return train(model, adam, None, attach(OPTIONS, probe_batch_size)(model)).memory.scalars()


def check_equal(got: dict, expected: dict, extra: set[str]) -> None:
    assert TAGS | extra <= set(got)
    assert set(got) == {t for t in expected if t.startswith("hessian/")}
    for tag, points in expected.items():
        steps = [2, 4] if tag in ADAM and "hessian/preconditioned_eig_top/1" in got else [0, 2, 4]  # Adam: after a step
        assert [s for s, _ in got[tag]] == [s for s, _ in points] == steps, tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-8, abs=1e-12), tag


def test_ddp_ranks_equal_one_process(ranks_run):
    _, info = ranks_run
    assert info[0]["ddp"]["failures"] == info[1]["ddp"]["failures"] == []
    assert info[1]["ddp"]["scalars"] == {}  # only rank 0 writes
    check_equal(info[0]["ddp"]["scalars"], one_process(False), {"hessian/edge_ratio", "hessian/stability_threshold"})


@pytest.mark.skipif(fully_shard is None, reason="torch without FSDP2 (fully_shard)")
@pytest.mark.filterwarnings("ignore:hessian. the preconditioned sharpness")  # at step 0: no Adam state yet
def test_fsdp2_ranks_equal_one_process_and_train_unchanged(ranks_run):
    _, info = ranks_run
    assert info[0]["fsdp"]["failures"] == info[1]["fsdp"]["failures"] == []
    assert info[1]["fsdp"]["scalars"] == {}
    check_equal(info[0]["fsdp"]["scalars"], one_process(True, probe_batch_size=2), ADAM)
    for r in range(WORLD):
        assert info[r]["fsdp"]["unchanged"]  # bit-identical parameters with and without the probe
        assert info[r]["fsdp"]["kinds"] == info[r]["fsdp"]["after"] == ["DTensor"]  # left sharded


@pytest.mark.skipif(fully_shard is None, reason="torch without FSDP2 (fully_shard)")
def test_fsdp2_products_equal_the_dense_hessian(ranks_run):
    root, _ = ranks_run
    model = make_model()
    _, _, px, py = data()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [p.numel() for p in params.values()])
        tensors = {n: t.view_as(params[n]) for n, t in zip(names, parts)}
        return F.cross_entropy(torch.func.functional_call(model, tensors, (px,)), py)

    dense = torch.func.hessian(loss)(torch.cat([p.reshape(-1) for p in params.values()]))
    for r in range(WORLD):
        saved = torch.load(root / f"hv{r}.pt", weights_only=True)
        expected = torch.stack([dense @ saved["v"], dense @ (2 * saved["v"])])
        torch.testing.assert_close(saved["hv"], expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
