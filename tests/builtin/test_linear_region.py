"""Local affine maps (probes.autodiff.linear_region), the L_gen identity of seed 003, and the ``linear_region`` probe.

References: an explicit layer loop for the gates and the product ``W_L D_{L-1} W_{L-1} ... D_1 W_1`` for
``A(x)``; ``torch.autograd.functional.jacobian`` per sample for other layers; a naive re-implementation of
the probe's draws for its flip fractions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FunctionalMLP, SharedReluMLP
from conftest import load_script as _load
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes.autodiff.linear_region import MAX_POOLS, check_piecewise_linear, local_affine_map
from probes.builtin.linear_region import region_patterns
from probes.functional.linear_region import (
    NotPiecewiseLinearError,
    l_gen,
    patterns_differ,
    perturb_inputs,
    perturb_params,
)
from probes.testing import probe_batch

ROOT = Path(__file__).resolve().parents[2]
HYP = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ------------------------------------------------------------------------------------------------
# references: explicit MLP loops
# ------------------------------------------------------------------------------------------------
def make_mlp(seed: int, sizes: list[int], slope: float, bias: bool) -> nn.Sequential:
    """Linear / (ReLU if slope == 0 else LeakyReLU(slope)) / ... / Linear, float64."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU() if slope == 0 else nn.LeakyReLU(slope))
    return nn.Sequential(*layers).double()


def weights(params: dict[str, torch.Tensor], n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    linear_idx = [2 * i for i in range(n_layers)]
    return [(params[f"{k}.weight"], params.get(f"{k}.bias")) for k in linear_idx]


def ref_forward(params, n_layers: int, slope: float, x: torch.Tensor):
    """Output (P, C), gates [(P, n_l)], and A(x) (P, C, D) as the product of gated weight matrices."""
    ws = weights(params, n_layers)
    h, gates = x, []
    A = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    for i, (W, b) in enumerate(ws):
        pre = h @ W.T + (b if b is not None else 0.0)
        A = W @ A
        if i < n_layers - 1:
            gate = pre > 0
            gates.append(gate)
            d = torch.where(gate, torch.ones((), dtype=x.dtype), torch.tensor(slope, dtype=x.dtype))
            h = pre * d
            A = d[:, :, None] * A
        else:
            h = pre
    return h, gates, A


def same_gates(g1, g2) -> torch.Tensor:
    return torch.stack([(a == b).all(dim=1) for a, b in zip(g1, g2)]).all(dim=0)


def net_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@st.composite
def nets(draw, bias: bool | None = None):
    depth = draw(st.integers(1, 3))
    sizes = [draw(st.integers(2, 5))] + [draw(st.integers(2, 6)) for _ in range(depth)] + [draw(st.integers(1, 3))]
    slope = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3]))
    b = draw(st.booleans()) if bias is None else bias
    seed = draw(st.integers(0, 10**6))
    return make_mlp(seed, sizes, slope, b), sizes, slope, seed


