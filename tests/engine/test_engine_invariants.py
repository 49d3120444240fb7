"""The engine's invariants under a hostile user: grad modes, interrupts, dtype moves, lazy modules, one point per
tag and step. Every count is checked against a hand count from hooks of the test's own."""

from __future__ import annotations

import pytest
import torch
from conftest import FunctionalMLP, SharedReluMLP
from torch import nn

import probes
from probes.records import Scalar


def hand_zeros(model: nn.Module, forwards) -> int:
    """Exact zeros at the outputs of every nn.ReLU call, counted by a forward hook of this test's own."""
    count = [0]

    def hook(module, args, out):
        count[0] += int((out == 0).sum())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            for x in forwards:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return count[0]


def total_zeros(session, tag: str = "relu_zeros/total/zeros") -> list[tuple[int, float]]:
    return session.memory.scalars().get(tag, [])


def zeros_by_step(session) -> dict[int, float]:
    """Zeros per flush, summed over the sites."""
    out: dict[int, float] = {}
    for tag, points in session.memory.scalars().items():
        if tag.startswith("relu_zeros/") and tag.endswith("/zeros") and "/total/" not in tag:
            for step, v in points:
                out[step] = out.get(step, 0) + v
    return out


def test_only_training_forwards_count_no_grad_inference_mode_and_raising_forwards_do_not():
    torch.manual_seed(0)
    model = SharedReluMLP()
    xs = [torch.randn(9, 12) for _ in range(6)]
    s = probes.attach(model, {"relu_zeros": {"every": 1}})
    with torch.inference_mode():  # the first forward of the window under inference_mode: ignored, probe stays on
        model(xs[0])
    model(xs[1])
    with torch.no_grad():  # a validation pass without eval(): not training data
        model(xs[2])
    model(xs[3])
    with pytest.raises(RuntimeError, match="mat1"):  # raises part-way (after the first ReLU): nothing counted
        model(torch.randn(9, 11))
    s.step()
    s.close()
    assert s.failures == {}
    assert zeros_by_step(s) == {1: hand_zeros(model, [xs[1], xs[3]])}


def test_a_forward_under_a_users_except_block_still_counts():
    """The raising-forward check compares with the exception active at entry, not any exception."""
    model = SharedReluMLP()
    x = torch.randn(7, 12)
    s = probes.attach(model, {"relu_zeros": {"every": 1}})
    try:
        raise ValueError("the user's own error")
    except ValueError:
        model(x)
    s.step()
    s.close()
    assert zeros_by_step(s) == {1: hand_zeros(model, [x])}


