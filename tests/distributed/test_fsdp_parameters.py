"""The probes that read parameters (pathgram, linear_region, particles) under FSDP2 (``fully_shard``), 2 gloo ranks.

Each rank trains ``fully_shard`` ReLU nets (each Linear its own unit, then the root) on its half of every batch:
a three-layer MLP with pathgram and linear_region, and a two-layer net with all three probes. The probes declare
``sharding = "per_module"``: pathgram's recomposition check and particles read each layer inside
``ProbeBatch.gathered(layer)``, and linear_region runs every forward through the model's own forward, making each
module's cast or perturbed parameters inside that module's forward. The reference is one process measuring the
same parameters: the workers save the whole parameters at attach and after each optimizer step (before the
session's step hook measures), and the reference loads them into an unsharded copy before its own steps; every
value must equal it (pathgram's norm to 1e-10 relative, the rest exactly or to rounding), the parameters trained
with probes must be bit-identical to those trained without, and no probe may fail. While these probes measure,
a counter on FSDP2's parameter groups records how many units are whole at once: never more than one (the roots
hold no parameters here), and the explicit gathers happen one unit at a time.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import data
from test_fsdp import shard
from torch import nn

import probes
from probes.builtin.linear_region import LinearRegion
from probes.builtin.particles import Particles
from probes.builtin.pathgram import PathGramProbe
from probes.testing import join_group, leave_group, run_ranks

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = init_device_mesh = FSDPModule = None

pytestmark = pytest.mark.skipif(
    fully_shard is None or not dist.is_available() or not dist.is_gloo_available(),
    reason="FSDP2 (torch.distributed.fsdp.fully_shard) with gloo is not available",
)

WORLD = 2
STEPS = 4
EVERY = 2
PER_RANK = 8
PROBES = ("pathgram", "linear_region", "particles")
SPECS = {
    "mlp": {"pathgram": {"every": EVERY, "image": None}, "linear_region": {"every": EVERY}},
    "two_layer": {
        "pathgram": {"every": EVERY, "image": None},
        "linear_region": {"every": EVERY},
        "particles": {"every": EVERY, "image_every": 1000},
    },
    # the root holds the last two Linears: it stays whole after each forward of the probes (FSDP's own choice)
    "rooted": {"pathgram": {"every": EVERY, "image": None}, "linear_region": {"every": EVERY}},
}


def make(kind: str) -> nn.Module:
    if kind in ("mlp", "rooted"):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3))


class ReadsChildWeight(nn.Module):
    """The head's weight is used by the parent's forward (``F.linear``), the head never called: under FSDP the
    probe cannot make its perturbed copy inside the head's forward, so linear_region refuses it at attach."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body, self.act, self.head = nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(self.body(x)), self.head.weight, self.head.bias)


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters (a collective under FSDP: every rank calls it)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def train(model: nn.Module, rank: int, session=None, snapshots: list | None = None) -> None:
    """SGD steps on this rank's half of each global batch; ``snapshots`` gets the whole parameters after each
    step, taken before the session's step hook measures."""
    x, y, _ = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if snapshots is not None:
        opt.register_step_post_hook(lambda *_: snapshots.append(whole(model)))
    if session is not None:
        opt.register_step_post_hook(lambda *_: session.step())
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for s in range(STEPS):
        F.cross_entropy(model(x[s, part]), y[s, part]).backward()
        opt.step()
        opt.zero_grad()


class Gathers:
    """Counts, while one of the three probes validates or measures, the FSDP2 parameter groups whole at once
    (``_to_unsharded`` / ``_to_sharded``), and the explicit ``FSDPModule.unshard`` calls (``batch.gathered``)."""

    def __init__(self) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.live: set[int] = set()
        self.probe: str | None = None
        self.reset()
        gathers = self

        def wrap(cls, name, before=None, after=None):
            original = getattr(cls, name)

            def wrapped(obj, *args, **kwargs):
                if before is not None:
                    before(obj)
                out = original(obj, *args, **kwargs)
                if after is not None:
                    after(obj)
                return out

            setattr(cls, name, wrapped)

        def unsharded(group):
            gathers.live.add(id(group))
            if gathers.probe is not None:
                gathers.peak[gathers.probe] = max(gathers.peak[gathers.probe], len(gathers.live))

        def explicit(module):
            if gathers.probe is not None:
                gathers.explicit[gathers.probe] += 1

        wrap(FSDPParamGroup, "_to_unsharded", after=unsharded)
        wrap(FSDPParamGroup, "_to_sharded", after=lambda g: gathers.live.discard(id(g)))
        wrap(FSDPParamGroup, "_to_sharded_post_forward", after=lambda g: gathers.live.discard(id(g)))
        wrap(FSDPModule, "unshard", before=explicit)
        for cls in (PathGramProbe, LinearRegion, Particles):
            for method in ("check", "measure"):
                original = getattr(cls, method)

                def within(obj, batch, _original=original):
                    gathers.probe = obj.name
                    try:
                        return _original(obj, batch)
                    finally:
                        gathers.probe = None

                setattr(cls, method, within)

    def reset(self) -> None:
        self.peak = dict.fromkeys(PROBES, 0)
        self.explicit = dict.fromkeys(PROBES, 0)


