"""Probes must not change training: same seeds, bit-identical parameters with and without probes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probes


def builtin_names() -> list[str]:
    return [i.name for i in probes.available() if i.source == "builtin"]


def train(model_fn, spec, steps: int = 50, seed: int = 0, probe_data=None, use_optimizer_hook=False):
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(200, 8, generator=g)
    y_all = torch.sign(x_all[:, :1] + 0.3 * x_all[:, 1:2])
    session = None
    if spec is not None:
        session = probes.attach(model, spec, probe_data=probe_data, sinks=["memory"],
                                optimizer=opt if use_optimizer_hook else None)
    for _ in range(steps):
        idx = torch.randint(0, 200, (20,))  # global RNG: probes must leave it untouched
        loss = F.mse_loss(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if session is not None and not use_optimizer_hook:
            session.step()
    if session is not None:
        session.close()
    return model, session


def two_layer():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_all_builtin_probes_leave_training_bit_identical():
    names = builtin_names()
    assert "relu_zeros" in names
    g = torch.Generator().manual_seed(7)
    px = torch.randn(24, 8, generator=g)
    py = torch.sign(px[:, 0]).reshape(-1, 1)
    spec = {n: {"every": 5} for n in names}
    ref, _ = train(two_layer, None)
    got, session = train(two_layer, spec, probe_data=(px, py))
    assert session.failures == {}, session.failures
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), name
    written = {t.split("/")[0] for t in session.memory.tags()}
    assert set(names) <= written, set(names) - written


def test_optimizer_hook_stepping_is_bit_identical_too():
    names = [n for n in builtin_names() if n in ("relu_zeros", "patterns", "alignment", "ntk", "margin")]
    g = torch.Generator().manual_seed(7)
    px = torch.randn(24, 8, generator=g)
    py = torch.sign(px[:, 0]).reshape(-1, 1)
    ref, _ = train(two_layer, None)
    got, session = train(two_layer, {n: {"every": 3} for n in names}, probe_data=(px, py), use_optimizer_hook=True)
    assert session.global_step == 50
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("extra", [["relu_zeros"], ["relu_zeros", "patterns", "alignment"]])
def test_dropout_and_batchnorm_training_is_bit_identical(extra):
    names = [n for n in extra if n in builtin_names()]

    def net():
        return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                             nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    px = torch.randn(30, 8, generator=torch.Generator().manual_seed(3))
    py = (px[:, 0] > 0).long()
    ref, _ = train(net, None)
    got, session = train(net, {n: {"every": 4} for n in names}, probe_data=(px, py))
    assert session.failures == {}, session.failures
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        assert torch.equal(a, b)
