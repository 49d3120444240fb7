"""The passive path: hooks on the attached model's own modules only, no call frames read, compiled models in one
graph, sites that follow a model changed after attach, site types per session, only what a probe reads kept."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.passive import InputsKept
from torch import nn
from torch.nn.modules import module as module_hooks

import probes
from probes.records import Scalar


def mlp(act=nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), act(), nn.Linear(12, 8), act(), nn.Linear(8, 3))


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def global_hooks() -> int:
    return len(module_hooks._global_forward_hooks) + len(module_hooks._global_forward_pre_hooks)


def zeros_by_hand(model: nn.Sequential, x: torch.Tensor, index: int) -> int:
    h = x
    for i, layer in enumerate(model):
        h = layer(h)
        if i == index:
            return int((h == 0).sum())
    raise AssertionError(index)


def test_an_unattached_model_carries_and_pays_nothing():
    """A teacher or EMA copy in the same process: no hook on it, no process-wide hook while training."""
    model, teacher = mlp(), mlp()
    session = probes.attach(model, ["relu_zeros"])
    assert hooks_on(teacher) == 0 and global_hooks() == 0
    model(torch.randn(4, 6)).sum().backward()  # shows that forward makes no functional call: no module stack
    assert hooks_on(model) == 2 + 2  # the root's begin and end, one output hook per ReLU
    calls = {"n": 0}
    real = probes.engine.capture._SiteOutput.__call__

    def counting(self, *args):
        calls["n"] += 1
        return real(self, *args)

    probes.engine.capture._SiteOutput.__call__ = counting
    try:
        teacher(torch.randn(4, 6)).sum().backward()
        assert calls["n"] == 0
        model(torch.randn(4, 6)).sum().backward()
        assert calls["n"] == 2
    finally:
        probes.engine.capture._SiteOutput.__call__ = real
    session.close()
    assert hooks_on(model) == 0


def test_a_functional_relu_is_named_without_reading_frames(monkeypatch):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
            self.block = nn.Sequential(nn.Linear(8, 8))

        def forward(self, x):
            return self.fc2(F.relu(self.block(F.relu(self.fc1(x)))))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 4)
    session = probes.attach(net, {"relu_zeros": {"every": 1}})
    frames = {"n": 0}
    real = sys._getframe

    def counting(depth=0):
        frames["n"] += 1
        return real(depth + 1)

    monkeypatch.setattr(sys, "_getframe", counting)
    net(x).sum().backward()
    monkeypatch.setattr(sys, "_getframe", real)
    assert frames["n"] == 0
    session.step()
    session.close()
    zeros = session.memory.scalars()
    h1 = F.relu(net.fc1(x))
    assert zeros["relu_zeros/forward:relu#1/zeros"][0][1] == int((h1 == 0).sum())
    assert zeros["relu_zeros/forward:relu#2/zeros"][0][1] == int((F.relu(net.block(h1)) == 0).sum())


def test_passive_probes_get_only_what_they_read():
    seen = []

    class Inputs(probes.Probe):
        name, description, every, passive, needs_probe_data = "inputs", "reads site inputs", 1, True, False
        site_values = frozenset({"pre"})

        def observe(self, site, pre, post):
            seen.append((site.name, pre is not None, post is not None))

        def flush(self, step):
            return [Scalar("inputs/n", len(seen))]

    model = mlp()
    session = probes.attach(model, [Inputs(), "relu_zeros"])
    model(torch.randn(3, 6)).sum().backward()
    session.close()
    assert seen == [("1", True, True), ("3", True, True)]  # relu_zeros reads the outputs: both kept, each probe

    seen.clear()
    session = probes.attach(model, [Inputs()])
    model(torch.randn(3, 6)).sum().backward()
    session.close()
    assert seen == [("1", True, False), ("3", True, False)]


def test_a_module_added_after_attach_is_counted_by_its_path():
    model = mlp()
    session = probes.attach(model, {"relu_zeros": {"every": 2}})
    x = torch.randn(20, 6)
    model(x).sum().backward()
    session.step()
    model.append(nn.ReLU())  # site "5" on the logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).sum().backward()
        session.step()
    scalars = session.memory.scalars()
    assert scalars["relu_zeros/5/zeros"] == [(2, zeros_by_hand(model, x, 5))]
    total = scalars["relu_zeros/total/fraction"][-1][1]
    outputs = 20 * (12 + 8) * 2 + 20 * 3
    zeros = sum(zeros_by_hand(model, x, i) for i in (1, 3)) * 2 + zeros_by_hand(model, x, 5)
    assert total == pytest.approx(zeros / outputs)
    said = [str(w.message) for w in caught if "changed after attach" in str(w.message)]
    assert len(said) == 1 and "new site(s) '5'" in said[0]
    session.close()


def test_a_replaced_module_is_said_and_a_broken_chain_names_it():
    model = mlp()
    x, y = torch.randn(20, 6), torch.arange(20) % 3
    session = probes.attach(
        model, {"patterns": {"every": 1}, "pathgram": {"every": 1}, "relu_zeros": {"every": 1}}, probe_data=(x, y)
    )
    model[3] = nn.GELU()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).sum().backward()
        session.step()
    messages = [str(w.message) for w in caught]
    assert any("replaced site(s) '3'" in m for m in messages), messages
    assert "pathgram" in session.failures and "'3'" in session.failures["pathgram"]
    assert "gelu" in session.failures["pathgram"].lower()
    scalars = session.memory.scalars()
    assert "relu_zeros/1/zeros" in scalars and "relu_zeros/3/zeros" not in scalars  # '3' is no longer a ReLU
    session.close()


def test_a_removed_module_stops_and_is_said():
    model = mlp()
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    x = torch.randn(8, 6)
    model(x).sum().backward()
    session.step()
    del model[3]  # Linear(12, 8) now feeds Linear(8, 3): path '3' is that Linear, no site
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).sum().backward()
        session.step()
    assert any("removed site(s) '3'" in str(w.message) for w in caught)
    assert session.memory.scalars()["relu_zeros/3/zeros"][-1][0] == 1
    session.close()


def test_site_types_are_per_session():
    """Defining a probe class that asks for GELU sites changes no other session."""
    model = mlp(nn.GELU)
    x, y = torch.randn(30, 6), torch.arange(30) % 3

    class GeluProbe(probes.Probe):
        name, description = "gelu_probe", "asks for GELU modules"
        site_types = (nn.GELU,)

        def measure(self, batch):
            return []

    with probes.attach(model, ["alignment"], probe_data=(x, y)) as session:
        pass
    assert "alignment/1/cka" in session.memory.scalars()
    assert GeluProbe.site_types == (nn.GELU,)


def test_copies_of_an_attached_model_observe_nothing():
    model = mlp()
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    clone = copy.deepcopy(model)
    ema = torch.optim.swa_utils.AveragedModel(model)
    x = torch.randn(4, 6)
    clone(x).sum().backward()
    ema(x).sum().backward()
    session.step()
    assert "relu_zeros/1/zeros" not in session.memory.scalars()
    model(x).sum().backward()
    session.step()
    assert session.memory.scalars()["relu_zeros/1/zeros"] == [(2, zeros_by_hand(model, x, 1))]
    session.close()


compile_ok = pytest.mark.skipif(sys.platform == "win32" or not hasattr(torch, "compile"), reason="no torch.compile")


@compile_ok
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_a_compiled_model_keeps_one_graph_counts_as_eager_and_trains_as_compiled(order):
    torch._dynamo.reset()
    x = torch.randn(3, 16, 6, generator=torch.Generator().manual_seed(1))

    def train(with_probes: bool):
        model = mlp()
        session = None
        if with_probes and order == "attach_then_compile":
            session = probes.attach(model, {"relu_zeros": {"every": 3}})
        compiled = torch.compile(model)
        if with_probes and order == "compile_then_attach":
            session = probes.attach(compiled, {"relu_zeros": {"every": 3}})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for xb in x:
            compiled(xb).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if session is not None:
                session.step()
        if session is not None:
            explained = torch._dynamo.explain(compiled)(x[0])
            session.close()
            return model, session, explained
        return model, None, None

    plain, _, _ = train(False)
    model, session, explained = train(True)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    # the same counts in eager: replay the steps on an eager copy of the trained weights
    eager = mlp()
    session_eager = probes.attach(eager, {"relu_zeros": {"every": 3}})
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    for xb in x:
        eager(xb).square().mean().backward()
        opt.step()
        opt.zero_grad()
        session_eager.step()
    session_eager.close()
    compiled_zeros = {t: v for t, v in session.memory.scalars().items() if t.endswith("/zeros")}
    eager_zeros = {t: v for t, v in session_eager.memory.scalars().items() if t.endswith("/zeros")}
    assert compiled_zeros == eager_zeros and compiled_zeros


@pytest.mark.parametrize("batch, forwards", [(3, 40), (300, 3)])  # 40 > one stash; 300 x 256: byte tensor
def test_relu_zeros_counts_small_and_large_activations_like_a_loop(batch, forwards):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 2))
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    xs = [torch.randn(batch, 8) for _ in range(forwards)]
    per_unit = torch.zeros(256, dtype=torch.int64)
    for x in xs:
        model(x).sum().backward()
        with torch.no_grad():  # not a training forward: not counted
            h = model[1](model[0](x))
        for row in h:  # the naive loop
            for j, v in enumerate(row.tolist()):
                per_unit[j] += v != 0
    session.step()
    session.close()
    scalars = session.memory.scalars()
    zeros = forwards * batch * 256 - int(per_unit.sum())
    assert scalars["relu_zeros/1/zeros"] == [(1, zeros)]
    assert scalars["relu_zeros/1/dead_in_window"] == [(1, float((per_unit == 0).sum()))]


def test_a_probe_pass_leaves_no_process_wide_hook_behind():
    """torch.compile warns of global hooks while any is registered: none is left after probe passes."""
    model = mlp()
    x, y = torch.randn(10, 6), torch.arange(10) % 3
    with probes.attach(model, {"alignment": {"every": 1}, "relu_zeros": {"every": 1}}, probe_data=(x, y)) as s:
        model(x).sum().backward()
        s.step()
    assert not module_hooks._has_any_global_hook()


@compile_ok
def test_a_module_added_to_a_compiled_model_is_counted_from_its_next_forward():
    model = mlp()
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    compiled = torch.compile(model)
    x = torch.randn(8, 6)
    compiled(x).sum().backward()
    session.step()
    model.append(nn.ReLU())  # site "5", on the logits
    compiled(x).sum().backward()
    session.step()
    with torch.no_grad():
        zeros = int((model(x) == 0).sum())
    assert session.memory.scalars()["relu_zeros/5/zeros"] == [(2, zeros)]
    session.close()


def test_a_passive_probe_declaring_gates_reads_them_in_training():
    """Through ``attach``: a passive probe with ``Needs(sites={"gate"})`` gets each site's input, whose signs are the
    gates of a naive forward."""

    class Gates(probes.Probe):
        name = "gatewatch"
        passive = True
        every = 1
        needs = probes.Needs(sites=frozenset({"gate"}))

        def __init__(self, **options):
            super().__init__(**options)
            self.gates = []

        def observe(self, site, pre, post):
            self.gates.append(pre > 0)

        def flush(self, step):
            return []

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    probe = Gates()
    session = probes.attach(model, [probe], sinks=["memory"])
    x = torch.randn(5, 3)
    model(x).sum().backward()
    session.step()
    session.close()
    with torch.no_grad():
        expected = model[0](x) > 0
    assert len(probe.gates) == 1 and torch.equal(probe.gates[0], expected)


@compile_ok
@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"])
def test_a_compiled_in_place_relu_hands_passive_probes_its_input_as_eager_does(backend):
    """``nn.ReLU(inplace=True)`` under ``torch.compile``: ``probes::site_input`` copies the input when the graph
    runs, before the activation overwrites it; the inputs equal a naive eager copy, in one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)
    )
    naive = []
    for m in (model[1], model[3]):
        m.register_forward_pre_hook(lambda _m, args: naive.append(args[0].detach().clone()))
    probe = InputsKept()
    session = probes.attach(model, [probe], sinks=["memory"])
    run = torch.compile(model, backend=backend) if backend else model
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probes.ProbesNoticeWarning)
        for _ in range(3):
            run(torch.randn(4, 3, generator=g)).sum().backward()
            session.step()
        explained = torch._dynamo.explain(run)(torch.randn(4, 3)) if backend else None
    session.close()
    kept = probe.kept[:6]  # explain's run is observed too
    assert [n for n, _ in kept] == ["1", "3"] * 3
    assert any(bool((t < 0).any()) for _, t in kept)  # inputs with negatives, as they were
    if backend is None:
        for (_, got), ref in zip(kept, naive):
            assert torch.equal(got, ref)
    else:
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch.manual_seed(0)
        eager = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        refs = []
        for _ in range(3):
            x = torch.randn(4, 3, generator=g)
            with torch.no_grad():
                z1 = eager[0](x)
                refs += [z1, eager[2](z1.relu())]
        for (_, got), ref in zip(kept, refs):
            torch.testing.assert_close(got, ref)
