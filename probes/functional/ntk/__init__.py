"""The empirical neural tangent kernel ``Theta(x, x') = J(x) J(x')^T`` of any model, exactly.

``J(x)`` is the Jacobian of the flattened output ``f(x)`` (``C`` values per sample) with respect to every
trainable parameter (``requires_grad=True``). Two kernels:

- ``mode="trace"`` (default): the ``P x P`` kernel summed over outputs, ``Theta_ij = sum_c J_c(x_i) . J_c(x_j)``
  (the sum of the PyTorch NTK tutorial; ``reduction="mean"`` divides by ``C``, neural-tangents' default
  ``trace_axes=(-1,)``);
- ``mode="full"``: the ``PC x PC`` kernel ``Theta_(i,a),(j,b) = J_a(x_i) . J_b(x_j)``, row ``i * C + a``
  (``.reshape(P, C, P, C)`` gives neural-tangents' ``(P, P, C, C)`` layout after a transpose).

Layerwise, with structured derivatives (Novak, Sohl-Dickstein & Schoenholz 2022, "Fast finite width neural
tangent kernel"): ``Theta = sum_l Theta_l`` over parameter-owning layers. For a layer with inputs ``z_k`` and
output gradients ``g_k`` at positions ``k`` (calls within one sample's forward, sequence positions, output
pixels), with a bias as a constant input 1 appended to ``z``::

    Theta_ij += sum_grp sum_{k,k'} (g_ik . g_jk') (z_ik . z_jk')      (Linear, Conv)
    Theta_ij += sum_{k,k'} [t_ik = t_jk'] g_ik . g_jk'                 (Embedding, tokens t)
    Theta_ij += D_i . D_j,  D_i the per-sample gradient (gamma, beta)  (LayerNorm, GroupNorm, eval BatchNorm)

Each layer takes the cheaper of the pairwise-position contraction above (``K^2 (n + d)`` per pair of samples)
and the outer-product one through ``D_i = sum_k g_ik z_ik^T`` (``n d`` per pair); no ``P x n_params`` Jacobian
of the whole model is formed. Cross terms ``k != k'`` of a layer called several times are summed
(nngeometry's ``Linear`` handler drops them). Beyond torch's own classes, the layerwise path takes modules by
their structure once their formula is confirmed on the probe inputs (transformers' ``Conv1D``, LayerNorm and
RMSNorm classes with their own ``forward``, scales), layers called on an input shared by all samples (position
tables indexed by ``position_ids`` of shape ``(1, T)``), parameters with a leading axis of 1 used directly in a
``forward`` (a ViT's ``cls_token`` and ``pos_embed``: one copy per sample gives their per-sample gradients), and
tied weights (the per-sample gradients of each use summed). The other parameters (other modules, use outside
the layer's own ``forward``, parametrizations) take per-sample Jacobians from ``torch.func``; ``ntk_plan``
shows the split and the reason for every parameter left to that fallback, and checks itself: each layerwise
term's per-sample gradient norms against plain autograd on two samples (``verify_plan``), a layer that
disagrees (a legacy ``spectral_norm`` hook) going to the fallback with a warning. ``ntk_operator`` gives
``Theta V`` and the exact diagonal from the same factors without the ``P x P`` kernel, for the Krylov solver
``probes.functional.spectra.top_eigenvalues``. Speed against ``torch.func``: ``benchmarks/ntk.py``,
``benchmarks/ntk_models.py`` (GPT-2, BERT, a ViT, a ResNet-18).

Samples must not interact (``SampleMixingError``): batch-statistics BatchNorm and active dropout are rejected,
and sample 0 must give the same output alone and in a batch of two. Nothing here changes the model: no
``.grad`` is written, no mode and no parameter is touched.

Modules: ``inputs`` (arguments, outputs, sample independence), ``plan`` (which parameters take which route,
and why), ``layers`` (the layer formulas), ``structural`` (layers recognised by structure, confirmed
numerically), ``tied`` (tied weights), ``selfcheck`` (``verify_plan``), ``terms`` (a layer's kernel term and its
two contractions), ``factors`` (recording the terms of all samples), ``fallback`` (``torch.func`` Jacobians),
``dense`` (``empirical_ntk``), ``operator`` (``NTKOperator``), ``planning`` (``ntk_plan``,
``ntk_operator``), ``cost`` (``ntk_cost``: the memory and time one measurement will take, before it runs),
``ranks`` (the kernel across ranks: ``distributed=True`` splits the samples over the ranks
of a process group, DDP replicas or FSDP2-sharded models alike, and assembles the kernel from exchanged
factors), ``outputs`` (one position of a sequence output, a Gaussian sketch of the outputs), ``progress``
(progress lines of a long measurement), ``settings`` (memory budgets and switches; setting one on this package
sets it there).
"""

from __future__ import annotations

import sys
import types

from probes.functional.ntk import settings
from probes.functional.ntk.cost import NTKCost, ntk_cost

# ``_accumulate_term`` and ``_layer_terms`` are importable from here too: benchmarks/ntk.py times them on their own
from probes.functional.ntk.dense import _accumulate_term as _accumulate_term
from probes.functional.ntk.dense import empirical_ntk, trace_over_outputs
from probes.functional.ntk.factors import _layer_terms as _layer_terms
from probes.functional.ntk.inputs import MODES, REDUCTIONS, SampleMixingError
from probes.functional.ntk.operator import NTKOperator
from probes.functional.ntk.plan import NTKPlan
from probes.functional.ntk.planning import ntk_operator, ntk_plan
from probes.functional.ntk.selfcheck import verify_plan

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
]


def _forwarded(name: str) -> property:
    return property(
        lambda _self: getattr(settings, name),
        lambda _self, value: setattr(settings, name, value),
        doc=f"``settings.{name}``, read and written there",
    )


class _Package(types.ModuleType):
    """This package, with the names of ``settings.TUNABLES`` as properties that read and write ``settings``, where
    the code reads them: ``probes.functional.ntk.FALLBACK_BUDGET = n`` (or ``monkeypatch.setattr``) takes effect."""

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(settings.TUNABLES))


for _name in settings.TUNABLES:
    setattr(_Package, _name, _forwarded(_name))
del _name

sys.modules[__name__].__class__ = _Package
