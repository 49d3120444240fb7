"""The ``margin`` probe (jamming forces) against a brute-force per-sample loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probes
from probes.builtin.margin import Margin, count_weights, forces
from probes.probe import ProbeBatch


def brute_force(f, y_pm, m):
    """Per-sample Python loop: Delta_i = m - y_i f_i, N_Delta, hinge-squared loss."""
    deltas = [m - float(yi) * float(fi) for fi, yi in zip(f, y_pm)]
    n = sum(1 for d in deltas if d > 0)
    loss = sum(0.5 * max(0.0, d) ** 2 for d in deltas) / len(deltas)
    return deltas, n, loss


def _records(probe, model, x, y, step=0):
    with torch.no_grad():
        out = model(x)
    return {r.tag: r for r in probe.measure(ProbeBatch(model, x, y, out, {}, step))}


@pytest.mark.parametrize("m", [0.5, 1.0, 0.0])
def test_binary_against_loop(m) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 1))
    x = torch.randn(40, 4)
    y = (torch.randn(40) > 0).long()
    recs = _records(Margin(margin=m), model, x, y)
    f = model(x).detach()[:, 0].tolist()
    deltas, n, loss = brute_force(f, [1 if v == 1 else -1 for v in y.tolist()], m)
    N = 4 * 7 + 7 * 1
    assert count_weights(model) == N
    assert recs["margin/n_delta"].item() == n
    assert recs["margin/n_delta_fraction"].item() == pytest.approx(n / 40)
    assert recs["margin/n_delta_per_weight"].item() == pytest.approx(n / N)
    assert recs["margin/loss"].item() == pytest.approx(loss, rel=1e-6)
    h = recs["margin/delta"]
    assert int(h.num) == 40 and float(h.min) == pytest.approx(min(deltas), rel=1e-6)
    assert float(h.max) == pytest.approx(max(deltas), rel=1e-6)


def test_pm1_float_labels_and_default_margin_half() -> None:
    f = torch.tensor([[0.7], [0.2], [-0.1], [-2.0]])
    y = torch.tensor([1.0, 1.0, -1.0, 1.0])
    delta = forces(f, y, 0.5)
    assert delta.tolist() == pytest.approx([-0.2, 0.3, 0.4, 2.5])
    assert Margin().margin == 0.5
    with pytest.raises(ValueError, match=r"\+-1"):
        forces(f, torch.tensor([0.3, 1.0, -1.0, 1.0]), 0.5)


def test_multiclass_margin_against_loop() -> None:
    torch.manual_seed(1)
    f = torch.randn(12, 4)
    y = torch.randint(0, 4, (12,))
    delta = forces(f, y, 1.0)
    for i in range(12):
        others = max(float(f[i, c]) for c in range(4) if c != int(y[i]))
        assert float(delta[i]) == pytest.approx(1.0 - (float(f[i, y[i]]) - others))
    with pytest.raises(ValueError, match="integer class labels"):
        forces(f, torch.randn(12), 1.0)
    with pytest.raises(ValueError, match="0..3"):
        forces(f, torch.full((12,), 4), 1.0)


def test_weights_exclude_biases_and_frozen() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 1))
    assert count_weights(model) == 15 + 5 + 5
    model[0].weight.requires_grad_(False)
    assert count_weights(model) == 10
    recs = _records(Margin(n_weights=100), model, torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert recs["margin/n_delta_per_weight"].item() == pytest.approx(recs["margin/n_delta"].item() / 100)


def test_errors() -> None:
    with pytest.raises(ValueError, match="margin"):
        Margin(margin=-1)
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="needs labels"):
        probes.attach(model, ["margin"], probe_data=torch.randn(4, 3), sinks=["memory"], strict=True)
    with pytest.raises(ValueError, match="NaN"):
        forces(torch.tensor([[float("nan")], [1.0]]), torch.tensor([0, 1]), 0.5)


def test_session_tags_and_training_reaches_zero() -> None:
    torch.manual_seed(2)
    x = torch.randn(30, 3)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    session = probes.attach(
        model, {"margin": {"every": 50, "margin": 1.0}}, probe_data=(x, y), sinks=["memory"], optimizer=opt, strict=True
    )
    ypm = 2.0 * y - 1
    for _ in range(120):
        delta = 1.0 - ypm * model(x)[:, 0]
        loss = 0.5 * delta.clamp(min=0).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    session.close()
    mem = session.memory
    assert {
        "margin/n_delta",
        "margin/n_delta_fraction",
        "margin/n_delta_per_weight",
        "margin/loss",
        "margin/delta",
    } <= mem.tags()
    n = mem.scalars()["margin/n_delta"]
    assert n[0][0] == 0 and n[0][1] > 0 and n[-1][1] == 0  # a separable problem gets fitted: no forces left
    assert mem.scalars()["margin/loss"][-1][1] == 0.0


@pytest.mark.parametrize("measure_at_attach", [True, False])
@pytest.mark.parametrize(
    "y, match",
    [
        (torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 2.0]), r"integer class labels.*y\.long\(\)"),  # float class labels
        (torch.tensor([0, 1, 5, 1, 0, 2]), r"0\.\.2 for 3 outputs, got 0\.\.5"),  # out of range of the 3 outputs
    ],
)
def test_labels_that_do_not_fit_the_outputs_raise_at_attach(y, match, measure_at_attach) -> None:
    """Knowable at attach (the at-attach pass gives the output width): attach raises, without strict too, and
    leaves no hook behind, instead of switching the probe off at step 0 with a warning."""
    from torch.nn.modules import module as hooks

    before = (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=match):
        probes.attach(
            model, ["margin"], probe_data=(torch.randn(6, 3), y), sinks=["memory"], measure_at_attach=measure_at_attach
        )
    assert (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks)) == before


def test_margin_follows_the_model() -> None:
    from probes import testing

    testing.check_follows_model(Margin, {}, move=lambda m: m.half())
