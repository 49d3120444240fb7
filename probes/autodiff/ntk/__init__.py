"""The empirical neural tangent kernel ``Theta(x, x') = J(x) J(x')^T`` of a model: the layer factors recorded with
hooks, the plan of which parameters take the layerwise route and which the ``torch.func`` fallback, the dense
kernel, the ``Theta V`` operator, the cost estimate and the exchange across ranks.

The contractions of the factors and the settings are in ``probes.functional.ntk``; how it all works is on the
docs page ``docs/probes/ntk_computation.md``.
"""

from __future__ import annotations

from probes.autodiff.ntk.cost import NTKCost, ntk_cost

# ``_accumulate_term`` and ``_layer_terms`` are importable from here too: benchmarks/ntk.py times them on their own
from probes.autodiff.ntk.dense import _accumulate_term as _accumulate_term
from probes.autodiff.ntk.dense import empirical_ntk
from probes.autodiff.ntk.factors import _layer_terms as _layer_terms
from probes.autodiff.ntk.inputs import MODES, REDUCTIONS, SampleMixingError
from probes.autodiff.ntk.operator import NTKOperator
from probes.autodiff.ntk.plan import NTKPlan
from probes.autodiff.ntk.planning import ntk_operator, ntk_plan
from probes.autodiff.ntk.selfcheck import verify_plan
from probes.functional.ntk.kernel import trace_over_outputs
from probes.functional.ntk.settings import DEFAULT, NTKSettings

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
    "trace_over_outputs",
    "MODES",
    "REDUCTIONS",
    "NTKSettings",
    "DEFAULT",
]
