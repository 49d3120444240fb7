"""The layers with a layerwise formula, and the kernel term of one call of each.

With ``z_k`` a call's input and ``g_k = df_c / d(output)`` at position ``k`` (calls of the layer within one
sample's forward, sequence positions, output pixels), the per-sample gradient is:

- ``nn.Linear``: ``dW = sum_k g_k z_k^T``, ``db = sum_k g_k``;
- ``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups): the same with ``z_k`` the unfolded
  input patch of output position ``k``, per group (the weight is block diagonal over groups);
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` in eval mode: ``dgamma = sum_k g_k * xhat_k``,
  ``dbeta = sum_k g_k`` (``xhat`` the normalised input, recomputed with torch's own formula);
- ``nn.Embedding``: ``dE = sum_k e_{t_k} g_k^T`` (rows selected by the tokens ``t``).

A subclass that overrides ``forward`` matches no kind here; ``structural`` may still recognise it (confirmed on the
probe inputs), else its parameters go to the fallback.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probes import _torch
from probes.functional.ntk.settings import DEFAULT, NTKSettings
from probes.functional.ntk.terms import _Embed, _Grad, _Pairs, _Term


def _first(args: tuple, kwargs: dict, name: str = "input") -> Any:
    """A call's input: its first positional argument, else ``kwargs[name]``, else its only tensor keyword."""
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


class _Kind:
    """A standard layer with a layerwise formula: which modules, the sample layout, the kernel term of one call."""

    bases: tuple[type[nn.Module], ...] = ()

    def matches(self, m: nn.Module) -> bool:
        return any(isinstance(m, b) and type(m).forward is b.forward for b in self.bases)

    def unsupported(self, m: nn.Module) -> str | None:
        """Why a module of this kind cannot take the layerwise path whatever its inputs (None: it can)."""
        return None

    def layout(self, m: nn.Module, x: Any) -> str | None:
        """Why this input does not have the samples along its first axis in the expected layout (None: fine)."""
        return None if isinstance(x, torch.Tensor) and x.ndim >= 1 else "its input is not a tensor with a sample axis"

    def term(self, m: nn.Module, x: torch.Tensor, g: torch.Tensor, settings: NTKSettings = DEFAULT) -> _Term:
        """The kernel term of one call: input ``x`` (B, ...), output gradients ``g`` (B, C, *output.shape[1:])."""
        raise NotImplementedError

    def term_call(
        self, m: nn.Module, args: tuple, kwargs: dict, g: torch.Tensor, settings: NTKSettings = DEFAULT
    ) -> _Term:
        """The kernel term of one call from its recorded arguments (``term`` of its input, for most kinds)."""
        return self.term(m, _first(args, kwargs), g, settings)


def _with_ones(Z: torch.Tensor, G: torch.Tensor, m: nn.Module) -> _Pairs:
    """The term of ``[z, 1]`` for a trainable weight and bias (the ones left implicit, ``bias=True``), ``z`` or
    ``1`` alone when only one of them trains."""
    bias = bool(m.bias is not None and m.bias.requires_grad)
    if not m.weight.requires_grad:
        return _Pairs(G, Z.new_ones(Z.shape[:-1] + (1,)))
    return _Pairs(G, Z, bias)


class _LinearKind(_Kind):
    bases: tuple[type[nn.Module], ...] = (nn.Linear,)  # declared: the structural _AffineKind has none

    def layout(self, m, x):
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return "its input has no sample axis (an unbatched call)"
        return None

    def term(self, m, x, g, settings=DEFAULT):
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

    def term(self, m, x, g, settings=DEFAULT):
        """Patches ``z_k`` by unfolding the padded input (``Tensor.unfold`` per spatial axis, then ``::dilation``)."""
        B, C = g.shape[:2]
        groups, n = m.groups, len(m.kernel_size)
        pad = _torch.conv_padding(m)
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        for i in range(n):
            x = x.unfold(2 + i, m.dilation[i] * (m.kernel_size[i] - 1) + 1, m.stride[i])
        x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in m.dilation)]  # (B, Cin, *O, *k)
        K = math.prod(x.shape[2 : 2 + n])
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

    def term(self, m, x, g, settings=DEFAULT):
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
        step = max(1, settings.output_block_bytes // max(1, g[:, :1].numel() * g.element_size()))
        for c in range(0, C, step):
            gc = g[:, c : c + step]
            if weight:
                D[:, c : c + step, :n] = _summed(gc * xhat, sum_dims).reshape(B, -1, n)
            if bias:
                D[:, c : c + step, weight * n :] = _summed(gc, sum_dims).reshape(B, -1, n)
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

    def term(self, m, x, g, settings=DEFAULT):
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


@contextmanager
def _used_params(modules: dict[str, nn.Module]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """``path -> _own_params`` of each module as its forward uses them, recorded by a forward pre-hook at each call
    inside the block: the graph's leaves, which under FSDP2 are the gathered tensors, not the registered shards."""
    used: dict[str, dict[str, torch.Tensor]] = {}

    def record(path: str):
        def hook(module: nn.Module, args: Any) -> None:
            used[path] = _own_params(module)

        return hook

    handles = [m.register_forward_pre_hook(record(path)) for path, m in modules.items()]
    try:
        yield used
    finally:
        for h in handles:
            h.remove()
