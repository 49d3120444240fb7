"""The Hessian's maths, tensors in and out: the loss of a chunk, Hutchinson's trace estimate, the edge of stability.

- Loss of a chunk (``chunk_loss``): the sum of the per-sample losses and their weight, so that chunks add up to the
  mean over the probe batch: cross-entropy for integer class labels (token labels ``(P, T)`` with ``-100`` ignored,
  positions paired at ``t + label_shift``, padding left out; weight = the kept positions), binary cross-entropy on
  one logit for labels in {0, 1} or {-1, +1}, ``F.mse_loss`` for float targets (weight = the output's entries), or
  a callable ``(output, y) -> mean loss`` (weight = the samples).
- Trace (Hutchinson 1989): ``tr(H) = E[z^T H z]`` for Rademacher ``z``; with ``m`` samples the estimate is their mean
  and its standard error ``s / sqrt(m)`` (``s`` the unbiased standard deviation of the samples).
- Edge of stability (Cohen et al. 2021, 2022): gradient descent on a quadratic of curvature ``lambda`` is stable
  while ``lambda < 2 / lr``; heavy-ball momentum ``beta`` moves the threshold to ``(2 + 2 beta) / lr`` (``lr`` the
  step on the gradient: ``(1 - dampening) lr`` with dampening); Adam's preconditioned sharpness
  ``lambda_max(D^-1/2 H D^-1/2)``, ``D = diag(sqrt(v_t / (1 - beta2^t)) + eps)``, has the threshold
  ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr at ``beta1 = 0.9``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from probes.functional.labels import IGNORE_INDEX


def _token_labels(y: torch.Tensor) -> bool:
    return y.ndim == 2 and not y.is_floating_point() and y.dtype != torch.bool


def chunk_loss(
    output: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    label_shift: int = 0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """``(total, weight)``: the summed loss of a chunk and what it counts, so that ``sum total / sum weight`` over
    the chunks is the mean loss over the probe batch (see the module docstring for which loss).

    Args:
        output: the model's output on the chunk (samples first).
        y: the chunk's labels or targets.
        loss: a callable ``(output, y) -> mean loss over the chunk``, or None for the default.
        label_shift: token labels: the output at position ``t`` pairs with the label at ``t + label_shift``.
        mask: token labels: the chunk's ``(p, T)`` attention mask (0 at padding), or None.

    Returns:
        The summed loss (a 0-d tensor with the graph) and its weight (a number).
    """
    if loss is not None:
        n = int(output.shape[0])
        return loss(output, y) * n, float(n)
    y = y.to(output.device)
    if y.is_floating_point():
        target = y.reshape(output.shape).to(output.dtype)
        return F.mse_loss(output, target, reduction="sum"), float(output.numel())
    if _token_labels(y) and output.ndim == 3:
        T = y.shape[1]
        paired = torch.full_like(y, IGNORE_INDEX)
        paired[:, : T - label_shift] = y[:, label_shift:]
        if mask is not None:
            real = mask.to(y.device) != 0
            keep = torch.zeros_like(real)
            keep[:, : T - label_shift] = real[:, : T - label_shift] & real[:, label_shift:]
            paired = torch.where(keep, paired, torch.full_like(paired, IGNORE_INDEX))
        kept = float((paired != IGNORE_INDEX).sum())
        total = F.cross_entropy(output.flatten(0, 1), paired.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return total, kept
    if output.ndim == 1 or output.shape[-1] == 1:
        target = (y.reshape(-1) > 0).to(output.dtype)
        return F.binary_cross_entropy_with_logits(output.reshape(-1), target, reduction="sum"), float(y.numel())
    return F.cross_entropy(output, y.reshape(-1).long(), reduction="sum"), float(y.numel())


def hutchinson(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's trace estimate from samples ``z_i^T H z_i`` (Rademacher ``z_i``) and its standard error.

    Args:
        samples: ``(m,)`` the quadratic forms.

    Returns:
        ``(mean, stderr)``: ``mean(samples)`` and ``std(samples, unbiased) / sqrt(m)`` (NaN for ``m = 1``), float64.
    """
    s = samples.to(torch.float64)
    m = s.numel()
    stderr = s.std(correction=1) / m**0.5 if m > 1 else torch.full((), float("nan"), dtype=torch.float64)
    return s.mean(), stderr


