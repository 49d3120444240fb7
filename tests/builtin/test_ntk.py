"""The empirical NTK (probes.autodiff.ntk), its eigen statistics (probes.functional.spectra) and the ``ntk`` probe.

References: ``torch.func`` ``vmap(jacrev)`` contraction over every parameter, and a naive per-sample
autograd loop; numpy for the eigen statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script as _load
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap

import probes
from probes.autodiff.ntk import SampleMixingError, empirical_ntk, ntk_plan
from probes.functional.ntk.settings import NTKSettings
from probes.functional.spectra import condition_number, effective_rank, kernel_distance, label_alignment, spectrum
from probes.kernels import DegenerateKernelError
from probes.probe import ProbeBatch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def jacobian_rows(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(P, C, n_params) per-sample Jacobians of every trainable parameter, by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p, xi):
        return functional_call(model, p, (xi[None],)).reshape(-1)

    j = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    P = x.shape[0]
    return torch.cat([v.reshape(P, v.shape[1], -1) for v in j.values()], dim=2)


def ntk_func(model: nn.Module, x: torch.Tensor, mode: str = "trace") -> torch.Tensor:
    J = jacobian_rows(model, x)
    P, C, _ = J.shape
    if mode == "trace":
        return torch.einsum("icn,jcn->ij", J, J)
    return torch.einsum("ian,jbn->iajb", J, J).reshape(P * C, P * C)


def ntk_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Trace NTK from one autograd.grad per sample and output (no torch.func)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        per_c = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
            for c in range(out.numel())
        ]
        rows.append(torch.stack(per_c))
    J = torch.stack(rows)
    return torch.einsum("icn,jcn->ij", J, J)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


ACTS = {"tanh": nn.Tanh, "erf": Erf, "relu": nn.ReLU}


def mlp(sizes, act="tanh", bias=True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).double()


class TwiceLinear(nn.Module):
    """One nn.Linear called twice per sample (weight sharing)."""

    def __init__(self, d=5, out=3, bias=True) -> None:
        super().__init__()
        self.shared = nn.Linear(d, d, bias=bias)
        self.head = nn.Linear(d, out, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h) + x)
        return self.head(h)


class SequenceModel(nn.Module):
    """A Linear applied over a sequence axis (input P x T x d), mean-pooled, then a head."""

    def __init__(self, d=4, width=6, out=2) -> None:
        super().__init__()
        self.embed = nn.Linear(d, width)
        self.head = nn.Linear(width, out)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


class ConvNorm(nn.Module):
    """Conv2d and LayerNorm (torch.func path) between Linear layers (fast path): the mixed path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.LayerNorm(3 * 4 * 4)
        self.fc = nn.Linear(48, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        h = self.norm(torch.relu(self.conv(x)).flatten(1))
        return self.out(torch.tanh(self.fc(h)))


class FunctionalReuse(nn.Module):
    """Uses a Linear's weight outside the Linear (F.linear): it must leave the fast path."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(nn.functional.linear(h, self.a.weight))
        return self.b(h)


class Tied(nn.Module):
    """An Embedding and an output Linear sharing one weight (tied weights)."""

    def __init__(self, vocab=7, d=5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx).mean(1))))


class InPlaceAfterLinear(nn.Module):
    """ReLU(inplace=True) right after a Linear: the recorded layer outputs must not be overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)
        )

    def forward(self, x):
        return self.net(x)


