"""The plan as the kernels use it: ``_build_plan`` (which parameters go layerwise, which to the fallback), then the
self-check against plain autograd (``selfcheck``), which sends a layer that disagrees to the fallback; and
``ntk_operator``, which plans and builds the matrix-free ``NTKOperator`` (the self-check uses that class, so its
entry point lives here, above both)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from probes.autodiff.fsdp import sharded_parameters, tops_gathered
from probes.autodiff.ntk import progress
from probes.autodiff.ntk.factors import _layer_terms
from probes.autodiff.ntk.fallback import _fallback_blocks
from probes.autodiff.ntk.inputs import _as_args, _check_modules, _trainable, _validated
from probes.autodiff.ntk.operator import NTKOperator, _compressed
from probes.autodiff.ntk.plan import NTKPlan, _build_plan, _refresh_fallback
from probes.autodiff.ntk.ranks import Share, together
from probes.autodiff.ntk.selfcheck import _demote
from probes.functional.ntk.settings import DEFAULT, NTKSettings
from probes.functional.ntk.terms import _Pairs


def ntk_plan(
    model: nn.Module, x: Any, *, fast_path: bool = True, check: bool = True, who: str = "empirical_ntk"
) -> NTKPlan:
    """Decide the layerwise layers and the fallback parameters (forwards on one and two samples), then check them.

    Also checks that samples do not interact. The plan's ``reasons`` name every module whose parameters go to
    the fallback and why (no layerwise formula for its type, use outside its own ``forward``, a failed self-check).
    Nothing in the model changes (no ``.grad`` written, no mode switched).

    Args:
        model: any ``nn.Module`` with at least one trainable parameter, taking ``x`` positionally.
        x: a tensor, or a tuple or list of tensors (the model's positional inputs), samples along the first axis.
        fast_path: ``False`` sends every parameter to the fallback (a reference).
        check: compare each layerwise layer's per-sample gradient norms with plain autograd on two samples
            (``verify_plan``) and send a layer that disagrees to the fallback, with a warning naming it.
        who: the name that error messages start with.

    Returns:
        The ``NTKPlan``, reusable by ``empirical_ntk(..., plan=)`` and ``ntk_operator(..., plan=)`` for the same
        model and input shape.

    Raises:
        SampleMixingError: a BatchNorm normalises with batch statistics, or sample 0's output changes when another
            sample is in the batch.
        ValueError: active dropout, no trainable parameter, inputs without samples or with NaN or infinite values,
            a model output without the samples along its first axis.
        TypeError: ``x`` is not a tensor or a sequence of tensors, or the model does not return a floating
            tensor.
    """
    with tops_gathered(model):
        plan = _build_plan(model, x, fast_path=fast_path, who=who)
        args, P = _as_args(x, who)
        if check and fast_path and P >= 2 and (plan.fast or plan.direct):
            _demote(model, args, plan, who)
            _refresh_fallback(plan, _trainable(model, who))
        sharded = sharded_parameters(model, plan.fallback + plan.direct)
    if sharded:
        raise ValueError(
            f"{who}: the parameters {sharded} of this FSDP2-sharded model have no layerwise formula here "
            f"({'; '.join(f'{k}: {v}' for k, v in plan.reasons.items())}), and the torch.func route "
            "needs them whole; shard the modules that hold them with their parent, or leave them out of "
            "training (requires_grad=False)"
        )
    return plan


def _inputs_and_plan(
    model: nn.Module,
    x: Any,
    mode: str,
    reduction: str,
    chunk_size: int | None,
    dtype: torch.dtype,
    fast_path: bool,
    plan: NTKPlan | None,
    who: str,
) -> tuple[tuple[torch.Tensor, ...], int, NTKPlan]:
    """The checked inputs, their sample count, and the plan (made now, or the given one checked)."""
    args, P = _validated(model, x, mode, reduction, chunk_size, dtype, who)
    if plan is None:
        plan = ntk_plan(model, args, fast_path=fast_path, who=who)
    else:
        _check_modules(model, who)
    return args, P, plan


def _share(distributed: bool, group: Any, P: int, who: str) -> Share | None:
    """This rank's share of the ``P`` samples for ``distributed=True`` (None: one process, or one rank)."""
    if not distributed:
        return None
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()):
        raise ValueError(
            f"{who}: distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    share = Share.of(P, group)
    return share if share.world > 1 else None


def ntk_operator(
    model: nn.Module,
    x: Any,
    *,
    mode: str = "trace",
    reduction: str = "sum",
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    fast_path: bool = True,
    plan: NTKPlan | None = None,
    distributed: bool = False,
    group: Any = None,
    settings: NTKSettings = DEFAULT,
) -> NTKOperator:
    """The kernel of ``empirical_ntk`` as a matrix-free operator, memory linear in ``P``.

    For the top eigenvalues at large ``P``: ``top_eigenvalues(op.matmat, op.shape[0], k)``
    (``probes.functional.spectra``); ``op.trace()`` and ``op.diagonal()`` are exact.

    Args:
        model: as for ``empirical_ntk``.
        x: as for ``empirical_ntk``.
        mode: as for ``empirical_ntk``.
        reduction: as for ``empirical_ntk``.
        chunk_size: as for ``empirical_ntk``.
        dtype: the precision of the products ``Theta V`` (the factors are kept in the model's precision).
        fast_path: as for ``empirical_ntk``.
        plan: as for ``empirical_ntk``.
        distributed: split the samples over the ranks of ``group``: each rank holds the factors of its
            ``P / world`` samples only, and every product ``Theta V`` sums the ranks' partial products in one
            all-reduce and assembles the rows in one all-gather (every rank calls ``matmat`` with the same ``V``
            and gets the same result; no rank holds ``P x P`` or another rank's factors).
        group: the process group (None: the default group).
        settings: as for ``empirical_ntk``.

    Returns:
        An ``NTKOperator`` holding the layerwise factors (and the fallback Jacobians that fit the budget).

    Raises:
        ValueError: as ``empirical_ntk``.
        TypeError: as ``empirical_ntk``.
        SampleMixingError: the model mixes samples.
        RuntimeError: as ``empirical_ntk``.
    """
    with tops_gathered(model):
        return _ntk_operator(
            model, x, mode, reduction, chunk_size, dtype, fast_path, plan, distributed, group, settings
        )


def _ntk_operator(
    model: nn.Module,
    x: Any,
    mode: str,
    reduction: str,
    chunk_size: int | None,
    dtype: torch.dtype,
    fast_path: bool,
    plan: NTKPlan | None,
    distributed: bool,
    group: Any,
    settings: NTKSettings,
) -> NTKOperator:
    who = "ntk_operator"
    args, P, plan = _inputs_and_plan(model, x, mode, reduction, chunk_size, dtype, fast_path, plan, who)
    C = plan.outputs
    Ce = C if mode == "full" else 1
    share = _share(distributed, group, P, who)
    local, rows = (args, P) if share is None else (share.take(args), share.S)
    with progress.measuring(who), together(share, who) if share is not None else nullcontext():
        terms = (
            list(
                _layer_terms(
                    model, local, rows, plan, mode, chunk_size, dtype, who, "operator", None, settings
                ).values()
            )
            if plan.fast
            else []
        )
        if share is None:  # bases of the row spaces: per rank they would differ, so across ranks the factors stay
            terms = [_compressed(t, dtype, settings) if isinstance(t, _Pairs) else t for t in terms]
        fallback: list[tuple[torch.Tensor | None, Any]] = []
        if plan.fallback:
            fallback = [
                (J, streamed)
                for _, J, streamed in _fallback_blocks(
                    model, local, rows, plan.fallback, C, mode, chunk_size, dtype, who, settings
                )
            ]
    scale = 1.0 / C if reduction == "mean" else 1.0
    return NTKOperator(terms, fallback, P, Ce, dtype, args[0].device, scale, share, settings)
