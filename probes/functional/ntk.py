"""The empirical neural tangent kernel ``Theta(x, x') = J(x) J(x')^T`` of any model, exactly.

``J(x)`` is the Jacobian of the flattened output ``f(x)`` (``C`` values per sample) with respect to
every trainable parameter (``requires_grad=True``). Two kernels are offered:

- ``mode="trace"`` (default): the ``P x P`` kernel summed over outputs,
  ``Theta_ij = sum_c J_c(x_i) . J_c(x_j)`` (the sum of the PyTorch NTK tutorial;
  ``reduction="mean"`` divides by ``C``, which is neural-tangents' default ``trace_axes=(-1,)``);
- ``mode="full"``: the ``PC x PC`` kernel ``Theta_(i,a),(j,b) = J_a(x_i) . J_b(x_j)``, row ``i * C + a``
  (``.reshape(P, C, P, C)`` gives neural-tangents' ``(P, P, C, C)`` layout after a transpose).

Layerwise path (structured derivatives, as in Novak et al. 2022, "Fast finite width neural tangent kernel").
``Theta = sum_l Theta_l`` over parameter-owning layers; for a layer with inputs ``z`` and output gradients
``g = df_c / d(output)`` (the gradients of ``sum_i f_c(x_i)`` for every output ``c``, valid because samples do not
interact, which is checked; one backward pass vectorised over the ``C`` cotangents, ``is_grads_batched``, or one
pass per output where the model's backward cannot be vectorised), the per-sample gradient of each standard layer
is a sum over *positions* ``k`` (calls of the layer within one sample's forward, sequence positions, output pixels):

- ``nn.Linear``: ``dW = sum_k g_k z_k^T``, ``db = sum_k g_k``;
- ``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups): the same with ``z_k`` the
  unfolded input patch of output position ``k``, per group (the weight is block diagonal over groups);
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` in eval mode: ``dgamma = sum_k g_k * xhat_k``,
  ``dbeta = sum_k g_k`` (``xhat`` the normalised input, recomputed with torch's own formula);
- ``nn.Embedding``: ``dE = sum_k e_{t_k} g_k^T`` (rows selected by the tokens ``t``).

Hence, with a bias as a constant input 1 appended to ``z``,

    Theta_ij += sum_grp sum_{k,k'} (g_ik . g_jk') (z_ik . z_jk')                  (Linear, Conv)
    Theta_ij += sum_{k,k'} [t_ik = t_jk'] g_ik . g_jk'                             (Embedding)
    Theta_ij += D_i . D_j,  D_i the per-sample gradient (gamma, beta)              (norm layers)

Each layer takes, automatically, the cheaper of two contractions: the *pairwise-position* one above
(``K^2 (n + d)`` per pair of samples, ``K`` positions, ``n`` outputs, ``d`` inputs) or the *outer-product* one,
forming the per-sample gradients ``D_i = sum_k g_ik z_ik^T`` (``n d`` per pair, when they fit in memory).
No ``P x n_params`` Jacobian of the whole model is formed. nngeometry's ``Linear`` handler counts a layer
called twice wrongly (it drops the cross terms ``k != k'``); they are summed here.

Cost: the ``C`` vector-Jacobian products (``torch.func`` needs the same) plus, in ``mode="trace"``,
``P^2 sum_l min(C n_l d_l, K_l^2 (C n_l + d_l))`` for the products (``mode="full"``:
``(P C)^2 sum_l min(n_l d_l, K_l^2 (n_l + d_l))``). For ``K = 1`` (MLPs) the second term is far below
``torch.func``'s ``P^2 C n_params``; for layers with many positions (convolutions over images, Linear layers
over long sequences) the outer-product route wins and costs what ``J J^T`` costs, so the gain there comes from
the per-sample gradients: ``D_i = sum_k g_ik z_ik^T`` for all outputs is one batched GEMM ``(C n x K) @ (K x d)``
per sample, written in place into the ``P``-sample buffer (the bias as ``sum_k g_ik``, no column of ones; the
output gradients copied once; on the CPU chunks of about ``CPU_FACTOR_CHUNK_BYTES`` of factors, as temporaries of
tens of MB cost more in page faults than in arithmetic). Measured (one thread, float64, medians of 3 rounds;
benchmarks/ntk.py; a shared 2-core VM, +-15%): small ResNet, P = 512: 4.7-5.3 s against ``torch.func``'s
8.3-10.6 s (1.8-2.0x; before these changes 1.4x), where the ``P x P`` products alone take 1.7 s (``torch.func`` /
products = 6.7x, the bound for any exact method that forms ``J J^T``); small transformer, P = 256: 1.06-1.08 s
against 1.4-1.7 s (1.4-1.55x; before 1.1x), products alone 0.5 s (bound 3.3x).

Fallback (a parameter of any other module, a layer whose weight is tied to another module, used outside its
own ``forward``, or computed by a parametrization). Per-sample Jacobians of those parameters only,
``torch.func.vmap(jacrev(functional_call))``. Each per-sample Jacobian is computed once: the parameters are
split into groups whose Jacobians for all ``P`` samples fit ``FALLBACK_BUDGET`` (a larger tensor into slices
along its first axis), and ``Theta += J_grp J_grp^T`` group by group (cost linear in ``P`` per Jacobian). Only
when one row of one parameter does not fit are its sample blocks recomputed per pair of blocks.

A layer is on the layerwise path when, in two small discovery passes (1 and 2 samples), every call sees the
sample axis first, is called equally often per sample, and the gradients of its parameters through its own
calls (the module re-run on the recorded inputs) reproduce autograd's gradient of the whole model;
``ntk_plan`` shows the decision and, for every parameter left to the fallback, the reason.

Large ``P``: ``ntk_operator`` keeps the same layerwise factors and gives ``Theta V`` blockwise without forming
the ``P x P`` kernel (for ``D`` held: ``D (D^T V)``; for factors: ``W = sum_j v_j g_j z_j^T``, then
``(Theta v)_i = sum_k g_ik^T W z_ik``; for embeddings a scatter-add into the table), and the diagonal exactly
(per-sample gradient norms), for the Krylov eigen solver ``probes.functional.spectra.top_eigenvalues``. Factors
are first expressed in bases of their row spaces when those are much smaller (``_compressed``; in trace mode the
``C n`` output-gradient axis of the layer before a linear head has rank ``n``), which keeps every inner product.

Samples must not interact: a BatchNorm that normalises with batch statistics (training mode, or
``track_running_stats=False``) is rejected by name, active dropout too, and the output of sample 0 alone
must match its output within a batch of two. The ``ntk`` probe always runs the model in eval mode.
Nothing here changes the model: no ``.grad`` is written (``torch.autograd.grad`` only), no mode and no
parameter is touched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

MODES = ("trace", "full")
REDUCTIONS = ("sum", "mean")

#: bytes of fallback Jacobians (all samples) of one parameter group; also the cap on per-sample gradients D
FALLBACK_BUDGET = 1 << 30
#: bytes of one chunk of per-sample Jacobians in the fallback (sets its default chunk size)
FALLBACK_CHUNK_BYTES = 1 << 27
#: bytes of the temporaries of one row strip of the layerwise products (sets the strip height)
STRIP_BYTES = 1 << 28
#: default samples per forward/backward of the layerwise path (lowered for layers with many positions)
FAST_CHUNK = 2048
#: bytes of the recorded factors of one forward/backward chunk (sets the chunk when FAST_CHUNK is too many)
FACTOR_CHUNK_BYTES = 1 << 28
#: the same on the CPU: smaller, because temporaries of tens of MB come as fresh pages from the operating system
#: at every allocation (glibc maps them), and the page faults cost more than the arithmetic on them
CPU_FACTOR_CHUNK_BYTES = 1 << 24
#: bytes of the temporaries of one block of outputs (norm layers' ``g * xhat``)
OUTPUT_BLOCK_BYTES = 1 << 23
#: one backward pass vectorised over the outputs (``is_grads_batched``) instead of one per output
BATCHED_GRADS = True
#: how a layer is contracted: "auto" (fewer operations), "pairs" or "outer" (for tests)
PAIRS_METHOD = "auto"


class SampleMixingError(ValueError):
    """The model's output for one sample depends on other samples of the batch: no per-sample NTK."""


