"""Operations on a computed NTK matrix."""

from __future__ import annotations

import torch


def trace_over_outputs(theta_full: torch.Tensor, outputs: int) -> torch.Tensor:
    """The trace over outputs of a full kernel: ``Theta_ij = sum_c Theta_(i,c),(j,c)``.

    Args:
        theta_full: a ``PC x PC`` kernel with row ``i * C + c`` (``empirical_ntk(..., mode="full")``).
        outputs: ``C``, output values per sample.

    Returns:
        The ``P x P`` kernel, equal to ``empirical_ntk(..., mode="trace")``.
    """
    n = theta_full.shape[0] // outputs
    return theta_full.view(n, outputs, n, outputs).diagonal(dim1=1, dim2=3).sum(-1)
