"""Layers recognised by their structure and confirmed on the probe inputs, whatever their class.

Two shapes of childless module, whatever their ``forward``:

- **affine** (``_AffineKind``): a 2-d ``weight`` and maybe a 1-d ``bias``, computing ``x W^T + b`` (``nn.Linear``
  layout) or ``x W + b`` (transformers' ``Conv1D``, GPT-2); the term is ``nn.Linear``'s;
- **elementwise affine** (``_ScaleKind``): one 1-d scale (``weight``, ``gamma``, ...) and maybe a 1-d ``bias``
  (or ``beta``) of the same size ``n``, computing ``y = w * h(x) + b`` along the output's last axis (or its
  axis 1), ``h`` not depending on them: LayerNorm and RMSNorm under another ``forward`` (timm's ``LayerNorm``,
  ``LlamaRMSNorm``, ``T5LayerNorm``), a ``LayerScale``. ``h`` is the module's own output with ``w = 1, b = 0``
  (``functional_call``), so the per-sample gradients ``dw = sum_k g_k * h_k``, ``db = sum_k g_k`` hold whatever
  precision or formula the module normalises with.

A candidate takes the layerwise path only after ``_confirm`` on every recorded call of the discovery pass: the
output equals the formula (affine), or equals ``w * h + b`` at the module's parameters and at a second, random
``(w, b)`` (elementwise affine), within a few rounding errors.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.func import functional_call

from probes.autodiff.ntk.layers import _first, _Kind, _LinearKind, _summed
from probes.functional.ntk.settings import DEFAULT, NTKSettings
from probes.functional.ntk.terms import _Grad, _Term

_ADDITIVE = ("bias", "beta")


class _AffineKind(_LinearKind):
    """``x W + b`` with ``W`` (in, out) (``transposed=True``, transformers' ``Conv1D``) or ``x W^T + b``."""

    bases = ()

    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed

    def matches(self, m: nn.Module) -> bool:
        return False

    def formula(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        W = cast(torch.Tensor, m.weight).detach()
        y = x @ W if self.transposed else x @ W.T
        bias = cast("torch.Tensor | None", m.bias)
        return y if bias is None else y + bias.detach()


class _ScaleKind(_Kind):
    """``y = w * h(x) + b`` along ``axis`` (-1 or 1) of the output, ``h`` the module's output at ``w = 1, b = 0``."""

    bases = ()

    def __init__(self, scale: str, shift: str | None, axis: int) -> None:
        self.scale, self.shift, self.axis = scale, shift, axis

    def matches(self, m: nn.Module) -> bool:
        return False

    def unit(
        self, m: nn.Module, args: tuple, kwargs: dict, w: torch.Tensor | None = None, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The module's output with scale ``w`` (default 1) and shift ``b`` (default 0)."""
        p = getattr(m, self.scale)
        sub = {self.scale: torch.ones_like(p) if w is None else w}
        if self.shift is not None:
            sub[self.shift] = torch.zeros_like(p) if b is None else b
        with torch.no_grad():
            return functional_call(m, sub, args, kwargs)

    def term_call(
        self, m: nn.Module, args: tuple, kwargs: dict, g: torch.Tensor, settings: NTKSettings = DEFAULT
    ) -> _Term:
        B, C = g.shape[:2]
        h = self.unit(m, args, kwargs).unsqueeze(1).to(g.dtype)
        ax = g.ndim - 1 if self.axis == -1 else 2
        sum_dims = tuple(d for d in range(2, g.ndim) if d != ax)
        weight = getattr(m, self.scale).requires_grad
        bias = self.shift is not None and getattr(m, self.shift).requires_grad
        n = g.shape[ax]
        D = g.new_empty(B, C, (weight + bias) * n)
        step = max(1, settings.output_block_bytes // max(1, g[:, :1].numel() * g.element_size()))
        for c in range(0, C, step):
            gc = g[:, c : c + step]
            if weight:
                D[:, c : c + step, :n] = _summed(gc * h, sum_dims)
            if bias:
                D[:, c : c + step, weight * n :] = _summed(gc, sum_dims)
        return _Grad(D)


def _candidate(m: nn.Module) -> str | None:
    """ "affine" or "scale" when the module has one of the two structures (no children), else None."""
    if next(m.children(), None) is not None:
        return None
    params = {n: p for n, p in m._parameters.items() if p is not None}
    if not params or not all(p.requires_grad for p in params.values()):
        return None
    w, b = params.get("weight"), params.get("bias")
    if w is not None and w.ndim == 2 and set(params) <= {"weight", "bias"} and (b is None or b.ndim == 1):
        return "affine"
    if all(p.ndim == 1 for p in params.values()) and len({p.numel() for p in params.values()}) == 1:
        shifts = [n for n in params if n in _ADDITIVE]
        if len(params) - len(shifts) == 1 and len(shifts) <= 1:
            return "scale"
    return None


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, terms: int) -> bool:
    """``a == b`` within rounding: ``4 terms eps`` of ``scale`` (the largest magnitude that was summed)."""
    if a.shape != b.shape:
        return False
    eps = torch.finfo(a.dtype).eps
    return bool((a - b).abs().max() <= 4 * max(terms, 1) * eps * scale + torch.finfo(a.dtype).tiny)


def _confirm(m: nn.Module, structure: str, calls: list[tuple[tuple, dict, torch.Tensor]]) -> _Kind | str:
    """The confirmed kind of a candidate, or why its recorded calls do not compute the formula."""
    if not calls:
        return "not called in the discovery pass, so its formula could not be confirmed"
    if any(not isinstance(o, torch.Tensor) or not isinstance(_first(a, kw), torch.Tensor) for a, kw, o in calls):
        return "a call's input or output is not a tensor"
    if structure == "affine":
        for kind in (_AffineKind(True), _AffineKind(False)):
            if all(_affine_holds(m, kind, _first(a, kw), o) for a, kw, o in calls):
                return kind
        return f"{type(m).__name__} does not compute x W + b or x W^T + b on the probe inputs"
    params = {n: p for n, p in m._parameters.items() if p is not None}
    shift = next((n for n in params if n in _ADDITIVE), None)
    scale = next(n for n in params if n != shift)
    n = params[scale].numel()
    o = calls[0][2]
    axes = [ax for ax in (-1, 1) if o.ndim >= (1 if ax == -1 else 3) and o.shape[ax] == n]
    for axis in axes:
        scale_kind = _ScaleKind(scale, shift, axis)
        if all(_scale_holds(m, scale_kind, a, kw, o) for a, kw, o in calls):
            return scale_kind
    return (
        f"{type(m).__name__} does not compute w * h(x) + b with its 1-d parameters on the probe inputs "
        "(not a LayerNorm, RMSNorm or scale)"
    )


def _affine_holds(m: nn.Module, kind: _AffineKind, x: torch.Tensor, out: torch.Tensor) -> bool:
    W = cast(torch.Tensor, m.weight)  # an affine candidate's 2-d weight
    bias = cast("torch.Tensor | None", m.bias)
    d_in, d_out = (W.shape[0], W.shape[1]) if kind.transposed else (W.shape[1], W.shape[0])
    if x.ndim < 2 or x.shape[-1] != d_in or out.shape != x.shape[:-1] + (d_out,) or not x.is_floating_point():
        return False
    with torch.no_grad():
        ref = kind.formula(m, x)
        Wa = W.detach().abs()
        scale = (x.abs() @ (Wa if kind.transposed else Wa.T)).max()
        if bias is not None:
            scale = scale + bias.detach().abs().max()
    return _close(out.detach(), ref, scale, d_in)


def _scale_holds(m: nn.Module, kind: _ScaleKind, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    shape = [1] * out.ndim
    shape[kind.axis] = -1

    def affine(h, w, b):
        y = w.reshape(shape) * h
        return y if b is None else y + b.reshape(shape)

    w = getattr(m, kind.scale).detach()
    b = getattr(m, kind.shift).detach() if kind.shift is not None else None
    g = torch.Generator(device="cpu").manual_seed(0)
    w2 = (torch.rand(w.shape, generator=g, dtype=torch.float64) + 0.5).to(w)
    b2 = None if b is None else (torch.rand(w.shape, generator=g, dtype=torch.float64) - 0.5).to(w)
    h = kind.unit(m, args, kwargs)
    if h.shape != out.shape or not h.is_floating_point():
        return False
    for wi, bi, oi in ((w, b, out.detach()), (w2, b2, None)):
        oi = kind.unit(m, args, kwargs, wi, bi) if oi is None else oi
        ref = affine(h, wi, bi)
        scale = wi.abs().max() * h.abs().max() + (0 if bi is None else bi.abs().max())
        if not _close(oi, ref, scale, 2):
            return False
    return True


def _describe(kind: _Kind, m: nn.Module) -> str:
    """The kind shown in ``NTKPlan.kinds``: the module's class, and the formula it was confirmed to compute."""
    if isinstance(kind, _AffineKind):
        return f"{type(m).__name__} (x W + b)" if kind.transposed else f"{type(m).__name__} (x W^T + b)"
    if isinstance(kind, _ScaleKind):
        return f"{type(m).__name__} (w * h(x) + b)"
    return type(m).__name__
