"""Which parameters take the layerwise path and which the fallback, and why (``ntk_plan``).

A layer is on the layerwise path when, in two small discovery passes (1 and 2 samples), every call sees the
sample axis first, is called equally often per sample, and the gradients of its parameters through its own
calls (the module re-run on the recorded inputs) reproduce autograd's gradient of the whole model. Every
other trainable parameter goes to the fallback, with the reason recorded per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from probes.functional.ntk.inputs import (
    _as_args,
    _check_mixing,
    _check_modules,
    _detached,
    _flat_output,
    _owners,
    _take,
    _trainable,
    _validated,
)
from probes.functional.ntk.layers import _KINDS, _first, _Kind, _kind_of, _own_params


@dataclass
class NTKPlan:
    """How ``empirical_ntk`` splits a model: layers on the layerwise path, parameters for ``torch.func``.

    Attributes:
        fast: module path -> number of calls per forward, for the layers on the layerwise path.
        fallback: names of the trainable parameters handled by per-sample Jacobians (``torch.func``).
        reasons: module path (``"<root>"`` for the model itself) -> why its parameters were left to the fallback.
        outputs: ``C``, output values per sample.
        kinds: module path -> layer kind (``"Linear"``, ``"Conv2d"``, ``"LayerNorm"``, ...).
        modules: module path -> the module itself (not in the ``repr``).
    """

    fast: dict[str, int] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    outputs: int = 0
    kinds: dict[str, str] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)


def ntk_plan(model: nn.Module, x: Any, *, fast_path: bool = True, who: str = "empirical_ntk") -> NTKPlan:
    """Decide the layerwise layers and the fallback parameters (two forwards on one and two samples).

    Also checks that samples do not interact. The plan's ``reasons`` name every module whose parameters go to
    the fallback and why (no layerwise formula for its type, tied weights, use outside its own ``forward``, ...).
    Nothing in the model changes (no ``.grad`` written, no mode switched).

    Args:
        model: any ``nn.Module`` with at least one trainable parameter, taking ``x`` positionally.
        x: a tensor, or a tuple or list of tensors (the model's positional inputs), samples along the first axis.
        fast_path: ``False`` sends every parameter to the fallback (a reference).
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
    args, P = _as_args(x, who)
    _check_modules(model, who)
    params = _trainable(model, who)
    name_of = {id(p): n for n, p in params.items()}
    plan = NTKPlan()
    candidates: dict[str, tuple[nn.Module, _Kind]] = {}
    owners = _owners(model)
    for path, m in model.named_modules():
        direct = [p for p in m._parameters.values() if p is not None and p.requires_grad]
        kind = _kind_of(m)
        label = path or "<root>"
        if kind is None:
            base = next((b for k in _KINDS for b in k.bases if isinstance(m, b)), None)
            if base is not None and direct:
                plan.reasons[label] = f"{type(m).__name__} overrides {base.__name__}.forward"
            elif base is not None and any(p.requires_grad for p in m.parameters()):
                plan.reasons[label] = "its weight or bias is computed (a parametrization), not a plain parameter"
            elif direct:
                plan.reasons[label] = f"no layerwise formula for {type(m).__name__}"
            continue
        params_m = [p for n, p in m.named_parameters() if p.requires_grad]
        if not params_m:
            continue
        if len(direct) != len(params_m):
            plan.reasons[label] = "its weight or bias is computed (a parametrization), not a plain parameter"
        elif not fast_path:
            plan.reasons[label] = "fast_path=False"
        elif (why := kind.unsupported(m)) is not None:
            plan.reasons[label] = why
        elif any(len(owners.get(id(p), ())) > 1 for p in direct):
            plan.reasons[label] = "its parameters are registered in another module too (tied weights)"
        else:
            candidates[path] = (m, kind)

    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {p: [] for p in candidates}
    layouts: dict[str, list[str | None]] = {p: [] for p in candidates}
    recording = {"on": False, "b": 0}

    def make_hook(path: str, kind: _Kind):
        def hook(module, hargs, hkwargs, output):
            xin = _first(hargs, hkwargs)
            why = kind.layout(module, xin)
            b = recording["b"]
            if why is None and int(xin.shape[0]) != b:
                why = "a call does not see the samples along the input's first axis"
            if why is None and not (isinstance(output, torch.Tensor) and output.ndim >= 1 and output.shape[0] == b):
                why = "a call does not return the samples along the output's first axis"
            layouts[path].append(why)
            if recording["on"] and isinstance(output, torch.Tensor):
                calls[path].append((_detached(hargs), _detached(hkwargs), output))
                return output.clone()  # later in-place ops must not alter the recorded output
            return None
        return hook

    handles = [m.register_forward_hook(make_hook(p, k), with_kwargs=True) for p, (m, k) in candidates.items()]
    b2 = min(P, 2)
    weights = torch.linspace(1.0, 2.0, 7)
    try:
        with torch.enable_grad():  # as in the measured passes (some modules take fused paths without grad)
            recording["b"] = 1
            out1 = _flat_output(model(*_take(args, 0, 1)), 1, who).detach()
        counts1 = {p: len(v) for p, v in layouts.items()}
        if b2 == 2:
            clones = {name_of[id(p)]: p.detach().clone().requires_grad_(True)
                      for m, _ in candidates.values() for p in _own_params(m).values()}
            recording.update(on=True, b=2)
            with torch.enable_grad():
                out2 = _flat_output(functional_call(model, clones, _take(args, 0, 2)), 2, who)
                w = weights.to(out2.device, out2.dtype).repeat(out2.shape[1] // 7 + 1)[:out2.shape[1]]
                recorded = [o for p in candidates for _, _, o in calls[p]]
                targets = list(clones.values()) + recorded
                if targets and out2.requires_grad:
                    grads = list(torch.autograd.grad((out2 * w).sum(), targets, allow_unused=True))
                else:  # the output depends on none of these parameters
                    grads = [None] * len(targets)
            recording["on"] = False
            _check_mixing(out1, out2, who)
            pgrad = dict(zip(clones, grads[:len(clones)]))
            ograd = iter(grads[len(clones):])
            for path, (m, _kind) in candidates.items():
                gs = [next(ograd) for _ in calls[path]]
                reason = next((why for why in layouts[path] if why), None)
                if reason is None and len(calls[path]) != counts1[path]:
                    reason = (f"called {counts1[path]} time(s) in a forward of one sample but {len(calls[path])} for "
                              "two (data-dependent)")
                if reason is None:
                    reason = _check_own_gradient(m, calls[path], gs, pgrad, name_of)
                if reason:
                    plan.reasons[path or "<root>"] = reason
        else:
            for path in candidates:
                reason = next((why for why in layouts[path] if why), None)
                if reason:
                    plan.reasons[path or "<root>"] = reason
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    plan.outputs = int(out1.shape[1])
    for path, (m, _kind) in candidates.items():
        if (path or "<root>") not in plan.reasons and counts1[path] > 0:
            plan.fast[path] = counts1[path]
            plan.kinds[path] = type(m).__name__
            plan.modules[path] = m
    fast_ids = {id(p) for m in plan.modules.values() for p in _own_params(m).values()}
    plan.fallback = [n for n, p in params.items() if id(p) not in fast_ids]
    return plan


def _check_own_gradient(m: nn.Module, calls: list[tuple[tuple, dict, torch.Tensor]],
                        grads: list[torch.Tensor | None], pgrad: dict[str, torch.Tensor | None],
                        name_of: dict[int, str]) -> str | None:
    """Why the layer's own calls do not account for its parameters' whole gradient, or None.

    The module is re-run on each recorded input with fresh leaves for its parameters; the gradient of
    ``sum_calls <output, recorded output gradient>`` must equal autograd's gradient through the whole model.
    """
    own = _own_params(m)
    if not calls:
        return None
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in own.items()}
    total = None
    with torch.enable_grad():
        for (a, kw, _), g in zip(calls, grads):
            if g is None:
                continue
            out = functional_call(m, leaves, a, kw)
            s = (out * g).sum()
            total = s if total is None else total + s
    mine = (torch.autograd.grad(total, list(leaves.values()), allow_unused=True) if total is not None
            else [None] * len(leaves))
    for p, dp in zip(own.values(), mine):
        ref = pgrad.get(name_of[id(p)])
        ref = torch.zeros_like(p) if ref is None else (ref.to_dense() if ref.is_sparse else ref)
        dp = torch.zeros_like(p) if dp is None else (dp.to_dense() if dp.is_sparse else dp)
        tol = torch.finfo(p.dtype).eps ** 0.5 * (float(ref.abs().max()) + float(dp.abs().max())) + 1e-30
        if float((ref - dp).abs().max()) > tol:
            return "its parameters receive gradient from outside its own calls (used functionally elsewhere?)"
    return None


def _inputs_and_plan(model: nn.Module, x: Any, mode: str, reduction: str, chunk_size: int | None,
                     dtype: torch.dtype, fast_path: bool, plan: NTKPlan | None, who: str
                     ) -> tuple[tuple[torch.Tensor, ...], int, NTKPlan]:
    """The checked inputs, their sample count, and the plan (made now, or the given one checked)."""
    args, P = _validated(model, x, mode, reduction, chunk_size, dtype, who)
    if plan is None:
        plan = ntk_plan(model, args, fast_path=fast_path, who=who)
    else:
        _check_modules(model, who)
    return args, P, plan
