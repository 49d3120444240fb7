"""Iterations that a ``GradScaler`` skips are no steps: ``attach(grad_scaler=...)`` counts them as
``train/skipped_steps``, training is unchanged, and a copied or pickled scaler carries nothing of the session."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probes


def loop(attach: bool, iterations: int = 8, scaler_kw=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", **(scaler_kw or {"init_scale": 2.0**127, "growth_interval": 1000}))
    session = probes.attach(model, {"relu_zeros": {"every": 1}}, optimizer=opt, grad_scaler=scaler) if attach else None
    stepped = []
    for _ in range(iterations):
        x = torch.randn(16, 4)
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True))
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        stepped.append(not all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    if session is not None:
        session.close()
    return model, scaler, session, stepped


def test_skipped_iterations_are_counted_and_training_is_unchanged():
    model, scaler, session, stepped = loop(True)
    plain, _, _, plain_stepped = loop(False)
    assert stepped == plain_stepped and not all(stepped) and any(stepped)  # some iterations really skipped
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    skipped = stepped.count(False)
    assert session.global_step == stepped.count(True)
    points = session.memory.scalars()["train/skipped_steps"]
    assert points[-1][1] == skipped
    assert "step" not in scaler.__dict__  # the scaler's own step is back after close


def test_a_copied_or_pickled_scaler_is_not_observed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    session = probes.attach(model, ["relu_zeros"], optimizer=opt, grad_scaler=scaler)
    for clone in (copy.deepcopy(scaler), pickle.loads(pickle.dumps(scaler))):
        model(torch.randn(3, 4)).sum().backward()
        clone.scale(model(torch.randn(3, 4)).sum()).backward()
        clone.step(opt)  # skipped (inf) or not, the copy counts nothing and steps as a plain scaler
        clone.update()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(scaler.state_dict(), buffer)
    session.close()
    assert session._scaler.skipped == 0 and "train/skipped_steps" not in session.memory.scalars()


def test_bad_grad_scaler_options_are_named():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="grad_scaler.*needs optimizer"):
        probes.attach(model, ["relu_zeros"], grad_scaler=torch.amp.GradScaler("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="grad_scaler"):
        probes.attach(model, ["relu_zeros"], optimizer=opt, grad_scaler=3)
    assert not opt._optimizer_step_post_hooks  # nothing left behind