def _worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=30)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        gathers = Gathers()
        _, _, probe_data = data()
        out: dict = {}
        saved: dict = {}
        for kind, spec in SPECS.items():
            gathers.reset()
            model = shard(make(kind), mesh, root_owns=kind == "rooted")
            snapshots = [whole(model)]
            session = probes.attach(model, spec, probe_data=probe_data, sinks=["memory"])
            particles = session.probes.get("particles")
            train(model, rank, session, snapshots)
            session.close()
            trained = whole(model)
            plain = shard(make(kind), mesh, root_owns=kind == "rooted")
            train(plain, rank)
            out[kind] = {
                "peak": gathers.peak,
                "explicit": gathers.explicit,
                "sharded": session.sharded,
                "failures": sorted(session.failures),
                "scalars": {t: [(st, float(v)) for st, v in series] for t, series in session.memory.scalars().items()}
                if session.sinks
                else {},
                "kinds": sorted({type(p).__name__ for p in model.parameters()}),
            }
            saved[kind] = {
                "snapshots": snapshots,
                "with": trained,
                "without": whole(plain),
                "trails": particles.trails() if particles is not None else None,
            }
        try:
            odd = ReadsChildWeight()
            fully_shard(odd.body, mesh=mesh)
            probes.attach(fully_shard(odd, mesh=mesh), {"linear_region": {}}, probe_data=probe_data)
            out["refused"] = None
        except ValueError as exc:
            out["refused"] = str(exc)
        torch.save(saved, os.path.join(root, f"saved{rank}.pt"))
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One spawn of 2 ranks serves every test here (process start-up dominates the cost)."""
    root = tmp_path_factory.mktemp("fsdp_parameters")
    run_ranks(_worker, (str(root),), world=WORLD, deadline_s=90)
    info = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    saved = [torch.load(root / f"saved{r}.pt", weights_only=True) for r in range(WORLD)]
    return info, saved


def reference(kind: str, snapshots: list[dict[str, torch.Tensor]]):
    """One process, unsharded, measuring the parameters the ranks had at each step (same probe batch)."""
    model = make(kind)

    def load(params):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])

    load(snapshots[0])
    _, _, probe_data = data()
    session = probes.attach(model, SPECS[kind], probe_data=probe_data, sinks=["memory"])
    for params in snapshots[1:]:
        load(params)
        session.step()
    session.close()
    return session, session.probes.get("particles")


@pytest.mark.parametrize("kind", list(SPECS))
def test_values_equal_one_process_and_training_is_unchanged(fsdp_run, kind):
    info, saved = fsdp_run
    for r in range(WORLD):
        assert info[r][kind]["sharded"] and info[r][kind]["kinds"] == ["DTensor"]
        assert info[r][kind]["failures"] == [], info[r][kind]["failures"]  # nothing switched off, on any rank
        for name, p in saved[r][kind]["with"].items():  # probes leave FSDP training bit for bit
            assert torch.equal(p, saved[r][kind]["without"][name]), name
    ref, particles = reference(kind, saved[0][kind]["snapshots"])
    assert not ref.failures
    expected = ref.memory.scalars()
    got = info[0][kind]["scalars"]
    assert info[1][kind]["scalars"] == {}  # only rank 0 writes
    tags = sorted(t for t in expected if t.split("/")[0] in SPECS[kind])
    assert set(tags) == set(got), sorted(set(tags) ^ set(got))
    for probe in SPECS[kind]:
        assert any(t.startswith(probe + "/") for t in tags), probe
    assert {"pathgram/norm", "linear_region/l_gen", "linear_region/identity_error"} <= set(tags)
    for tag in tags:
        steps = [st for st, _ in expected[tag]]
        assert steps == [st for st, _ in got[tag]] == [0, 2, 4], tag
        for (_, a), (_, b) in zip(got[tag], expected[tag]):
            b = float(b)
            if tag == "pathgram/norm":
                assert a == pytest.approx(b, rel=1e-10), tag
            elif "flip" in tag or tag.endswith("singular"):
                assert a == b, tag  # counts of flipped gates: exactly
            else:
                assert a == pytest.approx(b, rel=1e-9, abs=1e-15) or (a != a and b != b), (tag, a, b)
    if particles is not None:
        for r in range(WORLD):
            torch.testing.assert_close(saved[r][kind]["trails"], particles.trails(), rtol=1e-12, atol=0)


def test_one_unit_whole_at_a_time(fsdp_run):
    info, _ = fsdp_run
    for r in range(WORLD):
        for kind, spec in SPECS.items():
            peak, explicit = info[r][kind]["peak"], info[r][kind]["explicit"]
            # roots without parameters: while a probe runs, at most one Linear's unit is whole at any time; the
            # root holding parameters stays whole after the probe pass (FSDP), and one more unit at most
            assert peak == {p: (2 if kind == "rooted" else 1) if p in spec else 0 for p in PROBES}, (kind, peak)
            # pathgram's recomposition (one gather per Linear and measurement, plus validate) and particles (its
            # two layers, one after the other) gather each layer, except the root's, whole already after the probe
            # pass; linear_region's forwards gather through FSDP
            own_units = 1 if kind == "rooted" else sum(isinstance(m, nn.Linear) for m in make(kind).modules())
            assert explicit["pathgram"] == own_units * (1 + 3), (kind, explicit)
            assert explicit["particles"] == (2 * 3 if "particles" in spec else 0), (kind, explicit)
            assert explicit["linear_region"] == 0, (kind, explicit)
            assert explicit == info[1 - r][kind]["explicit"]  # the same gathers on both ranks


def test_a_parameter_read_outside_its_module_makes_linear_region_refuse_at_attach(fsdp_run):
    info, _ = fsdp_run
    for r in range(WORLD):  # attach raised on every rank (none went on into a probe pass alone)
        assert info[r]["refused"] is not None and "never calls module(s) ['head']" in info[r]["refused"]
        assert "linear_region" in info[r]["refused"]


class ConvNet(nn.Module):
    """Conv, BatchNorm (running statistics as buffers), max pooling, and a Linear called twice (one parameter set
    for both calls)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.bn, self.pool = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2)
        self.fc, self.twice, self.out = nn.Linear(64, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.r1, self.r2, self.r3, self.r4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.r1(self.bn(self.conv(x)))).flatten(1)
        h = self.r3(self.twice(self.r2(self.twice(self.r2(self.fc(h))))))
        return self.out(self.r4(h))


