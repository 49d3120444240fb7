"""Empirical NTK: probes' layerwise kernels against ``torch.func``, and the matrix-free spectrum at large P.

Cases, each measured in one process, the ratios as medians over interleaved rounds (``benchmarks/_timing.py``):

- ``mlp``: a 20-200-200-1 tanh MLP (float32), P = 250, 500, 1000: ``probes`` (float64 and float32 products),
  ``torch.func`` (``vmap(jacrev)`` per-sample Jacobians of every parameter, then ``J J^T``: the anchor), a
  per-sample autograd loop, only the ``P x P`` products of the layerwise formula, and neural-tangents when JAX
  and neural-tangents import;
- ``resnet``: a small ResNet (conv-BN-ReLU stem, two BasicBlocks with residuals, the second strided with a 1x1
  conv-BN shortcut, BatchNorm in eval mode, mean pooling, Linear head; 3x16x16 inputs, 10 outputs, float64),
  P = 512: ``probes`` against ``torch.func``, ratio = median over rounds of ``torch.func / probes``, and the
  "products floor": only the ``P x P`` products of the per-sample gradients (what ``J J^T`` costs in symmetric
  strips), so ``torch.func / floor`` is the best ratio any exact method forming ``J J^T`` could reach;
- ``transformer``: a 2-layer pre-norm transformer encoder (token and position Embedding, LayerNorm, 2-head
  attention from nn.Linear projections, GELU MLP, mean pooling, Linear head; d = 32, vocab 100, 10 outputs,
  float64), P = 256 sequences of 16 tokens;
- on both, the kernel against its bound: the three costs of any exact method that forms per-sample gradients,
  each timed alone in the same rounds by plain torch written here (none of probes' code): (a) the output-gradient
  passes (chunked forwards with hooks recording each layer's input, one backward pass vectorised over the outputs
  with ``autograd.grad(is_grads_batched=True)``), (b) each layer's per-sample gradients ``D = sum_k g_k z_k^T`` (one
  ``torch.bmm`` per layer and chunk: Conv2d on ``F.unfold`` patches, Linear over tokens; ``sum_k g_k xhat_k`` for
  the norm layers, a scatter-add for Embedding) into fresh buffers for all P, (c) the Gram products
  ``sum_l D_l D_l^T`` in symmetric strips. Their kernel is checked against probes'; printed: each cost, their
  sum, ``empirical_ntk``'s time and kernel / sum (median of the per-round ratios), with probes' own two stages
  (``_layer_terms``, ``_accumulate_term``) beside them;
- ``topk``: MLP 64-256-256-10 (float32), P = 4,000: top-10 eigenvalues from ``ntk_operator`` + block Krylov
  (``top_eigenvalues``) against ``eigvalsh`` of the dense kernel (time of each, largest relative error);
- ``large``: the same MLP at P = 50,000 in a fresh process: top-10 eigenvalues and the exact trace, wall time
  and peak resident memory (``ru_maxrss``, torch included);
- ``budget``: the ``ntk`` probe's estimate at attach (``probes.autodiff.ntk.ntk_cost``: peak memory and time)
  beside what its measurements take, each case in a fresh process: the peak is ``ru_maxrss`` after two
  measurements less the resident memory before them (torch, model and probe batch already there), the time that of
  the second measurement. Cases: an MLP 64-256-256-10 (tanh, float32, 85,002 parameters, top-10 spectrum with the
  default options) at P = 50,000; the same MLP's full spectrum at P = 4,000; the ResNet (P = 512) and the
  transformer (P = 256) above, full spectrum; every case with class labels (the alignment's kernels included).

Peak memory of the mlp cases: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the running total of the
allocations that ``torch.profiler(profile_memory=True)`` attributes to operators. Times are medians; never
asserted. The machine may be shared: the spread of the per-round ratios is printed with each median.

    python benchmarks/ntk.py                      # every case at the sizes above
    python benchmarks/ntk.py --cases resnet,transformer
    python benchmarks/ntk.py --cases budget       # the NTK's estimate against the measured peak and time
    python benchmarks/ntk.py --quick              # smaller P (ResNet 128, transformer 64, top-k 2,000, large 10,000)
    python benchmarks/ntk.py --smoke              # seconds (the test suite runs it)
"""