class BatchFirstFalse(nn.Module):
    """A Linear that sees (T, P, d): the sample axis is not first, so it must go through torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):  # x: (P, T, 3)
        h = torch.tanh(self.lin(x.transpose(0, 1)))  # (T, P, 4)
        return self.head(h.sum(0))


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "erf", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out", [1, 3])
def test_mlp_equals_torch_func(act, bias, out) -> None:
    torch.manual_seed(0)
    model = mlp([6, 9, 7, out], act, bias)
    x = torch.randn(11, 6, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert set(plan.fast) == {"0", "2", "4"} and plan.fallback == []
    assert_close(empirical_ntk(model, x), ntk_func(model, x))
    assert_close(empirical_ntk(model, x, mode="full"), ntk_func(model, x, "full"))
    assert_close(empirical_ntk(model, x, reduction="mean"), ntk_func(model, x) / out)


@pytest.mark.parametrize("method", ["auto", "pairs", "outer"])
def test_linear_called_twice_sums_over_pairs_of_calls(method) -> None:
    settings = NTKSettings(pairs_method=method)
    torch.manual_seed(1)
    for bias in (True, False):
        model = TwiceLinear(bias=bias).double()
        x = torch.randn(9, 5, dtype=torch.float64)
        assert ntk_plan(model, x).fast == {"shared": 2, "head": 1}
        ref = ntk_func(model, x)
        assert_close(empirical_ntk(model, x, settings=settings), ref)
        assert_close(empirical_ntk(model, x, mode="full", settings=settings), ntk_func(model, x, "full"))


def test_no_cross_terms_would_be_wrong() -> None:
    """The diagonal-calls-only formula (what nngeometry does) differs from the exact kernel here."""
    torch.manual_seed(2)
    model = TwiceLinear(bias=False).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    ref = ntk_func(model, x)
    zs, gs = [], []
    h = model.shared.register_forward_hook(lambda m, a, o: zs.append((a[0].detach(), o)))
    out = model(x)
    h.remove()
    for c in range(out.shape[1]):
        gs.append(torch.autograd.grad(out[:, c].sum(), [o for _, o in zs], retain_graph=True))
    diag_only = sum(((g[k] @ g[k].T) * (zs[k][0] @ zs[k][0].T)) for g in gs for k in range(2))
    J_head = jacobian_rows(model, x)[:, :, model.shared.weight.numel() :]
    diag_only = diag_only + torch.einsum("icn,jcn->ij", J_head, J_head)
    assert float((diag_only - ref).abs().max()) > 1e-3 * float(ref.abs().max())
    assert_close(empirical_ntk(model, x), ref)


@pytest.mark.parametrize("method", ["auto", "pairs", "outer"])
def test_linear_over_sequence_axis(method) -> None:
    settings = NTKSettings(pairs_method=method)
    torch.manual_seed(3)
    model = SequenceModel().double()
    x = torch.randn(7, 5, 4, dtype=torch.float64)
    assert ntk_plan(model, x).fast == {"embed": 1, "head": 1}
    assert_close(empirical_ntk(model, x, settings=settings), ntk_func(model, x))
    assert_close(empirical_ntk(model, x, mode="full", settings=settings), ntk_func(model, x, "full"))


class ScaledConvNorm(ConvNorm):
    """ConvNorm with a raw parameter used in ``forward`` (no layerwise formula): the mixed path."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 48))

    def forward(self, x):
        h = self.norm(torch.relu(self.conv(x)).flatten(1)) * self.gain
        return self.out(torch.tanh(self.fc(h)))


def test_conv_and_layernorm_mixed_path() -> None:
    torch.manual_seed(4)
    model = ConvNorm().double()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert set(plan.fast) == {"conv", "norm", "fc", "out"} and plan.fallback == []
    assert plan.kinds == {"conv": "Conv2d", "norm": "LayerNorm", "fc": "Linear", "out": "Linear"}
    assert_close(empirical_ntk(model, x), ntk_func(model, x))
    mixed = ScaledConvNorm().double()
    plan = ntk_plan(mixed, x)
    assert plan.fallback == ["gain"] and "no layerwise formula" in plan.reasons["<root>"]
    assert_close(empirical_ntk(mixed, x), ntk_func(mixed, x))
    assert_close(empirical_ntk(mixed, x, mode="full"), ntk_func(mixed, x, "full"))
    assert_close(empirical_ntk(model, x, mode="full"), ntk_func(model, x, "full"))
    assert_close(empirical_ntk(model, x, fast_path=False), ntk_func(model, x))


