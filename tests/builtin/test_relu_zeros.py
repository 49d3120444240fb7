"""relu_zeros against a naive per-element count at every site."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SharedReluMLP
from torch import nn

import probes


def naive_zero_counts_shared(model: SharedReluMLP, xs) -> dict[str, tuple[int, int, list[int]]]:
    """Per site: (zeros, outputs, per-unit nonzero counts) by looping over elements."""
    out: dict[str, list] = {}
    for x in xs:
        h = x
        for k, layer in enumerate(model.layers[:-1], start=1):
            h = torch.clamp(layer(h), min=0.0)
            z = sum(1 for e in h.flatten().tolist() if e == 0)
            units = [sum(1 for i in range(h.shape[0]) if h[i, j] != 0) for j in range(h.shape[1])]
            acc = out.setdefault(f"act#{k}", [0, 0, [0] * h.shape[1]])
            acc[0] += z
            acc[1] += h.numel()
            acc[2] = [a + b for a, b in zip(acc[2], units)]
    return {k: tuple(v) for k, v in out.items()}


def test_shared_relu_called_four_times_gives_four_sites(shared_relu_mlp):
    model = shared_relu_mlp
    torch.manual_seed(1)
    xs = [torch.randn(17, 12) for _ in range(3)]
    session = probes.attach(model, {"relu_zeros": {"every": 3}})
    for x in xs:  # training forwards: train mode, gradients enabled
        model(x)
        session.step()
    mem = session.memory
    expected = naive_zero_counts_shared(model, xs)
    assert set(expected) == {"act#1", "act#2", "act#3"}
    total_z = total_n = 0
    for site, (zeros, n, units) in expected.items():
        assert mem.last(f"relu_zeros/{site}/zeros") == zeros
        assert math.isclose(mem.last(f"relu_zeros/{site}/fraction"), zeros / n, rel_tol=1e-12)
        assert mem.last(f"relu_zeros/{site}/dead_in_window") == sum(1 for u in units if u == 0)
        hist = mem.histograms()[f"relu_zeros/{site}/unit_activity"][-1]
        assert int(hist.num) == len(units)
        np.testing.assert_allclose(float(hist.sum), sum(u / (n // len(units)) for u in units), rtol=1e-9)
        total_z, total_n = total_z + zeros, total_n + n
    assert math.isclose(mem.last("relu_zeros/total/fraction"), total_z / total_n, rel_tol=1e-12)
    session.close()


def test_seed003_four_calls_of_one_relu():
    torch.manual_seed(3)
    model = SharedReluMLP(sizes=(20, 16, 12, 10, 8, 4))
    x = torch.randn(32, 20)
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    model(x)
    session.step()
    tags = session.memory.tags()
    assert {f"relu_zeros/act#{k}/zeros" for k in range(1, 5)} <= tags
    expected = naive_zero_counts_shared(model, [x])
    for site, (zeros, _, _) in expected.items():
        assert session.memory.last(f"relu_zeros/{site}/zeros") == zeros
    session.close()


def test_functional_relu_sites_match_naive_count(functional_mlp):
    model = functional_mlp
    torch.manual_seed(2)
    x = torch.randn(25, 6)
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    model(x)
    session.step()
    h1 = F.relu(model.a(x))
    h2 = torch.relu(model.b(h1))
    h3 = model.c(h2).relu()
    mem = session.memory
    for name, h in [("forward:relu#1", h1), ("forward:relu#2", h2), ("forward:relu#3", h3)]:
        assert mem.last(f"relu_zeros/{name}/zeros") == sum(1 for e in h.flatten().tolist() if e == 0)
    session.close()


def test_functional_relu_named_by_calling_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x):
            return F.relu(self.lin(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())
            self.act = nn.ReLU()  # a module site: its internal F.relu must not count twice

        def forward(self, x):
            return self.act(self.blocks(x))

    model = Net()
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    model(torch.randn(4, 5))
    session.step()
    sites = {t.split("/")[1] for t in session.memory.tags() if t.endswith("/zeros")}
    assert sites == {"blocks.0:relu", "blocks.1:relu", "act"}
    session.close()


def test_only_training_forwards_are_counted(shared_relu_mlp):
    model = shared_relu_mlp
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    model.eval()
    model(torch.randn(8, 12))  # validation forward: not observed
    session.step()
    assert not session.memory.tags()
    model.train()
    model(torch.randn(8, 12))
    session.step()
    assert "relu_zeros/total/fraction" in session.memory.tags()
    session.close()


def test_nan_inputs_do_not_crash(shared_relu_mlp):
    model = shared_relu_mlp
    session = probes.attach(model, {"relu_zeros": {"every": 1}}, strict=True)
    x = torch.randn(8, 12)
    x[0, 0] = float("nan")
    model(x)
    session.step()
    assert 0.0 <= session.memory.last("relu_zeros/total/fraction") <= 1.0
    session.close()


def test_conv_units_are_channels():
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 2))
    session = probes.attach(model, {"relu_zeros": {"every": 1}})
    x = torch.randn(3, 2, 8, 8)
    model(x)
    session.step()
    h = torch.relu(model[0](x))
    per_channel = (h != 0).sum(dim=(0, 2, 3))
    hist = session.memory.histograms()["relu_zeros/1/unit_activity"][-1]
    assert int(hist.num) == 5
    np.testing.assert_allclose(float(hist.sum), (per_channel.double() / (3 * 36)).sum().item(), rtol=1e-9)
    assert session.memory.last("relu_zeros/1/dead_in_window") == int((per_channel == 0).sum())
    session.close()


def test_state_dict_keeps_the_open_window(shared_relu_mlp):
    model = shared_relu_mlp
    x1, x2 = torch.randn(6, 12), torch.randn(6, 12)
    s1 = probes.attach(model, {"relu_zeros": {"every": 2}})
    model(x1)
    s1.step()
    state = s1.state_dict()
    s1.detach()
    s2 = probes.attach(model, {"relu_zeros": {"every": 2}})
    s2.load_state_dict(state)
    assert s2.global_step == 1
    model(x2)
    s2.step()
    expected = naive_zero_counts_shared(model, [x1, x2])
    assert s2.memory.last("relu_zeros/act#1/zeros") == expected["act#1"][0]
    s2.close()


def test_long_windows_and_changing_batch_sizes_fold_exactly():
    """More than 255 forwards in one window and a ragged last batch: counts stay exact."""
    torch.manual_seed(5)
    model = SharedReluMLP(sizes=(6, 5, 4, 3, 2))
    session = probes.attach(model, {"relu_zeros": {"every": 10**6}})
    xs = [torch.randn(3, 6) for _ in range(300)] + [torch.randn(2, 6)]
    for x in xs:
        model(x)
    session.close()
    expected = naive_zero_counts_shared(model, xs)
    for site, (zeros, _, units) in expected.items():
        assert session.memory.last(f"relu_zeros/{site}/zeros") == zeros
        assert session.memory.last(f"relu_zeros/{site}/dead_in_window") == sum(1 for u in units if u == 0)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"sites": "gelu"}, ValueError, "relu_zeros: option 'sites' must be one of 'relu', 'all', got 'gelu'"),
        ({"sites": 1}, TypeError, "relu_zeros: option 'sites'"),
        ({"unit_dim": 1.0}, TypeError, "relu_zeros: option 'unit_dim' must be None or an int axis, got 1.0"),
        ({"bins": 0}, ValueError, "relu_zeros: option 'bins' must be a positive int <= 10000, got 0"),
        ({"bins": "20"}, TypeError, "relu_zeros: option 'bins'"),
    ],
)
def test_options_are_checked_through_the_schema(options, error, match):
    with pytest.raises(error, match=match):
        probes.attach(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), {"relu_zeros": options})


def test_a_dtype_move_within_a_window_keeps_counting():
    """The model moves (model.double()) between two training forwards of one window: the counts go on, equal to a
    hand count over both dtypes (the accumulators follow the activations' device)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 2))
    session = probes.attach(model, {"relu_zeros": {"every": 10}})
    xs = [torch.randn(7, 5) for _ in range(4)]
    zeros = 0
    for i, x in enumerate(xs):
        if i == 2:
            model.double()
        x = x.to(next(model.parameters()).dtype)
        with torch.no_grad():
            zeros += int((model[1](model[0](x)) == 0).sum())
        model(x)
    session.close()
    assert session.memory.scalars()["relu_zeros/1/zeros"] == [(0, zeros)]