# Earlier measurements, quoted in the library's docstring until probes/functional/ntk/ was split (the README table
# holds the current ones): --cases resnet,transformer, one thread, float64, medians of 3 rounds on a shared 2-core
# VM (+-15%). Small ResNet, P = 512: probes 4.7-5.3 s against torch.func's 8.3-10.6 s (1.8-2.0x; 1.4x before the
# per-sample gradients were written in place by batched GEMMs, with implicit bias columns and small CPU chunks),
# the P x P products alone 1.7 s (torch.func / products = 6.7x). Small transformer, P = 256: 1.06-1.08 s against
# 1.4-1.7 s (1.4-1.55x; 1.1x before), the products alone 0.5 s (bound 3.3x).
#
# The kernel against its bound (--cases resnet,transformer --threads 1 --rounds 5; float64, medians of 5
# interleaved rounds on the shared 2-core VM, other agents' tests running: rounds spread +-15%). ResNet, P = 512:
# (a) output-gradient passes 1.49 s, (b) per-sample gradients 1.38 s (1.01 s into reused buffers), (c) Gram 1.42 s;
# sum 4.20 s (3.84 s); empirical_ntk 4.13 s = 0.92x the sum (rounds 0.86-1.05), 1.01x with reused buffers
# (0.97-1.15); torch.func 9.4 s. Transformer, P = 256: (a) 0.24 s, (b) 0.34 s (0.16 s), (c) 0.45 s; sum 1.03 s
# (0.85 s); empirical_ntk 1.06 s = 1.05x (0.84-1.15), 1.26x with reused buffers (0.99-1.40); torch.func 1.67 s.
# The difference between the two sums is the first touch of the fresh memory of the per-sample gradients (781 and
# 414 MiB; page faults on this VM), which a kernel keeping no memory between calls pays too; THP_MEM_ALLOC_ENABLE=1
# removed it on the transformer (0.02 s) but made the ResNet slower (compaction stalls, 0.8 s). probes' own Gram
# (dense._accumulate_term, strips of max(128, P/4) rows) takes 0.51 s on the transformer against 0.45 s for (c)'s
# P/4 rows: swapping dense._strip_rows for P/4 rows made empirical_ntk 10% faster there (median of 7 rounds).
# Before _layer_terms stopped copying every recorded layer output (the same run otherwise): 0.94x and 1.05x the
# sum, 1.02x and 1.25x with reused buffers; the change is within the noise of these rounds.

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import interleaved, samples  # noqa: E402

import probes.autodiff.ntk as tangent  # noqa: E402
from probes.functional.spectra import top_eigenvalues  # noqa: E402

ANCHOR = "torch.func"
FLOOR = "products floor"
FACTORS = "probes factors"
CASES = ("mlp", "resnet", "transformer", "topk", "large", "budget")


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def build(
    P: int, sizes: tuple[int, ...], device: str, seed: int = 0, act: type[nn.Module] = nn.Tanh
) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(device), torch.randn(P, sizes[0], device=device)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 16, out: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, out)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.layer2(self.layer1(h)).mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h):
        B, T, d = h.shape
        split = (B, T, self.heads, d // self.heads)
        q, k, v = (f(h).view(split).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(B, T, d))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.ln1, self.att, self.ln2 = nn.LayerNorm(d), SelfAttention(d, heads), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, h):
        h = h + self.att(self.ln1(h))
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))


class Encoder(nn.Module):
    def __init__(
        self, vocab: int = 100, T: int = 16, d: int = 32, heads: int = 2, layers: int = 2, out: int = 10
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, 2 * d) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, out)

    def forward(self, t):
        h = self.tok(t) + self.pos(torch.arange(t.shape[1], device=t.device).expand(t.shape[0], -1))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln(h).mean(dim=1))


def resnet_case(P: int, width: int = 16, side: int = 16, out: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallResNet(width, out).double()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # running statistics as after some training, so BatchNorm is not the identity
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval(), torch.randn(P, 3, side, side, dtype=torch.float64)


def transformer_case(P: int, T: int = 16, d: int = 32, vocab: int = 100, out: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return Encoder(vocab, T, d, 2, 2, out).double().eval(), torch.randint(0, vocab, (P, T))


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def ntk_torch_func(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],)).reshape(-1)

    j = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    J = torch.cat([v.reshape(x.shape[0], -1) for v in j.values()], dim=1)
    return J @ J.T


