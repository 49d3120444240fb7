"""The NTK checks itself: each layerwise term against plain autograd, per sample, on two samples.

``verify_plan`` projects the outputs on a fixed random direction ``u`` (one output ``f . u``, so the check costs
one backward per sample whatever ``C``) and compares, for each term of the plan (a layer, a tie group, a directly
used parameter), the squared norm of its per-sample gradient from the layerwise path (``NTKOperator.diagonal``
of that term alone: the kernel's diagonal) with the squared norm of ``d(f(x_i) . u) / d(its parameters)`` from a
plain ``torch.autograd.grad`` of sample ``i`` alone (no ``torch.func``). Since ``u`` is random, a layer whose
formula does not match what the model computes (the legacy hook-based ``torch.nn.utils.spectral_norm`` and
``weight_norm``, pruning, any forward pre-hook that rewrites a weight from another parameter) disagrees.
``ntk_plan(..., check=True)`` (the default) sends such a layer to the fallback with a warning naming it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from probes.autodiff.ntk.factors import _layer_terms, _term_params
from probes.autodiff.ntk.inputs import _as_args, _flat_output, _take
from probes.autodiff.ntk.layers import _own_params, _used_params
from probes.autodiff.ntk.operator import NTKOperator
from probes.autodiff.ntk.plan import NTKPlan


def verify_plan(
    model: nn.Module, x: Any, plan: NTKPlan, *, samples: int = 2, who: str = "verify_plan"
) -> dict[str, str]:
    """The layerwise terms of ``plan`` whose per-sample gradient norms disagree with plain autograd.

    Args:
        model: the model the plan was made for.
        x: its inputs (as for ``ntk_plan``); the first ``samples`` samples are used.
        plan: a result of ``ntk_plan``.
        samples: how many samples to compare.
        who: the name that messages start with.

    Returns:
        Term -> what disagrees (empty when every term agrees). A term is named by its layer's path, its tie
        group's paths joined by ``+``, or a directly used parameter's name.

    Raises:
        TypeError: ``x`` is not a tensor or a sequence of tensors.
        ValueError: ``x`` has no samples.
    """
    args, P = _as_args(x, who)
    s = min(P, samples)
    sub = _take(args, 0, s)
    owners = _term_params(model, plan)
    if not owners:
        return {}
    u = torch.randn(plan.outputs, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    terms = _layer_terms(model, sub, s, plan, "trace", s, torch.float64, who, "operator", project=u)
    fast = {k: NTKOperator([t], [], s, 1, torch.float64, sub[0].device).diagonal() for k, t in terms.items()}
    flat = [p for ps in owners.values() for p in ps]
    ref = {k: torch.zeros(s, dtype=torch.float64) for k in owners}
    eps = 1.0
    where = {id(p): (path, key) for path, m in plan.modules.items() for key, p in _own_params(m).items()}
    # the parameter tensors the forward uses: under FSDP2 the gathered ones, which the graph holds, not the shards
    with _used_params(plan.modules) as live:
        for i in range(s):
            with torch.enable_grad():
                y = _flat_output(model(*_take(sub, i, i + 1)), 1, who)[0]
                eps = torch.finfo(y.dtype).eps
                yu = y @ u.to(y.device, y.dtype)
                used = [live.get(where[id(p)][0], {}).get(where[id(p)][1], p) if id(p) in where else p for p in flat]
                grads = (
                    torch.autograd.grad(yu, used, allow_unused=True) if yu.requires_grad else [None] * len(flat)
                )  # the output depends on no trainable parameter
            norms = iter([0.0 if g is None else float(g.double().pow(2).sum()) for g in grads])
            for k, ps in owners.items():
                ref[k][i] = sum(next(norms) for _ in ps)
    total = sum(float(v.sum()) for v in ref.values())
    bad = {}
    for k, mine in fast.items():
        mine = mine.cpu()
        err = float((mine - ref[k]).abs().max())
        if err > eps**0.5 * (float(torch.maximum(mine, ref[k]).max()) + eps**0.5 * total):
            bad[k] = (
                f"per-sample gradient norms {', '.join(f'{v:.6g}' for v in mine.tolist())} on the layerwise "
                f"path, {', '.join(f'{v:.6g}' for v in ref[k].tolist())} by autograd"
            )
    return bad


def _demote(model: nn.Module, args: tuple[torch.Tensor, ...], plan: NTKPlan, who: str) -> None:
    """Send the terms that ``verify_plan`` finds wrong to the fallback (``plan.fallback`` is refreshed by the
    caller), each with a reason in ``plan.reasons`` and a warning."""
    bad = verify_plan(model, args, plan, who=who)
    for key, why in bad.items():
        if key in plan.direct:
            plan.direct.remove(key)
            desc = f"parameter {key!r}"
            plan.reasons[key.rpartition(".")[0] or "<root>"] = f"{key}: the self-check failed ({why})"
        else:
            layers = key.split("+")
            desc = " + ".join(f"{plan.kinds.get(p, '')} {p or '<root>'!r}" for p in layers)
            plan.tied = [g for g in plan.tied if "+".join(g) != key]
            for path in layers:
                for table in (plan.fast, plan.modules, plan.layer_kinds, plan.kinds):
                    table.pop(path, None)
                if path in plan.shared:
                    plan.shared.remove(path)
                plan.reasons[path or "<root>"] = f"the self-check failed ({why})"
        warnings.warn(
            f"{who}: the layerwise NTK of {desc} disagrees with autograd ({why}); a forward pre-hook "
            "or parametrization rewriting its weight? Its parameters go to the exact but slower torch.func "
            "fallback",
            stacklevel=3,
        )
