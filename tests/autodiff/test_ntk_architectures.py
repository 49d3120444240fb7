"""The layerwise NTK on real architectures: GPT-2, BERT, a ViT, a ResNet-18 with BatchNorm, and the layers they
bring (transformers' ``Conv1D``, LayerNorm/RMSNorm classes with their own ``forward``, parameters used directly
in a ``forward``, position tables, tied weights); and the self-check that sends a layer whose formula does not
hold (legacy ``spectral_norm``/``weight_norm`` hooks, a pre-hook rewriting a weight) to the fallback.

Reference: the ``torch.func`` kernel of ``test_ntk_layers`` (``vmap(jacrev)`` over every trainable parameter),
float64; trace and top eigenvalues to 1e-10 relative. Models from small configs, nothing downloaded.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_ntk_layers import ntk_func  # the torch.func reference, float64
from torch import nn

from probes.autodiff.ntk import empirical_ntk, ntk_operator, ntk_plan, verify_plan
from probes.functional.spectra import top_eigenvalues

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10


def _load_models():
    spec = importlib.util.spec_from_file_location("_ntk_models", ROOT / "benchmarks" / "ntk_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _load_models()


def assert_spectrum(K: torch.Tensor, ref: torch.Tensor, k: int = 4) -> None:
    lam, lam_ref = torch.linalg.eigvalsh(K).flip(0)[:k], torch.linalg.eigvalsh(ref).flip(0)[:k]
    assert abs(float(K.trace() - ref.trace())) <= TOL * float(ref.trace())
    assert float((lam - lam_ref).abs().max()) <= TOL * float(lam_ref[0])
    assert float((K - ref).abs().max()) <= TOL * float(ref.abs().max())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the reference's vmap over attention
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "resnet"])
def test_real_architectures_take_the_layerwise_path_exactly(name) -> None:
    if name in ("gpt2", "bert"):
        pytest.importorskip("transformers")
    model = models.MODELS[name]()
    x = models.inputs(name, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check finds nothing to warn about
        plan = ntk_plan(model, x)
    assert plan.reasons == {} and plan.fallback == []
    ref = ntk_func(model, x)
    K = empirical_ntk(model, x, plan=plan)
    assert_spectrum(K, ref)
    op = ntk_operator(model, x, plan=plan)
    assert float((op.diagonal() - ref.diagonal()).abs().max()) <= TOL * float(ref.diagonal().max())
    top = top_eigenvalues(op.matmat, op.shape[0], 2)
    lam = torch.linalg.eigvalsh(ref).flip(0)[:2]
    assert float((top.values - lam).abs().max()) <= TOL * float(lam[0])
    if name == "gpt2":
        assert plan.kinds["model.transformer.h.0.attn.c_attn"] == "Conv1D (x W + b)"
        assert ["model.transformer.wte", "model.lm_head"] in plan.tied
        assert "model.transformer.wpe" in plan.shared
    if name == "bert":
        assert "model.bert.embeddings.position_embeddings" in plan.shared
    if name == "vit":
        assert set(plan.direct) == {"cls_token", "pos_embed"}
        assert plan.kinds["norm"] == "TimmLayerNorm (w * h(x) + b)"


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_gpt2_full_kernel_and_explicit_chunks() -> None:
    pytest.importorskip("transformers")
    model = models.gpt2(vocab=12)
    x = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(2))
    ref = ntk_func(model, x, "full")
    for chunk in (None, 1, 2):
        K = empirical_ntk(model, x, mode="full", chunk_size=chunk)
        assert float((K - ref).abs().max()) <= TOL * float(ref.abs().max())
    assert float((ntk_operator(model, x, mode="full").dense() - ref).abs().max()) <= TOL * float(ref.abs().max())


class RMSNorm(nn.Module):
    """LlamaRMSNorm as transformers writes it (the mean square in float32, the weight applied after)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class LayerNorm2d(nn.LayerNorm):
    """A channels-first LayerNorm (ConvNeXt's): the scale along axis 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, None, None, self.eps)
        return x.permute(0, 3, 1, 2) * self.weight[:, None, None] + self.bias[:, None, None]


class NotAffine(nn.Module):
    """A 1-d weight used nonlinearly: structurally a candidate, numerically not ``w * h + b``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.pow(2)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.ln2d = LayerNorm2d(4)
        self.lin = nn.Linear(4, 6)
        self.rms = RMSNorm(6)
        self.bad = NotAffine(6)
        self.pos = nn.Embedding(9, 6)
        self.query = nn.Parameter(torch.randn(1, 1, 6) * 0.3)  # a learned query, leading axis 1
        self.offset = nn.Parameter(torch.randn(1, 6) * 0.3)  # axis 0 is not the samples' (broadcast from the right)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln2d(torch.tanh(self.conv(x))).flatten(2).transpose(1, 2)  # (B, 9, 4)
        h = self.rms(self.lin(h)) + self.pos(torch.arange(9)[None])  # the table indexed by position
        h = torch.tanh(self.bad(h)) + self.query + self.offset
        return self.head(h.mean(1))