@dataclass
class NTKPlan:
    """How ``empirical_ntk`` splits a model: layers on the layerwise path, parameters for ``torch.func``.

    ``fast``: module path -> number of calls per forward; ``kinds``: module path -> layer kind ("Linear",
    "Conv2d", "LayerNorm", ...); ``fallback``: parameter names handled by per-sample Jacobians; ``reasons``:
    module path -> why its parameters were left to the fallback; ``outputs``: ``C``, output values per sample.
    """

    fast: dict[str, int] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    outputs: int = 0
    kinds: dict[str, str] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _as_args(x: Any, who: str) -> tuple[tuple[torch.Tensor, ...], int]:
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(f"{who}: x must be a tensor (or a tuple of tensors, the model's positional inputs) "
                        f"with the samples along the first axis, got {type(x).__name__}")
    if any(a.ndim == 0 for a in args):
        raise ValueError(f"{who}: x must have the samples along its first axis, got a 0-d tensor")
    P = int(args[0].shape[0])
    if any(int(a.shape[0]) != P for a in args):
        raise ValueError(f"{who}: the inputs have different numbers of samples {[int(a.shape[0]) for a in args]}")
    if P == 0:
        raise ValueError(f"{who}: x has no samples")
    for a in args:
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise ValueError(f"{who}: x contains NaN or infinite values")
    return args, P


def _take(args: tuple[torch.Tensor, ...], start: int, stop: int) -> tuple[torch.Tensor, ...]:
    return tuple(a[start:stop] for a in args)


def _flat_output(out: Any, rows: int, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who}: the model returned a {type(out).__name__}; the NTK needs a tensor output "
                        "(wrap the model so that it returns one tensor with the samples first)")
    if out.ndim == 0 or int(out.shape[0]) != rows:
        raise ValueError(f"{who}: the model output has shape {tuple(out.shape)} for {rows} input sample(s); "
                         "it must have the samples along its first axis")
    if not out.is_floating_point():
        raise TypeError(f"{who}: the model output has dtype {out.dtype}; it must be floating point")
    return out.reshape(rows, -1)


def _check_modules(model: nn.Module, who: str) -> None:
    """Reject modules that make a sample's output depend on the rest of the batch or on randomness."""
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_mean is None:
                why = "is in training mode" if m.training else "has track_running_stats=False"
                raise SampleMixingError(
                    f"{who}: {type(m).__name__} {path or '<root>'!r} {why}, so it normalises with the statistics "
                    "of the batch and every output depends on every sample: the per-sample NTK is undefined. "
                    "Call model.eval() first (the ntk probe runs the model in eval mode by design)")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"{who}: {type(m).__name__} {path or '<root>'!r} is active (training mode), so the "
                             "model is random and has no fixed Jacobian; call model.eval() first")


def _trainable(model: nn.Module, who: str) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{who}: the model has no trainable parameters (requires_grad=True), so its NTK is zero")
    return params