# ------------------------------------------------------------------------------------------------
# the local affine map
# ------------------------------------------------------------------------------------------------
@HYP
@given(nets(), st.integers(1, 6))
def test_affine_map_matches_gated_product_and_reconstructs_f(net, P) -> None:
    model, sizes, slope, seed = net
    x = torch.randn(P, sizes[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    A, c, f = local_affine_map(model, x)
    f_ref, _, A_ref = ref_forward(net_params(model), len(sizes) - 1, slope, x)
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.einsum("pcd,pd->pc", A, x) + c, f, rtol=1e-12, atol=1e-12)
    if model[0].bias is None:  # positive homogeneity: no offset without biases
        assert c.abs().max() <= 1e-12 * (1 + f.abs().max())


@HYP
@given(nets(bias=True), st.integers(1, 4))
def test_offset_comes_from_the_biases(net, P) -> None:
    """With biases ``c`` is not zero (the bias-free statement can fail); zeroing every bias makes it zero."""
    model, sizes, slope, seed = net
    x = torch.randn(P, sizes[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    no_bias = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert local_affine_map(model, x, params=no_bias).c.abs().max() <= 1e-12
    assume(bool(model[-1].bias.abs().min() > 1e-3))
    assert local_affine_map(model, x).c.abs().max() > 1e-9


def test_affine_map_of_conv_pool_batchnorm_against_per_sample_jacobian() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.LeakyReLU(0.2),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4, 3),
        nn.ReLU6(),
        nn.Linear(3, 2),
    ).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    A, c, f = local_affine_map(model, x, chunk_size=2)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], x[i]).reshape(2, -1)
        torch.testing.assert_close(A[i], J, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.einsum("pcd,pd->pc", A, x.reshape(5, -1)) + c, f, rtol=1e-12, atol=1e-12)
    # in the region of x the map is exact: a tiny step that keeps every pattern moves f by A x'
    _, pats = region_patterns(probe_batch(model, x, site_types=MAX_POOLS), x)
    xp = 1e-7 * torch.randn_like(x)
    f2, pats2 = region_patterns(probe_batch(model, x, site_types=MAX_POOLS), x + xp)
    assert not patterns_differ(pats, pats2).any()
    torch.testing.assert_close(f2 - f, torch.einsum("pcd,pd->pc", A, xp.reshape(5, -1)), rtol=1e-7, atol=1e-16)
    assert set(pats) == {"2", "3", "5", "10"} and pats["3"].dtype == torch.int64  # max pool: argmax indices
    assert pats["10"].shape == (5, 3, 2)  # ReLU6: both kinks


def test_jacfwd_branch_when_outputs_outnumber_inputs() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 9), nn.ReLU(), nn.Linear(9, 7)).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    A, c, f = local_affine_map(model, x)
    assert A.shape == (4, 7, 2)
    _, _, A_ref = ref_forward(net_params(model), 2, 0.0, x)
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the identity L_gen = (A(x, P*) - A(x, P)) x'
# ------------------------------------------------------------------------------------------------
def _perturbation(model, sizes, seed, scale_x, scale_p, x):
    g = torch.Generator().manual_seed(seed + 1)
    xp = scale_x * torch.randn(x.shape, dtype=x.dtype, generator=g)
    params = net_params(model)
    pstar = {n: p + scale_p * torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in params.items()}
    return xp, params, pstar


def _l_gen_and_axp(model, sizes, slope, x, xp, params, pstar):
    n = len(sizes) - 1
    f_x_p, g_x_p, _ = ref_forward(params, n, slope, x)
    f_x_ps, g_x_ps, _ = ref_forward(pstar, n, slope, x)
    f_xs_p, g_xs_p, _ = ref_forward(params, n, slope, x + xp)
    f_xs_ps, g_xs_ps, _ = ref_forward(pstar, n, slope, x + xp)
    keep = same_gates(g_x_p, g_xs_p) & same_gates(g_x_ps, g_xs_ps)
    lg = l_gen(f_x_p, f_x_ps, f_xs_p, f_xs_ps)
    A_p = local_affine_map(model, x).A
    A_ps = local_affine_map(model, x, params=pstar).A
    axp = torch.einsum("pcd,pd->pc", A_ps - A_p, xp)
    return keep, lg, axp


