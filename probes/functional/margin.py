"""The forces of the ``margin`` probe (seed 002; jamming): ``Delta_i = m - y_i f(x_i)`` for one output, or
``m - (f_{y_i}(x_i) - max_{c != y_i} f_c(x_i))`` for classes (Geiger, Spigler, d'Ascoli, Sagun, Baity-Jesi, Biroli &
Wyart 2019, "Jamming transition as a paradigm to understand the loss landscape of deep neural networks")."""

from __future__ import annotations

import torch

from probes.functional.labels import label_matrix


def forces(output: torch.Tensor, y: torch.Tensor, margin: float, who: str = "margin") -> torch.Tensor:
    """``Delta = m - y f(x)`` (binary, one output) or ``m - (f_y - max_{c != y} f_c)`` (classes), float64 (P,).

    Args:
        output: the model output, samples first.
        y: labels in ``{-1, +1}`` (one output) or class indices.
        margin: the margin ``m``.
        who: the probe named in errors.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{who}: the model output is a {type(output).__name__}, not a tensor")
    P = int(output.shape[0]) if output.ndim else 0
    if P == 0:
        raise ValueError(f"{who}: the model output has shape {tuple(output.shape)}; it needs the samples first")
    f = output.detach().reshape(P, -1).to(torch.float64)
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"{who}: the model output contains NaN or infinite values")
    if y.shape[0] != P:
        raise ValueError(f"{who}: {y.shape[0]} labels for a probe batch of {P} samples")
    if f.shape[1] == 1:
        Y = label_matrix(y, num_classes=2, who=who)
        if Y.shape[1] != 1 or not bool((Y.abs() == 1).all()):
            raise ValueError(
                f"{who}: a model with one output needs binary labels (+-1, or two class indices); "
                f"got labels of shape {tuple(y.shape)} with values other than +-1"
            )
        return margin - Y[:, 0].to(f.device) * f[:, 0]
    if y.is_floating_point() or y.ndim != 1:
        raise ValueError(
            f"{who}: a model with {f.shape[1]} outputs needs integer class labels of shape (P,), "
            f"got {y.dtype} of shape {tuple(y.shape)}; pass class indices (y.long()) in probe_data"
        )
    idx = y.to(f.device).long()
    if bool((idx < 0).any()) or bool((idx >= f.shape[1]).any()):
        raise ValueError(
            f"{who}: class labels must lie in 0..{f.shape[1] - 1} for {f.shape[1]} outputs, got "
            f"{int(idx.min())}..{int(idx.max())}; the labels do not fit the model's output width"
        )
    true = f.gather(1, idx[:, None])[:, 0]
    others = f.scatter(1, idx[:, None], float("-inf")).max(dim=1).values
    return margin - (true - others)
