"""The kernel term of one layer over a batch of samples, and what is done with it.

Three shapes of term (``B`` samples, ``Ce`` outputs kept apart: ``C`` in ``mode="full"``, 1 once traced):

- ``_Grad``: per-sample gradients ``D`` (norm layers, and any layer on the outer-product route):
  ``Theta_ij += D_i . D_j``;
- ``_Pairs``: output gradients ``G`` and inputs ``Z`` per position ``k`` and group (Linear, Conv):
  ``Theta_ij += sum_grp sum_{k,k'} (g_ik . g_jk') (z_ik . z_jk')``;
- ``_Embed``: output gradients and tokens (Embedding): ``Theta_ij += sum_{k,k'} [t_ik = t_jk'] g_ik . g_jk'``.

``_route`` picks per layer the cheaper contraction: the pairwise-position one above (``K^2 (n + d)`` per pair of
samples) or the outer-product one, forming ``D_i = sum_k g_ik z_ik^T`` (``n d`` per pair, when it fits in
memory; ``_outer_into`` writes it in place, one batched GEMM per sample block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from probes.functional.ntk.settings import DEFAULT, NTKSettings


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


def _materialized(t: _Term) -> _Term:
    """The term with the implicit bias column of ones appended to ``Z`` (other terms unchanged)."""
    if not (isinstance(t, _Pairs) and t.bias):
        return t
    return _Pairs(t.G, torch.cat([t.Z, t.Z.new_ones(t.Z.shape[:-1] + (1,))], dim=-1))


def _merge(terms: list[_Term]) -> _Term:
    """One term for all calls of a layer within a forward: positions concatenated, gradients summed."""
    t0 = terms[0]
    if len(terms) == 1:
        return t0
    # all calls of one layer give terms of one kind, that of the first
    if isinstance(t0, _Grad):
        grads = cast("list[_Grad]", terms)
        return _Grad(torch.stack([t.D for t in grads]).sum(0))
    if isinstance(t0, _Pairs):
        pairs = cast("list[_Pairs]", terms)
        return _Pairs(torch.cat([t.G for t in pairs], dim=2), torch.cat([t.Z for t in pairs], dim=1), t0.bias)
    embeds = cast("list[_Embed]", terms)
    return _Embed(torch.cat([t.G for t in embeds], dim=2), torch.cat([t.T for t in embeds], dim=1), t0.V)


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


def _route(t: _Term, P: int, itemsize: int, target: str, Ce: int, settings: NTKSettings = DEFAULT) -> str:
    """ "outer" (per-sample gradients D) or "pairs" (pairwise positions), by operation count per pair of samples
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
    fits = P * outer_size * itemsize <= settings.fallback_budget
    if settings.pairs_method != "auto":
        return "outer" if (settings.pairs_method == "outer" and fits) else "pairs"
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


def _term_bytes(t: _Term) -> int:
    if isinstance(t, _Grad):
        return t.D.numel() * t.D.element_size()
    if isinstance(t, _Pairs):
        return (t.G.numel() + t.Z.numel()) * t.G.element_size()
    return t.G.numel() * t.G.element_size() + t.T.numel() * 8


def _fields(t: _Term) -> list[torch.Tensor]:
    return [t.D] if isinstance(t, _Grad) else [t.G, t.Z] if isinstance(t, _Pairs) else [t.G, t.T]


def _alloc(t: _Term, P: int) -> _Term:
    """A term like ``t`` with room for ``P`` samples."""
    new = [v.new_empty((P,) + tuple(v.shape[1:])) for v in _fields(t)]
    if isinstance(t, _Grad):
        return _Grad(new[0])
    if isinstance(t, _Pairs):
        return _Pairs(new[0], new[1])
    return _Embed(new[0], new[1], t.V)


def _copy_rows(dst: _Term, src: _Term, start: int) -> None:
    for a, b in zip(_fields(dst), _fields(src)):
        a[start : start + b.shape[0]].copy_(b)


def _as_dtype(t: _Term, dtype: torch.dtype) -> _Term:
    if isinstance(t, _Grad):
        return _Grad(t.D.to(dtype))
    if isinstance(t, _Pairs):
        return _Pairs(t.G.to(dtype), t.Z.to(dtype))
    return _Embed(t.G.to(dtype), t.T, t.V)