@HYP
@given(nets(), st.integers(1, 6), st.floats(1e-7, 1e-2), st.floats(1e-7, 1e-1))
def test_l_gen_equals_a_prime_x_prime_when_gates_agree(net, P, scale_x, scale_p) -> None:
    model, sizes, slope, seed = net
    x = torch.randn(P, sizes[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    xp, params, pstar = _perturbation(model, sizes, seed, scale_x, scale_p, x)
    keep, lg, axp = _l_gen_and_axp(model, sizes, slope, x, xp, params, pstar)
    assume(bool(keep.any()))
    f_max = ref_forward(params, len(sizes) - 1, slope, x)[0].abs().max()
    scale = 1e-12 * (1 + lg.abs().max() + axp.abs().max() + f_max)
    assert (lg[keep] - axp[keep]).abs().max() <= scale
    # biases cancel: within one parameter set, x and x* share the offset c
    for ps in (params, pstar):
        c_x = local_affine_map(model, x, params=ps).c
        c_xs = local_affine_map(model, x + xp, params=ps).c
        assert (c_x[keep] - c_xs[keep]).abs().max() <= 1e-12 * (1 + c_x.abs().max())


@HYP
@given(nets(), st.floats(0.01, 0.2))
def test_identity_fails_once_a_gate_flips(net, scale_p) -> None:
    """Walking x* = x + s v away from x: the identity holds while gates agree and breaks after a flip."""
    model, sizes, slope, seed = net
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, sizes[0], dtype=torch.float64, generator=g)
    v = -x + 0.5 * torch.randn(x.shape, dtype=x.dtype, generator=g)
    params = net_params(model)
    pstar = {
        n: p + scale_p * p.norm() / math.sqrt(p.numel()) * torch.randn(p.shape, dtype=p.dtype, generator=g)
        for n, p in params.items()
    }
    A_p = local_affine_map(model, x).A
    assume(bool(A_p.abs().max() > 1e-6))  # a net dead at x has nothing to show
    flipped_residuals, kept = [], 0
    for s in np.geomspace(1e-4, 20.0, 40):
        xp = s * v
        keep, lg, axp = _l_gen_and_axp(model, sizes, slope, x, xp, params, pstar)
        residual = float((lg - axp).abs().max())
        if bool(keep.all()):
            kept += 1
            assert residual <= 1e-11 * (1 + float(lg.abs().max()))
        else:
            flipped_residuals.append(residual / (1 + float(lg.abs().max())))
    assume(flipped_residuals)
    assert kept > 0
    assert max(flipped_residuals) > 1e-8  # not vacuous: with a flip, L_gen != A'x'


def test_identity_fails_for_a_constructed_flip() -> None:
    """f(x) = relu(w x): P = {w = 1}, P* = {w = 2}, x = 1, x' = -2 crosses the kink under both."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
    x, xp = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[-2.0]], dtype=torch.float64)
    params = net_params(model)
    pstar = dict(params, **{"0.weight": torch.tensor([[2.0]], dtype=torch.float64)})
    keep, lg, axp = _l_gen_and_axp(model, [1, 1, 1], 0.0, x, xp, params, pstar)
    assert not bool(keep.any())
    assert float(lg) == -1.0 and float(axp) == -2.0  # (1 - 2) - (0 - 0) against (2 - 1) * (-2)


# ------------------------------------------------------------------------------------------------
# the check: an error naming the module
# ------------------------------------------------------------------------------------------------
class TanhInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.block(x))


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h * h


class MyRelu(nn.Module):
    def forward(self, x):
        return x.clamp(min=0)


class SinInChild(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class ExpAfterChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

    def forward(self, x):
        return torch.exp(self.child(x))  # called by the root after its child returned


def test_a_smooth_call_is_named_by_the_module_whose_forward_makes_it_without_reading_frames(monkeypatch) -> None:
    """The trace names the innermost running module from a stack kept by module hooks: the nested child, then the
    root once the child has returned; no call frame is read, and no hook is left behind."""
    real, reads = sys._getframe, []
    monkeypatch.setattr(sys, "_getframe", lambda depth=0: reads.append(depth) or real(depth + 1))
    nested = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Identity(), SinInChild()))
    with pytest.raises(NotPiecewiseLinearError, match=r"sin in the forward of '1\.1'"):
        check_piecewise_linear(nested, torch.randn(4, 3), allow=(SinInChild,))
    after = ExpAfterChild()
    with pytest.raises(NotPiecewiseLinearError, match=r"exp in the forward of '<root>'"):
        check_piecewise_linear(after, torch.randn(4, 3), allow=(ExpAfterChild,))
    assert reads == []
    for m in (*nested.modules(), *after.modules()):
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize(
    "model, match",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), r"'1' \(Tanh\)"),
        (nn.Sequential(nn.Linear(3, 4), nn.GELU()), r"'1' \(GELU\)"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softplus()), r"'1' \(Softplus\)"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), r"'1' \(LayerNorm\)"),
        (TanhInForward(), r"tanh in the forward of '<root>'"),
        (Square(), "second derivative"),
        (nn.Sequential(nn.Linear(3, 4), MyRelu()), r"'1' \(MyRelu\)"),
    ],
)
def test_not_piecewise_linear_is_an_error_naming_the_module(model, match) -> None:
    with pytest.raises(NotPiecewiseLinearError, match=match):
        check_piecewise_linear(model, torch.randn(4, 3))
    with pytest.raises(NotPiecewiseLinearError, match=match):
        probes.attach(
            model, ["linear_region"], probe_data=(torch.randn(6, 3), torch.arange(6) % 2), sinks=["memory"], strict=True
        )


def test_allow_and_modes() -> None:
    model = nn.Sequential(nn.Linear(3, 4), MyRelu(), nn.Linear(4, 2))
    check_piecewise_linear(model, torch.randn(4, 3), allow=(MyRelu,))
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.ReLU())
    with pytest.raises(NotPiecewiseLinearError, match="random in training mode"):
        local_affine_map(drop, torch.randn(2, 3))
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(NotPiecewiseLinearError, match="batch statistics"):
        local_affine_map(bn, torch.randn(2, 3))
    running = bn[1].running_mean.clone()
    check_piecewise_linear(bn, torch.randn(5, 3), assume_eval=True)  # the probe's view at attach
    assert bn.training and torch.equal(bn[1].running_mean, running)  # modes and buffers untouched
    bn.eval()
    local_affine_map(bn, torch.randn(2, 3))


# ------------------------------------------------------------------------------------------------
# the probe
# ------------------------------------------------------------------------------------------------
def bit_rate(g0, g1) -> float:
    flipped = sum(int(a != b) for s0, s1 in zip(g0, g1) for a, b in zip(s0.flatten().tolist(), s1.flatten().tolist()))
    return flipped / sum(s.numel() for s in g0)


def naive_flip_fractions(model, slope, sizes, x, eps, delta, seed):
    """Replays the probe's draws (same generator, same order) with the explicit MLP loop."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    n = len(sizes) - 1
    x = x.double()
    _, g0, _ = ref_forward(params, n, slope, x)
    out = {}
    for e in eps:
        u = torch.randn(x.shape, generator=g, dtype=x.dtype)
        xp = u / u.norm(dim=1, keepdim=True) * (e * x.norm(dim=1, keepdim=True))
        g1 = ref_forward(params, n, slope, x + xp)[1]
        out[f"linear_region/flip_fraction_eps_{e:g}"] = float((~same_gates(g0, g1)).double().mean())
        out[f"linear_region/gate_flip_rate_eps_{e:g}"] = bit_rate(g0, g1)
    for d in delta:
        ps = {}
        for name, p in params.items():
            u = torch.randn(p.shape, generator=g, dtype=p.dtype)
            ps[name] = p + u * (d * p.norm() / u.norm())
        g1 = ref_forward(ps, n, slope, x)[1]
        out[f"linear_region/flip_fraction_delta_{d:g}"] = float((~same_gates(g0, g1)).double().mean())
        out[f"linear_region/gate_flip_rate_delta_{d:g}"] = bit_rate(g0, g1)
    return out


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_probe_flip_fractions_match_naive_replay(slope) -> None:
    sizes = [6, 10, 8, 3]
    model = make_mlp(5, sizes, slope, True).float()
    x = torch.randn(200, 6)
    eps, delta = (1e-3, 3e-2, 0.3), (1e-2, 0.2)
    session = probes.attach(
        model,
        {"linear_region": {"eps": eps, "delta": delta, "seed": 7, "dtype": "float64"}},
        probe_data=(x, torch.arange(200) % 3),
        sinks=["memory"],
        strict=True,
    )
    mem = session.memory
    expected = naive_flip_fractions(model, slope, sizes, x, eps, delta, 7)
    for tag, value in expected.items():
        assert mem.last(tag) == pytest.approx(value, abs=1e-12), tag
    assert 0 < expected["linear_region/flip_fraction_eps_0.3"]  # the check can fail
    tags = mem.tags()
    assert {"linear_region/flip_fraction", "linear_region/l_gen", "linear_region/identity_error"} <= tags
    assert "linear_region/a_prime_x_prime" not in tags  # equal to l_gen: not written twice
    assert mem.last("linear_region/identity_error") < 1e-12 * (1 + mem.last("linear_region/l_gen"))
    assert 0 <= mem.last("linear_region/flip_fraction") <= 1
    session.close()


def test_probe_joint_quantities_against_reference() -> None:
    sizes = [4, 7, 5, 2]
    model = make_mlp(11, sizes, 0.0, True)
    x = torch.randn(50, 4, dtype=torch.float64)
    probe = probes.plugins.probe_class("linear_region")(eps=(0.05,), delta=(0.05,), seed=3)
    batch = probe_batch(model, x)
    probe.check(batch)
    records = {r.tag: r.item() for r in probe.measure(batch)}
    g = torch.Generator().manual_seed(3)
    xp = perturb_inputs(x, 0.05, g)
    params = net_params(model)
    pstar = perturb_params(params, list(params), 0.05, g)
    keep, lg, axp = _l_gen_and_axp(model, sizes, 0.0, x, xp, params, pstar)
    assert 0 < keep.sum() < 50  # some samples keep their gates, some do not
    assert records["linear_region/flip_fraction"] == pytest.approx(1 - keep.double().mean().item(), abs=1e-12)
    assert records["linear_region/l_gen"] == pytest.approx(lg[keep].norm(dim=1).mean().item(), rel=1e-10)
    assert records["linear_region/l_gen"] == pytest.approx(axp[keep].norm(dim=1).mean().item(), rel=1e-10)
    # on the flipped samples the identity does not hold, so averaging them in would differ
    assert not torch.allclose(lg[~keep], axp[~keep])


def test_perturbation_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    x[2] = 0
    xp = perturb_inputs(x, 0.1, g)
    norms = xp.reshape(7, -1).norm(dim=1)
    expected = x.reshape(7, -1).norm(dim=1) * 0.1
    expected[2] = 0.1
    torch.testing.assert_close(norms, expected)
    p = {"w": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64)}
    pp = perturb_params(p, ["w"], 0.02, g)
    assert (pp["w"] - p["w"]).norm() == pytest.approx(0.02 * p["w"].norm().item())
    assert pp["b"] is p["b"]


