"""Tied weights: the per-sample gradient of a parameter shared by several layers is the sum over its uses.

The layers of a tie group (``NTKPlan.tied``) take the outer-product route (per-sample gradients ``D`` in each
layer's own layout); ``_tied_term`` rewrites each layer's ``D`` in the layout of its parameters
(``_param_grads``: ``nn.Linear``'s ``(out, in)`` block, transposed for a ``Conv1D``'s ``(in, out)`` weight; a
convolution's ``(out, in / groups, *kernel)``; an embedding's table; a norm's scale then shift), sums the
gradients of each shared parameter over the layers that use it, and gives one term for the group.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from probes.autodiff.ntk.layers import _ConvKind, _EmbeddingKind, _Kind, _LinearKind, _NormKind
from probes.autodiff.ntk.structural import _AffineKind, _ScaleKind
from probes.functional.ntk.terms import _Grad


def _param_grads(kind: _Kind, m: nn.Module, D: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, its per-sample gradients (P, C, numel))`` for each trainable parameter of one layer, from the
    layer's per-sample gradients ``D`` (P, C, F) as ``terms._outer_into`` writes them."""
    P, C = D.shape[:2]
    if isinstance(kind, (_LinearKind, _ConvKind)):
        weight, b = cast(torch.Tensor, m.weight), cast("torch.Tensor | None", m.bias)
        bias = b is not None and b.requires_grad
        if not weight.requires_grad:  # then the bias is what trains
            return [(cast(torch.Tensor, b), D.reshape(P, C, -1))]
        n_out = weight.shape[1] if isinstance(kind, _AffineKind) and kind.transposed else weight.shape[0]
        groups = cast(int, m.groups) if isinstance(kind, _ConvKind) else 1
        V = D.reshape(P, C, groups, n_out // groups, -1)
        W = V[..., : V.shape[-1] - bias]
        if isinstance(kind, _AffineKind) and kind.transposed:
            W = W.reshape(P, C, n_out, -1).transpose(2, 3)
        out = [(weight, W.reshape(P, C, -1))]
        if bias:
            out.append((cast(torch.Tensor, b), V[..., -1].reshape(P, C, -1)))
        return out
    if isinstance(kind, _EmbeddingKind):
        return [(cast(torch.Tensor, m.weight), D)]
    if isinstance(kind, _ScaleKind):
        names = [kind.scale] + ([kind.shift] if kind.shift is not None else [])
    elif isinstance(kind, _NormKind):
        names = ["weight", "bias"]
    else:
        raise TypeError(f"no per-parameter layout for {type(kind).__name__}")
    ps = [getattr(m, n) for n in names]
    ps = [p for p in ps if p is not None and p.requires_grad]
    sizes = [p.numel() for p in ps]
    return list(zip(ps, D.split(sizes, dim=2)))


def _tied_term(layers: list[tuple[_Kind, nn.Module, torch.Tensor]]) -> _Grad:
    """One term for a tie group: per parameter, the per-sample gradients of its uses summed (P, C, n_params)."""
    acc: dict[int, torch.Tensor] = {}
    for kind, m, D in layers:
        for p, Dp in _param_grads(kind, m, D):
            acc[id(p)] = Dp.clone() if id(p) not in acc else acc[id(p)].add_(Dp)
    return _Grad(torch.cat(list(acc.values()), dim=2))