@dataclass(frozen=True)
class EdgeSetting:
    """What the edge of stability is measured against for an optimizer.

    Attributes:
        kind: ``"sgd"`` (plain or heavy-ball) or ``"adam"`` (Adam and AdamW: preconditioned sharpness).
        threshold: the stability threshold of the sharpness (``2 / lr``, ``(2 + 2 beta) / lr``, or
            ``(2 + 2 beta1) / ((1 - beta1) lr)``).
        beta2: Adam's ``beta2`` (None for SGD).
        eps: Adam's ``eps`` (None for SGD).
        amsgrad: Adam's ``amsgrad`` (``max_exp_avg_sq`` is its second moment).
    """

    kind: str
    threshold: float
    beta2: float | None = None
    eps: float | None = None
    amsgrad: bool = False


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0) -> float:
    """``(2 + 2 beta) / ((1 - dampening) lr)``: ``2 / lr`` without momentum (Cohen et al. 2021).

    Args:
        lr: the learning rate.
        momentum: the heavy-ball momentum ``beta`` (0: plain gradient descent).
        dampening: SGD's dampening of the momentum buffer.
    """
    return (2.0 + 2.0 * momentum) / ((1.0 - dampening) * lr)


def adam_threshold(lr: float, beta1: float) -> float:
    """``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022): 38 / lr at ``beta1 = 0.9``.

    Args:
        lr: the learning rate.
        beta1: Adam's first-moment decay.
    """
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


#: the hyper-parameters that must agree over the parameter groups, by optimizer kind
_SHARED = {"sgd": ("lr", "momentum", "dampening", "nesterov"), "adam": ("lr", "betas", "eps", "amsgrad")}


def edge_setting(optimizer: Any) -> EdgeSetting | str:
    """The edge-of-stability setting of ``optimizer`` from its ``param_groups``, or why there is none.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or None.

    Returns:
        An ``EdgeSetting``, or a sentence saying why the ratio is left out (no optimizer, another kind, Nesterov
        momentum, groups with different hyper-parameters, a zero learning rate).
    """
    if optimizer is None:
        return "no optimizer was given to attach (attach(optimizer=...))"
    if isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        kind = "adam"
    else:
        return f"the optimizer is a {type(optimizer).__name__}; the threshold is known for SGD, Adam and AdamW"
    groups: Sequence[dict] = optimizer.param_groups
    first = groups[0]
    for key in _SHARED[kind]:
        if any(g.get(key) != first.get(key) for g in groups[1:]):
            return f"the optimizer's parameter groups have different {key!r}: no single threshold"
    lr = float(first["lr"])
    if lr <= 0:
        return f"the learning rate is {lr}"
    if kind == "sgd":
        if first.get("nesterov"):
            return "SGD with Nesterov momentum: the threshold is known for heavy-ball momentum"
        return EdgeSetting("sgd", sgd_threshold(lr, float(first.get("momentum", 0.0)), float(first["dampening"])))
    beta1, beta2 = (float(b) for b in first["betas"])
    return EdgeSetting("adam", adam_threshold(lr, beta1), beta2, float(first["eps"]), bool(first.get("amsgrad")))


def adam_preconditioner(exp_avg_sq: torch.Tensor, step: float, beta2: float, eps: float) -> torch.Tensor:
    """``D = sqrt(v_t / (1 - beta2^t)) + eps``, Adam's diagonal preconditioner (as its update divides by it).

    Args:
        exp_avg_sq: ``v_t``, the optimizer's ``exp_avg_sq`` (flattened or not).
        step: ``t``, the optimizer's step count (>= 1).
        beta2: ``beta2``.
        eps: ``eps``.

    Returns:
        ``D`` in float64, shaped like ``exp_avg_sq``.
    """
    v = exp_avg_sq.to(torch.float64)
    return torch.sqrt(v / (1.0 - beta2**step)) + eps
