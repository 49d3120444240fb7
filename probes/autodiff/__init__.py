"""What needs the model itself: factor recording with hooks, layer plans, parameter swaps, per-sample gradients,
Hessian-vector products, FSDP gathers and the exchange across ranks.

Below the engine and above ``probes.functional`` (pure tensor maths); see ``docs/architecture.md``. The public
functions that take a model::

    from probes.autodiff import empirical_ntk, ntk_operator, local_affine_map
"""

from __future__ import annotations

from probes.autodiff.linear_region import check_piecewise_linear, local_affine_map
from probes.autodiff.ntk import (
    NTKCost,
    NTKOperator,
    NTKPlan,
    SampleMixingError,
    empirical_ntk,
    ntk_cost,
    ntk_operator,
    ntk_plan,
    verify_plan,
)

__all__ = [
    "empirical_ntk",
    "ntk_operator",
    "ntk_plan",
    "ntk_cost",
    "verify_plan",
    "NTKOperator",
    "NTKPlan",
    "NTKCost",
    "SampleMixingError",
    "local_affine_map",
    "check_piecewise_linear",
]