def test_probe_on_functional_relu_and_shared_relu_sites() -> None:
    for model, d in ((FunctionalMLP(), 6), (SharedReluMLP(), 12)):
        x = torch.randn(40, d)
        session = probes.attach(
            model,
            {"linear_region": {"eps": (1e-2,), "delta": (1e-2,)}},
            probe_data=(x, torch.arange(40) % 2),
            sinks=["memory"],
            strict=True,
        )
        assert session.memory.last("linear_region/identity_error") < 1e-10
        _, pats = region_patterns(
            probe_batch(model, x), x.double(), {n: t.double() for n, t in model.state_dict().items()}
        )
        assert len(pats) == 3  # three functional sites / three calls of the shared ReLU
        session.close()


def test_relu6_second_kink_counts_as_a_flip() -> None:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU6(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
    batch = probe_batch(model, torch.zeros(1, 1, dtype=torch.float64))
    _, a = region_patterns(batch, torch.tensor([[5.9]], dtype=torch.float64))
    _, b = region_patterns(batch, torch.tensor([[6.1]], dtype=torch.float64))
    _, c = region_patterns(batch, torch.tensor([[3.0]], dtype=torch.float64))
    assert bool(patterns_differ(a, b)) and not bool(patterns_differ(a, c))


def test_probe_leaves_training_bit_identical() -> None:
    def run(with_probe: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xs, ys = torch.randn(4, 16, 5), torch.randint(0, 3, (4, 16))
        session = None
        if with_probe:
            session = probes.attach(
                model,
                {"linear_region": {"every": 1}},
                probe_data=(xs[0], ys[0]),
                sinks=["memory"],
                optimizer=opt,
                strict=True,
            )
        for x, y in zip(xs, ys):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if session is not None:
            assert len(session.memory.scalars()["linear_region/flip_fraction"]) == 5
            session.close()
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), model.training

    p0, rng0, t0 = run(False)
    p1, rng1, t1 = run(True)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert torch.equal(rng0, rng1) and t0 and t1


def test_probe_options_are_checked() -> None:
    cls = probes.plugins.probe_class("linear_region")
    with pytest.raises(ValueError, match="eps"):
        cls(eps=())
    with pytest.raises(ValueError, match="delta"):
        cls(delta=(-1.0,))
    with pytest.raises(ValueError, match="dtype"):
        cls(dtype="int32")
    with pytest.raises(TypeError, match="probe batch"):
        probes.attach(
            nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
            ["linear_region"],
            probe_data=(torch.arange(4).reshape(2, 2), None),
            strict=True,
        )


# ------------------------------------------------------------------------------------------------
# the example
# ------------------------------------------------------------------------------------------------
def test_spearman_with_ties_against_scipy() -> None:
    example = _load(ROOT / "examples" / "relu_zeros_at_init.py", "_example_relu_zeros_at_init")
    stats = pytest.importorskip("scipy.stats")
    a = [0.3, 0.1, 0.1, 0.5, 0.2, 0.5, 0.9]
    b = [1.0, 2.0, 2.0, 0.5, 3.0, 0.7, 0.1]
    assert example.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    np.testing.assert_allclose(example.rankdata(np.array(a)), stats.rankdata(a))


def test_example_smoke(tmp_path: Path) -> None:
    example = _load(ROOT / "examples" / "relu_zeros_at_init.py", "_example_relu_zeros_at_init")
    result = example.main(["--smoke", "--logdir", str(tmp_path)])
    assert Path(result["png"]).is_file()
    rows = result["rows"]
    assert len(rows) >= 3 and all(0 < r["zero_fraction"] < 1 and 0 <= r["acc"] <= 1 for r in rows)
    assert -1 <= result["spearman"] <= 1
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == len(rows) and all(any(p.glob("events.out.tfevents*")) for p in runs)


def test_probe_in_the_model_dtype_and_under_no_grad() -> None:
    """``dtype=None`` works in float32 (L_gen then sits at the rounding level, hence the float64 default)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(64, 5)
    with torch.no_grad():
        s32 = probes.attach(model, {"linear_region": {"dtype": None}}, probe_data=x, sinks=["memory"], strict=True)
        s64 = probes.attach(model, ["linear_region"], probe_data=x, sinks=["memory"], strict=True)
    for tag in ("linear_region/flip_fraction_eps_0.1", "linear_region/flip_fraction_delta_0.1"):
        assert 0 < s32.memory.last(tag) < 1 and 0 < s64.memory.last(tag) < 1  # draws differ between dtypes
    # rounding of four float64 forwards and two jvp (a few u per layer), as the other tests bound it; float32 is
    # some 1e8 times larger
    assert s64.memory.last("linear_region/identity_error") < 1e-12 * (1 + s64.memory.last("linear_region/l_gen"))
    assert s32.memory.last("linear_region/identity_error") > s64.memory.last("linear_region/identity_error")
    s32.close()
    s64.close()


# ------------------------------------------------------------------------------------------------
# identity modules and the dtype choice (issue 13, item 5)
# ------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """A CIFAR ResNet block: the shortcut is an empty ``nn.Sequential()`` unless it downsamples; one in-place
    ReLU module called twice."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, 1, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        BasicBlock(4, 4),
        BasicBlock(4, 6, 2),
        nn.Identity(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the defaults
            model(torch.randn(16, 3, 6, 6))
    return model


def test_identity_modules_are_piecewise_linear() -> None:
    """The empty ``nn.Sequential()`` shortcut of a standard ResNet block (rejected before as 'not a known
    piecewise-linear layer') and ``nn.Identity`` pass the check, and the probe measures the net."""
    model = tiny_resnet()
    check_piecewise_linear(model, torch.randn(4, 3, 6, 6), assume_eval=True)
    check_piecewise_linear(nn.Sequential(nn.Linear(3, 3), nn.Sequential(), nn.ReLU(), nn.Identity()), torch.randn(2, 3))
    x = torch.randn(40, 3, 6, 6)
    opts = {"eps": (1e-7, 1e-2), "delta": (1e-7, 1e-2), "dtype": "float64"}
    session = probes.attach(model, {"linear_region": opts}, probe_data=x, sinks=["memory"], strict=True)
    mem = session.memory
    assert mem.last("linear_region/flip_fraction") < 1  # some samples keep their regions at 1e-7
    assert mem.last("linear_region/identity_error") <= 1e-12 * (1 + mem.last("linear_region/l_gen"))
    assert 0 <= mem.last("linear_region/flip_fraction_eps_0.01") <= 1
    session.close()
    # a container with children is not a leaf: its children are judged
    with pytest.raises(NotPiecewiseLinearError, match=r"'1.0' \(Tanh\)"):
        check_piecewise_linear(nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh())), torch.randn(2, 3))