def test_structural_layers_position_tables_and_direct_parameters() -> None:
    torch.manual_seed(3)
    model = Mixed().double().eval()
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert plan.kinds["rms"] == "RMSNorm (w * h(x) + b)" and plan.kinds["ln2d"] == "LayerNorm2d (w * h(x) + b)"
    assert plan.shared == ["pos"] and plan.direct == ["query"]
    assert set(plan.reasons) == {"bad", "<root>"} and "w * h(x) + b" in plan.reasons["bad"]
    assert "offset" in plan.reasons["<root>"] and set(plan.fallback) == {"bad.weight", "offset"}
    ref = ntk_func(model, x)
    assert_spectrum(empirical_ntk(model, x, plan=plan), ref)
    K = ntk_operator(model, x, plan=plan).dense()
    assert float((K - ref).abs().max()) <= TOL * float(ref.abs().max())


def test_transformers_rms_norms() -> None:
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Linear(4, 6), LlamaRMSNorm(6), nn.Tanh(), nn.Linear(6, 6), T5LayerNorm(6), nn.Linear(6, 3)
    ).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[4].weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert plan.fallback == [] and plan.kinds["1"] == "LlamaRMSNorm (w * h(x) + b)"
    assert plan.kinds["4"] == "T5LayerNorm (w * h(x) + b)"
    assert_spectrum(empirical_ntk(model, x, plan=plan), ntk_func(model, x))


def test_the_probe_measures_the_legacy_spectral_norm_kernel() -> None:
    import probes

    model = _hooked("spectral_norm")
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.arange(8) % 3
    ref = ntk_func(model, x)
    with pytest.warns(UserWarning, match="'2' disagrees with autograd"):
        s = probes.attach(model, ["ntk"], probe_data=(x, y), strict=True)
    s.close()
    assert s.memory.last("ntk/trace") == pytest.approx(float(ref.trace()), rel=1e-10)


class IndexedParam(nn.Module):
    """A leading-axis-1 parameter indexed (``p[0]``): one copy per sample would give every sample sample 0's copy."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 4))
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(x + self.p[0]))


def test_a_direct_parameter_that_is_not_broadcast_falls_back() -> None:
    torch.manual_seed(4)
    model = IndexedParam().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    plan = ntk_plan(model, x)
    assert plan.direct == [] and plan.fallback == ["p"] and "mixes the samples" in plan.reasons["<root>"]
    assert_spectrum(empirical_ntk(model, x, plan=plan), ntk_func(model, x))


# ------------------------------------------------------------------------------------------------
# the self-check
# ------------------------------------------------------------------------------------------------
def _hooked(which: str) -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    if which == "spectral_norm":
        nn.utils.spectral_norm(model[2])
    elif which == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the legacy hook version, deprecated
            nn.utils.weight_norm(model[2])
        with torch.no_grad():  # as after training: at g = |v| (its start) the kernel is the plain Linear's
            model[2].weight_g.mul_(torch.linspace(0.5, 1.5, 8, dtype=torch.float64)[:, None])
    else:  # a pre-hook computing the weight from another parameter at every call
        lin = model[2]
        raw = nn.Parameter(lin.weight.detach().clone())
        del lin.weight
        lin.register_parameter("raw", raw)
        lin.weight = raw * torch.sigmoid(raw)
        lin.register_forward_pre_hook(lambda mod, args: setattr(mod, "weight", mod.raw * torch.sigmoid(mod.raw)))
    return model.eval()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the reference's vmap over weight_norm
@pytest.mark.parametrize("which", ["spectral_norm", "weight_norm", "pre_hook"])
def test_self_check_sends_a_rewritten_weight_to_the_fallback(which) -> None:
    model = _hooked(which)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref = ntk_func(model, x)
    unchecked = ntk_plan(model, x, check=False)
    assert "2" in unchecked.fast  # the formula does not see the hook ...
    assert set(verify_plan(model, x, unchecked)) == {"2"}  # ... the check does
    assert abs(float(empirical_ntk(model, x, plan=unchecked).trace() - ref.trace())) > 1e-3 * float(ref.trace())
    with pytest.warns(UserWarning, match=r"'2' disagrees with autograd"):
        plan = ntk_plan(model, x)
    assert "2" not in plan.fast and "self-check" in plan.reasons["2"]
    assert {"0", "4"} <= set(plan.fast) and all(n.startswith("2.") for n in plan.fallback)
    assert_spectrum(empirical_ntk(model, x, plan=plan), ref)
    with pytest.warns(UserWarning, match="disagrees"):
        K = empirical_ntk(model, x)  # the check runs in every plan made inside
    assert_spectrum(K, ref)


def test_no_batching_rule_warning_reaches_the_user() -> None:
    pytest.importorskip("transformers")
    model = models.gpt2(vocab=12)
    x = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = empirical_ntk(model, x)
        K0 = empirical_ntk(model, x, fast_path=False)  # every parameter through torch.func's vmap
        op = ntk_operator(model, x, fast_path=False)
        op.matmat(torch.ones(3, dtype=torch.float64))
    assert float((K - K0).abs().max()) <= TOL * float(K0.abs().max())
    assert not [w for w in caught if "performance drop" in str(w.message)], [str(w.message)[:80] for w in caught]
    with warnings.catch_warnings():  # the filter is inside the NTK only: torch still warns elsewhere
        warnings.simplefilter("error")
        from torch.func import vmap

        q = torch.randn(2, 1, 2, 3, 4, dtype=torch.float64)
        with pytest.raises(UserWarning, match="performance drop"):
            vmap(nn.functional.scaled_dot_product_attention)(q, q, q)


def test_benchmark_smoke() -> None:
    pytest.importorskip("transformers")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ntk_models.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torch.func / probes" in run.stdout
