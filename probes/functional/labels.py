"""Label matrices ``Y`` in R^{P x C}: binary labels as +-1 in one column, classes one-hot."""

from __future__ import annotations

import torch


def label_matrix(y: torch.Tensor, num_classes: int | None = None, who: str = "labels") -> torch.Tensor:
    """Return ``Y`` as float64 P x C.

    - floating ``y`` (P,) or (P, C): taken as given (regression targets, or +-1 labels);
    - integer ``y`` with two distinct values and ``num_classes in (None, 1, 2)``: +-1 in one column
      (the larger value maps to +1);
    - other integer ``y``: one-hot with ``num_classes`` (default ``max(y) + 1``) columns.

    Args:
        y: labels, one row per sample (tensor or array-like; bool counts as integer).
        num_classes: columns of the one-hot matrix for integer labels (default ``max(y) + 1``).
        who: the name that error messages start with.

    Returns:
        ``Y``, a float64 ``P x C`` tensor on ``y``'s device.

    Raises:
        ValueError: no sample, NaN or infinite floating labels, integer labels that are not one index per sample,
            a negative class index, or an index at least ``num_classes``.
    """
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.ndim == 0 or y.shape[0] == 0:
        raise ValueError(f"{who}: labels must have one row per sample, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.isfinite(y).all():
            raise ValueError(f"{who}: labels contain NaN or infinite values")
        y = y.double()
        return y.reshape(y.shape[0], -1)
    if y.dtype == torch.bool:
        y = y.long()
    if y.ndim != 1:
        raise ValueError(f"{who}: integer labels must be one class index per sample, got shape {tuple(y.shape)}")
    values = torch.unique(y)
    if values.numel() <= 2 and num_classes in (None, 1, 2) and values.min() >= 0:
        hi = values.max()
        return torch.where(y == hi, 1.0, -1.0).double().reshape(-1, 1)
    if y.min() < 0:
        raise ValueError(f"{who}: class indices must be non-negative, got min {int(y.min())}")
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if int(y.max()) >= c:
        raise ValueError(f"{who}: class index {int(y.max())} out of range for {c} classes")
    return torch.nn.functional.one_hot(y, c).double()