def _owners(model: nn.Module) -> dict[int, set[int]]:
    """Parameter id -> ids of the modules that register it (more than one: tied weights)."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return owners



# ------------------------------------------------------------------------------------------------
# per-layer structure: terms of the kernel
# ------------------------------------------------------------------------------------------------
@dataclass
class _Grad:
    """Per-sample gradients ``D`` (B, Ce, n): ``Theta_(i,a),(j,b) += D_ia . D_jb``."""

    D: torch.Tensor


@dataclass
class _Pairs:
    """``G`` (B, Ce, K, g, n), ``Z`` (B, K, g, d): ``Theta += sum_grp sum_{k,k'} (G_k . G_k') (Z_k . Z_k')``.

    ``bias=True``: ``Z`` stands for ``[Z, 1]`` (a trailing input 1 per position, the bias) not yet appended;
    only a layer's fresh term carries it (``_materialized`` appends the ones; the outer route never needs them).
    """

    G: torch.Tensor
    Z: torch.Tensor
    bias: bool = False


@dataclass
class _Embed:
    """``G`` (B, Ce, K, d), tokens ``T`` (B, K) into ``V`` rows: ``Theta += sum_{k,k'} [T_k = T_k'] G_k . G_k'``."""

    G: torch.Tensor
    T: torch.Tensor
    V: int


_Term = _Grad | _Pairs | _Embed


def _first(args: tuple, kwargs: dict, name: str = "input") -> Any:
    return args[0] if args else kwargs.get(name)


class _Kind:
    """A standard layer with a layerwise formula: which modules, the sample layout, the kernel term of one call."""

    bases: tuple[type, ...] = ()

    def matches(self, m: nn.Module) -> bool:
        return any(isinstance(m, b) and type(m).forward is b.forward for b in self.bases)

    def unsupported(self, m: nn.Module) -> str | None:
        """Why a module of this kind cannot take the layerwise path whatever its inputs (None: it can)."""
        return None

    def layout(self, m: nn.Module, x: Any) -> str | None:
        """Why this input does not have the samples along its first axis in the expected layout (None: fine)."""
        return None if isinstance(x, torch.Tensor) and x.ndim >= 1 else "its input is not a tensor with a sample axis"

    def term(self, m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> _Term:
        """The kernel term of one call: input ``x`` (B, ...), output gradients ``g`` (B, C, *output.shape[1:])."""
        raise NotImplementedError


def _with_ones(Z: torch.Tensor, G: torch.Tensor, m: nn.Module) -> _Pairs:
    """The term of ``[z, 1]`` for a trainable weight and bias (the ones left implicit, ``bias=True``), ``z`` or
    ``1`` alone when only one of them trains."""
    bias = m.bias is not None and m.bias.requires_grad
    if not m.weight.requires_grad:
        return _Pairs(G, Z.new_ones(Z.shape[:-1] + (1,)))
    return _Pairs(G, Z, bias)


def _materialized(t: _Term) -> _Term:
    """The term with the implicit bias column of ones appended to ``Z`` (other terms unchanged)."""
    if not (isinstance(t, _Pairs) and t.bias):
        return t
    return _Pairs(t.G, torch.cat([t.Z, t.Z.new_ones(t.Z.shape[:-1] + (1,))], dim=-1))


class _LinearKind(_Kind):
    bases = (nn.Linear,)

    def layout(self, m, x):
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return "its input has no sample axis (an unbatched call)"
        return None

    def term(self, m, x, g):
        B, C = g.shape[:2]
        Z = x.reshape(B, -1, 1, x.shape[-1])
        G = g.reshape(B, C, Z.shape[1], 1, g.shape[-1])
        return _with_ones(Z.to(g.dtype), G, m)


class _ConvKind(_Kind):
    bases = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def layout(self, m, x):
        n = len(m.kernel_size)
        if not isinstance(x, torch.Tensor) or x.ndim != n + 2:
            return f"its input is not batched (expected {n + 2} dimensions)"
        return None

    def term(self, m, x, g):
        """Patches ``z_k`` by unfolding the padded input (``Tensor.unfold`` per spatial axis, then ``::dilation``)."""
        B, C = g.shape[:2]
        groups, n = m.groups, len(m.kernel_size)
        pad = list(m._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        for i in range(n):
            x = x.unfold(2 + i, m.dilation[i] * (m.kernel_size[i] - 1) + 1, m.stride[i])
        x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in m.dilation)]  # (B, Cin, *O, *k)
        K = math.prod(x.shape[2:2 + n])
        perm = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
        # copied as (B, Cin, *k, *O), positions innermost (a fast copy); per group (Cin / groups) * prod(k) inputs
        # in the weight's layout; Z (B, K, groups, d) is a transposed view of it
        Z = x.permute(perm).reshape(B, groups, -1, K).permute(0, 3, 1, 2)
        G = g.reshape(B, C, m.out_channels, K).transpose(2, 3).reshape(B, C, K, groups, m.out_channels // groups)
        return _with_ones(Z.to(g.dtype), G, m)


class _NormKind(_Kind):
    """LayerNorm, GroupNorm, BatchNorm (eval): ``D = [sum_k g_k * xhat_k, sum_k g_k]`` per sample."""

    bases = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def unsupported(self, m):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            return "a BatchNorm normalising with batch statistics"
        return None

    def layout(self, m, x):
        if not isinstance(x, torch.Tensor):
            return "its input is not a tensor"
        if isinstance(m, nn.LayerNorm):
            if x.ndim <= len(m.normalized_shape):
                return "its input has no sample axis outside the normalized shape"
        elif x.ndim < 2:
            return "its input has no sample axis (an unbatched call)"
        return None

    def term(self, m, x, g):
        B, C = g.shape[:2]
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            nd = len(m.normalized_shape)
            sum_dims = tuple(range(2, g.ndim - nd))
        else:
            if isinstance(m, nn.GroupNorm):
                xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
            else:
                xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
            sum_dims = tuple(range(3, g.ndim))
        weight = m.weight is not None and m.weight.requires_grad
        bias = m.bias is not None and m.bias.requires_grad
        xhat = xhat.unsqueeze(1).to(g.dtype)
        n = math.prod(s for i, s in enumerate(g.shape) if i >= 2 and i not in sum_dims)
        D = g.new_empty(B, C, (weight + bias) * n)
        # a block of outputs at a time: the product g * xhat stays a small temporary (g is C x a layer's output)
        step = max(1, OUTPUT_BLOCK_BYTES // max(1, g[:, :1].numel() * g.element_size()))
        for c in range(0, C, step):
            gc = g[:, c:c + step]
            if weight:
                D[:, c:c + step, :n] = _summed(gc * xhat, sum_dims).reshape(B, -1, n)
            if bias:
                D[:, c:c + step, weight * n:] = _summed(gc, sum_dims).reshape(B, -1, n)
        return _Grad(D)


def _summed(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return t.sum(dims) if dims else t


class _EmbeddingKind(_Kind):
    bases = (nn.Embedding,)

    def unsupported(self, m):
        if m.max_norm is not None:
            return "max_norm renormalises the weight in place during the forward"
        if m.scale_grad_by_freq:
            return "scale_grad_by_freq scales its gradient by token counts of the whole batch"
        return None

    def term(self, m, x, g):
        B, C = g.shape[:2]
        T = x.reshape(B, -1).long()
        G = g.reshape(B, C, T.shape[1], m.embedding_dim)
        if m.padding_idx is not None:  # the padding row gets no gradient
            G = G * (T != m.padding_idx)[:, None, :, None].to(G.dtype)
        return _Embed(G, T, m.num_embeddings)


_KINDS: tuple[_Kind, ...] = (_LinearKind(), _ConvKind(), _NormKind(), _EmbeddingKind())


def _kind_of(m: nn.Module) -> _Kind | None:
    for k in _KINDS:
        if k.matches(m):
            return k
    return None


def _own_params(m: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters a layer registers itself (``weight``, ``bias``)."""
    return {n: p for n, p in m._parameters.items() if p is not None and p.requires_grad}


def _merge(terms: list[_Term]) -> _Term:
    """One term for all calls of a layer within a forward: positions concatenated, gradients summed."""
    t0 = terms[0]
    if len(terms) == 1:
        return t0
    if isinstance(t0, _Grad):
        return _Grad(torch.stack([t.D for t in terms]).sum(0))
    if isinstance(t0, _Pairs):
        return _Pairs(torch.cat([t.G for t in terms], dim=2), torch.cat([t.Z for t in terms], dim=1), t0.bias)
    return _Embed(torch.cat([t.G for t in terms], dim=2), torch.cat([t.T for t in terms], dim=1), t0.V)


def _traced(t: _Term, mode: str) -> _Term:
    """``mode="trace"``: fold the output axis into the feature axis (``sum_c g_c . g'_c = [g_c]_c . [g'_c]_c``)."""
    if mode == "full":
        return t
    if isinstance(t, _Grad):
        return _Grad(t.D.reshape(t.D.shape[0], 1, -1))
    if isinstance(t, _Pairs):
        B, C, K, g, n = t.G.shape
        return _Pairs(t.G.permute(0, 2, 3, 1, 4).reshape(B, 1, K, g, C * n), t.Z, t.bias)
    B, C, K, d = t.G.shape
    return _Embed(t.G.permute(0, 2, 1, 3).reshape(B, 1, K, C * d), t.T, t.V)


def _route(t: _Term, P: int, itemsize: int, target: str, Ce: int) -> str:
    """"outer" (per-sample gradients D) or "pairs" (pairwise positions), by operation count per pair of samples
    (``target="dense"``: the ``P x P`` products) or by memory (``target="operator"``: what ``Theta v`` keeps).

    ``t`` has all ``C`` outputs (not traced); ``Ce`` is ``C`` (``mode="full"``) or 1 (trace: the outputs then
    fold into the feature axis, ``n -> C n``). Per pair of samples the outer route costs ``Ce^2 (C / Ce) g n d``,
    the pairwise one ``g K^2 (Ce C n + d)``."""
    if isinstance(t, _Grad):
        return "outer"
    if isinstance(t, _Pairs):
        B, C, K, g, n = t.G.shape
        d = t.Z.shape[-1] + t.bias
        outer_size = C * g * n * d
        pair_cost, factor_size = g * K * K * (Ce * C * n + d), C * K * g * n + K * g * d
    else:
        B, C, K, d = t.G.shape
        outer_size = C * t.V * d
        pair_cost, factor_size = K * K * (Ce * C * d + 1), C * K * d + K
    fits = P * outer_size * itemsize <= FALLBACK_BUDGET
    if PAIRS_METHOD != "auto":
        return "outer" if (PAIRS_METHOD == "outer" and fits) else "pairs"
    if target == "operator":
        return "outer" if fits and outer_size <= factor_size else "pairs"
    return "outer" if fits and Ce * outer_size < pair_cost else "pairs"


def _outer_features(t: _Term) -> int:
    """Length of one output's per-sample gradient ``D_ic`` of the term's layer."""
    if isinstance(t, _Grad):
        return t.D.shape[2]
    if isinstance(t, _Pairs):
        _, _, _, g, n = t.G.shape
        return g * n * (t.Z.shape[-1] + t.bias)
    return t.V * t.G.shape[3]


def _outer_into(t: _Term, out: torch.Tensor) -> None:
    """Write the per-sample gradients ``D_ic`` of every sample and output of ``t`` (all ``C`` outputs, not traced)
    into ``out`` (B, C, F), in ``out``'s dtype; the trace over outputs is then a view ``(B, 1, C F)``.

    ``_Pairs``: per group, ``D_ic = [sum_k g_ick z_ik^T, sum_k g_ick]`` (weight ``n x d``, then the bias), one
    batched GEMM ``(B, C n, K) @ (B, K, d)`` written in place; ``_Embed``: ``D_ic = sum_k e_{t_ik} g_ick^T``
    (``V x d``) by a scatter-add; ``_Grad``: copied.
    """
    if isinstance(t, _Grad):
        out.copy_(t.D)
        return
    B, C = out.shape[:2]
    if isinstance(t, _Embed):
        _, _, K, d = t.G.shape
        D = out.view(B, C, t.V, d).zero_()
        D.scatter_add_(2, t.T[:, None, :, None].expand(B, C, K, d), t.G.to(out.dtype))
        return
    _, _, K, g, n = t.G.shape
    d = t.Z.shape[-1]
    D = out.view(B, C, g, n, d + t.bias)
    A = out.new_empty(B, C, n, K)  # one group's output gradients, rows (c, n) per sample (one copy of G)
    for j in range(g):
        A.copy_(t.G[:, :, :, j].transpose(2, 3))
        Z = t.Z[:, :, j].to(out.dtype)  # (B, K, d), any strides (a transposed view for convolutions)
        W = D[:, :, j, :, :d]
        if g == 1:  # (c, n) rows of the weight block are equally spaced: the GEMM writes them in place
            torch.bmm(A.view(B, C * n, K), Z, out=W.view(B, C * n, d))
        else:
            W.copy_(torch.bmm(A.view(B, C * n, K), Z).view(B, C, n, d))
        if t.bias:
            D[:, :, j, :, d] = A.sum(-1)


# ------------------------------------------------------------------------------------------------
# plan: which layers take the layerwise path
# ------------------------------------------------------------------------------------------------
def ntk_plan(model: nn.Module, x: Any, *, fast_path: bool = True, who: str = "empirical_ntk") -> NTKPlan:
    """Decide the layerwise layers and the fallback parameters (two forwards on one and two samples).

    Also checks that samples do not interact (``SampleMixingError``). ``reasons`` names every module whose
    parameters go to the fallback and why (no layerwise formula for its type, tied weights, use outside its
    own ``forward``, ...).
    """
    args, P = _as_args(x, who)
    _check_modules(model, who)
    params = _trainable(model, who)
    name_of = {id(p): n for n, p in params.items()}
    plan = NTKPlan()
    candidates: dict[str, tuple[nn.Module, _Kind]] = {}
    owners = _owners(model)
    for path, m in model.named_modules():
        direct = [p for p in m._parameters.values() if p is not None and p.requires_grad]
        kind = _kind_of(m)
        label = path or "<root>"
        if kind is None:
            base = next((b for k in _KINDS for b in k.bases if isinstance(m, b)), None)
            if base is not None and direct:
                plan.reasons[label] = f"{type(m).__name__} overrides {base.__name__}.forward"
            elif base is not None and any(p.requires_grad for p in m.parameters()):
                plan.reasons[label] = "its weight or bias is computed (a parametrization), not a plain parameter"
            elif direct:
                plan.reasons[label] = f"no layerwise formula for {type(m).__name__}"
            continue
        params_m = [p for n, p in m.named_parameters() if p.requires_grad]
        if not params_m:
            continue
        if len(direct) != len(params_m):
            plan.reasons[label] = "its weight or bias is computed (a parametrization), not a plain parameter"
        elif not fast_path:
            plan.reasons[label] = "fast_path=False"
        elif (why := kind.unsupported(m)) is not None:
            plan.reasons[label] = why
        elif any(len(owners.get(id(p), ())) > 1 for p in direct):
            plan.reasons[label] = "its parameters are registered in another module too (tied weights)"
        else:
            candidates[path] = (m, kind)

    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {p: [] for p in candidates}
    layouts: dict[str, list[str | None]] = {p: [] for p in candidates}
    recording = {"on": False, "b": 0}

    def make_hook(path: str, kind: _Kind):
        def hook(module, hargs, hkwargs, output):
            xin = _first(hargs, hkwargs)
            why = kind.layout(module, xin)
            b = recording["b"]
            if why is None and int(xin.shape[0]) != b:
                why = "a call does not see the samples along the input's first axis"
            if why is None and not (isinstance(output, torch.Tensor) and output.ndim >= 1 and output.shape[0] == b):
                why = "a call does not return the samples along the output's first axis"
            layouts[path].append(why)
            if recording["on"] and isinstance(output, torch.Tensor):
                calls[path].append((_detached(hargs), _detached(hkwargs), output))
                return output.clone()  # later in-place ops must not alter the recorded output
            return None
        return hook

    handles = [m.register_forward_hook(make_hook(p, k), with_kwargs=True) for p, (m, k) in candidates.items()]
    b2 = min(P, 2)
    weights = torch.linspace(1.0, 2.0, 7)
    try:
        with torch.enable_grad():  # as in the measured passes (some modules take fused paths without grad)
            recording["b"] = 1
            out1 = _flat_output(model(*_take(args, 0, 1)), 1, who).detach()
        counts1 = {p: len(v) for p, v in layouts.items()}
        if b2 == 2:
            clones = {name_of[id(p)]: p.detach().clone().requires_grad_(True)
                      for m, _ in candidates.values() for p in _own_params(m).values()}
            recording.update(on=True, b=2)
            with torch.enable_grad():
                out2 = _flat_output(functional_call(model, clones, _take(args, 0, 2)), 2, who)
                w = weights.to(out2.device, out2.dtype).repeat(out2.shape[1] // 7 + 1)[:out2.shape[1]]
                recorded = [o for p in candidates for _, _, o in calls[p]]
                targets = list(clones.values()) + recorded
                if targets and out2.requires_grad:
                    grads = list(torch.autograd.grad((out2 * w).sum(), targets, allow_unused=True))
                else:  # the output depends on none of these parameters
                    grads = [None] * len(targets)
            recording["on"] = False
            _check_mixing(out1, out2, who)
            pgrad = dict(zip(clones, grads[:len(clones)]))
            ograd = iter(grads[len(clones):])
            for path, (m, _kind) in candidates.items():
                gs = [next(ograd) for _ in calls[path]]
                reason = next((why for why in layouts[path] if why), None)
                if reason is None and len(calls[path]) != counts1[path]:
                    reason = (f"called {counts1[path]} time(s) in a forward of one sample but {len(calls[path])} for "
                              "two (data-dependent)")
                if reason is None:
                    reason = _check_own_gradient(m, calls[path], gs, pgrad, name_of)
                if reason:
                    plan.reasons[path or "<root>"] = reason
        else:
            for path in candidates:
                reason = next((why for why in layouts[path] if why), None)
                if reason:
                    plan.reasons[path or "<root>"] = reason
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    plan.outputs = int(out1.shape[1])
    for path, (m, _kind) in candidates.items():
        if (path or "<root>") not in plan.reasons and counts1[path] > 0:
            plan.fast[path] = counts1[path]
            plan.kinds[path] = type(m).__name__
            plan.modules[path] = m
    fast_ids = {id(p) for m in plan.modules.values() for p in _own_params(m).values()}
    plan.fallback = [n for n, p in params.items() if id(p) not in fast_ids]
    return plan


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detached(o) for o in obj)
    if isinstance(obj, list):
        return [_detached(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _check_mixing(out1: torch.Tensor, out2: torch.Tensor, who: str) -> None:
    """Sample 0 alone and within a batch of two must give the same output (up to rounding)."""
    a, b = out1[0].detach(), out2[0].detach()
    eps = torch.finfo(a.dtype).eps
    scale = torch.maximum(a.abs().max(), b.abs().max())
    diff = (a - b).abs().max()
    if bool(diff > 1e3 * eps * scale + torch.finfo(a.dtype).tiny):
        raise SampleMixingError(
            f"{who}: the output for sample 0 changes by {float(diff):.3g} (scale {float(scale):.3g}) when another "
            "sample is in the batch: the model mixes samples (batch statistics, attention over the batch, ...), "
            "so the per-sample NTK is undefined. Evaluate in eval mode without cross-sample operations")


def _check_own_gradient(m: nn.Module, calls: list[tuple[tuple, dict, torch.Tensor]],
                        grads: list[torch.Tensor | None], pgrad: dict[str, torch.Tensor | None],
                        name_of: dict[int, str]) -> str | None:
    """Why the layer's own calls do not account for its parameters' whole gradient, or None.

    The module is re-run on each recorded input with fresh leaves for its parameters; the gradient of
    ``sum_calls <output, recorded output gradient>`` must equal autograd's gradient through the whole model.
    """
    own = _own_params(m)
    if not calls:
        return None
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in own.items()}
    total = None
    with torch.enable_grad():
        for (a, kw, _), g in zip(calls, grads):
            if g is None:
                continue
            out = functional_call(m, leaves, a, kw)
            s = (out * g).sum()
            total = s if total is None else total + s
    mine = (torch.autograd.grad(total, list(leaves.values()), allow_unused=True) if total is not None
            else [None] * len(leaves))
    for p, dp in zip(own.values(), mine):
        ref = pgrad.get(name_of[id(p)])
        ref = torch.zeros_like(p) if ref is None else (ref.to_dense() if ref.is_sparse else ref)
        dp = torch.zeros_like(p) if dp is None else (dp.to_dense() if dp.is_sparse else dp)
        tol = torch.finfo(p.dtype).eps ** 0.5 * (float(ref.abs().max()) + float(dp.abs().max())) + 1e-30
        if float((ref - dp).abs().max()) > tol:
            return "its parameters receive gradient from outside its own calls (used functionally elsewhere?)"
    return None


# ------------------------------------------------------------------------------------------------
# layerwise path: the terms of every layer, chunk by chunk
# ------------------------------------------------------------------------------------------------
def _term_bytes(t: _Term) -> int:
    if isinstance(t, _Grad):
        return t.D.numel() * t.D.element_size()
    if isinstance(t, _Pairs):
        return (t.G.numel() + t.Z.numel()) * t.G.element_size()
    return t.G.numel() * t.G.element_size() + t.T.numel() * 8


def _layer_terms(model: nn.Module, args: tuple[torch.Tensor, ...], P: int, plan: NTKPlan, mode: str,
                 chunk: int | None, dtype: torch.dtype, who: str, target: str = "dense") -> dict[str, _Term]:
    """One term per layerwise layer over all ``P`` samples, each reduced to its route (``_route``).

    Terms whose route is "outer" are per-sample gradients ``D`` in ``dtype``; "pairs" factors are in ``dtype``
    for ``target="dense"`` and in the precision they were computed in for ``target="operator"`` (converted
    block by block later; exact, and half the memory for a float32 model).
    """
    C = plan.outputs
    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {p: [] for p in plan.fast}
    kinds = {p: _kind_of(m) for p, m in plan.modules.items()}
    full: dict[str, _Term] = {}
    routes: dict[str, str] = {}

    def make_hook(path: str):
        def hook(module, hargs, hkwargs, output):
            calls[path].append((hargs, hkwargs, output))
            return output.clone()
        return hook

    handles = [m.register_forward_hook(make_hook(p), with_kwargs=True) for p, m in plan.modules.items()]
    try:
        start, size = 0, min(P, int(chunk) if chunk is not None else 8)
        while start < P:
            stop = min(P, start + size)
            m = stop - start
            for v in calls.values():
                v.clear()
            with torch.enable_grad():
                out = _flat_output(model(*_take(args, start, stop)), m, who)
                if out.shape[1] != C:
                    raise ValueError(f"{who}: the model gives {out.shape[1]} outputs per sample for a batch of {m} "
                                     f"but {C} for one sample")
                recorded = []
                for path, k in plan.fast.items():
                    if len(calls[path]) != k:
                        raise RuntimeError(f"{who}: {plan.kinds[path]} {path!r} was called {len(calls[path])} times "
                                           f"in a forward of {m} samples and {k} times for one sample")
                    for _, _, o in calls[path]:
                        if int(o.shape[0]) != m:
                            raise RuntimeError(f"{who}: {plan.kinds[path]} {path!r} returned an output of shape "
                                               f"{tuple(o.shape)} in a forward of {m} samples (sample axis not first)")
                        recorded.append(o)
                grads = _output_grads(out, recorded, C)
            for v in calls.values():  # nothing refers to the graph any more: it is freed
                v[:] = [(_detached(a), _detached(kw), o.detach()) for a, kw, o in v]
            del out, recorded
            i, chunk_bytes = 0, 0
            Ce = C if mode == "full" else 1
            for path, k in plan.fast.items():
                mod, kind = plan.modules[path], kinds[path]
                terms = []
                for j, (a, kw, o) in enumerate(calls[path]):
                    gb = grads[i + j]
                    g = (o.new_zeros((C,) + tuple(o.shape)) if gb is None else gb).transpose(0, 1)  # (m, C, *out)
                    terms.append(kind.term(mod, _first(a, kw), g))
                    grads[i + j] = None
                i += k
                t = _merge(terms)
                del terms
                chunk_bytes += _term_bytes(t)
                if path not in routes:
                    routes[path] = _route(t, P, torch.finfo(dtype).bits // 8, target, Ce)
                if routes[path] == "outer":  # per-sample gradients written in place, all outputs: (P, C, F)
                    if path not in full:
                        full[path] = _Grad(g.new_empty(P, C, _outer_features(t), dtype=dtype))
                    _outer_into(t, full[path].D[start:stop])
                    del t
                    continue
                t = _traced(_materialized(t), mode)
                if target == "dense":
                    t = _as_dtype(t, dtype)
                if path not in full:  # all P samples preallocated (no second copy from concatenating chunks)
                    full[path] = _alloc(t, P)
                _copy_rows(full[path], t, start)
                del t
            del grads
            for v in calls.values():
                v.clear()
            start = stop
            if chunk is None:  # after the first chunk: as many samples as FACTOR_CHUNK_BYTES of factors allow
                per_sample = max(1, chunk_bytes // m)
                budget = CPU_FACTOR_CHUNK_BYTES if args[0].device.type == "cpu" else FACTOR_CHUNK_BYTES
                size = max(1, min(FAST_CHUNK, budget // per_sample))
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    return {path: _traced(full[path], mode) if routes[path] == "outer" else full[path] for path in plan.fast}


def _output_grads(out: torch.Tensor, recorded: list[torch.Tensor], C: int) -> list[torch.Tensor | None]:
    """``g_c = d(sum_i f_c(x_i)) / d(recorded)`` for every output ``c``, as one (C, B, *shape) tensor per recorded
    tensor (None: not reached).

    One backward pass vectorised over the ``C`` cotangents (the rows of the identity, ``is_grads_batched``);
    if the model's backward cannot be vectorised, ``C`` passes of ``sum_i f_c(x_i)`` (same values).
    """
    if not recorded or not out.requires_grad:  # no layerwise layer reaches the output
        return [None] * len(recorded)
    if BATCHED_GRADS:
        eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, out.shape[0], C)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return list(torch.autograd.grad(out, recorded, eye, retain_graph=True, allow_unused=True,
                                                is_grads_batched=True))
        except Exception:  # noqa: BLE001 - an operation without a batching rule for its backward: one pass each
            pass
    per_c = [torch.autograd.grad(out[:, c].sum(), recorded, retain_graph=c < C - 1, allow_unused=True)
             for c in range(C)]
    return [None if per_c[0][r] is None else torch.stack([p[r] for p in per_c]) for r in range(len(recorded))]


def _fields(t: _Term) -> list[torch.Tensor]:
    return [t.D] if isinstance(t, _Grad) else [t.G, t.Z] if isinstance(t, _Pairs) else [t.G, t.T]


def _alloc(t: _Term, P: int) -> _Term:
    """A term like ``t`` with room for ``P`` samples."""
    new = [v.new_empty((P,) + tuple(v.shape[1:])) for v in _fields(t)]
    return _Grad(*new) if isinstance(t, _Grad) else _Pairs(*new) if isinstance(t, _Pairs) else _Embed(*new, t.V)


def _copy_rows(dst: _Term, src: _Term, start: int) -> None:
    for a, b in zip(_fields(dst), _fields(src)):
        a[start:start + b.shape[0]].copy_(b)


def _as_dtype(t: _Term, dtype: torch.dtype) -> _Term:
    if isinstance(t, _Grad):
        return _Grad(t.D.to(dtype))
    if isinstance(t, _Pairs):
        return _Pairs(t.G.to(dtype), t.Z.to(dtype))
    return _Embed(t.G.to(dtype), t.T, t.V)


# ------------------------------------------------------------------------------------------------
# dense products, row strip by row strip
# ------------------------------------------------------------------------------------------------
def _strip_rows(P: int, per_pair: int, itemsize: int, chunk: int | None) -> int:
    """Rows per strip: ``chunk`` if given, else about P/4 (so that the strips above the diagonal skip ~3/8 of
    the products of a full ``P x P`` product) and small enough that a strip's temporaries, ``per_pair``
    numbers per pair of samples, stay under STRIP_BYTES."""
    if chunk is not None:
        return max(1, min(P, chunk))
    rows = max(128, -(-P // 4))
    return max(1, min(P, rows, STRIP_BYTES // max(1, P * per_pair * itemsize)))


def _add_strip(theta: torch.Tensor, blk: torch.Tensor, s: int, e: int, Ce: int) -> None:
    """Add the strip ``rows s:e x columns s:P`` (sample units) and its mirror image below the diagonal."""
    r0, r1 = s * Ce, e * Ce
    diag = blk[:, :r1 - r0]
    diag.copy_((diag + diag.T) / 2)  # the diagonal block exactly symmetric, like the mirrored blocks
    theta[r0:r1, r0:] += blk
    if blk.shape[1] > r1 - r0:
        theta[r1:, r0:r1] += blk[:, r1 - r0:].T


def _accumulate_gram(theta: torch.Tensor, D: torch.Tensor, Ce: int, chunk: int | None) -> None:
    """``theta += D D^T`` for rows ``D`` (P Ce, n), strip by strip."""
    P = D.shape[0] // Ce
    rows = _strip_rows(P, Ce * Ce, D.element_size(), chunk)
    for s in range(0, P, rows):
        e = min(P, s + rows)
        _add_strip(theta, D[s * Ce:e * Ce] @ D[s * Ce:].T, s, e, Ce)


def _accumulate_pairs(theta: torch.Tensor, G: torch.Tensor, Z: torch.Tensor, chunk: int | None) -> None:
    """``theta += sum_{k,k'} (G_k G_k'^T) * (Z_k Z_k'^T)`` for one group, ``G`` (P, Ce, K, n), ``Z`` (P, K, d)."""
    P, Ce, K, n = G.shape
    d = Z.shape[2]
    rows = _strip_rows(P, Ce * Ce * K * K * 2, G.element_size(), chunk)
    for s in range(0, P, rows):
        e = min(P, s + rows)
        ga, gc = G[s:e], G[s:]
        if K == 1:
            gg = ga.reshape(-1, n) @ gc.reshape(-1, n).T  # ((e-s) Ce, (P-s) Ce)
            zz = Z[s:e, 0] @ Z[s:, 0].T  # (e-s, P-s)
            if Ce == 1:
                blk = gg.mul_(zz)
            else:
                blk = gg.view(e - s, Ce, P - s, Ce).mul_(zz[:, None, :, None]).view(gg.shape)
        else:
            gg = (ga.reshape(-1, n) @ gc.reshape(-1, n).T).view(e - s, Ce, K, P - s, Ce, K)
            zz = (Z[s:e].reshape(-1, d) @ Z[s:].reshape(-1, d).T).view(e - s, 1, K, P - s, 1, K)
            blk = gg.mul_(zz).sum(dim=(2, 5)).reshape((e - s) * Ce, (P - s) * Ce)
        _add_strip(theta, blk, s, e, Ce)


def _accumulate_embed(theta: torch.Tensor, t: _Embed, chunk: int | None) -> None:
    """``theta += sum_{k,k'} [T_k = T_k'] (G_k G_k'^T)``, strip by strip."""
    P, Ce, K, d = t.G.shape
    rows = _strip_rows(P, Ce * Ce * K * K * 2, t.G.element_size(), chunk)
    for s in range(0, P, rows):
        e = min(P, s + rows)
        gg = (t.G[s:e].reshape(-1, d) @ t.G[s:].reshape(-1, d).T).view(e - s, Ce, K, P - s, Ce, K)
        same = (t.T[s:e].view(e - s, 1, K, 1, 1, 1) == t.T[s:].view(1, 1, 1, P - s, 1, K))
        blk = gg.mul_(same.to(gg.dtype)).sum(dim=(2, 5)).reshape((e - s) * Ce, (P - s) * Ce)
        _add_strip(theta, blk, s, e, Ce)


def _accumulate_term(theta: torch.Tensor, t: _Term, chunk: int | None) -> None:
    if isinstance(t, _Grad):
        P, Ce = t.D.shape[:2]
        _accumulate_gram(theta, t.D.reshape(P * Ce, -1), Ce, chunk)
    elif isinstance(t, _Pairs):
        for j in range(t.G.shape[3]):
            _accumulate_pairs(theta, t.G[:, :, :, j], t.Z[:, :, j], chunk)
    else:
        _accumulate_embed(theta, t, chunk)


# ------------------------------------------------------------------------------------------------
# fallback: per-sample Jacobians with torch.func, each computed once
# ------------------------------------------------------------------------------------------------
def _fallback_groups(sizes: dict[str, int], rows: int, itemsize: int) -> list[list[str]]:
    """Consecutive parameters grouped so that a group's Jacobian for all samples, ``rows x n_grp``, fits
    FALLBACK_BUDGET (a parameter larger than that alone forms its own group)."""
    cap = max(1, FALLBACK_BUDGET // max(1, rows * itemsize))
    groups: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n, k in sizes.items():
        if cur and size + k > cap:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += k
    if cur:
        groups.append(cur)
    return groups


def _jacobian_fn(model: nn.Module, args: tuple[torch.Tensor, ...], names: Sequence[str], C: int, mode: str,
                 dtype: torch.dtype, who: str,
                 rows: tuple[int, int] | None = None) -> Callable[[int, int], torch.Tensor]:
    """``jac(s, e)``: per-sample Jacobians of the parameters ``names`` for samples ``s:e``, as rows
    ``(e - s) x (C n)`` (trace) or ``(e - s) C x n`` (full), in ``dtype``. ``rows=(a, b)`` (one parameter):
    only with respect to its slice ``[a:b]`` along the first axis (the rest held constant)."""
    params = dict(model.named_parameters())
    sub = {n: params[n].detach() for n in names}
    Ce = C if mode == "full" else 1
    if rows is not None:
        (name,) = names
        whole, (a, b) = sub[name], rows
        sub = {name: whole[a:b]}

    def f(p: dict[str, torch.Tensor], *xi: torch.Tensor) -> torch.Tensor:
        if rows is not None:
            p = {name: torch.cat([whole[:a], p[name], whole[b:]])}
        return functional_call(model, p, tuple(t.unsqueeze(0) for t in xi)).reshape(-1)

    one = jacrev(f)
    jac_fn = vmap(one, in_dims=(None,) + (0,) * len(args))
    # 0: vmap over samples; 1: jacrev one sample at a time (vmap refused the model: data-dependent control flow,
    # e.g. attention-mask checks); 2: plain autograd, one sample and one output at a time (jacrev's own vmap over
    # the outputs refused a kernel without a batching rule, e.g. nn.LSTM)
    level = [0]

    def per_sample(s: int, e: int) -> dict[str, torch.Tensor]:
        parts = [one(sub, *(a[i] for a in args)) for i in range(s, e)]
        return {k: torch.stack([part[k] for part in parts]) for k in parts[0]}

    def by_autograd(s: int, e: int) -> dict[str, torch.Tensor]:
        live = [params[n] for n in names]
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with torch.enable_grad():
            for i in range(s, e):
                y = _flat_output(model(*(a[i:i + 1] for a in args)), 1, who)[0]
                for c in range(y.shape[0]):
                    grads = torch.autograd.grad(y[c], live, retain_graph=c < y.shape[0] - 1, allow_unused=True)
                    for n, p, g in zip(names, live, grads):
                        g = torch.zeros_like(p) if g is None else g
                        out[n].append(g[rows[0]:rows[1]] if rows is not None else g)
        return {n: torch.stack(v).reshape((e - s, C) + v[0].shape) for n, v in out.items()}

    def jac(s: int, e: int) -> torch.Tensor:
        with torch.no_grad():  # the transforms still differentiate; no graph to the other parameters
            j = None
            for lvl, fn in enumerate((lambda: jac_fn(sub, *_take(args, s, e)), lambda: per_sample(s, e),
                                      lambda: by_autograd(s, e))):
                if lvl < level[0]:
                    continue
                try:
                    j = fn()
                    break
                except Exception as exc:  # noqa: BLE001 - the next, slower route; the last one says why
                    level[0] = lvl + 1
                    if lvl == 2:
                        raise RuntimeError(
                            f"{who}: could not take per-sample Jacobians of {list(names)[:6]}"
                            f"{'...' if len(names) > 6 else ''} ({type(exc).__name__}: {exc}); the model must work "
                            "on one sample at a time (no .item() on values that need gradients)") from exc
        flat = torch.cat([v.reshape(e - s, C, -1) for v in j.values()], dim=2).to(dtype)
        return flat.reshape((e - s) * Ce, -1)

    return jac


def _fallback_chunk(model: nn.Module, names: Sequence[str], P: int, C: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, min(P, int(chunk)))
    params = dict(model.named_parameters())
    n = sum(params[k].numel() for k in names)
    return max(1, min(P, FALLBACK_CHUNK_BYTES // max(1, 3 * C * n * params[names[0]].element_size())))


def _fallback_blocks(model: nn.Module, args: tuple[torch.Tensor, ...], P: int, names: Sequence[str], C: int,
                     mode: str, chunk: int | None, dtype: torch.dtype, who: str):
    """Yield ``(group, J, jac)``: for each parameter group, its Jacobian rows for all samples (computed once,
    sample chunk by sample chunk). A parameter whose Jacobian alone exceeds FALLBACK_BUDGET is split into slices
    along its first axis that fit (each entry still computed once); only when one slice of one row does not fit,
    ``J = None`` comes with the chunk function ``jac`` (its blocks are then recomputed per pair)."""
    params = dict(model.named_parameters())
    Ce = C if mode == "full" else 1
    itemsize = torch.finfo(dtype).bits // 8
    sizes = {n: params[n].numel() * (C // Ce) for n in names}
    for group in _fallback_groups(sizes, P * Ce, itemsize):
        step = _fallback_chunk(model, group, P, C, chunk)
        bounds = [(s, min(P, s + step)) for s in range(0, P, step)]
        slices: list[tuple[int, int] | None] = [None]
        if P * Ce * sum(sizes[n] for n in group) * itemsize > FALLBACK_BUDGET:
            p = params[group[0]]
            per_row = P * Ce * (sizes[group[0]] // max(1, p.shape[0] if p.ndim else 1)) * itemsize
            if p.ndim == 0 or per_row > FALLBACK_BUDGET:
                yield group, None, (_jacobian_fn(model, args, group, C, mode, dtype, who), bounds)
                continue
            height = max(1, FALLBACK_BUDGET // per_row)
            slices = [(a, min(p.shape[0], a + height)) for a in range(0, p.shape[0], height)]
        for rows in slices:
            jac = _jacobian_fn(model, args, group, C, mode, dtype, who, rows)
            J = torch.cat([jac(s, e) for s, e in bounds]) if len(bounds) > 1 else jac(*bounds[0])
            yield group, J, None


def _accumulate_fallback(theta: torch.Tensor, model: nn.Module, args: tuple[torch.Tensor, ...], P: int,
                         names: Sequence[str], C: int, mode: str, chunk: int | None, dtype: torch.dtype,
                         who: str) -> None:
    Ce = C if mode == "full" else 1
    for _, J, streamed in _fallback_blocks(model, args, P, names, C, mode, chunk, dtype, who):
        if J is not None:
            _accumulate_gram(theta, J, Ce, chunk)
            del J
            continue
        # one parameter too large to hold for all samples: sample blocks, recomputed per pair of blocks
        jac, bounds = streamed
        for a, (s, e) in enumerate(bounds):
            Ja = jac(s, e)
            blk = Ja @ Ja.T
            theta[s * Ce:e * Ce, s * Ce:e * Ce] += (blk + blk.T) / 2
            for s2, e2 in bounds[a + 1:]:
                blk = Ja @ jac(s2, e2).T
                theta[s * Ce:e * Ce, s2 * Ce:e2 * Ce] += blk
                theta[s2 * Ce:e2 * Ce, s * Ce:e * Ce] += blk.T


# ------------------------------------------------------------------------------------------------
# matrix-free: Theta V from the same factors
# ------------------------------------------------------------------------------------------------
def _block_rows(P: int, per_row: int, itemsize: int) -> int:
    return max(1, min(P, STRIP_BYTES // max(1, per_row * itemsize)))


#: a factor's feature axis is compressed when its numerical rank is at most this fraction of its length
COMPRESS_RATIO = 0.75
#: longest feature axis tried for compression (its Gram's eigh costs about 10 m^3)
COMPRESS_MAX = 4096


def _row_basis(F2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """An orthonormal basis ``Q`` (m x r) of the row space of ``F2`` (rows x m) when ``r <= COMPRESS_RATIO m``.

    From the eigenvectors of the Gram ``F2^T F2`` (float64, accumulated by row blocks) whose eigenvalues exceed
    ``m eps lambda_max``: ``F2 Q Q^T = F2`` up to that level, so every inner product ``f . f'`` of two rows is kept.
    """
    rows, m = F2.shape
    if m < 16 or m > COMPRESS_MAX or rows < 2 * m:  # the Gram and its eigh must pay off over many products
        return None
    eps = torch.finfo(torch.float64).eps
    if rows > 4 * m:  # rank of 2m spread rows first (a lower bound of the rank): cheap rejection of full rank
        sub = F2[torch.linspace(0, rows - 1, 2 * m, device=F2.device).long()].to(torch.float64)
        lam = torch.linalg.eigvalsh(sub.T @ sub)
        if int((lam > m * eps * lam[-1].clamp(min=torch.finfo(torch.float64).tiny)).sum()) > COMPRESS_RATIO * m:
            return None
    step = _block_rows(rows, m, 8)
    gram = torch.zeros(m, m, dtype=torch.float64, device=F2.device)
    for s in range(0, rows, step):
        blk = F2[s:s + step].to(torch.float64)
        gram += blk.T @ blk
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > m * eps * lam[-1].clamp(min=torch.finfo(torch.float64).tiny)
    if int(keep.sum()) > COMPRESS_RATIO * m:
        return None
    return vec[:, keep].to(dtype)


def _compressed(t: _Pairs, dtype: torch.dtype) -> _Pairs:
    """``G`` and ``Z`` of a one-group layer expressed in bases of their row spaces (inner products unchanged):
    e.g. in ``mode="trace"`` the ``C n`` output-gradient axis of the layer before a linear head has rank ``n``.
    Costs one Gram per factor (about two or three products ``Theta V``); each product then shrinks likewise."""
    P, Ce, K, g, n = t.G.shape
    if g != 1:
        return t
    G, Z = t.G, t.Z
    Q = _row_basis(G.reshape(-1, n), dtype)
    if Q is not None:
        G = torch.cat([G[s:s + 4096].to(dtype).reshape(-1, n) @ Q for s in range(0, P, 4096)])
        G = G.reshape(P, Ce, K, 1, -1)
    d = Z.shape[-1]
    Q = _row_basis(Z.reshape(-1, d), dtype)
    if Q is not None:
        Z = (Z.to(dtype).reshape(-1, d) @ Q).reshape(P, K, 1, -1)
    return _Pairs(G, Z)


class NTKOperator:
    """``Theta`` (``n x n``, ``n = P`` or ``P C``) as an operator over the layerwise factors, never ``n x n``.

    ``matmat(V)`` = ``Theta V`` (``V``: ``n`` or ``n x b``), blockwise over samples: per-sample gradients held
    as ``D`` give ``D (D^T V)``; factors give ``W = sum_j v_j sum_k g_jk z_jk^T`` per group, then
    ``(Theta v)_i = sum_k g_ik^T W z_ik`` (embeddings: ``W`` scatter-added by token, then gathered); fallback
    Jacobians are held when they fit ``FALLBACK_BUDGET``, else recomputed twice per product.
    ``diagonal()`` is exact: the squared norms of the per-sample gradients (``sum_{k,k'}`` within a sample).
    Work per product: about ``2 P C_e K g n d`` per layer and vector, memory: the factors.
    """

    def __init__(self, terms: list[_Term], fallback: list[tuple[torch.Tensor | None, Any]], P: int, Ce: int,
                 dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> None:
        self.terms, self.fallback = terms, fallback
        self.P, self.Ce, self.dtype, self.device, self.scale = P, Ce, dtype, device, scale
        self.products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.P * self.Ce, self.P * self.Ce)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        vec = V.ndim == 1
        V = (V[:, None] if vec else V).to(self.dtype)
        if V.shape[0] != self.shape[0]:
            raise ValueError(f"NTKOperator.matmat: V has {V.shape[0]} rows for an {self.shape[0]}-row kernel")
        out = torch.zeros_like(V)
        for t in self.terms:
            self._term_matmat(t, V, out)
        for J, streamed in self.fallback:
            if J is not None:
                out += J @ (J.T @ V)
                continue
            jac, bounds = streamed
            W = None
            for s, e in bounds:
                blk = jac(s, e).T @ V[s * self.Ce:e * self.Ce]
                W = blk if W is None else W.add_(blk)
            for s, e in bounds:
                out[s * self.Ce:e * self.Ce] += jac(s, e) @ W
        if self.scale != 1.0:
            out *= self.scale
        self.products += V.shape[1]
        return out[:, 0] if vec else out

    def _term_matmat(self, t: _Term, V: torch.Tensor, out: torch.Tensor) -> None:
        P, Ce, b, dt = self.P, self.Ce, V.shape[1], self.dtype
        Vs = V.view(P, Ce, b)
        outs = out.view(P, Ce, b)
        if isinstance(t, _Grad):
            D = t.D.reshape(P * Ce, -1)
            out += D @ (D.T @ V)
            return
        if isinstance(t, _Pairs):
            _, _, K, g, n = t.G.shape
            d = t.Z.shape[-1]
            # W_grp = sum_{i,c,k} g_ick (v_icb z_ik)^T: one GEMM (n x rows) @ (rows x b d) per block and group;
            # (Theta v)_icb = sum_k (g_ick^T W_b) . z_ik: a GEMM (rows x n) @ (n x b d), then a dot over d
            rows = _block_rows(P, Ce * K * (n + 2 * b * d) + K * d, 8)
            W = torch.zeros(g, n, b * d, dtype=dt, device=V.device)
            for s in range(0, P, rows):
                G, Z = t.G[s:s + rows].to(dt), t.Z[s:s + rows].to(dt)
                ZV = Z[:, None, :, :, None, :] * Vs[s:s + rows, :, None, None, :, None]  # (r, Ce, K, g, b, d)
                for j in range(g):
                    W[j] += G[:, :, :, j].reshape(-1, n).T @ ZV[:, :, :, j].reshape(-1, b * d)
            for s in range(0, P, rows):
                G, Z = t.G[s:s + rows].to(dt), t.Z[s:s + rows].to(dt)
                r = G.shape[0]
                for j in range(g):
                    GW = (G[:, :, :, j].reshape(-1, n) @ W[j]).view(r, Ce, K, b, d)
                    outs[s:s + rows] += torch.einsum("rckbd,rkd->rcb", GW, Z[:, :, j])
            return
        _, _, K, d = t.G.shape
        rows = _block_rows(P, K * (2 * d * b + Ce * d), 8)
        W = torch.zeros(t.V, d * b, dtype=dt, device=V.device)
        for s in range(0, P, rows):
            G = t.G[s:s + rows].to(dt)
            Gv = torch.einsum("rckd,rcb->rkdb", G, Vs[s:s + rows])
            W.index_add_(0, t.T[s:s + rows].reshape(-1), Gv.reshape(-1, d * b))
        for s in range(0, P, rows):
            G, T = t.G[s:s + rows].to(dt), t.T[s:s + rows]
            outs[s:s + rows] += torch.einsum("rckd,rkdb->rcb", G, W[T].view(T.shape[0], K, d, b))

    def diagonal(self) -> torch.Tensor:
        """``Theta_ii`` exactly: squared norms of the per-sample gradients (``n`` values)."""
        P, Ce, dt = self.P, self.Ce, self.dtype
        diag = torch.zeros(P, Ce, dtype=dt, device=self.device)
        for t in self.terms:
            if isinstance(t, _Grad):
                diag += t.D.to(dt).pow(2).sum(-1)
            elif isinstance(t, _Pairs):
                _, _, K, g, n = t.G.shape
                rows = _block_rows(P, K * K * g * (Ce + 1) + Ce * K * g * n, 8)
                for s in range(0, P, rows):
                    G, Z = t.G[s:s + rows].to(dt), t.Z[s:s + rows].to(dt)
                    gg = torch.einsum("rckgn,rclgn->rcgkl", G, G)
                    zz = torch.einsum("rkgd,rlgd->rgkl", Z, Z)
                    diag[s:s + rows] += (gg * zz[:, None]).sum(dim=(2, 3, 4))
            else:
                _, _, K, d = t.G.shape
                rows = _block_rows(P, K * K * (Ce + 1) + Ce * K * d, 8)
                for s in range(0, P, rows):
                    G, T = t.G[s:s + rows].to(dt), t.T[s:s + rows]
                    gg = torch.einsum("rckd,rcld->rckl", G, G)
                    diag[s:s + rows] += (gg * (T[:, :, None] == T[:, None, :])[:, None].to(dt)).sum(dim=(2, 3))
        diag = diag.reshape(-1)
        for J, streamed in self.fallback:
            if J is not None:
                diag += J.pow(2).sum(1)
                continue
            jac, bounds = streamed
            for s, e in bounds:
                diag[s * Ce:e * Ce] += jac(s, e).pow(2).sum(1)
        return diag * self.scale

    def trace(self) -> torch.Tensor:
        """``tr Theta = sum_i ||J(x_i)||^2`` (exact, no kernel)."""
        return self.diagonal().sum()

    def dense(self, block: int = 1024) -> torch.Tensor:
        """The ``n x n`` kernel by products with blocks of the identity (tests, small ``n``)."""
        n = self.shape[0]
        cols = [self.matmat(torch.eye(n, dtype=self.dtype, device=self.device)[:, s:s + block])
                for s in range(0, n, block)]
        K = torch.cat(cols, dim=1)
        return (K + K.T) / 2


# ------------------------------------------------------------------------------------------------
# public
# ------------------------------------------------------------------------------------------------
def _validated(model: nn.Module, x: Any, mode: str, reduction: str, chunk_size: int | None, dtype: torch.dtype,
               who: str) -> tuple[tuple[torch.Tensor, ...], int]:
    if mode not in MODES:
        raise ValueError(f"{who}: mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mode == "full" and reduction != "sum":
        raise ValueError(f"{who}: reduction={reduction!r} applies to the trace over outputs; mode='full' keeps "
                         "every output pair (use reduction='sum')")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be a floating torch.dtype, got {dtype!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"{who}: chunk_size must be a positive number of samples, got {chunk_size}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    return _as_args(x, who)


def _inputs_and_plan(model: nn.Module, x: Any, mode: str, reduction: str, chunk_size: int | None,
                     dtype: torch.dtype, fast_path: bool, plan: NTKPlan | None, who: str
                     ) -> tuple[tuple[torch.Tensor, ...], int, NTKPlan]:
    """The checked inputs, their sample count, and the plan (made now, or the given one checked)."""
    args, P = _validated(model, x, mode, reduction, chunk_size, dtype, who)
    if plan is None:
        plan = ntk_plan(model, args, fast_path=fast_path, who=who)
    else:
        _check_modules(model, who)
    return args, P, plan


def empirical_ntk(model: nn.Module, x: Any, *, mode: str = "trace", reduction: str = "sum",
                  chunk_size: int | None = None, dtype: torch.dtype = torch.float64,
                  fast_path: bool = True, plan: NTKPlan | None = None) -> torch.Tensor:
    """The empirical NTK ``J J^T`` of ``model`` on the samples ``x`` (samples along the first axis).

    ``mode="trace"``: ``P x P``, summed over the ``C`` outputs (``reduction="mean"`` divides by ``C``, as
    neural-tangents does by default); ``mode="full"``: ``PC x PC`` with row ``i * C + c``.
    Every trainable parameter counts. ``chunk_size`` bounds the samples per forward/backward and the rows
    per block of products (default: automatic); ``dtype`` is the precision of the products and of the result
    (the forward and backward run in the model's own precision). ``fast_path=False`` sends every parameter
    through ``torch.func`` (a reference). The model is used as it is (its train/eval mode is not changed);
    it must not mix samples (``SampleMixingError``). ``plan``: a result of ``ntk_plan`` for this model and
    input shape, to skip the two discovery passes when the same kernel is measured repeatedly.
    """
    who = "empirical_ntk"
    args, P, plan = _inputs_and_plan(model, x, mode, reduction, chunk_size, dtype, fast_path, plan, who)
    C = plan.outputs
    Ce = C if mode == "full" else 1
    theta = torch.zeros(P * Ce, P * Ce, dtype=dtype, device=args[0].device)
    if plan.fast:
        terms = _layer_terms(model, args, P, plan, mode, chunk_size, dtype, who, "dense")
        for path in list(terms):
            _accumulate_term(theta, terms.pop(path), chunk_size)
    if plan.fallback:
        _accumulate_fallback(theta, model, args, P, plan.fallback, C, mode, chunk_size, dtype, who)
    if reduction == "mean":
        theta /= C
    return theta


def ntk_operator(model: nn.Module, x: Any, *, mode: str = "trace", reduction: str = "sum",
                 chunk_size: int | None = None, dtype: torch.dtype = torch.float64, fast_path: bool = True,
                 plan: NTKPlan | None = None) -> NTKOperator:
    """The kernel of ``empirical_ntk`` (same arguments) as a matrix-free ``NTKOperator``: ``Theta V`` and the
    exact diagonal from the layerwise factors, memory linear in ``P``; for the top eigenvalues at large ``P``
    (``probes.functional.spectra.top_eigenvalues``)."""
    who = "ntk_operator"
    args, P, plan = _inputs_and_plan(model, x, mode, reduction, chunk_size, dtype, fast_path, plan, who)
    C = plan.outputs
    Ce = C if mode == "full" else 1
    terms = list(_layer_terms(model, args, P, plan, mode, chunk_size, dtype, who, "operator").values()) \
        if plan.fast else []
    terms = [_compressed(t, dtype) if isinstance(t, _Pairs) else t for t in terms]
    fallback: list[tuple[torch.Tensor | None, Any]] = []
    if plan.fallback:
        fallback = [(J, streamed) for _, J, streamed in
                    _fallback_blocks(model, args, P, plan.fallback, C, mode, chunk_size, dtype, who)]
    return NTKOperator(terms, fallback, P, Ce, dtype, args[0].device, 1.0 / C if reduction == "mean" else 1.0)


def trace_over_outputs(theta_full: torch.Tensor, outputs: int) -> torch.Tensor:
    """``P x P`` sum over outputs of a full ``PC x PC`` kernel (row ``i * C + c``)."""
    n = theta_full.shape[0] // outputs
    return theta_full.view(n, outputs, n, outputs).diagonal(dim1=1, dim2=3).sum(-1)


__all__ = ["empirical_ntk", "ntk_operator", "ntk_plan", "NTKOperator", "NTKPlan", "SampleMixingError",
           "trace_over_outputs", "MODES", "REDUCTIONS"]