class Interrupting(nn.Module):
    """Raises KeyboardInterrupt in its forward when armed (a Ctrl-C in the middle of a forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return x


@pytest.mark.parametrize("functional", [False, True])
def test_a_keyboard_interrupt_inside_a_forward_leaves_the_session_consistent(functional):
    torch.manual_seed(1)
    base = FunctionalMLP() if functional else SharedReluMLP()
    width = 6 if functional else 12
    stop = Interrupting()
    model = nn.Sequential(base, stop)
    px = torch.randn(10, width)
    s = probes.attach(model, {"relu_zeros": {"every": 1}, "patterns": {"every": 1}}, probe_data=px)
    xs = [torch.randn(8, width) for _ in range(3)]
    model(xs[0])
    stop.armed = True
    with pytest.raises(KeyboardInterrupt):  # the notebook pattern: interrupt, then run the cell again
        model(torch.randn(8, width))
    model(xs[1])  # no step() in between: the next forward itself must find the capture consistent
    s.step()
    model(xs[2])
    s.step()
    assert torch.overrides._get_current_function_mode_stack() == []  # no TorchFunctionMode left behind
    s.close()
    assert s.failures == {}
    if functional:
        per_step = zeros_by_step(s)
        reference = probes.attach(base, {"relu_zeros": {"every": 1}})
        base(xs[0]), base(xs[1])
        reference.step()
        base(xs[2])
        reference.step()
        reference.close()
        assert per_step == zeros_by_step(reference) and per_step[2] > 0
    else:
        assert zeros_by_step(s) == {1: hand_zeros(base, [xs[0], xs[1]]), 2: hand_zeros(base, [xs[2]])}
    steps = sorted({st for tag, pts in s.memory.scalars().items() if tag.startswith("patterns/") for st, _ in pts})
    assert steps == [0, 1, 2]


def patterns_and_ntk(session) -> dict[str, float]:
    return {
        t: pts[-1][1]
        for t, pts in session.memory.scalars().items()
        if t.startswith(("patterns/", "ntk/trace", "alignment/"))
    }


def test_the_probe_batch_follows_the_model_to_float64_equal_to_a_fresh_attach():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(12, 5), torch.arange(12) % 3
    spec = {"patterns": {"every": 1}, "ntk": {"every": 1, "image": False}, "alignment": {"every": 1}}
    s = probes.attach(model, spec, probe_data=(x, y))
    model.double()
    s.step()
    assert s.x.dtype == torch.float64
    s.close()
    assert s.failures == {}
    moved = patterns_and_ntk(s)
    fresh = probes.attach(model, spec, probe_data=(x, y))
    fresh.close()
    assert s.failures == {} and fresh.failures == {}
    expected = patterns_and_ntk(fresh)
    assert set(moved) == set(expected)
    for tag, v in expected.items():
        assert moved[tag] == pytest.approx(v, rel=1e-12, abs=1e-12), tag
    model.half()  # and on to half precision: the probes keep measuring, on half inputs
    s2 = probes.attach(model, {"patterns": {"every": 1}}, probe_data=(x, y))
    model.float()
    s2.step()
    s2.close()
    assert s2.failures == {} and s2.x.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_probe_batch_follows_the_model_to_another_device():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    s = probes.attach(model, {"patterns": {"every": 1}}, probe_data=torch.randn(6, 5))
    model.cuda()
    s.step()
    s.close()
    assert s.failures == {} and s.x.device.type == "cuda"


def lazy_run(with_probes: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(2))
    opt = None
    session = None
    if with_probes:
        session = probes.attach(
            model, {"relu_zeros": {"every": 2}, "patterns": {"every": 2}}, probe_data=torch.ones(4, 7)
        )
    for _ in range(4):
        x = torch.randn(8, 7)
        loss = model(x).square().mean()
        if opt is None:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if session is not None:
            session.step()
    if session is not None:
        session.close()
        assert session.failures == {}
        assert session.memory.scalars()["patterns/1/active_fraction"][0][0] == 2  # measured once initialised
    return [p.detach().clone() for p in model.parameters()], torch.rand(3)


def test_lazy_modules_train_bit_identically_and_the_rng_stream_continues():
    with pytest.warns(probes.engine.session.ProbesNoticeWarning, match="lazy"):
        probed, probed_next = lazy_run(True)
    plain, plain_next = lazy_run(False)
    assert all(torch.equal(a, b) for a, b in zip(probed, plain))
    assert torch.equal(probed_next, plain_next)  # the user's next random draws are those of a run without probes


class Forwards(probes.Probe):
    """A plugin counting forwards with add_state, whose flush always returns a record (0 for an empty window)."""

    name = "forwards"
    passive = True
    every = 2

    def __init__(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.int64))

    def wants(self, site):
        return True

    def observe(self, site, pre, post):
        self.n += 1

    def flush(self, step):
        return [Scalar("forwards/n", self.n)]


def test_one_point_per_tag_per_step_close_does_not_flush_a_window_flushed_at_that_step():
    model = SharedReluMLP()
    s = probes.attach(model, [Forwards()])
    for _ in range(4):
        model(torch.randn(3, 12))
        s.step()
    s.close()  # step 4 was due: its window was written; close writes no second point (a 0) at step 4
    assert s.memory.scalars()["forwards/n"] == [(2, 6.0), (4, 6.0)]
    s = probes.attach(model, [Forwards()])
    for _ in range(3):
        model(torch.randn(3, 12))
        s.step()
    model(torch.randn(3, 12))
    s.close()  # a window with forwards since the last flush is still written at close
    assert s.memory.scalars()["forwards/n"] == [(2, 6.0), (3, 6.0)]
