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
        tokens = (
            ""
            if y.ndim != 2
            else (
                "; token labels (P, T) give one sample per position to alignment and "
                "margin only (their option positions=): leave this probe out, or pass one "
                "label per sample in probe_data"
            )
        )
        raise ValueError(
            f"{who}: integer labels must be one class index per sample, got shape {tuple(y.shape)}{tokens}"
        )
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


#: the Hugging Face convention for a position without a label
IGNORE_INDEX = -100


def padded_labels(labels: torch.Tensor, shift: int, mask: torch.Tensor | None) -> int:
    """How many labelled pairs the attention mask leaves out: positions ``t`` whose paired label (at ``t + shift``)
    is not ``-100`` but whose own position or label position is padding (mask 0).

    Args:
        labels: integer labels ``(P, T)``.
        shift: how far ahead the paired label lies.
        mask: the ``(P, T)`` attention mask, or None (then 0).

    Returns:
        The number of such pairs (0 for labels or a mask of another shape, or a shift out of range).
    """
    if mask is None or labels.ndim != 2 or tuple(mask.shape) != tuple(labels.shape):
        return 0
    T = labels.shape[1]
    if shift < 0 or shift >= T:
        return 0
    real = mask.to(labels.device) != 0
    labelled = labels[:, shift:] != IGNORE_INDEX
    kept = real[:, : T - shift] & real[:, shift:]
    return int((labelled & ~kept).sum())


def token_positions(
    labels: torch.Tensor, shift: int = 0, positions: str = "all", mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of token-level labels are samples, and their labels.

    Labels ``(P, T)`` hold one class per position, ``-100`` where a position has none. With ``shift`` the features
    at position ``t`` pair with the label at ``t + shift`` (a causal language model predicts the next token:
    ``shift=1``, as in its own loss); a position is kept when its paired label is not ``-100`` and, with ``mask``,
    both the position and the position of its label are real tokens: a position whose mask is 0 is not a sample, like
    one labelled ``-100`` (so ``labels = input_ids`` with the pads left in gives what ``-100`` at the pads gives).

    Args:
        labels: integer labels ``(P, T)``.
        shift: how far ahead the paired label lies (0 or more).
        positions: ``"all"`` every kept position, ``"last"`` the last kept position of each sequence (a sequence
            without one contributes nothing).
        mask: optional ``(P, T)`` attention mask (nonzero at real tokens): a pair is kept only when the features'
            position ``t`` and the label's position ``t + shift`` are both real.

    Returns:
        ``(index, y)``: ``index`` a ``(N, 2)`` long tensor of ``(sample, position)`` pairs of the features, ``y`` the
        ``N`` labels paired with them.

    Raises:
        ValueError: labels that are not integer ``(P, T)``, a negative shift, a shift as long as the sequence, an
            unknown ``positions``, a mask of another shape, or no position left to keep.
    """
    if labels.ndim != 2 or labels.is_floating_point():
        raise ValueError(f"token labels must be integer (P, T) class indices, got {labels.dtype} {tuple(labels.shape)}")
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    P, T = labels.shape
    if shift < 0 or shift >= T:
        raise ValueError(f"label_shift must be in [0, {T}) for sequences of {T} positions, got {shift}")
    paired = torch.full_like(labels, IGNORE_INDEX)
    paired[:, : T - shift] = labels[:, shift:]
    keep = paired != IGNORE_INDEX
    if mask is not None:
        if tuple(mask.shape) != (P, T):
            raise ValueError(f"the attention mask has shape {tuple(mask.shape)}, the labels {(P, T)}")
        real = mask.to(keep.device) != 0
        keep[:, : T - shift] &= real[:, : T - shift] & real[:, shift:]  # the feature's position and its label's
        keep[:, T - shift :] = False
    if positions == "last":
        last = torch.where(keep, torch.arange(T, device=keep.device), -1).max(dim=1).values
        rows = torch.nonzero(last >= 0).squeeze(1)
        index = torch.stack([rows, last[rows]], dim=1)
    else:
        index = torch.nonzero(keep)
    if index.shape[0] == 0:
        raise ValueError("no position has a label (all are -100 after the shift, or padding): nothing to measure")
    return index, paired[index[:, 0], index[:, 1]]


#: what ``positions`` may be for token labels: every kept position, or the last kept one of each sequence
POSITIONS = ("all", "last")


def is_token_labels(y: torch.Tensor | None) -> bool:
    """Whether ``y`` holds token labels: integer ``(P, T)`` class indices (``-100`` where a position has none).

    Args:
        y: the probe labels, or None.

    Returns:
        True for an integer (not bool) tensor with two axes.
    """
    return isinstance(y, torch.Tensor) and y.ndim == 2 and not y.is_floating_point() and y.dtype != torch.bool


def token_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` ``(P, T, ...)`` at the ``(sample, position)`` pairs ``index``, flattened: ``(N, -1)``.

    Args:
        t: a ``(P, T, ...)`` tensor.
        index: ``(N, 2)`` integer ``(sample, position)`` pairs.
    """
    index = index.to(t.device)
    return t[index[:, 0], index[:, 1]].reshape(index.shape[0], -1)
