"""Empirical NTK of real architectures: GPT-2, BERT, a ViT and a ResNet-18, probes against ``torch.func``.

Models from small configs (random weights, nothing downloaded), float64, in eval mode:

- ``gpt2``: ``transformers.GPT2LMHeadModel`` (2 layers, width 32, 2 heads, vocab 100, 8 tokens), the kernel of
  the last position's logits (100 outputs); ``Conv1D`` projections, ``wpe`` indexed by position, ``lm_head`` tied
  to ``wte``;
- ``bert``: ``transformers.BertForSequenceClassification`` (2 layers, width 32, 2 heads, vocab 100, 8 tokens,
  3 classes); ``position_embeddings`` indexed by position;
- ``vit``: a plain-torch ViT as timm writes it (patch 4 on 3 x 32 x 32 images, width 32, 2 blocks, 2 heads,
  10 classes): ``cls_token`` concatenated and ``pos_embed`` added in the model's own ``forward``, a ``LayerNorm``
  subclass that overrides ``forward`` (timm's), a ``LayerScale`` of one parameter;
- ``resnet``: a ResNet-18 (widths 8-64, BatchNorm in eval mode, 3 x 16 x 16 images, 10 classes);
- ``vit_tiny`` (on request, several GB for ``torch.func``): the same ViT at timm's ``vit_tiny_patch16_224``
  widths (192, 12 blocks, 3 heads), 5.4M parameters.

One NTK measurement (``empirical_ntk``, trace over outputs) at P samples: wall time and peak memory of probes
against ``torch.func`` (``vmap(jacrev)`` per-sample Jacobians of every parameter, then ``J J^T``: the anchor,
measured in the same run), printed as ratios ``torch.func / probes``, and how many parameters the plan leaves
to the fallback. With the ``gpt2`` case, one more row: the ``ntk`` probe's ``outputs=k`` sketch (k = 8 Gaussian
projections of the 100 logits, ``probes.autodiff.ntk.outputs``) against the exact kernel and ``torch.func``,
with the relative error of its trace and of the kernel (Frobenius) for one seed, and the mean over 8 seeds of
the traces' relative error (the sketch is unbiased: the mean converges to the exact trace), and the exact kernel
of every position's logits (``positions="all"``, the probe's former default on a ``(P, T, C)`` output). Peak memory: the
running total of the allocations ``torch.profiler(profile_memory=True)``
attributes to operators. Times are medians over rounds; never asserted.

    python benchmarks/ntk_models.py            # gpt2 and vit at P = 16, 3 rounds
    python benchmarks/ntk_models.py --quick    # P = 16, 1 round
    python benchmarks/ntk_models.py --smoke    # P = 4, every model, 1 round (the test suite runs it)
    python benchmarks/ntk_models.py --cases gpt2,vit,bert,resnet --P 16
    python benchmarks/ntk_models.py --cases vit_tiny --P 8 --rounds 1
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class Logits(nn.Module):
    """A transformers model's logits (of the last position for a language model), one tensor per sample."""

    def __init__(self, model: nn.Module, last: bool) -> None:
        super().__init__()
        self.model, self.last = model, last

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids).logits
        return logits[:, -1] if self.last else logits


def gpt2(vocab: int = 100) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=16, bos_token_id=0, eos_token_id=0)
    return Logits(GPT2LMHeadModel(cfg), last=True).double().eval()


def bert(vocab: int = 100) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=16,
        num_labels=3,
    )
    return Logits(BertForSequenceClassification(cfg), last=False).double().eval()


class TimmLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm``: the standard formula under its own ``forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerScale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), 0.5) + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = TimmLayerNorm(d, eps=1e-6), TimmLayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ls1 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.ls1(self.proj(a.transpose(1, 2).reshape(B, N, d)))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """timm's ``VisionTransformer`` in plain torch: conv patch embedding, ``cls_token`` and ``pos_embed`` used in
    ``forward`` (``_pos_embed``), pre-norm blocks, final norm, the class token's features to a Linear head."""

    def __init__(
        self, img: int = 32, patch: int = 4, d: int = 32, depth: int = 2, heads: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img // patch) ** 2 + 1, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(depth)))
        self.norm = TimmLayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit() -> nn.Module:
    return ViT().double().eval()


def vit_tiny() -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` widths (192, 12 blocks, 3 heads) at 32 px with patch 4: 5.4M parameters."""
    return ViT(d=192, depth=12, heads=3).double().eval()


def resnet() -> nn.Module:
    from _resnet import ResNet18

    torch.manual_seed(0)
    model = ResNet18(w=8).double()
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) - 0.5)
    return model.eval()


MODELS = {"gpt2": gpt2, "bert": bert, "vit": vit, "resnet": resnet, "vit_tiny": vit_tiny}
SMALL = ("gpt2", "bert", "vit", "resnet")


def inputs(name: str, P: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name in ("gpt2", "bert"):
        return torch.randint(0, 100, (P, 8), generator=g)
    size = 16 if name == "resnet" else 32
    return torch.randn(P, 3, size, size, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def func_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The anchor: ``torch.func`` per-sample Jacobians of every trainable parameter, then ``J J^T``."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p, xi):
        return functional_call(model, p, (xi[None],)).reshape(-1)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        j = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    P = x.shape[0]
    J = torch.cat([v.reshape(P, v.shape[1], -1).to(torch.float64) for v in j.values()], dim=2)
    return torch.einsum("icn,jcn->ij", J, J)


def measure(name: str, P: int, rounds: int) -> dict[str, float]:
    from _timing import paired_ratios, samples

    from probes.autodiff.ntk import empirical_ntk, ntk_plan

    # after probes: benchmarks/ntk.py puts this checkout first on the path (PYTHONPATH may name another)
    peak_memory = importlib.import_module("ntk").peak_memory

    model, x = MODELS[name](), inputs(name, P)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    plan = ntk_plan(model, x)
    t_plan = time.perf_counter() - t0
    params = dict(model.named_parameters())
    fallback = sum(params[n].numel() for n in plan.fallback)
    K = empirical_ntk(model, x, plan=plan)
    ref = func_ntk(model, x)
    err = float((K - ref).abs().max() / ref.abs().max())
    cases = {"torch.func": lambda: func_ntk(model, x), "probes": lambda: empirical_ntk(model, x, plan=plan)}
    times = samples(cases, rounds=rounds, warmup=0)
    ratio = 1.0 / paired_ratios(times, "torch.func")["probes"]
    mem = {k: peak_memory(fn, "cpu") for k, fn in cases.items()}
    t_probes, t_func = statistics.median(times["probes"]), statistics.median(times["torch.func"])
    print(
        f"\n== {name}: P = {P}, {plan.outputs} outputs, {n_params} parameters, float64; fallback: "
        f"{len(plan.fallback)} tensors ({fallback} values){', ' + str(sorted(plan.reasons)) if plan.reasons else ''}"
    )
    print(f"   plan (discovery and self-check): {t_plan:.3f} s")
    print(f"   probes     {t_probes:8.3f} s  peak {mem['probes']:8.1f} MiB")
    print(f"   torch.func {t_func:8.3f} s  peak {mem['torch.func']:8.1f} MiB")
    print(
        f"   torch.func / probes: time {ratio:.2f}x, peak memory {mem['torch.func'] / max(mem['probes'], 1e-9):.2f}x;"
        f" max relative difference {err:.2e}"
    )
    return {
        "time_ratio": ratio,
        "mem_ratio": mem["torch.func"] / max(mem["probes"], 1e-9),
        "err": err,
        "fallback": fallback,
    }


def measure_sketch(P: int, rounds: int, k: int = 8) -> dict[str, float]:
    """``outputs=k`` on the gpt2 case: the kernel of ``k`` fixed Gaussian projections of the logits."""
    from _timing import paired_ratios, samples

    from probes.autodiff.ntk import empirical_ntk, ntk_plan
    from probes.autodiff.ntk.outputs import SelectedOutput, gaussian_sketch

    model, x = gpt2(), inputs("gpt2", P)
    C = int(model(x[:1]).shape[1])
    sketched = SelectedOutput(model, position=False, sketch=gaussian_sketch(C, k, 0))
    plan, plan_k = ntk_plan(model, x), ntk_plan(sketched, x)
    exact = empirical_ntk(model, x, plan=plan)
    K = empirical_ntk(sketched, x, plan=plan_k)
    trace_err = float((K.trace() - exact.trace()).abs() / exact.trace())
    fro_err = float(torch.linalg.matrix_norm(K - exact) / torch.linalg.matrix_norm(exact))
    seeds = [
        float(empirical_ntk(SelectedOutput(model, position=False, sketch=gaussian_sketch(C, k, s)), x).trace())
        for s in range(8)
    ]
    mean_err = abs(statistics.fmean(seeds) - float(exact.trace())) / float(exact.trace())
    cases = {
        "torch.func": lambda: func_ntk(model, x),
        "probes": lambda: empirical_ntk(model, x, plan=plan),
        "sketch": lambda: empirical_ntk(sketched, x, plan=plan_k),
    }
    times = samples(cases, rounds=rounds, warmup=0)
    r = paired_ratios(times, "torch.func")
    print(f"\n== gpt2 outputs={k}: P = {P}, {C} logits projected on {k} Gaussian directions (seed 0)")
    print(
        f"   outputs={k}  {statistics.median(times['sketch']):8.3f} s;  exact probes "
        f"{statistics.median(times['probes']):.3f} s;  torch.func {statistics.median(times['torch.func']):.3f} s"
    )
    print(
        f"   torch.func / outputs={k}: time {1.0 / r['sketch']:.2f}x;  exact probes / outputs={k}: time "
        f"{r['probes'] / r['sketch']:.2f}x"
    )
    print(
        f"   relative error: trace {trace_err:.2%}, kernel (Frobenius) {fro_err:.2%}; mean trace of 8 seeds "
        f"{mean_err:.2%}"
    )
    # the probe's old default on a language model's (P, T, C) logits: every position (positions="all")
    seq = Logits(model.model, last=False)
    t0 = time.perf_counter()
    empirical_ntk(seq, x)
    t_all = time.perf_counter() - t0
    T = int(x.shape[1])
    print(
        f"   (P, T, C) = ({P}, {T}, {C}) logits, every position (positions='all', {T * C} outputs): "
        f"{t_all:.3f} s, {t_all / statistics.median(times['probes']):.1f}x the last position's exact kernel "
        f"(positions='last', the default), {t_all / statistics.median(times['sketch']):.0f}x outputs={k} (1 round)"
    )
    return {"trace_err": trace_err, "fro_err": fro_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help="comma-separated: gpt2, bert, vit, resnet")
    ap.add_argument("--P", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cases = a.cases.split(",") if a.cases else (list(SMALL) if a.smoke else ["gpt2", "vit"])
    P = a.P or (4 if a.smoke else 16)
    rounds = a.rounds or (1 if (a.smoke or a.quick) else 3)
    import probes.autodiff.ntk as tangent

    print(
        f"NTK of real architectures, one measurement (trace over outputs), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); ratios torch.func / probes (above 1: probes is faster or smaller); "
        f"probes from {Path(tangent.__file__).parents[3]}"
    )
    for name in cases:
        r = measure(name, P, rounds)
        if not math.isfinite(r["err"]) or r["err"] > 1e-8:
            raise SystemExit(f"{name}: probes and torch.func differ by {r['err']:.3g}")
    if "gpt2" in cases:
        r = measure_sketch(P, rounds)
        if not math.isfinite(r["fro_err"]):
            raise SystemExit("gpt2 outputs=k: the sketched kernel is not finite")


if __name__ == "__main__":
    main()
