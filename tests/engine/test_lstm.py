"""An LSTM classifier, a model the probes were not designed on: Embedding -> LSTM -> Linear-ReLU-Linear.

The LSTM's gates (sigmoid, tanh) are inside ``nn.LSTM``'s fused kernel, so its only activation site is the head's
ReLU; its parameters take the NTK's per-sample fallback (``ntk_plan`` says why; ``torch.func`` cannot vmap
``nn.LSTM`` in this torch, so the fallback takes them one sample at a time), the others the layerwise path.
Every value is checked against an independent computation, and training is unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probes
from probes.autodiff.ntk import ntk_plan

VOCAB, T, P = 20, 7, 24


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.head(self.act(self.fc(h[:, -1])))


def make(dtype=torch.float32):
    torch.manual_seed(0)
    model = LSTMClassifier().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (P, T), generator=g)
    y = torch.arange(P) % 3
    return model, x, y


def train(model, x, y, session=None, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, P, (8,), generator=g)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        if session is not None:
            session.step()


def test_probes_do_not_change_lstm_training():
    ref, x, y = make()
    train(ref, x, y)
    model, x, y = make()
    s = probes.attach(
        model,
        {n: {"every": 2} for n in ("relu_zeros", "alignment", "margin", "ntk", "patterns")},
        probe_data=(x, y),
        strict=True,
    )
    train(model, x, y, s)
    s.close()
    assert s.failures == {}
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_lstm_ntk_equals_torch_func_and_the_plan_says_why_the_lstm_falls_back():
    model, x, y = make(torch.float64)
    model.eval()
    plan = ntk_plan(model, x)
    assert {"embed", "fc", "head"} <= set(plan.fast)
    lstm_params = {n for n, _ in model.named_parameters() if n.startswith("lstm.")}
    assert set(plan.fallback) == lstm_params and "LSTM" in plan.reasons["lstm"]
    params = list(model.parameters())
    rows = []  # per-sample autograd: torch.func cannot vmap nn.LSTM here (no batching rule for its in-place ops)
    for i in range(P):
        out = model(x[i : i + 1])[0]
        rows.append(
            torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                    for c in range(3)
                ]
            )
        )
    J = torch.stack(rows)
    theta = torch.einsum("pck,qck->pq", J, J)
    s = probes.attach(model, {"ntk": {"image": False}}, probe_data=(x, y), strict=True)
    s.close()
    mem = s.memory
    assert mem.last("ntk/trace") == pytest.approx(float(theta.trace()), rel=1e-10)
    assert mem.last("ntk/eig_max") == pytest.approx(float(torch.linalg.eigvalsh(theta)[-1]), rel=1e-10)


def test_lstm_alignment_and_relu_zeros_equal_hand_computations():
    model, x, y = make()
    s = probes.attach(
        model, {"alignment": {"every": 10**6}, "relu_zeros": {"every": 3}}, probe_data=(x, y), strict=True
    )
    zeros = 0
    model.train()
    for i in range(3):
        xb = x[8 * i : 8 * (i + 1)]
        with torch.no_grad():  # the hand count (a forward under no_grad is not a training forward: not counted)
            h, _ = model.lstm(model.embed(xb))
            zeros += int((model.fc(h[:, -1]) <= 0).sum())
        model(xb)  # the training forward: train mode, gradients enabled
        s.step()
    s.close()
    assert s.memory.scalars()["relu_zeros/act/zeros"][0] == (3, zeros)
    model.eval()
    with torch.no_grad():
        h, _ = model.lstm(model.embed(x))
        feats = torch.relu(model.fc(h[:, -1])).double()
    Fc = feats - feats.mean(0)
    Y = F.one_hot(y, 3).double()
    Yc = Y - Y.mean(0)
    cka = (Fc.T @ Yc).pow(2).sum() / (torch.linalg.norm(Fc.T @ Fc) * torch.linalg.norm(Yc.T @ Yc))
    assert s.memory.scalars()["alignment/act/cka"][0][1] == pytest.approx(float(cka), rel=1e-6)
