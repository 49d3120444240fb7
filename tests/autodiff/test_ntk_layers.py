"""Layerwise NTK of convolutional, normalisation and embedding layers, the fallback, and the matrix-free spectrum.

Reference everywhere: the ``torch.func`` Jacobian contraction ``sum_c J_c J_c^T`` over every trainable parameter
(``vmap(jacrev(functional_call))``), and ``torch.linalg.eigvalsh`` of the dense kernel; float64 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from probes.autodiff.ntk import empirical_ntk, fallback, ntk_operator, ntk_plan
from probes.functional.ntk.settings import NTKSettings
from probes.functional.spectra import effective_rank, effective_rank_bounds, top_eigenvalues
from probes.probe import ProbeBatch

TOL = 1e-10


def ntk_func(model: nn.Module, x: torch.Tensor, mode: str = "trace") -> torch.Tensor:
    """The reference kernel: ``torch.func`` per-sample Jacobians of every trainable parameter, ``J J^T`` in float64."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p, xi):
        return functional_call(model, p, (xi[None],)).reshape(-1)

    j = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    P = x.shape[0]
    J = torch.cat([v.reshape(P, v.shape[1], -1).double() for v in j.values()], dim=2)
    if mode == "trace":
        return torch.einsum("icn,jcn->ij", J, J)
    C = J.shape[1]
    return torch.einsum("ian,jbn->iajb", J, J).reshape(P * C, P * C)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} (scale {scale:.3g})"


def assert_spectrum(K: torch.Tensor, ref: torch.Tensor, k: int = 5) -> None:
    """Trace and the top-k eigenvalues within TOL (relative to the largest)."""
    lam, lam_ref = torch.linalg.eigvalsh(K).flip(0)[:k], torch.linalg.eigvalsh(ref).flip(0)[:k]
    assert abs(float(K.trace() - ref.trace())) <= TOL * float(ref.trace())
    assert float((lam - lam_ref).abs().max()) <= TOL * float(lam_ref[0])


def exact_everywhere(model: nn.Module, x: torch.Tensor, modes=("trace", "full")) -> None:
    """Dense kernel (both contractions), operator products and diagonal, trace and top eigenvalues."""
    plan = ntk_plan(model, x)
    for mode in modes:
        ref = ntk_func(model, x, mode)
        K = empirical_ntk(model, x, mode=mode, plan=plan)
        assert_close(K, ref)
        assert_spectrum(K, ref)
        op = ntk_operator(model, x, mode=mode, plan=plan)
        assert_close(op.dense(), ref)
        assert_close(op.diagonal(), ref.diagonal())
        top = top_eigenvalues(op.matmat, op.shape[0], 3)
        assert float((top.values - torch.linalg.eigvalsh(ref).flip(0)[:3]).abs().max()) <= TOL * float(top.values[0])


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


class ResNetish(nn.Module):
    """conv-BN-ReLU stem (stride 2), a residual block with a grouped conv, a dilated 'same' conv (reflect
    padding), a 1x1 strided shortcut conv, global pooling and a Linear head."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, (2, 3), dilation=(2, 1), padding="same", padding_mode="reflect")
        self.short = nn.Conv2d(8, 6, 1, stride=2)
        self.down = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, out)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        r = torch.relu(self.bn1(self.c1(h)))
        h = torch.relu(h + self.c2(r))  # residual
        h = torch.relu(self.bn2(self.down(h)) + self.short(h))  # strided residual
        return self.head(h.mean(dim=(2, 3)))


class Conv13(nn.Module):
    """Conv1d (stride, dilation, circular padding) -> GroupNorm -> Conv3d (groups, anisotropic stride) -> BN3d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=2, padding_mode="circular")
        self.gn = nn.GroupNorm(2, 4)
        self.b = nn.Conv3d(4, 6, (1, 2, 2), groups=2, stride=(1, 2, 1), padding=(0, 1, 0))
        self.bn = nn.BatchNorm3d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = self.gn(torch.tanh(self.a(x)))  # (B, 4, 8)
        h = h.reshape(h.shape[0], 4, 2, 2, 2)
        return self.fc(torch.tanh(self.bn(self.b(h))).mean(dim=(2, 3, 4)))