def test_equals_naive_autograd_loop_with_batchnorm_eval_and_inplace() -> None:
    """A per-sample autograd loop (no torch.func) as reference: BatchNorm in eval mode, in-place ReLUs."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(7, 4, dtype=torch.float64)
    assert_close(empirical_ntk(model, x), ntk_loop(model, x))
    model2 = InPlaceAfterLinear().double()
    x5 = torch.randn(7, 5, dtype=torch.float64)
    assert_close(empirical_ntk(model2, x5), ntk_loop(model2, x5))


def test_an_output_changed_in_place_keeps_its_layer_on_the_fast_path() -> None:
    """Recorded layer outputs are not copied unless the forward changes one in place (an in-place ReLU, ``out +=``):
    then the kernel still equals autograd's and the self-check keeps every layer (it warns and demotes otherwise)."""
    import warnings

    resnet = _load(ROOT / "benchmarks" / "_resnet.py", "_bench_resnet")
    torch.manual_seed(9)
    for model, x in (
        (InPlaceAfterLinear().double(), torch.randn(7, 5, dtype=torch.float64)),
        (resnet.ResNet18(4, 3).double().eval(), torch.randn(3, 3, 8, 8, dtype=torch.float64)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan = ntk_plan(model, x)
            kernel = empirical_ntk(model, x, plan=plan)
        assert not plan.fallback
        assert_close(kernel, ntk_loop(model, x))


def test_functional_reuse_tied_weights_and_transposed_layout_leave_the_fast_path() -> None:
    torch.manual_seed(6)
    model = FunctionalReuse().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert "a" in plan.reasons and "a.weight" in plan.fallback and "b" in plan.fast
    assert_close(empirical_ntk(model, x), ntk_func(model, x))

    tied = Tied().double()
    idx = torch.randint(0, 7, (6, 3))
    plan = ntk_plan(tied, idx)
    assert plan.tied == [["emb", "out"]] and "mid" in plan.fast and plan.fallback == []  # gradients of both uses summed
    params = {n: p.detach() for n, p in tied.named_parameters()}
    J = vmap(jacrev(lambda p, i: functional_call(tied, p, (i[None],)).reshape(-1)), in_dims=(None, 0))(params, idx)
    J = torch.cat([v.reshape(6, 7, -1) for v in J.values()], 2)
    assert_close(empirical_ntk(tied, idx), torch.einsum("icn,jcn->ij", J, J))

    for P in (3, 4):  # P == T: the layout check still catches it
        model = BatchFirstFalse().double()
        x = torch.randn(P, 4, 3, dtype=torch.float64)
        plan = ntk_plan(model, x)
        assert "lin" in plan.reasons and "lin.weight" in plan.fallback
        assert_close(empirical_ntk(model, x), ntk_loop(model, x))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_parametrized_and_unused_linears() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(15)
    model = mlp([4, 6, 2])
    model[0] = weight_norm(model[0])
    x = torch.randn(5, 4, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert "0" in plan.reasons and "2" in plan.fast
    assert any(n.startswith("0.parametrizations.weight") for n in plan.fallback)
    assert_close(empirical_ntk(model, x), ntk_func(model, x))

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.spare = nn.Linear(4, 2)

        def forward(self, x):
            self.spare(x)  # computed, but the output does not depend on it
            return self.used(x)

    unused = Unused().double()
    assert_close(empirical_ntk(unused, x), ntk_func(unused, x))
    unused.used.requires_grad_(False)
    assert float(empirical_ntk(unused, x).abs().max()) == 0.0


def test_frozen_parameters_do_not_count() -> None:
    torch.manual_seed(7)
    model = mlp([5, 6, 2])
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    x = torch.randn(5, 5, dtype=torch.float64)
    assert_close(empirical_ntk(model, x), ntk_func(model, x))


def test_chunking_and_recomputed_fallback_blocks() -> None:
    torch.manual_seed(8)
    model = ConvNorm().double()
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64)
    ref = ntk_func(model, x, "full")
    assert_close(empirical_ntk(model, x, mode="full", chunk_size=3), ref)
    assert_close(empirical_ntk(model, x, mode="full", chunk_size=3, fast_path=False), ref)
    groups = NTKSettings(fallback_budget=10 * 2 * 500 * 8)  # parameter groups of <= 500 entries
    assert_close(empirical_ntk(model, x, mode="full", fast_path=False, settings=groups), ref)
    streamed = NTKSettings(fallback_budget=1)  # forces the pairwise recomputation of Jacobian blocks
    assert_close(empirical_ntk(model, x, mode="full", chunk_size=4, fast_path=False, settings=streamed), ref)
    assert_close(empirical_ntk(model, x, chunk_size=4, fast_path=False, settings=streamed), ntk_func(model, x))


def test_float32_model_float64_products() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(20, 5)
    K = empirical_ntk(model, x)
    assert K.dtype == torch.float64 and torch.equal(K, K.T)
    ref = ntk_func(model.double(), x.double())
    assert float((K - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    assert empirical_ntk(model.double(), x.double(), dtype=torch.float32).dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 4),
    widths=st.lists(st.integers(1, 9), min_size=4, max_size=4),
    d=st.integers(1, 6),
    out=st.integers(1, 3),
    P=st.integers(1, 9),
    bias=st.booleans(),
    act=st.sampled_from(sorted(ACTS)),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_random_mlps(depth, widths, d, out, P, bias, act, seed) -> None:
    torch.manual_seed(seed)
    model = mlp([d, *widths[:depth], out], act, bias)
    x = torch.randn(P, d, dtype=torch.float64)
    assert_close(empirical_ntk(model, x), ntk_func(model, x))
    assert_close(empirical_ntk(model, x, mode="full", chunk_size=max(1, P // 2)), ntk_func(model, x, "full"))


# ------------------------------------------------------------------------------------------------
# errors and side effects
# ------------------------------------------------------------------------------------------------
def test_batchnorm_in_training_mode_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with pytest.raises(SampleMixingError, match=r"BatchNorm1d '1'.*training mode.*eval"):
        empirical_ntk(model, x)
    model.eval()
    empirical_ntk(model, x)
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(SampleMixingError, match="track_running_stats=False"):
        empirical_ntk(no_stats, x)


def test_sample_mixing_detected_numerically() -> None:
    class Centre(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True)

    with pytest.raises(SampleMixingError, match="mixes samples"):
        empirical_ntk(Centre(), torch.randn(4, 3))


def test_bad_arguments() -> None:
    model = mlp([3, 4, 2])
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        empirical_ntk(model, x, mode="diag")
    with pytest.raises(ValueError, match="reduction"):
        empirical_ntk(model, x, mode="full", reduction="mean")
    with pytest.raises(ValueError, match="NaN"):
        empirical_ntk(model, torch.full((2, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="no trainable"):
        empirical_ntk(mlp([3, 2]).requires_grad_(False), x)
    with pytest.raises(TypeError, match="tensor output"):
        empirical_ntk(_TupleOut(), x)
    with pytest.raises(ValueError, match="dropout|Dropout"):
        empirical_ntk(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).double().train(), x)


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.lin(x), x


def test_model_left_untouched() -> None:
    torch.manual_seed(10)
    model = ConvNorm().double().train()
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    rng = torch.get_rng_state()
    empirical_ntk(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.conv.weight.grad, torch.ones_like(model.conv.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv.weight")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------
# spectra against numpy
# ------------------------------------------------------------------------------------------------
def test_spectrum_statistics_against_numpy() -> None:
    torch.manual_seed(11)
    model = mlp([4, 12, 3], "erf")
    x = torch.randn(15, 4, dtype=torch.float64)
    K = empirical_ntk(model, x)
    s = spectrum(K)
    Kn = K.numpy()
    lam = np.linalg.eigvalsh(Kn)
    np.testing.assert_allclose(s.eigenvalues.numpy(), lam, rtol=1e-10, atol=1e-10 * lam.max())
    assert float(s.trace) == pytest.approx(np.trace(Kn), rel=1e-12)
    assert float(s.eig_max) == pytest.approx(lam.max(), rel=1e-12)
    p = lam / lam.sum()
    assert float(s.effective_rank) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert float(s.condition) == pytest.approx(np.linalg.cond(Kn), rel=1e-6)
    np.testing.assert_allclose(s.top(3).numpy(), lam[::-1][:3], rtol=1e-12)
    y = np.sign(np.random.default_rng(0).standard_normal(15))
    y[:2] = [1, -1]
    C = np.eye(15) - 1 / 15
    Kc, Lc = C @ Kn @ C, C @ np.outer(y, y) @ C
    expected = (Kc * Lc).sum() / np.linalg.norm(Kc) / np.linalg.norm(Lc)
    assert float(label_alignment(K, torch.tensor(y)[:, None])) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(DegenerateKernelError):
        label_alignment(K, torch.ones(15, 1))


def test_spectrum_edge_cases() -> None:
    assert float(effective_rank(torch.tensor([0.0, 0.0, 5.0]))) == pytest.approx(1.0)
    assert float(effective_rank(torch.ones(7))) == pytest.approx(7.0)
    assert math.isinf(float(condition_number(torch.tensor([-1e-18, 1.0, 2.0], dtype=torch.float64))))
    assert float(condition_number(torch.tensor([0.5, 2.0]))) == pytest.approx(4.0)
    A = torch.randn(5, 3, dtype=torch.float64)
    K = A @ A.T
    assert float(kernel_distance(K, 3 * K)) == pytest.approx(0.0, abs=1e-14)
    assert float(kernel_distance(K, torch.eye(5, dtype=torch.float64))) > 0
    with pytest.raises(ValueError, match="not symmetric"):
        spectrum(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        spectrum(torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------
# the probe
# ------------------------------------------------------------------------------------------------
def _binary_data(P=24, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, d, generator=g)
    y = (x[:, 0] > 0).long()
    y[:2] = torch.tensor([0, 1])
    return x, y


def test_probe_measure_by_hand_matches_spectrum() -> None:
    from probes.builtin.ntk import NTK

    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 1))
    x, y = _binary_data()
    probe = NTK(top_k=3)
    with torch.no_grad():
        out = model(x)
    recs = {r.tag: r for r in probe.measure(ProbeBatch(model, x, y, out, {}, 0))}
    K = ntk_func(model.double(), x.double())
    model.float()
    lam = np.linalg.eigvalsh(K.numpy())
    assert recs["ntk/eig_max"].item() == pytest.approx(lam[-1], rel=1e-5)
    assert recs["ntk/trace"].item() == pytest.approx(np.trace(K.numpy()), rel=1e-5)
    assert recs["ntk/eig_top/3"].item() == pytest.approx(lam[-3], rel=1e-5)
    assert recs["ntk/distance_from_init"].item() == pytest.approx(0.0, abs=1e-12)
    Y = torch.where(y == 1, 1.0, -1.0).double()[:, None]
    assert recs["ntk/alignment"].item() == pytest.approx(float(label_alignment(K, Y)), rel=1e-5)
    assert recs["ntk/spectrum"].as_uint8().shape[2] == 3
    assert int(recs["ntk/log10_eigenvalues"].num) == int((lam > 0).sum())
    assert "ntk/eigenvalues" not in recs  # the linear histogram is not written (one bin held nearly everything)
    state = probe.state_dict()
    with torch.no_grad():
        model[2].weight.mul_(3.0)
        model[0].weight.add_(0.5)
    fresh = NTK()
    fresh.load_state_dict(state)
    moved = {
        r.tag: r.item() for r in fresh.measure(ProbeBatch(model, x, y, model(x).detach(), {}, 5)) if hasattr(r, "item")
    }
    assert moved["ntk/distance_from_init"] > 1e-4
    assert fresh.init_step == 0


def test_probe_reuses_its_plan_until_the_model_changes() -> None:
    from probes.builtin.ntk import NTK

    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    probe = NTK()
    out = model(x).detach()
    first = {r.tag: r for r in probe.measure(ProbeBatch(model, x, y, out, {}, 0))}
    plan = probe._plan
    probe.measure(ProbeBatch(model, x, y, out, {}, 1))
    assert probe._plan is plan
    model[0].requires_grad_(False)  # fewer parameters: a new plan and a smaller kernel
    frozen = {r.tag: r for r in probe.measure(ProbeBatch(model, x, y, out, {}, 2))}
    assert probe._plan is not plan
    ref = ntk_func(model.double(), x.double())
    assert frozen["ntk/trace"].item() == pytest.approx(float(ref.trace()), rel=1e-5)
    assert frozen["ntk/trace"].item() < first["ntk/trace"].item()


def test_probe_full_mode_and_mean_reduction() -> None:
    from probes.builtin.ntk import NTK

    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(9, 4)
    y = torch.arange(9) % 3
    out = model(x).detach()
    full = {r.tag: r for r in NTK(mode="full").measure(ProbeBatch(model, x, y, out, {}, 0))}
    mean = {r.tag: r for r in NTK(reduction="mean").measure(ProbeBatch(model, x, y, out, {}, 0))}
    total = {r.tag: r for r in NTK().measure(ProbeBatch(model, x, y, out, {}, 0))}
    assert int(full["ntk/log10_eigenvalues"].num) <= 27
    assert full["ntk/trace"].item() == pytest.approx(total["ntk/trace"].item(), rel=1e-9)
    assert mean["ntk/trace"].item() == pytest.approx(total["ntk/trace"].item() / 3, rel=1e-9)
    assert full["ntk/alignment"].item() == pytest.approx(total["ntk/alignment"].item(), rel=1e-9)
    with pytest.raises(ValueError, match="mode"):
        NTK(mode="diag")


def test_session_logs_every_tag_and_survives_checkpoint() -> None:
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    x, y = _binary_data(P=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    session = probes.attach(model, {"ntk": {"every": 2}}, probe_data=(x, y), sinks=["memory"], strict=True)
    for _ in range(4):  # BatchNorm trains in training mode; the probe runs in eval mode
        loss = ((model(x)[:, 0] - (2.0 * y - 1)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.step()
        assert model.training
    mem = session.memory
    tags = mem.tags()
    expected = {
        "ntk/trace",
        "ntk/eig_max",
        "ntk/eig_min",
        "ntk/condition",
        "ntk/effective_rank",
        "ntk/alignment",
        "ntk/distance_from_init",
        "ntk/log10_eigenvalues",
        "ntk/spectrum",
        "ntk/eig_top/1",
        "ntk/eig_top/5",
    }
    assert expected <= tags
    dist = mem.scalars()["ntk/distance_from_init"]
    assert [s for s, _ in dist] == [0, 2, 4] and dist[0][1] == pytest.approx(0.0, abs=1e-12) and dist[-1][1] > 0
    state = session.state_dict()
    session.close()
    again = probes.attach(model, {"ntk": {"every": 2}}, probe_data=(x, y), sinks=["memory"], strict=True)
    again.load_state_dict(state)
    again.measure()
    assert again.memory.scalars()["ntk/distance_from_init"][-1][1] == pytest.approx(dist[-1][1], rel=1e-6)
    again.close()


def test_probe_constant_labels_fail_at_attach() -> None:
    model = nn.Sequential(nn.Linear(3, 1))
    with pytest.raises(DegenerateKernelError, match="all the same"):
        probes.attach(
            model,
            ["ntk"],
            probe_data=(torch.randn(6, 3), torch.ones(6, dtype=torch.long)),
            sinks=["memory"],
            strict=True,
        )


# ------------------------------------------------------------------------------------------------
# example and benchmark stay runnable
# ------------------------------------------------------------------------------------------------
def test_example_smoke(tmp_path: Path) -> None:
    example = _load(ROOT / "examples" / "ntk_jamming.py", "_example_ntk_jamming")
    result = example.main(["--smoke", "--logdir", str(tmp_path)])
    assert Path(result["png"]).is_file()
    rows = result["rows"]
    assert len(rows) >= 2
    for r in rows:  # N_Delta counts probe samples with a positive force: a whole number in [0, P], 0 iff no loss
        P = round(r["P_over_N"] * r["N"])
        assert float(r["n_delta"]).is_integer() and 0 <= r["n_delta"] <= P, r
        assert (r["n_delta"] == 0) == (r["loss"] == 0.0), r
    assert all(r["n_delta_per_weight"] == pytest.approx(r["n_delta"] / r["N"]) for r in rows)
    assert any(p.is_dir() for p in tmp_path.iterdir())


def test_benchmark_smoke(capsys) -> None:
    bench = _load(ROOT / "benchmarks" / "ntk.py", "_bench_ntk")
    rows = bench.main(["--smoke"])
    out = capsys.readouterr().out
    assert "torch.func" in out and "ratio" in out
    assert "est. peak" in out and {r["case"] for r in rows if r["section"] == "budget"} == set(bench.BUDGET_MODELS)
    assert all(r["max_error"] < 1e-4 for r in rows if r.get("max_error") is not None)


@pytest.mark.parametrize("move", ["double", "double-float"])
def test_the_plan_and_the_first_kernel_follow_the_model(move):
    """After model.double() the NTK is re-planned and measures what a fresh attach on the moved model measures; the
    first kernel, kept from before the move, still gives a finite distance_from_init."""
    from probes import testing
    from probes.builtin.ntk import NTK

    moves = {"double": lambda m: m.double(), "double-float": lambda m: m.double().float()}
    testing.check_follows_model(NTK, {"image": False}, move=moves[move], references=("ntk/distance_from_init",))


@pytest.mark.parametrize("measure_at_attach", [True, False])
def test_labels_out_of_range_of_the_outputs_raise_at_attach(measure_at_attach):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    y = torch.tensor([0, 1, 5, 1, 0, 2])  # class 5 for a model with 3 outputs
    with pytest.raises(ValueError, match=r"ntk: class index 5 out of range.*3 outputs.*0\.\.2"):
        probes.attach(
            model, ["ntk"], probe_data=(torch.randn(6, 3), y), sinks=["memory"], measure_at_attach=measure_at_attach
        )


def test_a_model_without_a_per_sample_ntk_raises_at_attach_without_measuring() -> None:
    """validate plans on two samples: a model that mixes samples raises at attach, also with
    measure_at_attach=False, before any kernel is computed."""

    class Centre(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    with pytest.raises(SampleMixingError, match="ntk: .*mixes samples"):
        probes.attach(
            Centre(),
            ["ntk"],
            probe_data=(torch.randn(6, 3), torch.arange(6) % 2),
            sinks=["memory"],
            measure_at_attach=False,
        )


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"mode": "diag"}, ValueError, "ntk: option 'mode' must be one of"),
        ({"top_k": -1}, ValueError, "ntk: option 'top_k' must be a non-negative int, got -1"),
        ({"bins": 2.5}, TypeError, "ntk: option 'bins' must be a positive int <= 10000, got 2.5"),
        ({"spectrum": "topk", "top_k": 0}, ValueError, "ntk: option 'top_k' must be >= 1 with spectrum='topk'"),
        ({"memory_budget": True}, TypeError, "ntk: option 'memory_budget' must be a positive number of bytes"),
        ({"chunk_size": 0}, ValueError, "ntk: option 'chunk_size' must be None or a positive int, got 0"),
        ({"image": "yes"}, TypeError, "ntk: option 'image' must be True or False"),
    ],
)
def test_options_are_checked_through_the_schema(options, error, match) -> None:
    with pytest.raises(error, match=match):
        probes.attach(
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
            {"ntk": options},
            probe_data=(torch.randn(6, 3), torch.arange(6) % 2),
        )