def ntk_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[i : i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


def product_factors(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(G, [Z 1])`` of every Linear of an MLP with one output (the factors the products need)."""
    plan = tangent.ntk_plan(model, x)
    pairs = tangent.NTKSettings(pairs_method="pairs")
    terms = tangent._layer_terms(model, (x,), x.shape[0], plan, "trace", None, dtype, "bench", settings=pairs)
    return [(t.G[:, 0, 0, 0], t.Z[:, 0, 0]) for t in terms.values()]


def products(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    out = None
    for G, Z in factors:
        term = (G @ G.T).mul_(Z @ Z.T)
        out = term if out is None else out.add_(term)
    return out


def products_floor(model: nn.Module, x: torch.Tensor, plan: tangent.NTKPlan):
    """A callable doing only the ``P x P`` products of ``empirical_ntk`` (float64, trace): the Gram of the
    per-sample gradients of every layer (``_accumulate_term``), on factors computed once beforehand. Any exact
    method that forms ``J J^T`` pays at least this (``P^2 C n_params / 2`` multiply-adds)."""
    P = x.shape[0]
    terms = list(tangent._layer_terms(model, (x,), P, plan, "trace", None, torch.float64, "bench").values())

    def run() -> torch.Tensor:
        theta = torch.zeros(P, P, dtype=torch.float64)
        for t in terms:
            tangent._accumulate_term(theta, t, None)
        return theta

    return run


# ------------------------------------------------------------------------------------------------
# the three costs of an exact per-sample-gradient method, each alone, in plain torch (none of probes' code)
# ------------------------------------------------------------------------------------------------
BOUND = ("(a) output-gradient passes", "(b) per-sample gradients", "(c) Gram products")
BOUND_SUM = "sum (a)+(b)+(c)"
BOUND_REUSED = "(b) into reused buffers"
WARM_SUM = "sum, (b) into reused buffers"
#: samples per forward/backward of the three costs timed alone: the fastest (a) + (b) of 4, 8, 16, 32, 64
BOUND_CHUNK = {"resnet": 16, "transformer": 32}


def bound_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that register a trainable parameter (each called once per forward in these nets)."""
    return [m for m in model.modules() if any(p is not None and p.requires_grad for p in m._parameters.values())]


def output_grad_passes(model: nn.Module, x: torch.Tensor, chunk: int):
    """(a) Chunk by chunk: a forward with hooks recording every layer's input ``z`` and output, then one backward
    pass vectorised over the ``C`` outputs (``is_grads_batched``) giving ``g = df_c / d(output)`` of every layer,
    ``(C, B, *output)``. Yields ``(start, stop, [(module, z, g)])`` per chunk."""
    layers = bound_layers(model)
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o))) for m in layers]
    try:
        P = x.shape[0]
        for s in range(0, P, chunk):
            e = min(P, s + chunk)
            seen.clear()
            with torch.enable_grad():
                f = model(x[s:e]).reshape(e - s, -1)
                C = f.shape[1]
                eye = torch.eye(C, dtype=f.dtype, device=f.device)[:, None, :].expand(C, e - s, C)
                gs = torch.autograd.grad(f, [o for _, _, o in seen], eye, is_grads_batched=True)
            calls = [(m, z.detach(), g) for (m, z, _), g in zip(seen, gs)]
            del f, gs
            seen.clear()
            yield s, e, calls
    finally:
        for h in handles:
            h.remove()


def _n_features(m: nn.Module) -> int:
    return sum(p.numel() for p in m._parameters.values() if p is not None and p.requires_grad)