def test_auto_dtype_sweeps_in_the_model_dtype_and_checks_the_identity_in_float64(caplog) -> None:
    """Default ``dtype="auto"`` on a float32 model: the per-size flip fractions are those of a float32 run
    (``dtype=None``: same draws, same dtype), the joint quantities those of float64 copies of the same draws, and
    the choice is logged once."""
    import copy
    import logging

    sizes = [6, 10, 8, 3]
    model = make_mlp(5, sizes, 0.0, True).float()
    x = torch.randn(200, 6)
    eps, delta = (2e-3, 3e-2, 0.3), (2e-3, 0.2)
    opts = {"eps": eps, "delta": delta, "seed": 7}
    with caplog.at_level(logging.INFO, logger="probes.linear_region"):
        auto = probes.attach(model, {"linear_region": opts}, probe_data=x, sinks=["memory"], strict=True)
        auto.measure()
    said = [r.getMessage() for r in caplog.records if r.name == "probes.linear_region"]
    assert len(said) == 1 and "in float32" in said[0] and "in float64" in said[0] and "L_gen" in said[0]
    f32 = probes.attach(model, {"linear_region": dict(opts, dtype=None)}, probe_data=x, sinks=["memory"], strict=True)
    a, b = auto.memory, f32.memory
    swept = [t for t in a.tags() if "_eps_" in t or "_delta_" in t]
    assert len(swept) == 2 * (len(eps) + len(delta))
    for tag in swept:
        assert a.last(tag) == b.last(tag), tag
    # the joint quantities: float64 copies of the float32 draws (first eps, first delta)
    g = torch.Generator().manual_seed(7)
    xp = perturb_inputs(x, eps[0], g)
    for e in eps[1:]:
        perturb_inputs(x, e, g)
    p32 = {n: p.detach() for n, p in model.named_parameters()}
    pstar = perturb_params(p32, list(p32), delta[0], g)
    m64 = copy.deepcopy(model).double()
    keep, lg, axp = _l_gen_and_axp(
        m64, sizes, 0.0, x.double(), xp.double(), net_params(m64), {n: t.double() for n, t in pstar.items()}
    )
    assert 0 < keep.sum() < 200
    assert a.last("linear_region/flip_fraction") == pytest.approx(1 - keep.double().mean().item(), abs=1e-12)
    assert a.last("linear_region/l_gen") == pytest.approx(lg[keep].norm(dim=1).mean().item(), rel=1e-10)
    assert a.last("linear_region/identity_error") < 1e-12 * (1 + a.last("linear_region/l_gen"))
    assert b.last("linear_region/identity_error") > 1e3 * a.last("linear_region/identity_error")  # float32: rounding
    auto.close()
    f32.close()


