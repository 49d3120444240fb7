"""Probes under FSDP2 (``fully_shard``): 2 CPU processes (gloo) never hang or crash and count like one process.

Each rank trains a ``fully_shard`` ReLU MLP (each Linear sharded, then the root) on its half of every batch.
Every forward all-gathers the parameters, so the active probes run on every rank (same probes, same order,
same probe batch); ntk splits the probe batch over the ranks and equals one process; passive counts are summed
over the ranks at each flush; only rank 0 writes. The reference
is one process training the same MLP on the union of the data: relu_zeros counts agree to a few gate flips
(the reduce-scattered gradients differ from one process's only by rounding), the step-0 measurements agree
exactly, and the parameters trained under FSDP with probes are bit-identical to those trained without.
A probe that raises on one rank only (passive or active) is switched off on every rank, and the ranks go on
running the same probe passes, instead of hanging in FSDP's all-gathers; a probe whose setup raises on one
rank makes attach raise on every rank; a rank with other probe-batch values measures on rank 0's. The
example ``examples/distributed.py --fsdp --smoke`` runs under torchrun. Every worker runs under a gloo
timeout and a deadline, so a hang is a failure, not a stuck test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import CountingProbe, FlakyPassive, data, make_model, read_scalars  # noqa: F401 - shared with the DDP tests
from torch import nn

import probes
from probes.records import Scalar
from probes.testing import join_group, leave_group, run_ranks

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = init_device_mesh = None

pytestmark = pytest.mark.skipif(
    fully_shard is None or not dist.is_available() or not dist.is_gloo_available(),
    reason="FSDP2 (torch.distributed.fsdp.fully_shard) with gloo is not available",
)

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 4
EVERY = 2
PER_RANK = 8
SPEC = {"relu_zeros": {"every": EVERY}, "patterns": {"every": EVERY}, "alignment": {"every": EVERY}}
#: the NTK across the ranks, matrix-free (the distributed operator; test_distributed.py covers the dense route)
NTK = {"every": EVERY, "spectrum": "topk", "top_k": 3, "image": False}


def shard(model: nn.Module, mesh, root_owns: bool = False) -> nn.Module:
    """Each Linear, then the root; ``root_owns``: only the first Linear, so the root holds the others."""
    for layer in model[:1] if root_owns else model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, session, rank: int | None) -> None:
    """SGD steps on this rank's half of each global batch (``rank=None``: one process, the whole batch)."""
    x, y, _ = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if session is not None:
        session_hook = opt.register_step_post_hook(lambda *_: session.step())
    for s in range(STEPS):
        part = slice(None) if rank is None else slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        F.cross_entropy(model(x[s, part]), y[s, part]).backward()
        opt.step()
        opt.zero_grad()
    if session is not None:
        session_hook.remove()


def start(rank: int, root: str):
    join_group(rank, WORLD, root, timeout_s=30)
    return init_device_mesh("cpu", (WORLD,))


