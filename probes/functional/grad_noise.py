"""Gradient noise from sums over samples: the simple noise scale (McCandlish et al. 2018) and the gradient
signal-to-noise ratio (Liu et al. 2020).

Per-sample gradients ``g_i`` (``i = 1..n``) enter only through ``n``, ``s = sum_i g_i`` and ``q = sum_i g_i^2``
(elementwise), accumulated in float64: the mean ``g = s / n`` and the unbiased variances
``Sigma_jj = (q_j - s_j^2 / n) / (n - 1)``. No ``n x parameters`` matrix is needed. The per-sample losses that the
gradients are taken of (cross-entropy, token cross-entropy, MSE) are here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from probes.functional.labels import IGNORE_INDEX

#: per-sample losses for ``loss=None``: picked from the labels and the output
LOSSES = ("cross_entropy", "binary_cross_entropy", "mse", "token_cross_entropy")


@dataclass
class GradientSums:
    """Sums over samples of per-sample gradients, per parameter (float64).

    Attributes:
        n: the number of samples summed.
        total: name -> ``sum_i g_i`` (the parameter's shape).
        squares: name -> ``sum_i g_i^2`` elementwise.
        norms: the per-sample gradient norms ``|g_i|`` over all the parameters, in sample order.
    """

    n: int = 0
    total: dict[str, torch.Tensor] = field(default_factory=dict)
    squares: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: list[torch.Tensor] = field(default_factory=list)

    def add(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Add a block of per-sample gradients.

        Args:
            grads: ``name -> (b, *shape)``, the same ``b`` samples for every name.
        """
        sq_norm: torch.Tensor | None = None
        b = 0
        for name, g in grads.items():
            g = g.detach().to(torch.float64)
            b = int(g.shape[0])
            s, q = g.sum(dim=0), g.square().sum(dim=0)
            self.total[name] = self.total[name] + s if name in self.total else s
            self.squares[name] = self.squares[name] + q if name in self.squares else q
            part = g.reshape(b, -1).square().sum(dim=1)
            sq_norm = part if sq_norm is None else sq_norm + part
        if sq_norm is not None:
            self.norms.append(sq_norm.sqrt())
            self.n += b

    def sample_norms(self) -> torch.Tensor:
        """``|g_i|`` for every sample summed so far, float64 ``(n,)``."""
        return torch.cat(self.norms) if self.norms else torch.zeros(0, dtype=torch.float64)


def mean_gradient(total: torch.Tensor, n: int) -> torch.Tensor:
    """``g = s / n``.

    Args:
        total: ``s = sum_i g_i``.
        n: the number of samples.
    """
    return total / n


def variances(total: torch.Tensor, squares: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased per-coordinate variances ``Sigma_jj = (q_j - s_j^2 / n) / (n - 1)``, clamped at 0 (rounding).

    Args:
        total: ``s = sum_i g_i``.
        squares: ``q = sum_i g_i^2``.
        n: the number of samples (at least 2).

    Returns:
        ``Sigma_jj``, same shape as ``total``.
    """
    if n < 2:
        raise ValueError(f"grad_noise: the covariance of per-sample gradients needs at least 2 samples, got {n}")
    return ((squares - total.square() / n) / (n - 1)).clamp_min(0.0)


def noise_scale(sums: GradientSums) -> torch.Tensor:
    """The simple noise scale ``B_simple = tr(Sigma) / |g|^2`` (McCandlish, Kaplan, Amodei et al. 2018, "An
    empirical model of large-batch training", eq. 2.9), float64 0-d (``inf`` when ``g = 0``).

    Args:
        sums: the sums over at least 2 samples.
    """
    trace = sum(variances(sums.total[k], sums.squares[k], sums.n).sum() for k in sums.total)
    g2 = sum(mean_gradient(sums.total[k], sums.n).square().sum() for k in sums.total)
    return torch.as_tensor(trace / g2, dtype=torch.float64)


def grad_norm(sums: GradientSums) -> torch.Tensor:
    """``|g|``, the norm of the mean gradient, float64 0-d.

    Args:
        sums: the sums over the samples.
    """
    g2 = sum(mean_gradient(sums.total[k], sums.n).square().sum() for k in sums.total)
    return torch.as_tensor(g2, dtype=torch.float64).sqrt()


def variance_floor(sums: GradientSums, rtol: float) -> torch.Tensor:
    """``(rtol * rms)^2`` with ``rms^2 = mean_j q_j / n`` the mean square of a gradient entry over every coordinate:
    variances below it are rounding (a coordinate whose gradient is zero in exact arithmetic, such as an attention
    key bias, varies at ``eps`` of the gradients' scale), float64 0-d.

    Args:
        sums: the sums over the samples.
        rtol: the floor's standard deviation relative to ``rms`` (the probe: 64 ``eps`` of the gradients' dtype).
    """
    count = sum(q.numel() for q in sums.squares.values())
    total = sum(q.sum() for q in sums.squares.values())
    return torch.as_tensor(rtol**2 * total / max(1, count * sums.n), dtype=torch.float64)


def gsnr(
    sums: GradientSums, names: Iterable[str] | None = None, floor: torch.Tensor | float = 0.0
) -> torch.Tensor | None:
    """The gradient signal-to-noise ratio ``mean_j g_j^2 / Sigma_jj`` (Liu, Wang, Zhang et al. 2020,
    "Understanding why neural networks generalize well through GSNR of parameters", eq. 1), over the coordinates
    ``j`` of the parameters ``names`` (default: all) whose variance is above ``floor`` (``variance_floor``);
    coordinates whose per-sample gradients are all equal (``Sigma_jj = 0``, e.g. embedding rows no sample uses) or
    equal up to rounding are left out.

    Args:
        sums: the sums over at least 2 samples.
        names: the parameters whose coordinates are averaged (default: all).
        floor: variances at or below it are left out.

    Returns:
        float64 0-d, or None when no coordinate has a variance above the floor.
    """
    ratio_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for k in sums.total if names is None else names:
        var = variances(sums.total[k], sums.squares[k], sums.n)
        g = mean_gradient(sums.total[k], sums.n)
        kept = var > torch.as_tensor(floor, dtype=var.dtype, device=var.device)
        ratio_sum = ratio_sum + (g[kept].square() / var[kept]).sum().cpu()
        count += int(kept.sum())
    return ratio_sum / count if count else None


def token_targets(
    labels: torch.Tensor, shift: int, index: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position targets and weights of token labels: the loss of sequence ``i`` is the mean cross-entropy over
    its kept positions (``index``, from ``probes.functional.labels.token_positions``).

    Args:
        labels: integer ``(P, T)``, ``-100`` where a position has no label.
        shift: the features at ``t`` pair with the label at ``t + shift``.
        index: ``(N, 2)`` kept ``(sample, position)`` pairs.
        dtype: the weights' dtype.

    Returns:
        ``(rows, targets, weights)``: the sequences with at least one kept position, their ``(n, T)`` targets (0
        where not kept) and ``(n, T)`` weights ``1 / n_i`` at the kept positions, 0 elsewhere.
    """
    P, T = labels.shape
    keep = torch.zeros(P, T, dtype=torch.bool, device=labels.device)
    keep[index[:, 0], index[:, 1]] = True
    paired = torch.full_like(labels, IGNORE_INDEX)
    paired[:, : T - shift] = labels[:, shift:]
    counts = keep.sum(dim=1)
    rows = torch.nonzero(counts > 0).squeeze(1)
    weights = keep[rows].to(dtype) / counts[rows, None].to(dtype)
    targets = torch.where(keep[rows], paired[rows], 0)
    return rows, targets, weights


def sample_loss(kind: str, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The summed loss of a block of samples, each sample's loss in the form the training loss averages.

    - ``cross_entropy``: ``-log softmax(f)_y`` (integer classes, ``C > 1`` outputs);
    - ``binary_cross_entropy``: of the logit ``f`` and ``y`` in {0, 1} (one output);
    - ``mse``: ``mean_c (f_c - y_c)^2`` (float targets);
    - ``token_cross_entropy``: ``sum_t w_t CE(f_t, y_t)`` with the weights of ``token_targets``.

    Args:
        kind: one of ``LOSSES``.
        output: ``(b, ...)`` the model's outputs.
        target: ``(b, ...)`` the targets.
        weight: ``(b, T)`` token weights (``token_cross_entropy`` only).

    Returns:
        ``sum_i loss_i``, 0-d.
    """
    b = output.shape[0]
    if kind == "cross_entropy":
        return F.cross_entropy(output.reshape(b, -1), target.reshape(b), reduction="sum")
    if kind == "binary_cross_entropy":
        f = output.reshape(b)
        return F.binary_cross_entropy_with_logits(f, target.reshape(b).to(f.dtype), reduction="sum")
    if kind == "mse":
        f = output.reshape(b, -1)
        return (f - target.reshape(b, -1).to(f.dtype)).square().mean(dim=1).sum()
    if kind == "token_cross_entropy":
        if weight is None:
            raise ValueError("grad_noise: the token_cross_entropy loss needs the token weights (token_targets)")
        T, C = output.shape[1], output.shape[-1]
        ce = F.cross_entropy(output.reshape(b * T, C), target.reshape(b * T), reduction="none").reshape(b, T)
        return (ce * weight.to(ce.dtype)).sum()
    raise ValueError(f"grad_noise: unknown loss {kind!r}; one of {LOSSES}")