def test_dtype_of_a_float64_model_and_explicit_dtypes(caplog) -> None:
    import logging

    model = make_mlp(3, [4, 6, 2], 0.0, True)  # float64
    probe = probes.plugins.probe_class("linear_region")()
    assert probe.dtypes(model, torch.randn(2, 4)) == (torch.float64, torch.float64)
    assert probe.dtypes(model.float(), torch.randn(2, 4)) == (torch.float32, torch.float64)
    cls = probes.plugins.probe_class("linear_region")
    assert cls(dtype=None).dtypes(model.float(), torch.randn(2, 4)) == (torch.float32, torch.float32)
    assert cls(dtype="float64").dtypes(model.float(), torch.randn(2, 4)) == (torch.float64, torch.float64)
    assert cls(dtype=torch.float64).dtypes(model.float(), torch.randn(2, 4)) == (torch.float64, torch.float64)
    with caplog.at_level(logging.INFO, logger="probes.linear_region"):
        s = probes.attach(
            model.double(),
            ["linear_region"],
            probe_data=torch.randn(20, 4, dtype=torch.float64),
            sinks=["memory"],
            strict=True,
        )
    said = [r.getMessage() for r in caplog.records if r.name == "probes.linear_region"]
    assert said == ["linear_region: everything in float64 (the model's dtype)."]
    s.close()


