"""Probes under DDP: 2 CPU processes (gloo) give the totals of one process on the union of the data.

Each rank trains a DDP-wrapped ReLU MLP on its half of every batch; ``relu_zeros`` counts are
summed over the ranks at each flush, the active probes run once (rank 0), except ntk, which splits the probe
batch over the ranks (its kernel equals one process's to 1e-10), and only rank 0 writes.
The reference is one process whose forwards see both halves. The weights are not updated (forward
and backward only; DDP still all-reduces the gradients), so both runs see the same network and the
counts must agree exactly. A second test gives the ranks different accumulators: the probe is
switched off on every rank with a clear message, instead of crashing training in the collective.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import probes
from probes.records import Scalar
from probes.testing import join_group, leave_group, run_ranks

WORLD = 2
STEPS = 4
EVERY = 2
PER_RANK = 8


class CountingProbe(probes.Probe):
    """Active probe: counts its measurements and logs the mean output on the probe batch."""

    name = "counting"
    every = 2

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, batch):
        self.calls += 1
        return [Scalar("counting/mean_output", batch.output.double().mean())]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * PER_RANK, 10, generator=g)
    y = torch.randint(0, 3, (STEPS, WORLD * PER_RANK), generator=g)
    probe = (torch.randn(20, 10, generator=g), torch.arange(20) % 3)
    return x, y, probe


SPEC = {
    "relu_zeros": {"every": EVERY},
    "alignment": {"every": EVERY},
    "ntk": {"every": EVERY, "image": False},
    "pathgram": {"every": EVERY, "image": None},
}


def _worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=60)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y, probe_data = data()
        counting = CountingProbe()
        session = probes.attach(
            model,
            {**SPEC, counting: None},
            probe_data=probe_data,
            logdir=os.path.join(root, f"tb_rank{rank}"),
            sinks=["tensorboard", "memory"],
        )
        ntk, ntk_calls = session.probes["ntk"], []
        measure = ntk.measure
        ntk.measure = lambda batch: (ntk_calls.append([batch.world_size, batch.size]), measure(batch))[1]
        for s in range(STEPS):
            xb = x[s, rank * PER_RANK : (rank + 1) * PER_RANK]  # this rank's half of the global batch
            yb = y[s, rank * PER_RANK : (rank + 1) * PER_RANK]
            F.cross_entropy(model(xb), yb).backward()
            model.zero_grad()
            session.step()
        session.close()
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            mem = session.memory.scalars() if session.sinks else {}
            json.dump(
                {
                    "sinks": len(session.sinks),
                    "measure_calls": counting.calls,
                    "ntk_calls": ntk_calls,
                    "failures": sorted(session.failures),
                    "ntk": {t: v for t, v in mem.items() if t.startswith("ntk/")},
                },
                f,
            )
    finally:
        leave_group()


def read_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_ddp_totals_equal_a_single_process_run_on_the_union(tmp_path):
    run_ranks(_worker, (str(tmp_path),), world=WORLD)

    # reference: one process, every forward sees both halves, same weights
    model = make_model()
    x, y, probe_data = data()
    counting = CountingProbe()
    ref = probes.attach(model, {**SPEC, counting: None}, probe_data=probe_data, sinks=["memory"])
    for s in range(STEPS):
        F.cross_entropy(model(x[s]), y[s]).backward()
        model.zero_grad()
        ref.step()
    ref.close()
    expected = ref.memory.scalars()

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [i["failures"] for i in info] == [[], []]
    assert info[0]["sinks"] == 2 and info[1]["sinks"] == 0  # only rank 0 writes (TensorBoard, memory)
    assert info[0]["measure_calls"] == counting.calls == 1 + STEPS // EVERY  # attach + cadence (close: none due)
    assert info[1]["measure_calls"] == 0  # active probes run once, on rank 0
    assert not (tmp_path / "tb_rank1").exists()
    # ntk splits the probe batch over the ranks: both measure, each the factors of half of the 20 samples, and the
    # kernel assembled from exchanged factors equals one process's (this float32 model's passes round differently on
    # 10 samples than on 20; tests/distributed/test_ntk_ranks.py checks float64 models to 1e-10)
    assert info[0]["ntk_calls"] == info[1]["ntk_calls"] == [[WORLD, 20]] * (STEPS // EVERY)
    ntk_ref = {t: v for t, v in expected.items() if t.startswith("ntk/")}
    assert (
        {"ntk/trace", "ntk/eig_max", "ntk/eig_top/1", "ntk/eig_top/5", "ntk/alignment", "ntk/eig_min"}
        <= set(ntk_ref)
        == set(info[0]["ntk"])
    )
    for tag, values in ntk_ref.items():
        assert [st for st, _ in info[0]["ntk"][tag]] == [st for st, _ in values] == [0, 2, 4], tag
        # the trace and the top eigenvalues to 1e-8 (the acceptance); eig_min and the condition number carry the
        # float32 passes' rounding relative to eig_max, the rest (alignment, effective rank, drift) to 1e-6
        tol = (
            1e-3
            if tag in ("ntk/condition", "ntk/eig_min")
            else 1e-8
            if tag == "ntk/trace" or tag.startswith(("ntk/eig_max", "ntk/eig_top/"))
            else 1e-6
        )
        assert [v for _, v in info[0]["ntk"][tag]] == pytest.approx([v for _, v in values], rel=tol, abs=1e-12), tag

    got = read_scalars(tmp_path / "tb_rank0")
    zero_tags = [t for t in expected if t.startswith("relu_zeros/")]
    assert {
        "relu_zeros/1/zeros",
        "relu_zeros/3/zeros",
        "relu_zeros/1/dead_in_window",
        "relu_zeros/total/fraction",
    } <= set(expected)
    assert zero_tags and set(zero_tags) <= set(got)
    for tag in zero_tags:
        steps_expected = [st for st, _ in expected[tag]]
        assert [st for st, _ in got[tag]] == steps_expected == [2, 4], tag
        for (_, a), (_, b) in zip(got[tag], expected[tag]):
            if tag.endswith(("/zeros", "/dead_in_window")):
                assert a == b, (tag, a, b)  # integer counts: exact
            else:
                assert a == pytest.approx(b, rel=1e-6), (tag, a, b)
    # the counts really are sums over ranks: 2 flush windows x 2 steps x 16 samples x 24 units
    zeros = dict(got["relu_zeros/1/zeros"])
    frac = dict(got["relu_zeros/1/fraction"])
    assert zeros[2] == pytest.approx(frac[2] * EVERY * WORLD * PER_RANK * 24, rel=1e-6)
    # ntk's backward passes on rank 0 (autograd.grad on the inner module) do not trigger DDP's reducer
    for tag in (
        "alignment/1/cka",
        "alignment/3/cka",
        "counting/mean_output",
        "ntk/trace",
        "ntk/eig_max",
        "pathgram/norm",
    ):
        assert [st for st, _ in got[tag]] == [st for st, _ in expected[tag]] == [0, 2, 4]
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-5)


def _uneven_worker(rank: int, root: str) -> None:
    """Rank 1 runs no training forward in the first window: the ranks hold different accumulators."""
    join_group(rank, WORLD, root, timeout_s=20)
    try:
        model = make_model()  # the session only needs torch.distributed; no DDP wrapper, so ranks may differ
        x, y, (px, py) = data()
        if rank == 1:  # another probe batch on rank 1: ntk splits rank 0's over the ranks
            px = px + 1.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session = probes.attach(model, SPEC, probe_data=(px, py), sinks=["memory"])
        for s in range(STEPS):
            if rank == 0 or s >= EVERY:
                model(x[s, rank * PER_RANK : (rank + 1) * PER_RANK])
            session.step()
        session.close()
        mem = session.memory.scalars() if session.sinks else {}
        with open(os.path.join(root, f"uneven{rank}.json"), "w") as f:
            json.dump(
                {
                    "failures": {k: v.strip().splitlines()[-1] for k, v in session.failures.items()},
                    "zeros_steps": [st for st, _ in mem.get("relu_zeros/1/zeros", [])],
                    "cka_steps": [st for st, _ in mem.get("alignment/1/cka", [])],
                    "ntk": mem.get("ntk/trace", []),
                    "notices": [str(w.message) for w in caught],
                },
                f,
            )
    finally:
        leave_group()


def test_ranks_with_different_accumulators_fail_the_probe_clearly_instead_of_hanging(tmp_path):
    run_ranks(_uneven_worker, (str(tmp_path),), world=WORLD)
    info = [json.loads((tmp_path / f"uneven{r}.json").read_text()) for r in range(WORLD)]
    for r in range(WORLD):
        assert list(info[r]["failures"]) == ["relu_zeros"], info[r]
        assert "ranks hold different accumulators" in info[r]["failures"]["relu_zeros"]
    assert info[0]["zeros_steps"] == []  # nothing written from mismatched sums
    assert info[0]["cka_steps"] == [0, 2, 4]  # the other probes keep working
    # rank 1 passed another probe batch: both ranks measure ntk on rank 0's (said once), equal to one process
    assert any("probe_data differs between the ranks" in n for n in info[0]["notices"])
    _, _, probe_data = data()
    ref = probes.attach(make_model(), {"ntk": SPEC["ntk"]}, probe_data=probe_data, sinks=["memory"])
    expected = ref.memory.scalars()["ntk/trace"][0][1]
    ref.close()
    assert [st for st, _ in info[0]["ntk"]] == [0, 2, 4]
    assert info[0]["ntk"][0][1] == pytest.approx(expected, rel=1e-6)


class FlakyPassive(probes.Probe):
    """Passive probe that raises on rank 1 only (a NaN there, say)."""

    name = "flaky"
    passive = True
    needs_probe_data = False
    every = EVERY

    def __init__(self) -> None:
        self.add_state("count", torch.zeros(1, dtype=torch.int64), reduce="sum")

    def observe(self, site, pre, post):
        if dist.get_rank() == 1:
            raise ValueError("flaky: bad values on this rank")
        self.count += 1

    def flush(self, step):
        return [Scalar("flaky/count", self.count)]


def _one_rank_fails_worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=20)
    try:
        model = make_model()
        x, _, _ = data()
        session = probes.attach(model, {FlakyPassive(): None, "relu_zeros": {"every": EVERY}}, sinks=["memory"])
        for s in range(STEPS):
            model(x[s, rank * PER_RANK : (rank + 1) * PER_RANK])
            session.step()
        session.close()
        mem = session.memory.scalars() if session.sinks else {}
        with open(os.path.join(root, f"fails{rank}.json"), "w") as f:
            json.dump(
                {
                    "failures": sorted(session.failures),
                    "flaky": mem.get("flaky/count", []),
                    "zeros_steps": [st for st, _ in mem.get("relu_zeros/1/zeros", [])],
                },
                f,
            )
    finally:
        leave_group()


def test_a_probe_failing_on_one_rank_is_switched_off_on_all_without_hanging(tmp_path):
    run_ranks(_one_rank_fails_worker, (str(tmp_path),), world=WORLD)
    info = [json.loads((tmp_path / f"fails{r}.json").read_text()) for r in range(WORLD)]
    assert info[0]["failures"] == info[1]["failures"] == ["flaky"]
    assert info[0]["flaky"] == []  # never written: the sum would have missed rank 1
    assert info[0]["zeros_steps"] == [2, 4]  # relu_zeros keeps working on both ranks