class Attention(nn.Module):
    """Single-head self-attention from four nn.Linear layers (applied along the sequence axis)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h):
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1]), dim=-1)
        return self.o(a @ self.v(h))


class Encoder(nn.Module):
    """Token + position Embedding, pre-norm attention and MLP blocks with LayerNorm, mean pooling, Linear head."""

    def __init__(self, vocab: int = 11, T: int = 5, d: int = 8, layers: int = 2, out: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "ln1": nn.LayerNorm(d),
                        "att": Attention(d),
                        "ln2": nn.LayerNorm(d),
                        "fc1": nn.Linear(d, 2 * d),
                        "fc2": nn.Linear(2 * d, d),
                    }
                )
            )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, t):
        pos = torch.arange(t.shape[1], device=t.device).expand(t.shape[0], -1)
        h = self.tok(t) + self.pos(pos)
        for b in self.blocks:
            h = h + b["att"](b["ln1"](h))
            h = h + b["fc2"](torch.nn.functional.gelu(b["fc1"](b["ln2"](h))))
        return self.head(self.ln(h).mean(dim=1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoderLayer (MultiheadAttention: its in_proj is a raw parameter -> fallback)."""

    def __init__(self, vocab: int = 9, d: int = 8, out: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, out)

    def forward(self, t):
        return self.head(self.layer(self.tok(t)).mean(dim=1))


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
def test_conv_net_batchnorm_residual_strides_groups() -> None:
    torch.manual_seed(0)
    model = _randomise_bn(ResNetish().double())
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert plan.fallback == [] and plan.kinds["bn1"] == "BatchNorm2d" and plan.kinds["c1"] == "Conv2d"
    exact_everywhere(model, x)


@pytest.mark.parametrize("method", ["pairs", "outer"])
def test_both_contractions(method) -> None:
    settings = NTKSettings(pairs_method=method)
    torch.manual_seed(1)
    model = _randomise_bn(ResNetish().double())
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    assert_close(empirical_ntk(model, x, mode="full", settings=settings), ntk_func(model, x, "full"))
    enc = Encoder().double()
    t = torch.randint(0, 11, (6, 5))
    assert_close(empirical_ntk(enc, t, settings=settings), ntk_func(enc, t))
    assert_close(ntk_operator(enc, t, settings=settings).dense(), ntk_func(enc, t))


def test_conv1d_conv3d_groupnorm() -> None:
    torch.manual_seed(2)
    model = _randomise_bn(Conv13().double())
    x = torch.randn(6, 2, 16, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert plan.fallback == [] and set(plan.kinds.values()) == {
        "Conv1d",
        "GroupNorm",
        "Conv3d",
        "BatchNorm3d",
        "Linear",
    }
    exact_everywhere(model, x)


def test_transformer_encoder_embedding_layernorm_attention() -> None:
    torch.manual_seed(3)
    model = Encoder().double()
    t = torch.randint(0, 11, (8, 5))
    t[0, :2] = 0  # padding tokens: no gradient to the padding row
    t[1] = t[2]  # equal sequences share every row
    plan = ntk_plan(model, t)
    assert plan.fallback == [] and plan.kinds["tok"] == "Embedding" and plan.kinds["blocks.0.ln1"] == "LayerNorm"
    assert plan.fast["blocks.0.att.q"] == 1
    exact_everywhere(model, t)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_torch_transformer_encoder_layer() -> None:
    torch.manual_seed(4)
    model = TorchEncoder().double().eval()
    t = torch.randint(0, 9, (6, 4))
    plan = ntk_plan(model, t)
    assert {"tok", "layer.linear1", "layer.linear2", "layer.norm1", "layer.norm2", "head"} <= set(plan.fast)
    assert "layer.self_attn.in_proj_weight" in plan.fallback
    assert "MultiheadAttention" in plan.reasons["layer.self_attn"]
    exact_everywhere(model, t, modes=("trace",))


def test_linear_layer_norm_frozen_and_no_affine_parts() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.GroupNorm(3, 3, affine=False), nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 2)
    ).double()
    model[0].weight.requires_grad_(False)  # only the conv bias trains
    model[3].bias.requires_grad_(False)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    assert_close(empirical_ntk(model, x), ntk_func(model, x))