@pytest.mark.parametrize(
    "options, error, match",
    [
        (
            {"eps": "0.1"},
            TypeError,
            "linear_region: option 'eps' must be a positive finite number or a non-empty sequence of them, got '0.1'",
        ),
        ({"eps": ()}, ValueError, "option 'eps'"),
        ({"eps": (0.1, "0.2")}, TypeError, "option 'eps'"),
        ({"eps": (0.1, float("nan"))}, ValueError, "option 'eps'"),
        ({"eps": True}, TypeError, "option 'eps'"),
        ({"delta": (-1.0,)}, ValueError, "option 'delta'"),
        ({"delta": float("inf")}, ValueError, "option 'delta'"),
        ({"delta": None}, TypeError, "option 'delta'"),
        ({"seed": 1.5}, TypeError, "linear_region: option 'seed' must be a non-negative int below 2..63, got 1.5"),
        ({"seed": "0"}, TypeError, "option 'seed'"),
        ({"seed": -1}, ValueError, "option 'seed'"),
        ({"seed": True}, TypeError, "option 'seed'"),
        ({"dtype": "int32"}, ValueError, "linear_region: option 'dtype'"),
        ({"dtype": "double64"}, ValueError, "option 'dtype'"),
        ({"dtype": torch.int64}, ValueError, "option 'dtype'"),
        ({"dtype": 64}, TypeError, "option 'dtype'"),
        ({"max_samples": 0}, ValueError, "option 'max_samples'"),
        (
            {"max_samples": 2.7},
            TypeError,
            "linear_region: option 'max_samples' must be None or a positive int, got 2.7",
        ),
        ({"max_samples": "10"}, TypeError, "option 'max_samples'"),
        ({"max_samples": True}, TypeError, "option 'max_samples'"),
        ({"allow": "MyRelu"}, TypeError, "linear_region: option 'allow'"),
        ({"allow": (int,)}, TypeError, "option 'allow'"),
        ({"allow": MyRelu()}, TypeError, "option 'allow'"),
    ],
)
def test_every_option_is_checked_at_construction(options, error, match) -> None:
    cls = probes.plugins.probe_class("linear_region")
    with pytest.raises(error, match=match.replace("(", "\\(").replace(")", "\\)")):
        cls(**options)
    with pytest.raises(error, match="linear_region"):  # and through attach, before anything runs
        probes.attach(
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
            {"linear_region": options},
            probe_data=torch.randn(6, 3),
            sinks=["memory"],
        )


def test_good_options_are_normalised() -> None:
    cls = probes.plugins.probe_class("linear_region")
    p = cls(
        eps=0.5, delta=np.array([1e-3, 1e-2]), seed=np.int64(3), dtype="float32", max_samples=np.int32(7), allow=MyRelu
    )
    assert p.eps == (0.5,) and p.delta == (1e-3, 1e-2) and p.seed == 3 and p.dtype == torch.float32
    assert p.max_samples == 7 and type(p.max_samples) is int and p.allow == (MyRelu,)
    assert cls(allow=[MyRelu, nn.Tanh]).allow == (MyRelu, nn.Tanh) and cls().dtype == "auto"


@pytest.mark.parametrize("dtype", ["auto", None])
def test_linear_region_follows_the_model(dtype) -> None:
    from probes import testing

    testing.check_follows_model(
        probes.plugins.probe_class("linear_region"),
        {"eps": (0.01,), "delta": (0.01,), "dtype": dtype},
        move=lambda m: m.double(),
    )
