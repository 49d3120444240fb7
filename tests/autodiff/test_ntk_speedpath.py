"""The fast path of the layerwise NTK: per-sample gradients written in place, one backward pass vectorised over
the outputs (with its per-output fallback), implicit bias columns, CPU chunking and blocks of outputs.

Reference: the ``torch.func`` Jacobian contraction over every trainable parameter; float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
from test_ntk_layers import ntk_func  # the torch.func reference, float64
from torch import nn

from probes.autodiff.ntk import empirical_ntk, ntk_operator, ntk_plan
from probes.functional.ntk import terms
from probes.functional.ntk.settings import NTKSettings

TOL = 1e-12


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= tol, f"relative error {err:.3g}"


class ConvSeq(nn.Module):
    """Conv2d with bias (groups 1 and 2), eval BatchNorm, LayerNorm and a Linear over a sequence axis, a head."""

    def __init__(self, out: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2)
        self.ln = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, out)

    def forward(self, x):
        h = self.c2(torch.relu(self.bn(self.c1(x))))  # (B, 4, 3, 3)
        h = self.lin(torch.tanh(self.ln(h.flatten(2).transpose(1, 2))))  # (B, 9, 5): positions along a sequence
        return self.head(h.mean(dim=1))


def _model(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = ConvSeq().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(7, 3, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("method", ["auto", "outer", "pairs"])
def test_every_route_and_mode_against_torch_func(mode, method) -> None:
    settings = NTKSettings(pairs_method=method)
    model, x = _model()
    ref = ntk_func(model, x, mode)
    assert_close(empirical_ntk(model, x, mode=mode, settings=settings), ref)
    assert_close(ntk_operator(model, x, mode=mode, settings=settings).dense(), ref, 1e-10)


def test_per_output_backward_passes_give_the_same_kernel() -> None:
    model, x = _model(1)
    batched = empirical_ntk(model, x, mode="full")
    assert_close(empirical_ntk(model, x, mode="full", settings=NTKSettings(batched_grads=False)), batched)
    assert_close(batched, ntk_func(model, x, "full"))


def test_vectorised_backward_falls_back_to_one_pass_per_output(monkeypatch) -> None:
    """A backward that cannot be vectorised over the cotangents: the C passes, same kernel."""
    model, x = _model(2)
    plan = ntk_plan(model, x)
    real = torch.autograd.grad
    calls = {"batched": 0, "single": 0}

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls["batched"] += 1
            raise RuntimeError("no batching rule")
        calls["single"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    K = empirical_ntk(model, x, plan=plan)
    monkeypatch.setattr(torch.autograd, "grad", real)
    assert calls["batched"] == 1 and calls["single"] == 4  # one chunk of 7 samples, 4 outputs
    assert_close(K, ntk_func(model, x))


def test_small_cpu_chunks_and_blocks_of_outputs() -> None:
    model, x = _model(3)
    # one sample per chunk after the first; norm layers: one output at a time
    settings = NTKSettings(cpu_factor_chunk_bytes=1, output_block_bytes=1)
    for mode in ("trace", "full"):
        assert_close(empirical_ntk(model, x, mode=mode, settings=settings), ntk_func(model, x, mode))


def test_float32_model_float64_per_sample_gradients() -> None:
    model, x = _model(4)
    model, x = model.float(), x.float()
    K = empirical_ntk(model, x)
    assert K.dtype == torch.float64
    assert_close(K, ntk_func(model, x), 1e-5)  # the float32 forward and backward set the accuracy


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("method", ["outer", "pairs"])
def test_frozen_weight_or_bias_with_the_implicit_ones_column(frozen, method) -> None:
    settings = NTKSettings(pairs_method=method)
    model, x = _model(5)
    for m in (model.c1, model.c2, model.lin):
        getattr(m, frozen).requires_grad_(False)
    for mode in ("trace", "full"):
        assert_close(empirical_ntk(model, x, mode=mode, settings=settings), ntk_func(model, x, mode))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_outer_into_matches_einsum(groups, bias) -> None:
    """Per-sample gradients of a factor term written in place: ``[sum_k g_k z_k^T, sum_k g_k]`` per group."""
    torch.manual_seed(6)
    B, C, K, n, d = 3, 4, 5, 2, 6
    gb = torch.randn(C, B, K, groups, n, dtype=torch.float64)
    Z = torch.randn(B, groups, d, K, dtype=torch.float64).permute(0, 3, 1, 2)  # a transposed view, as for convs
    t = terms._Pairs(gb.transpose(0, 1), Z, bias)
    out = torch.full((B, C, terms._outer_features(t)), float("nan"), dtype=torch.float64)
    terms._outer_into(t, out)
    G = gb.transpose(0, 1)
    W = torch.einsum("bckgn,bkgd->bcgnd", G, Z)
    if bias:
        W = torch.cat([W, G.sum(2)[..., None]], dim=-1)
    assert torch.allclose(out, W.reshape(B, C, -1), rtol=1e-14, atol=1e-14)
    t2 = terms._materialized(t)
    assert t2.Z.shape[-1] == d + bias and not t2.bias