def layer_gradients(m: nn.Module, z: torch.Tensor, g: torch.Tensor, D: torch.Tensor) -> None:
    """(b) for one layer and one chunk: the per-sample gradients ``D`` (B, C, F) of ``m`` (weight then bias) from
    its input ``z`` and output gradients ``g`` (C, B, *output): ``dW = sum_k g_k z_k^T`` by one batched GEMM
    (Conv2d on ``F.unfold`` patches, Linear over positions), ``sum_k g_k xhat_k`` for the norm layers, a
    scatter-add of ``g`` into the token rows for Embedding."""
    C, B = g.shape[:2]
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        if isinstance(m, nn.Conv2d):
            assert m.groups == 1 and m.padding_mode == "zeros"
            Z = F.unfold(z, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # (B, K, d)
        else:
            Z = z.reshape(B, -1, m.in_features)
        n, K, d = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features, Z.shape[1], Z.shape[2]
        A = g.reshape(C, B, -1, n) if isinstance(m, nn.Linear) else g.reshape(C, B, n, K).transpose(2, 3)
        A = A.permute(1, 0, 3, 2).reshape(B, C * n, K)  # (B, C n, K): rows (c, n) of each sample
        bias = m.bias is not None
        W = D.view(B, C, n, d + bias)  # a row [dW_row, db] per output unit: the GEMM writes into it in place
        torch.bmm(A, Z, out=W[..., :d].view(B, C * n, d))
        if bias:
            W[..., d] = A.view(B, C, n, K).sum(-1)
    elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
        if isinstance(m, nn.BatchNorm2d):
            xhat = F.batch_norm(z, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
            n = m.num_features
            gg, xx = g.reshape(C, B, n, -1), xhat.reshape(B, n, -1)
            D[:, :, :n] = torch.einsum("cbnk,bnk->bcn", gg, xx)
            D[:, :, n:] = gg.sum(-1).transpose(0, 1)
        else:
            xhat = F.layer_norm(z, m.normalized_shape, None, None, m.eps)
            n = xhat.shape[-1]
            gg, xx = g.reshape(C, B, -1, n), xhat.reshape(B, -1, n)
            D[:, :, :n] = torch.einsum("cbkn,bkn->bcn", gg, xx)
            D[:, :, n:] = gg.sum(2).transpose(0, 1)
    elif isinstance(m, nn.Embedding):
        t = z.reshape(B, -1)
        n = m.embedding_dim
        rows = D.view(B, C, m.num_embeddings, n).zero_()
        rows.scatter_add_(2, t[:, None, :, None].expand(B, C, t.shape[1], n), g.reshape(C, B, -1, n).transpose(0, 1))
    else:
        raise TypeError(f"no per-sample gradient formula here for {type(m).__name__}")


def per_sample_gradients(
    model: nn.Module, P: int, C: int, chunks, out: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """(b) Every layer's per-sample gradients ``D`` (P, C, F), in fresh buffers (or in ``out``), from ``chunks`` of
    records ``(start, stop, [(module, z, g)])``."""
    p = next(model.parameters())
    layers = bound_layers(model)
    Ds = (
        dict(zip(layers, out))
        if out is not None
        else {m: torch.empty(P, C, _n_features(m), dtype=p.dtype, device=p.device) for m in layers}
    )
    for s, e, calls in chunks:
        for m, z, g in calls:
            layer_gradients(m, z, g, Ds[m][s:e])
    return list(Ds.values())


def gram_products(Ds: list[torch.Tensor], P: int) -> torch.Tensor:
    """(c) ``Theta = sum_l D_l D_l^T`` (trace over outputs: ``D_l`` as (P, C F)), in strips of ``P / 4`` rows
    over the upper triangle, each mirrored below the diagonal."""
    rows = max(1, -(-P // 4))
    theta = torch.zeros(P, P, dtype=Ds[0].dtype, device=Ds[0].device)
    for D in Ds:
        D = D.reshape(P, -1)
        for s in range(0, P, rows):
            e = min(P, s + rows)
            blk = D[s:e] @ D[s:].T
            theta[s:e, s:] += blk
            theta[e:, s:e] += blk[:, e - s :].T
    return theta


def bound_costs(model: nn.Module, x: torch.Tensor, C: int, chunk: int) -> tuple[dict, torch.Tensor]:
    """The three costs as callables, each alone, and the kernel they compute together (to check them).

    (a) runs the passes and drops their records. (b) forms the per-sample gradients of every chunk from the
    records of one chunk, kept as after its backward pass (in cache, as in a method interleaving (a) and (b)),
    into fresh buffers for all ``P`` samples (``BOUND_REUSED``: into the same buffers every time, so without the
    first touch of fresh memory). (c) takes the per-sample gradients of all ``P`` samples, computed once
    beforehand (``BOUND_REUSED`` then overwrites them: the check is done, and the products' time does not depend
    on the values)."""
    P = x.shape[0]
    first: list = []

    def keep_first(passes):
        for s, e, calls in passes:
            if not first:
                first.extend(calls)
            yield s, e, calls

    Ds = per_sample_gradients(model, P, C, keep_first(output_grad_passes(model, x, chunk)))
    theta = gram_products(Ds, P)

    def one_chunk_repeated():
        for s in range(0, P, chunk):
            m = min(P, s + chunk) - s
            yield s, s + m, [(mod, z[:m], g[:, :m]) for mod, z, g in first]

    def passes_alone() -> None:
        for _ in output_grad_passes(model, x, chunk):
            pass

    return {
        BOUND[0]: passes_alone,
        BOUND[1]: lambda: per_sample_gradients(model, P, C, one_chunk_repeated()),
        BOUND[2]: lambda: gram_products(Ds, P),
        BOUND_REUSED: lambda: per_sample_gradients(model, P, C, one_chunk_repeated(), out=Ds),
    }, theta


def neural_tangents_case(model: nn.Module, x: torch.Tensor):
    """A callable computing neural-tangents' empirical NTK (trace, summed) on the same weights, or None."""
    try:
        import jax
        import jax.numpy as jnp
        import neural_tangents as nt
    except Exception:  # noqa: BLE001 - optional column
        return None
    linears = [m for m in model if isinstance(m, nn.Linear)]
    params = [
        (jnp.asarray(m.weight.detach().cpu().numpy().T), jnp.asarray(m.bias.detach().cpu().numpy())) for m in linears
    ]

    def apply(p, xs):
        h = xs
        for i, (w, b) in enumerate(p):
            h = h @ w + b
            if i < len(p) - 1:
                h = jnp.tanh(h)
        return h

    fn = jax.jit(nt.empirical_ntk_fn(apply, trace_axes=(-1,), vmap_axes=0))
    xs = jnp.asarray(x.detach().cpu().numpy())
    return lambda: fn(xs, None, params).block_until_ready()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(fn, device: str) -> float:
    """Peak memory (MiB) that one call of ``fn`` adds: CUDA allocator statistics, or on the CPU the running
    total of the allocations and frees that ``torch.profiler`` attributes to operators (peaks inside one
    operator are not seen)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    total = peak = 0
    for e in events:
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    return peak / 2**20


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def mlp_section(Ps: list[int], sizes: tuple[int, ...], rounds: int, memory: bool, device: str) -> list[dict]:
    print(
        f"\n== mlp: empirical NTK (trace over outputs) of MLP {'-'.join(map(str, sizes))} (tanh, float32), "
        f"device {device}; medians of {rounds} interleaved rounds"
    )
    rows: list[dict] = []
    for P in Ps:
        model, x = build(P, sizes, device)
        f64 = product_factors(model, x, torch.float64)
        f32 = product_factors(model, x, torch.float32)
        fns = {
            "probes (float64)": lambda m=model, x=x: tangent.empirical_ntk(m, x),
            "probes (float32)": lambda m=model, x=x: tangent.empirical_ntk(m, x, dtype=torch.float32),
            ANCHOR: lambda m=model, x=x: ntk_torch_func(m, x),
            "products (float64)": lambda f=f64: products(f),
            "products (float32)": lambda f=f32: products(f),
            "autograd loop": lambda m=model, x=x: ntk_loop(m, x),
        }
        nt_case = neural_tangents_case(model, x)
        if nt_case is not None:
            fns["neural-tangents"] = nt_case
        ref = ntk_torch_func(model, x).double()
        errors = {
            name: rel_error(fns[name](), ref) for name in ("probes (float64)", "probes (float32)", "autograd loop")
        }
        timed = {k: (lambda f=f: (f(), sync(device))) for k, f in fns.items()}
        times = interleaved(timed, rounds=rounds, warmup=1)
        mems = {k: peak_memory(f, device) for k, f in fns.items()} if memory else {}
        print(f"\nP = {P}")
        print(
            f"{'case':<20} {'time (ms)':>11} {'ratio vs ' + ANCHOR:>20} {'x products':>11} {'peak MiB':>9} "
            f"{'rel. error':>11}"
        )
        for name, t in times.items():
            prod = times["products (float32)" if "float32" in name else "products (float64)"]
            vs_products = f"{t / prod:>11.2f}" if name.startswith("probes") else f"{'':>11}"
            mem = mems.get(name)
            mem_s = f"{mem:>9.1f}" if mem is not None else f"{'-':>9}"
            err = errors.get(name)
            err_s = f"{err:>11.1e}" if err is not None else f"{'':>11}"
            print(f"{name:<20} {t * 1e3:>11.2f} {times[ANCHOR] / t:>19.2f}x {vs_products} {mem_s} {err_s}")
            rows.append(
                {
                    "section": "mlp",
                    "P": P,
                    "case": name,
                    "time": t,
                    "speedup_vs_func": times[ANCHOR] / t,
                    "vs_products": t / prod if name.startswith("probes") else None,
                    "peak_mib": mem,
                    "max_error": err,
                }
            )
    print(
        "ratio vs torch.func = torch.func time / case time (higher is faster); x products = case time / time "
        "of the P x P products of the layerwise formula in the same precision"
    )
    return rows


def model_section(
    name: str, model: nn.Module, x: torch.Tensor, rounds: int, describe: str, bound_chunk: int
) -> list[dict]:
    """probes vs torch.func on one model: times, the median of the per-round ratios, and the exactness; then the
    kernel against the three costs of an exact per-sample-gradient method, each timed alone in the same rounds."""
    P = x.shape[0]
    plan = tangent.ntk_plan(model, x)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n== {name}: {describe}; P = {P}, {n_params} parameters, {plan.outputs} outputs, float64; "
        f"layerwise: {len(plan.fast)} layers, fallback: {plan.fallback or 'none'}"
    )
    K = tangent.empirical_ntk(model, x)
    ref = ntk_torch_func(model, x)
    lam, lam_ref = torch.linalg.eigvalsh(K).flip(0)[:5], torch.linalg.eigvalsh(ref).flip(0)[:5]
    err = rel_error(K, ref)
    eig_err = float(((lam - lam_ref).abs() / lam_ref[0]).max())
    trace_err = abs(float(K.trace() / ref.trace()) - 1)
    del ref
    bound, theta = bound_costs(model, x, plan.outputs, min(P, bound_chunk))
    bound_err = rel_error(theta, K)
    del K, theta
    floor = products_floor(model, x, plan)
    cases = {
        "probes": lambda: tangent.empirical_ntk(model, x, plan=plan),
        ANCHOR: lambda: ntk_torch_func(model, x),
        FLOOR: floor,
        FACTORS: lambda: tangent._layer_terms(model, (x,), P, plan, "trace", None, torch.float64, "bench"),
        **bound,
    }
    measured = samples(cases, rounds=rounds, warmup=0)  # round 1 warms all alike; medians over rounds
    del floor, bound
    measured[BOUND_SUM] = [sum(ts) for ts in zip(*(measured[k] for k in BOUND))]
    measured[WARM_SUM] = [a + b + c for a, b, c in zip(*(measured[k] for k in (BOUND[0], BOUND_REUSED, BOUND[2])))]
    ratios = [f / p for p, f in zip(measured["probes"], measured[ANCHOR])]
    floor_ratios = [f / p for p, f in zip(measured[FLOOR], measured[ANCHOR])]
    over_sum = [p / s for p, s in zip(measured["probes"], measured[BOUND_SUM])]
    over_warm = [p / s for p, s in zip(measured["probes"], measured[WARM_SUM])]
    times = {k: statistics.median(v) for k, v in measured.items()}
    ratio, best, vs_sum, vs_warm = (statistics.median(v) for v in (ratios, floor_ratios, over_sum, over_warm))
    print(f"{'case':<15} {'median (s)':>11}   per round (s)")
    for k in ("probes", ANCHOR, FLOOR):
        print(f"{k:<15} {times[k]:>11.3f}   {', '.join(f'{t:.2f}' for t in measured[k])}")
    print(
        f"ratio torch.func / probes: median {ratio:.2f}x (per round: {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"max |K - K_func| / max|K_func| = {err:.1e}, trace {trace_err:.1e}, top-5 eigenvalues {eig_err:.1e}"
    )
    print(
        f"{FLOOR}: {times[FLOOR]:.3f} s, the P x P products alone (the Gram of the per-sample gradients, J J^T "
        f"in symmetric strips); torch.func / floor = {best:.2f}x, the best ratio of any exact method that forms "
        f"J J^T; probes = {times['probes'] / times[FLOOR]:.2f}x the floor"
    )
    print(
        f"\nthe kernel against its three costs, each alone (plain torch: hooks, autograd.grad, bmm; chunks of "
        f"{min(P, bound_chunk)} samples); their kernel equals probes' to {bound_err:.1e}"
    )
    print(f"{'cost':<34} {'median (s)':>11}   per round (s)")
    label = {
        "probes": "empirical_ntk",
        FACTORS: "  its (a)+(b): _layer_terms",
        FLOOR: "  its (c): _accumulate_term",
        BOUND_REUSED: "  (b) into reused buffers",
        WARM_SUM: "  sum with (b) into reused buffers",
    }
    for k in (BOUND[0], BOUND[1], BOUND_REUSED, BOUND[2], BOUND_SUM, WARM_SUM, "probes", FACTORS, FLOOR):
        print(f"{label.get(k, k):<34} {times[k]:>11.3f}   {', '.join(f'{t:.2f}' for t in measured[k])}")
    print(
        f"kernel / sum: median {vs_sum:.2f}x (per round: {', '.join(f'{r:.2f}' for r in over_sum)}); "
        f"kernel / sum with (b) into reused buffers: {vs_warm:.2f}x (per round: "
        f"{', '.join(f'{r:.2f}' for r in over_warm)})"
    )
    mib = P * plan.outputs * n_params * 8 / 2**20
    touch = times[BOUND[1]] - times[BOUND_REUSED]
    print(
        f"(b) writes the {mib:.0f} MiB of per-sample gradients into fresh memory, as a kernel that keeps none "
        f"between calls must: its first touch (page faults, zeroing) is {touch:.3f} s of (b)"
    )
    return [
        {
            "section": name,
            "P": P,
            "case": "probes",
            "time": times["probes"],
            "speedup_vs_func": ratio,
            "ratios": ratios,
            "max_error": err,
            "trace_error": trace_err,
            "eig_error": eig_err,
            "vs_bound_sum": vs_sum,
            "vs_bound_sum_rounds": over_sum,
            "vs_warm_sum": vs_warm,
        },
        {"section": name, "P": P, "case": ANCHOR, "time": times[ANCHOR], "speedup_vs_func": 1.0},
        {"section": name, "P": P, "case": FLOOR, "time": times[FLOOR], "speedup_vs_func": best},
        *(
            {"section": name, "P": P, "case": k, "time": times[k], "rounds": measured[k]}
            for k in (*BOUND, BOUND_SUM, BOUND_REUSED, WARM_SUM, FACTORS)
        ),
        {"section": name, "P": P, "case": "bound check", "max_error": bound_err},
    ]


def topk_section(P: int, sizes: tuple[int, ...], k: int = 10) -> list[dict]:
    model, x = build(P, sizes, "cpu", act=nn.ReLU)
    print(
        f"\n== topk: top-{k} eigenvalues of the NTK of MLP {'-'.join(map(str, sizes))} (ReLU, float32 model, "
        f"float64 products), P = {P}"
    )
    t0 = time.perf_counter()
    K = tangent.empirical_ntk(model, x)
    t1 = time.perf_counter()
    lam = torch.linalg.eigvalsh(K).flip(0)[:k]
    t2 = time.perf_counter()
    trace_ref = float(K.trace())
    del K
    op = tangent.ntk_operator(model, x)
    t3 = time.perf_counter()
    top = top_eigenvalues(op.matmat, op.shape[0], k)
    trace = float(op.trace())
    t4 = time.perf_counter()
    err = float(((top.values - lam).abs() / lam).max())
    print(
        f"dense kernel {t1 - t0:.2f} s + eigvalsh {t2 - t1:.2f} s; operator {t3 - t0 - (t2 - t0):.2f} s "
        f"+ block Krylov {t4 - t3:.2f} s ({top.products} products, converged: {top.converged})"
    )
    print(
        f"largest relative error of the top-{k}: {err:.1e}; trace relative error {abs(trace / trace_ref - 1):.1e}; "
        f"lambda_{k} / lambda_1 = {float(lam[-1] / lam[0]):.2e}"
    )
    return [
        {
            "section": "topk",
            "P": P,
            "case": "topk",
            "time": t4 - t2,
            "dense_time": t2 - t0,
            "eig_error": err,
            "products": top.products,
        }
    ]


def large_child(P: int, sizes: tuple[int, ...], k: int) -> None:
    """Run in a fresh process: the operator, top-k and trace; print one JSON line."""
    import resource

    model, x = build(P, sizes, "cpu", act=nn.ReLU)
    t0 = time.perf_counter()
    op = tangent.ntk_operator(model, x)
    t1 = time.perf_counter()
    top = top_eigenvalues(op.matmat, op.shape[0], k)
    t2 = time.perf_counter()
    trace = float(op.trace())
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "P": P,
                "factors_s": t1 - t0,
                "krylov_s": t2 - t1,
                "trace_s": t3 - t2,
                "total_s": t3 - t0,
                "products": top.products,
                "converged": top.converged,
                "peak_rss_gib": rss,
                "top": top.values.tolist(),
                "trace": trace,
            }
        )
    )


def large_section(P: int, sizes: tuple[int, ...], k: int = 10, threads: int | None = None) -> list[dict]:
    print(
        f"\n== large: top-{k} eigenvalues and trace of the NTK of MLP {'-'.join(map(str, sizes))} (ReLU, float32 "
        f"model, float64 products) at P = {P}, fresh process"
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--large-child",
        str(P),
        "--sizes",
        ",".join(map(str, sizes)),
        "--k",
        str(k),
    ] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    print(
        f"factors {r['factors_s']:.1f} s, block Krylov {r['krylov_s']:.1f} s ({r['products']} products, converged: "
        f"{r['converged']}), trace {r['trace_s']:.1f} s; total {r['total_s']:.1f} s; peak RSS "
        f"{r['peak_rss_gib']:.2f} GiB (a P x P float64 kernel would be {P * P * 8 / 2**30:.1f} GiB)"
    )
    print(f"top eigenvalues: {', '.join(f'{v:.4g}' for v in r['top'][:5])}, ...; trace {r['trace']:.6g}")
    return [{"section": "large", "P": P, "case": "topk", "time": r["total_s"], "peak_rss_gib": r["peak_rss_gib"]}]


BUDGET_MODELS = ("mlp topk", "mlp full", "resnet", "transformer")


def _budget_model(name: str, P: int, smoke: bool):
    """The model, the probe inputs and labels, and the ntk options of one ``budget`` case."""
    g = torch.Generator().manual_seed(3)
    if name.startswith("mlp"):
        model, x = build(P, (8, 16, 16, 3) if smoke else (64, 256, 256, 10), "cpu")
        spectrum = "topk" if name == "mlp topk" else "full"
    elif name == "resnet":
        model, x = resnet_case(P, **({"width": 4, "side": 8} if smoke else {}))
        spectrum = "full"
    else:
        model, x = transformer_case(P, **({"T": 4, "d": 8, "vocab": 11} if smoke else {}))
        spectrum = "full"
    with torch.no_grad():
        C = model(x[:1]).shape[1]
    y = torch.randint(0, C, (P,), generator=g)
    return model, x, y, {"spectrum": spectrum, "top_k": 10, "image": False}


def _rss_now() -> int:
    """Resident bytes of this process now (``/proc/self/statm``), else the peak so far."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def budget_child(cases: str, smoke: bool) -> None:
    """``name:P,...`` in this process, one after the other, a JSON line each (a fresh process per case measures its
    peak alone)."""
    for case in cases.split(","):
        name, P = case.rsplit(":", 1)
        print(json.dumps(budget_case(name, int(P), smoke)))


def budget_case(name: str, P: int, smoke: bool) -> dict:
    """The ntk probe's estimate at attach (``validate``), then two measurements; the peak is ``ru_maxrss`` after
    them less the resident memory before them (torch, the model and the probe batch)."""
    import resource
    import warnings

    import probes.builtin.ntk as ntk_probe
    from probes.testing import probe_batch

    model, x, y, opts = _budget_model(name, P, smoke)
    probe = ntk_probe.NTK(**opts)
    products: list[int] = []
    solve = ntk_probe.top_eigenvalues

    def counted(*args, **kwargs):
        top = solve(*args, **kwargs)
        products.append(top.products)
        return top

    ntk_probe.top_eigenvalues = counted  # the vectors the Krylov solver multiplied, beside the estimate's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = probe_batch(model, x, y)
        probe.check(batch)
        cost = probe.cost
        before = _rss_now()
        times = []
        for step in (0, 1):
            batch.step = step
            t0 = time.perf_counter()
            probe.measure(batch)
            times.append(time.perf_counter() - t0)
    ntk_probe.top_eigenvalues = solve
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: KiB on Linux
    return {
        "case": name,
        "P": P,
        "route": cost.route,
        "n": cost.n,
        "est_peak": cost.peak_bytes,
        "est_s": cost.seconds,
        "stages": cost.stages,
        "products": cost.products,
        "measured_products": products[-1] if products else 0,
        "peak": maxrss - before,
        "maxrss": maxrss,
        "first_s": times[0],
        "second_s": times[1],
        "baseline": before,
        "summary": cost.summary(),
    }


def budget_section(sizes: dict[str, int], smoke: bool, threads: int | None = None) -> list[dict]:
    """The ntk probe's attach-time estimate (``probes.autodiff.ntk.ntk_cost``) against the measured peak and time,
    one fresh process per case."""
    print(
        "\n== budget: the ntk probe's estimate at attach against what its measurement takes; peak = ru_maxrss "
        "after two measurements less the resident memory before them, "
        + (
            "in this process (--smoke: a case's peak shows only above the earlier ones')"
            if smoke
            else "a fresh process per case"
        )
        + "; time of the second measurement"
    )
    print(
        f"{'case':<12} {'route':<5} {'P':>7} {'est. peak':>10} {'measured':>10} {'ratio':>6} {'est. time':>10} "
        f"{'measured':>9} {'ratio':>6} {'process peak':>13}"
    )
    rows = []
    if smoke:
        results = [budget_case(name, P, smoke) for name, P in sizes.items()]
    else:
        results = []
        for name, P in sizes.items():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--budget-child", f"{name}:{P}"] + (
                ["--threads", str(threads)] if threads else []
            )
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
            results += [json.loads(line) for line in out if line.startswith("{")]
    for r in results:
        name, P = r["case"], r["P"]
        ratio, t_ratio = r["peak"] / max(1, r["est_peak"]), r["second_s"] / max(1e-9, r["est_s"])
        print(
            f"{name:<12} {r['route']:<5} {P:>7} {r['est_peak'] / 2**20:>7.0f} MiB {r['peak'] / 2**20:>6.0f} MiB "
            f"{ratio:>6.2f} {r['est_s']:>9.3g}s {r['second_s']:>8.3g}s {t_ratio:>6.2f} "
            f"{r['maxrss'] / 2**30:>9.2f} GiB"
        )
        rows.append(
            {
                "section": "budget",
                "P": P,
                "case": name,
                **{
                    k: r[k]
                    for k in (
                        "route",
                        "est_peak",
                        "peak",
                        "maxrss",
                        "est_s",
                        "first_s",
                        "second_s",
                        "stages",
                        "products",
                        "measured_products",
                    )
                },
                "peak_ratio": ratio,
                "time_ratio": t_ratio,
            }
        )
    for r in rows:
        print(
            f"  {r['case']}: estimate by stage (MiB): "
            + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["stages"].items())
            + (
                f"; Krylov products: {r['products']} estimated, {r['measured_products']} taken"
                if r["route"] == "topk"
                else ""
            )
        )
    print(
        "ratio = measured / estimated (peak: memory the measurement adds; time: the estimate's operations at "
        "the measured float64 GEMM rate); process peak: ru_maxrss, torch, model and probe batch included"
    )
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    p.add_argument("--sizes", default=None, help="MLP widths of the mlp case (default 20,200,200,1)")
    p.add_argument("--P", default=None, help="comma-separated probe-batch sizes of the mlp case")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--bound-chunk",
        type=int,
        default=None,
        help=f"samples per forward/backward of the three costs timed alone (default {BOUND_CHUNK})",
    )
    p.add_argument("--large-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    big_sizes = (64, 256, 256, 10)
    if args.budget_child is not None:
        budget_child(args.budget_child, args.smoke)
        return []
    if args.large_child is not None:
        large_child(args.large_child, tuple(int(s) for s in args.sizes.split(",")), args.k)
        return []
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (20, 200, 200, 1)
    if args.smoke:
        Ps, rounds, memory, sizes = [24], 1, False, (5, 16, 16, 1)
        P_res, P_tr, P_topk, P_large, rounds_models = 6, 4, 200, 1000, 1
        res_kw, tr_kw = {"width": 4, "side": 8}, {"T": 4, "d": 8, "vocab": 11}
        topk_sizes = large_sizes = (8, 16, 16, 3)
        budget = {"mlp topk": 300, "mlp full": 100, "resnet": 8, "transformer": 8}
    elif args.quick:
        Ps, rounds, memory = [250, 500], 3, not args.no_memory
        P_res, P_tr, P_topk, P_large, rounds_models = 128, 64, 2000, 10_000, 3
        res_kw, tr_kw, topk_sizes, large_sizes = {}, {}, big_sizes, big_sizes
        budget = {"mlp topk": 10_000, "mlp full": 2000, "resnet": 128, "transformer": 64}
    else:
        Ps, rounds, memory = [250, 500, 1000], 5, not args.no_memory
        P_res, P_tr, P_topk, P_large, rounds_models = 512, 256, 4000, 50_000, 3
        res_kw, tr_kw, topk_sizes, large_sizes = {}, {}, big_sizes, big_sizes
        budget = {"mlp topk": 50_000, "mlp full": 4000, "resnet": 512, "transformer": 256}
    if args.P:
        Ps = [int(v) for v in args.P.split(",")]
    rounds = args.rounds or rounds
    rounds_models = args.rounds or rounds_models
    print(f"empirical NTK benchmarks, device {args.device}, {torch.get_num_threads()} torch threads; cases {cases}")
    rows: list[dict] = []
    if "mlp" in cases:
        rows += mlp_section(Ps, sizes, rounds, memory, args.device)
    if "resnet" in cases:
        model, x = resnet_case(P_res, **res_kw)
        rows += model_section(
            "resnet",
            model,
            x,
            rounds_models,
            "small ResNet (conv-BN-ReLU stem, 2 BasicBlocks, residuals, BN eval), 3x16x16 inputs",
            args.bound_chunk or BOUND_CHUNK["resnet"],
        )
    if "transformer" in cases:
        model, t = transformer_case(P_tr, **tr_kw)
        rows += model_section(
            "transformer",
            model,
            t,
            rounds_models,
            f"2-layer transformer encoder (Embedding, LayerNorm, attention), {t.shape[1]} tokens",
            args.bound_chunk or BOUND_CHUNK["transformer"],
        )
    if "topk" in cases:
        rows += topk_section(P_topk, topk_sizes)
    if "large" in cases:
        rows += large_section(P_large, large_sizes, threads=args.threads)
    if "budget" in cases:
        rows += budget_section(budget, args.smoke, threads=args.threads)
    return rows


if __name__ == "__main__":
    main()