def _worker(rank: int, root: str) -> None:
    mesh = start(rank, root)
    try:
        _, _, probe_data = data()
        model = shard(make_model(), mesh)
        counting = CountingProbe()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gates = {"every": EVERY, "save": True, "directory": os.path.join(root, f"gates_rank{rank}")}
            session = probes.attach(
                model,
                {**SPEC, "patterns": gates, "ntk": NTK, counting: None},
                probe_data=probe_data,
                logdir=os.path.join(root, f"tb_rank{rank}"),
                sinks=["tensorboard", "memory"],
            )
        train(model, session, rank)
        session.close()
        with_probes = {n: p.full_tensor() for n, p in model.named_parameters()}  # collective: every rank

        plain = shard(make_model(), mesh)
        train(plain, None, rank)
        without = {n: p.full_tensor() for n, p in plain.named_parameters()}
        # a root that holds parameters: FSDP2 keeps them gathered after a forward without backward (the
        # probe pass), so the session reshards them; the model is left as training leaves it
        rooted = shard(make_model(), mesh, root_owns=True)
        rooted_session = probes.attach(rooted, SPEC, probe_data=probe_data, sinks=["memory"])
        train(rooted, rooted_session, rank)
        rooted_session.close()
        kinds = sorted({type(p).__name__ for p in rooted.parameters()})
        rooted_with = {n: p.full_tensor() for n, p in rooted.named_parameters()}
        plain = shard(make_model(), mesh, root_owns=True)
        train(plain, None, rank)
        rooted_without = {n: p.full_tensor() for n, p in plain.named_parameters()}
        if rank == 0:
            torch.save(
                {"with": with_probes, "without": without, "rooted_with": rooted_with, "rooted_without": rooted_without},
                os.path.join(root, "params.pt"),
            )
        mem = session.memory.scalars() if session.sinks else {}
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "sharded": session.sharded,
                    "sinks": len(session.sinks),
                    "measure_calls": counting.calls,
                    "ntk": {t: v for t, v in mem.items() if t.startswith("ntk/")},
                    "rooted_parameter_kinds": kinds,
                    "failures": sorted(session.failures),
                    "ntk_messages": [str(w.message) for w in caught if "'ntk'" in str(w.message)],
                },
                f,
            )
        failing_probes(rank, root, mesh)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One spawn of 2 ranks (process start-up dominates the cost) serves the tests that read its files."""
    root = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, (str(root),), world=WORLD)
    return root


def test_fully_shard_mlp_counts_like_one_process_and_trains_unchanged(fsdp_run):
    tmp_path = fsdp_run

    # reference: one process, the same MLP trained on the union of every rank's data
    model = make_model()
    _, _, probe_data = data()
    counting = CountingProbe()
    ref = probes.attach(model, {**SPEC, "ntk": NTK, counting: None}, probe_data=probe_data, sinks=["memory"])
    train(model, ref, None)
    ref.close()
    expected = ref.memory.scalars()

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert info[0]["sharded"] and info[1]["sharded"]
    assert info[0]["failures"] == info[1]["failures"] == []
    assert not [m for m in info[0]["ntk_messages"] + info[1]["ntk_messages"] if "sharded" in m or "switched" in m]
    # the probe pass ran on every rank, as often as in one process; only rank 0 writes
    assert info[0]["measure_calls"] == info[1]["measure_calls"] == counting.calls == 1 + STEPS // EVERY
    assert info[0]["sinks"] == 2 and info[1]["sinks"] == 0
    # the NTK across the ranks (each the factors of half the probe batch, FSDP gathering one unit at a time, the
    # products Theta V assembled from the ranks' partial products): one process's trace and top eigenvalues, at step 0
    # to 1e-8 (this float32 model's passes on 10 samples instead of 20), then as trained (the weights' rounding too)
    ntk_ref = {t: v for t, v in expected.items() if t.startswith("ntk/")}
    tags = {"ntk/trace", "ntk/eig_max", "ntk/eig_top/1", "ntk/eig_top/2", "ntk/eig_top/3", "ntk/effective_rank"}
    assert tags == set(ntk_ref) == set(info[0]["ntk"])
    for tag, values in ntk_ref.items():
        mine = info[0]["ntk"][tag]
        assert [st for st, _ in mine] == [st for st, _ in values] == [0, 2, 4], tag
        assert mine[0][1] == pytest.approx(values[0][1], rel=1e-6 if tag == "ntk/effective_rank" else 1e-8), tag
        assert [v for _, v in mine] == pytest.approx([v for _, v in values], rel=1e-3), tag
    assert not (tmp_path / "tb_rank1").exists()
    assert len(list((tmp_path / "gates_rank0").iterdir())) == 1 + STEPS // EVERY  # gate snapshots: rank 0 only
    assert not (tmp_path / "gates_rank1").exists()

    got = read_scalars(tmp_path / "tb_rank0")
    zero_tags = [t for t in expected if t.startswith("relu_zeros/") and t.endswith("/zeros")]
    assert {"relu_zeros/1/zeros", "relu_zeros/3/zeros"} <= set(zero_tags) and set(zero_tags) <= set(got)
    for tag in zero_tags:
        assert [st for st, _ in got[tag]] == [st for st, _ in expected[tag]] == [2, 4], tag
        for (_, a), (_, b) in zip(got[tag], expected[tag]):
            assert abs(a - b) <= 3, (tag, a, b)  # summed over ranks = one process, to a few gate flips
    assert got["relu_zeros/total/fraction"][0][1] == pytest.approx(
        expected["relu_zeros/total/fraction"][0][1], abs=3 / (EVERY * WORLD * PER_RANK * 40)
    )
    # step 0: the same network on the same probe batch, so the active probes agree exactly
    for tag in (
        "alignment/1/cka",
        "alignment/3/cka",
        "alignment/output/cka",
        "patterns/1/active_fraction",
        "patterns/3/active_fraction",
        "patterns/distinct",
        "counting/mean_output",
    ):
        assert [st for st, _ in got[tag]] == [st for st, _ in expected[tag]] == [0, 2, 4], tag
        assert got[tag][0][1] == pytest.approx(expected[tag][0][1], rel=1e-6, abs=1e-12), tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-3, abs=1e-6), tag

    params = torch.load(tmp_path / "params.pt", weights_only=True)
    for name, p in params["with"].items():
        assert torch.equal(p, params["without"][name]), name  # probes leave FSDP training bit for bit
    for name, p in params["rooted_with"].items():
        assert torch.equal(p, params["rooted_without"][name]), name
    assert info[0]["rooted_parameter_kinds"] == info[1]["rooted_parameter_kinds"] == ["DTensor"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(params["with"][name], p.detach(), rtol=1e-5, atol=1e-6)


class FlakyActive(probes.Probe):
    """Active probe, due at every step, that raises on rank 1 from step 1 on. At odd steps it is the only
    probe due: a rank that switched it off alone would skip the probe pass the other rank runs (a hang)."""

    name = "flaky_active"
    every = 1

    def __init__(self) -> None:
        self.x_sums: list[float] = []

    def measure(self, batch):
        self.x_sums.append(float(batch.x.double().sum()))
        if dist.get_rank() == 1 and batch.step >= 1:
            raise ValueError("flaky_active: bad values on this rank")
        return [Scalar("flaky_active/mean_output", batch.output.double().mean())]


class SetupFails(probes.Probe):
    """Active probe whose setup raises on rank 1 only (a missing directory there, say)."""

    name = "setup_fails"

    def setup(self, context):
        if dist.get_rank() == 1:
            raise ValueError("no log directory on this rank")


def failing_probes(rank: int, root: str, mesh) -> None:
    """Rank 1 raises in a passive and in an active probe, and passes another probe batch."""
    _, _, (px, py) = data()
    if rank == 1:
        px = px + 1.0  # a rank with another probe batch: every rank must use rank 0's
    model = shard(make_model(), mesh)
    flaky_active = FlakyActive()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = probes.attach(
            model, {FlakyPassive(): None, flaky_active: None, **SPEC}, probe_data=(px, py), sinks=["memory"]
        )
        train(model, session, rank)
        session.close()
    mem = session.memory.scalars() if session.sinks else {}
    try:  # attach raises on every rank, instead of rank 0 going on into a probe pass alone
        probes.attach(shard(make_model(), mesh), {SetupFails(): None, "alignment": {}}, probe_data=(px, py))
        attach_error = None
    except Exception as exc:  # noqa: BLE001
        attach_error = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(root, f"fails{rank}.json"), "w") as f:
        json.dump(
            {
                "failures": {k: v.strip().splitlines()[-1] for k, v in session.failures.items()},
                "x_sums": flaky_active.x_sums,
                "steps": {t: [st for st, _ in v] for t, v in mem.items()},
                "warnings": [str(w.message) for w in caught],
                "attach_error": attach_error,
            },
            f,
        )


def test_a_probe_failing_on_one_rank_is_switched_off_on_every_rank_without_hanging(fsdp_run):
    tmp_path = fsdp_run
    info = [json.loads((tmp_path / f"fails{r}.json").read_text()) for r in range(WORLD)]
    for r in range(WORLD):
        assert sorted(info[r]["failures"]) == ["flaky", "flaky_active"], info[r]["failures"]
    assert "raised on another rank" in info[0]["failures"]["flaky_active"]
    assert "bad values on this rank" in info[1]["failures"]["flaky_active"]
    assert "another rank" in info[0]["failures"]["flaky"]
    # both ranks measured on rank 0's probe batch, and stopped at the same step
    assert info[0]["x_sums"] == info[1]["x_sums"] and len(info[0]["x_sums"]) == 2  # steps 0 and 1
    assert any("probe_data differs between the ranks" in w for w in info[0]["warnings"])
    steps = info[0]["steps"]
    assert "flaky/count" not in steps  # never written: the sum would have missed rank 1
    assert steps["flaky_active/mean_output"] == [0, 1]  # rank 0's own step-1 value stands; then off everywhere
    assert steps["alignment/1/cka"] == [0, 2, 4] and steps["relu_zeros/1/zeros"] == [2, 4]  # the others go on
    assert info[1]["steps"] == {}
    # a probe whose setup raises on one rank only: attach raises on every rank
    assert "attach failed on another rank" in info[0]["attach_error"]
    assert "no log directory on this rank" in info[1]["attach_error"]


def test_example_runs_under_torchrun_with_fsdp(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        str(ROOT / "examples" / "distributed.py"),
        "--backend",
        "gloo",
        "--fsdp",
        "--smoke",
        "--logdir",
        str(tmp_path / "runs"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 150 s (a hang): {exc.stdout!s}{exc.stderr!s}"[-3000:])
    # gloo may abort a process in the interpreter's teardown after everything succeeded ("terminate called without
    # an active exception"); that, and only that, is tolerated: the run's outputs are checked below either way
    teardown_abort = "terminate called without an active exception" in done.stderr
    assert done.returncode == 0 or teardown_abort, (done.stdout + done.stderr)[-3000:]
    assert "test accuracy" in done.stdout
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["fsdp"]  # one run, written by rank 0
    got = read_scalars(tmp_path / "runs" / "fsdp")
    assert {
        "relu_zeros/total/fraction",
        "alignment/1/cka",
        "patterns/distinct",
        "train/loss",
        "test/accuracy",
        "ntk/trace",
        "ntk/eig_max",
        "pathgram/norm",
        "linear_region/flip_fraction_eps_0.01",
        "particles/mean_norm",
    } <= set(got), sorted(got)
    for tag in (
        "alignment/1/cka",
        "ntk/trace",
        "pathgram/norm",
        "linear_region/flip_fraction_eps_0.01",
        "particles/mean_norm",
    ):
        assert [st for st, _ in got[tag]] == [0, 4, 8, 12], tag
