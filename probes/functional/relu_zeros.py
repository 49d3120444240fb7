"""The counts of the ``relu_zeros`` probe (seed 003): which axis of an activation indexes units, and from the
per-unit counts of non-zero outputs the zeros, their fraction, the dead units and each unit's activity."""

from __future__ import annotations

from typing import NamedTuple

import torch


def unit_axis(ndim: int, unit_dim: int | None = None) -> tuple[int, bool]:
    """The axis of an ``ndim``-d activation that indexes units: the last of a 2-D or 3-D (sequence) one, 1 (channels)
    of a 4-D/5-D one, 0 of a 1-D one; ``unit_dim`` (an axis, negative from the end) overrides it where the
    activation has that axis.

    Args:
        ndim: the activation's number of dimensions (at least 1).
        unit_dim: the ``unit_dim`` option of ``relu_zeros`` / ``patterns``, or None.

    Returns:
        ``(axis, fits)``: the axis (non-negative), and False when ``unit_dim`` was given but the activation has no
        such axis (the default axis is returned then; the probes say so once per site).
    """
    if unit_dim is not None and -ndim <= unit_dim < ndim:
        return unit_dim % ndim, True
    default = 0 if ndim <= 1 else (ndim - 1 if ndim <= 3 else 1)
    return default, unit_dim is None


class ZeroCounts(NamedTuple):
    """One site's window: ``zeros`` outputs exactly zero, their ``fraction``, ``dead`` units (never non-zero), and
    each unit's ``activity`` (fraction of its outputs that were non-zero)."""

    zeros: torch.Tensor
    fraction: torch.Tensor
    dead: torch.Tensor
    activity: torch.Tensor


def zero_counts(nonzero: torch.Tensor, outputs: int, per_unit: int) -> ZeroCounts:
    """``zeros = outputs - sum_u nonzero_u``, ``fraction = zeros / outputs``, ``dead = #{u : nonzero_u = 0}``,
    ``activity_u = nonzero_u / per_unit``.

    Args:
        nonzero: ``(units,)`` int64: the non-zero outputs of each unit in the window.
        outputs: all outputs of the site in the window (> 0).
        per_unit: outputs of one unit in the window.

    Returns:
        The ``ZeroCounts`` (0-d float64 tensors, ``activity`` ``(units,)`` float64).
    """
    zeros = outputs - nonzero.sum().double()
    return ZeroCounts(zeros, zeros / outputs, (nonzero == 0).sum(), nonzero.double() / per_unit)