# ------------------------------------------------------------------------------------------------
# what falls back, and why
# ------------------------------------------------------------------------------------------------
class TiedAndShared(nn.Module):
    """Embedding tied to the output Linear; a conv weight also used through F.conv2d; a BatchNorm subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.conv = nn.Conv1d(4, 4, 1)
        self.other = nn.Conv1d(4, 4, 1)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        h = self.emb(t).transpose(1, 2)  # (B, 4, T)
        h = torch.tanh(self.conv(h)) + self.other(h)
        h = torch.nn.functional.conv1d(torch.tanh(h), self.conv.weight)  # the weight used outside conv.forward
        return self.out(h.mean(dim=2))


def test_plan_falls_back_with_a_reason() -> None:
    torch.manual_seed(6)
    model = TiedAndShared().double()
    t = torch.randint(0, 6, (5, 3))
    plan = ntk_plan(model, t)
    assert plan.tied == [["emb", "out"]]  # tied weights: their per-sample gradients summed
    assert "outside its own calls" in plan.reasons["conv"]
    assert set(plan.fast) == {"emb", "other", "out"}
    assert set(plan.fallback) == {"conv.weight", "conv.bias"}
    assert_close(empirical_ntk(model, t), ntk_func(model, t))
    assert_close(ntk_operator(model, t).dense(), ntk_func(model, t))


def test_fallback_computes_each_jacobian_once(monkeypatch) -> None:
    torch.manual_seed(7)
    model = _randomise_bn(ResNetish().double())
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    seen: list[list[int]] = []
    real = fallback._jacobian_fn

    def counting(*a, **k):
        jac, mine = real(*a, **k), []
        seen.append(mine)
        return lambda s, e: (mine.append(e - s), jac(s, e))[1]

    monkeypatch.setattr(fallback, "_jacobian_fn", counting)
    ref = ntk_func(model, x)
    for params_per_block, chunk in ((400, 4), (150, None)):  # at 150, the larger tensors are cut into row slices
        seen.clear()
        settings = NTKSettings(fallback_budget=6 * 3 * 8 * params_per_block)
        assert_close(empirical_ntk(model, x, fast_path=False, chunk_size=chunk, settings=settings), ref)
        assert len(seen) > 3 and all(sum(m) == 6 for m in seen)  # every sample once per group or slice
    op = ntk_operator(model, x, fast_path=False)
    assert all(J is not None for J, _ in op.fallback)
    assert_close(op.dense(), ref)


# ------------------------------------------------------------------------------------------------
# matrix-free spectrum
# ------------------------------------------------------------------------------------------------
def test_top10_at_large_P_against_eigvalsh() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    x = torch.randn(1500, 10)
    K = empirical_ntk(model, x)
    lam = torch.linalg.eigvalsh(K).flip(0)
    op = ntk_operator(model, x)
    top = top_eigenvalues(op.matmat, 1500, 10)
    assert top.converged
    assert float(((top.values - lam[:10]).abs() / lam[:10]).max()) < 1e-6
    assert float(op.trace()) == pytest.approx(float(K.trace()), rel=1e-12)
    est, lo, hi = effective_rank_bounds(top.values, op.trace(), 1500)
    true = float(effective_rank(lam))
    assert lo <= true * (1 + 1e-9) and true <= hi * (1 + 1e-9) and lo <= est <= hi


def test_effective_rank_bounds_edge_cases() -> None:
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    exact = float(effective_rank(lam))
    assert effective_rank_bounds(lam, lam.sum(), 4) == pytest.approx((exact, exact, exact))
    est, lo, hi = effective_rank_bounds(lam[:2], lam.sum(), 4)
    assert lo <= exact <= hi and lo < hi
    assert effective_rank_bounds(torch.zeros(2), 0.0, 5) == (0.0, 0.0, 0.0)


def test_probe_topk_route_and_options() -> None:
    from probes.builtin.ntk import NTK

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(40, 4)
    y = torch.arange(40) % 2
    batch = ProbeBatch(model, x, y, model(x).detach(), {}, 0)
    full = {r.tag: r for r in NTK(spectrum="full", top_k=4).measure(batch)}
    for probe in (NTK(spectrum="topk", top_k=4), NTK(top_k=4, memory_budget=1000)):
        assert probe.uses_topk(40)
        topk = {r.tag: r for r in probe.measure(batch)}
        assert "ntk/eig_min" not in topk and "ntk/condition" not in topk
        for tag in ("ntk/trace", "ntk/eig_max", "ntk/eig_top/1", "ntk/eig_top/4"):
            assert topk[tag].item() == pytest.approx(full[tag].item(), rel=1e-9), tag
        assert topk["ntk/effective_rank"].item() > 1
        assert topk["ntk/spectrum"].pixels.ndim == 3  # an image of the top eigenvalues, now and at the start
    assert not NTK().uses_topk(40) and NTK().uses_topk(10_000)
    for bad, match in (
        ({"spectrum": "some"}, "spectrum"),
        ({"spectrum": "topk", "top_k": 0}, "top_k"),
        ({"memory_budget": 0}, "memory_budget"),
    ):
        with pytest.raises(ValueError, match=f"ntk: .*{match}"):
            NTK(**bad)
    with pytest.raises(TypeError, match="ntk: .*memory_budget"):  # a string where a number is expected
        NTK(memory_budget="1GB")
