"""The user's context never reaches a measurement: autocast, grad and inference mode, torch function and dispatch
modes around ``opt.step()`` or ``session.step()`` leave every logged value as it is without them."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import probes
from probes.engine.context import isolated

PROBES = {
    "ntk": {"every": 2},
    "pathgram": {"every": 2},
    "patterns": {"every": 2},
    "alignment": {"every": 2},
    "margin": {"every": 2},
    "relu_zeros": {"every": 2},
}


class Calls(TorchFunctionMode):
    """A user's function mode: counts the torch calls it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class Ops(TorchDispatchMode):
    """A user's dispatch mode (a FLOP counter, say): counts the aten ops it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def run(around_step, steps: int = 4, *, optimizer: bool = True):
    """Train a small ReLU net for ``steps`` steps with ``around_step()`` entered around ``opt.step()`` (or around
    ``session.step()`` when ``optimizer`` is False); the logged scalars, the parameters and the contexts used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1))
    x, y = torch.randn(40, 6), torch.randint(0, 2, (40,)).float() * 2 - 1
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    session = probes.attach(model, PROBES, probe_data=(x[:24], y[:24]), optimizer=opt if optimizer else None)
    used = []
    for i in range(steps):
        xb, yb = x[i * 10 : (i + 1) * 10], y[i * 10 : (i + 1) * 10]
        F.mse_loss(model(xb).squeeze(1), yb).backward()
        ctx = around_step()
        used.append(ctx)
        if optimizer:
            with ctx:
                opt.step()
        else:
            opt.step()
            with ctx:
                session.step()
        opt.zero_grad()
    assert session.failures == {}
    session.close()
    scalars = {t: [(s, v) for s, v in pts] for t, pts in session.memory.scalars().items()}
    return scalars, [p.detach().clone() for p in model.parameters()], used


def plain():
    return contextlib.nullcontext()


CONTEXTS = {
    "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "autocast_fp16": lambda: torch.autocast("cpu", dtype=torch.float16),
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "function_mode": Calls,
    "dispatch_mode": Ops,
}


@pytest.fixture(scope="module")
def reference():
    return run(plain)


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_values_equal_whatever_wraps_opt_step(reference, name):
    scalars, params, _ = run(CONTEXTS[name])
    ref_scalars, ref_params, _ = reference
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert scalars.keys() == ref_scalars.keys()
    different = [t for t in scalars if scalars[t] != ref_scalars[t]]
    assert different == [], f"under {name}, {len(different)} logged values differ, e.g. {different[:5]}"
    assert any(t.startswith("ntk/") for t in scalars) and any(t.startswith("pathgram/") for t in scalars)


def test_session_step_inside_autocast(reference):
    scalars, _, _ = run(CONTEXTS["autocast_bf16"], optimizer=False)
    assert scalars == reference[0]


@pytest.mark.parametrize("mode_type", [Ops, Calls])
def test_user_modes_see_none_of_the_probes_work(mode_type):
    """A user's FLOP counter or function mode around opt.step() sees the optimizer's work only, with or without
    probes (the probes measure at steps 2 and 4, and flush and write at every step)."""
    _, _, with_probes = run(mode_type)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(torch.randn(10, 6)).sum().backward()
    mode = mode_type()
    with mode:
        opt.step()
    count = mode.ops if mode_type is Ops else mode.calls
    assert [m.ops if mode_type is Ops else m.calls for m in with_probes] == [count] * len(with_probes)


def test_isolated_restores_everything():
    mode = Calls()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode(), mode:
        with isolated():
            assert not torch.is_autocast_enabled("cpu")
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            before = mode.calls
            torch.ones(2).add(1)
            assert mode.calls == before
            assert (torch.ones(2, dtype=torch.float32) @ torch.ones(2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu") and torch.is_inference_mode_enabled()
        before = mode.calls
        torch.ones(2).add(1)
        assert mode.calls > before
    assert not torch.is_autocast_enabled("cpu")


def test_isolated_leaves_a_torch_func_transform():
    """A step hook reached inside ``torch.func.grad`` (a user differentiating through a training step) measures as
    at top level: the transform's wrapped tensors do not reach the measurement."""
    seen = {}

    def f(w):
        with isolated():
            t = torch.ones(3, requires_grad=True)
            (g,) = torch.autograd.grad((t * 2).sum(), t)
            seen["grad"] = g
        return (w * w).sum()

    torch.func.grad(f)(torch.ones(2))
    assert torch.equal(seen["grad"], torch.full((3,), 2.0))