def test_linear_region_per_module_route_equals_whole_parameters_in_one_process():
    """The route taken under FSDP2 (``ModuleParameters``: each module's cast or perturbed tensors made in its own
    forward, draws replayed) against whole parameters through ``functional_call``, on one unsharded model with
    buffers, pooling indices, float32 sweeps and a float64 joint perturbation, and a module called twice."""
    from dataclasses import replace

    from probes.testing import probe_batch

    model = ConvNet()
    with torch.no_grad():
        for _ in range(3):  # running statistics away from (0, 1)
            model(torch.randn(16, 2, 8, 8) * 2 + 0.5)
    model.eval()
    x = torch.randn(12, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    batch = probe_batch(model, x, site_types=LinearRegion.needs.site_types)
    probe = LinearRegion(eps=(1e-3, 1e-1), delta=(1e-3, 3e-2))
    probe.check(batch)
    whole_route = {r.tag: float(r.item()) for r in probe.measure(batch)}
    context = copy.copy(batch.context)
    context.sharded = True  # no FSDP units here: batch.context.gathered does nothing
    sharded = replace(batch, context=context)
    probe.check(sharded)
    per_module = {r.tag: float(r.item()) for r in probe.measure(sharded)}
    assert whole_route.keys() == per_module.keys() and len(whole_route) == 11
    assert 0 < whole_route["linear_region/flip_fraction_delta_0.03"] < 1  # the perturbations matter here
    assert whole_route["linear_region/l_gen"] > 0
    for tag, value in whole_route.items():
        assert per_module[tag] == value or (value != value and per_module[tag] != per_module[tag]), tag
