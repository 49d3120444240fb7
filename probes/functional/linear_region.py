"""The tensor side of linear regions (seed 003): activation patterns of gated sites, how many samples changed
region, perturbations of inputs and parameters, and ``L_gen = (f(x, P) - f(x, P*)) - (f(x*, P) - f(x*, P*))``.

The model side (the piecewise-linearity check, ``local_affine_map``, parameter swaps) is
``probes.autodiff.linear_region``; the formulas are on the docs page ``docs/probes/linear_region.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Params = dict[str, torch.Tensor]


#: site kinds whose pattern is ``pre > 0``
_ONE_KINK = frozenset({"relu", "leakyrelu", "leaky_relu", "prelu", "rrelu"})


class NotPiecewiseLinearError(ValueError):
    """The network is not piecewise linear in its input (or not per sample), so it has no local affine map."""


class LocalAffineMap(NamedTuple):
    """``f(z) = A z + c`` near each sample: ``A`` (P, C, D), ``c`` (P, C), ``f`` (P, C) (flattened per sample)."""

    A: torch.Tensor
    c: torch.Tensor
    f: torch.Tensor


def site_pattern(kind: str, module: nn.Module | None, pre: torch.Tensor) -> torch.Tensor:
    """The activation pattern of one gated site: which piece of the activation each entry is on.

    Args:
        kind: the site's kind (the ReLU family, ``"relu6"``, ``"hardtanh"``, or a max-pooling site).
        module: the activation or pooling module (its thresholds, kernel size, ...).
        pre: the site's input.

    Returns:
        ``pre > 0`` for the ReLU family; both kinks, stacked on a last axis, for ReLU6 and Hardtanh; the argmax
        indices for max pooling.

    Raises:
        NotPiecewiseLinearError: a kind without an activation pattern.
    """
    if kind in _ONE_KINK:
        return pre > 0
    if kind in ("relu6", "hardtanh"):
        lo, hi = (module.min_val, module.max_val) if isinstance(module, nn.Hardtanh) else (0.0, 6.0)
        return torch.stack([pre > lo, pre < hi], dim=-1)
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        pools: dict[int, Callable[..., Any]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
        fn = pools[int(type(module).__name__[-2])]
        return fn(
            pre,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.ceil_mode,
            return_indices=True,
        )[1]
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        adaptive: dict[int, Callable[..., Any]] = {
            1: F.adaptive_max_pool1d,
            2: F.adaptive_max_pool2d,
            3: F.adaptive_max_pool3d,
        }
        fn = adaptive[int(type(module).__name__[-2])]
        return fn(pre, module.output_size, return_indices=True)[1]
    raise NotPiecewiseLinearError(
        f"linear_region: site of kind {kind!r} has no activation pattern (not piecewise linear)"
    )


def patterns_differ(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Which samples changed linear region: their pattern differs at some site.

    Args:
        a: site -> pattern (samples first), from one pass.
        b: the same sites from another pass.

    Returns:
        ``(P,)`` bool.

    Raises:
        ValueError: the passes met different sites, or none.
    """
    if set(a) != set(b):
        raise ValueError(f"linear_region: the two passes met different sites ({sorted(set(a) ^ set(b))})")
    flips = None
    for name, pa in a.items():
        d = (pa != b[name]).reshape(pa.shape[0], -1).any(dim=1)
        flips = d if flips is None else flips | d
    if flips is None:
        raise ValueError(
            "linear_region: the model has no gated site (ReLU family, ReLU6, Hardtanh, max pooling); "
            "it is affine and has a single linear region"
        )
    return flips


def flip_rate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Fraction of all pattern entries (gate bits, pooling indices) that differ, over samples and sites.

    Args:
        a: site -> pattern, from one pass.
        b: the same sites from another pass.

    Returns:
        A 0-d float64 tensor in [0, 1].

    Raises:
        ValueError: the passes met different sites, or none.
    """
    if set(a) != set(b) or not a:
        raise ValueError("linear_region: the two passes must meet the same, non-empty set of gated sites")
    changed = sum((pa != b[n]).sum() for n, pa in a.items())
    assert isinstance(changed, torch.Tensor)  # a sum of tensors: ``a`` is not empty
    return changed.double() / sum(pa.numel() for pa in a.values())


def perturb_inputs(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``x'`` with ``||x'_i|| = eps ||x_i||`` (``eps`` where ``x_i = 0``), Gaussian direction per sample.

    Args:
        x: inputs, samples first.
        eps: relative size of the perturbation.
        generator: the random source (on ``x``'s device).

    Returns:
        ``x'``, shaped like ``x`` (the perturbation, not ``x + x'``).
    """
    P = x.shape[0]
    u = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    norm_x = x.reshape(P, -1).norm(dim=1)
    scale = torch.where(norm_x > 0, norm_x, torch.ones_like(norm_x)) * eps
    u_norm = u.reshape(P, -1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    return u * (scale / u_norm).reshape((P,) + (1,) * (x.ndim - 1))


def perturb_params(state: Params, names: list[str], delta: float, generator: torch.Generator) -> Params:
    """``P + P'`` with ``||P'_k||_F = delta ||P_k||_F`` for each tensor named in ``names`` (copies; others shared).

    Args:
        state: name -> tensor (``parameter_state``).
        names: the tensors to perturb.
        delta: relative size of each perturbation.
        generator: the random source (on the tensors' device).

    Returns:
        A new mapping: perturbed copies for ``names``, the other tensors shared with ``state``.
    """
    out = dict(state)
    for n in names:
        out[n] = perturb_tensor(state[n], delta, generator)
    return out


def perturb_tensor(p: torch.Tensor, delta: float, generator: torch.Generator) -> torch.Tensor:
    """``p + p'`` with ``||p'||_F = delta ||p||_F``: one Gaussian draw shaped like ``p`` (``perturb_params``' step).

    Args:
        p: a floating tensor.
        delta: relative size of the perturbation.
        generator: the random source (on ``p``'s device); one ``randn`` of ``p``'s shape and dtype is drawn.

    Returns:
        A new tensor.
    """
    u = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return p + u * (delta * p.norm() / u.norm().clamp_min(torch.finfo(p.dtype).tiny))


def l_gen(f_x_p: torch.Tensor, f_x_ps: torch.Tensor, f_xs_p: torch.Tensor, f_xs_ps: torch.Tensor) -> torch.Tensor:
    """``L_gen = (f(x, P) - f(x, P*)) - (f(x*, P) - f(x*, P*))`` per sample (seed 003).

    Args:
        f_x_p: ``f(x, P)``.
        f_x_ps: ``f(x, P*)``.
        f_xs_p: ``f(x*, P)``.
        f_xs_ps: ``f(x*, P*)``.

    Returns:
        ``L_gen``, shaped like the arguments.
    """
    return (f_x_p - f_x_ps) - (f_xs_p - f_xs_ps)


def default_dtype_of(name: Any) -> torch.dtype | None:
    """``"float64"`` / ``torch.float64`` / ``None`` (the model's own) -> a torch dtype or None.

    Args:
        name: a floating dtype, its name, or ``None``.

    Returns:
        The dtype, or ``None``.

    Raises:
        ValueError: not a floating dtype.
    """
    if name is None:
        return None
    dt = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"linear_region: dtype must be a floating torch dtype name, got {name!r}")
    return dt
