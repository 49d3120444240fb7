"""What the NTK accepts: the inputs, the model's output, the arguments, and samples that do not interact.

Samples must not interact: a BatchNorm that normalises with batch statistics (training mode, or
``track_running_stats=False``) is rejected by name, active dropout too, and the output of sample 0 alone must
match its output within a batch of two (``_check_mixing``, run by ``ntk_plan``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODES = ("trace", "full")
REDUCTIONS = ("sum", "mean")


class SampleMixingError(ValueError):
    """The model's output for one sample depends on other samples of the batch: no per-sample NTK.

    Raised by ``ntk_plan``, ``empirical_ntk`` and ``ntk_operator`` for a BatchNorm that normalises with batch
    statistics, and when sample 0 gives another output alone than in a batch of two.
    """


def _as_args(x: Any, who: str) -> tuple[tuple[torch.Tensor, ...], int]:
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(
            f"{who}: x must be a tensor (or a tuple of tensors, the model's positional inputs) "
            f"with the samples along the first axis, got {type(x).__name__}"
        )
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
        raise TypeError(
            f"{who}: the model returned a {type(out).__name__}; the NTK needs a tensor output "
            "(wrap the model so that it returns one tensor with the samples first)"
        )
    if out.ndim == 0 or int(out.shape[0]) != rows:
        raise ValueError(
            f"{who}: the model output has shape {tuple(out.shape)} for {rows} input sample(s); "
            "it must have the samples along its first axis"
        )
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
                    "Call model.eval() first (the ntk probe runs the model in eval mode by design)"
                )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{who}: {type(m).__name__} {path or '<root>'!r} is active (training mode), so the "
                "model is random and has no fixed Jacobian; call model.eval() first"
            )


def _trainable(model: nn.Module, who: str) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
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
            "so the per-sample NTK is undefined. Evaluate in eval mode without cross-sample operations"
        )


def _validated(
    model: nn.Module, x: Any, mode: str, reduction: str, chunk_size: int | None, dtype: torch.dtype, who: str
) -> tuple[tuple[torch.Tensor, ...], int]:
    if mode not in MODES:
        raise ValueError(f"{who}: mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mode == "full" and reduction != "sum":
        raise ValueError(
            f"{who}: reduction={reduction!r} applies to the trace over outputs; mode='full' keeps "
            "every output pair (use reduction='sum')"
        )
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be a floating torch.dtype, got {dtype!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"{who}: chunk_size must be a positive number of samples, got {chunk_size}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    return _as_args(x, who)
