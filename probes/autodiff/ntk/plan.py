"""Which parameters take the layerwise path and which the fallback, and why (``ntk_plan``).

A layer is on the layerwise path when, in two small discovery passes (1 and 2 samples), every call sees the
sample axis first (or one input shared by all samples: leading axis 1, e.g. a position table indexed by
``position_ids`` of shape ``(1, T)``), is called equally often per sample, and the gradients of its parameters
through its own calls (the module re-run on the recorded inputs) reproduce autograd's gradient of the whole
model. A module without a standard class is taken when ``structural`` recognises it and confirms its formula on
the recorded calls. Layers that share a parameter (tied weights) are taken together, their per-sample
gradients summed. A parameter with a leading axis of 1 used directly in a ``forward`` (a ViT's ``cls_token``,
``pos_embed``) is taken when one copy per sample (leading axis ``B``) gives the same outputs and each sample's
output depends on its own copy only. Every other trainable parameter goes to the fallback, with the reason
recorded per module. Finally the self-check (``selfcheck``) compares each layer's per-sample gradient norms with
plain autograd on two samples; a layer that disagrees goes to the fallback with a warning.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from probes.autodiff.fsdp import gathered, units
from probes.autodiff.ntk.inputs import (
    _as_args,
    _check_mixing,
    _check_modules,
    _detached,
    _flat_output,
    _owners,
    _take,
    _trainable,
)
from probes.autodiff.ntk.layers import _KINDS, _first, _Kind, _kind_of, _LinearKind, _own_params, _used_params
from probes.autodiff.ntk.structural import _candidate, _confirm, _describe


@dataclass
class NTKPlan:
    """How ``empirical_ntk`` splits a model: layers on the layerwise path, parameters for ``torch.func``.

    Attributes:
        fast: module path -> number of calls per forward, for the layers on the layerwise path.
        fallback: names of the trainable parameters handled by per-sample Jacobians (``torch.func``).
        reasons: module path (``"<root>"`` for the model itself) -> why its parameters were left to the fallback.
        outputs: ``C``, output values per sample.
        kinds: module path -> layer kind (``"Linear"``, ``"Conv2d"``, ``"LayerNorm"``, ...; a module recognised
            by its structure also names the formula it was confirmed to compute).
        tied: groups of layers (paths) that share parameters; their per-sample gradients are summed.
        shared: layers called on an input shared by all samples (leading axis 1; position tables).
        direct: names of parameters used directly in a ``forward`` (leading axis 1, broadcast over samples),
            per-sample gradients from one copy per sample.
        modules: module path -> the module itself (not in the ``repr``).
        layer_kinds: module path -> its layer formula (not in the ``repr``).
    """

    fast: dict[str, int] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    outputs: int = 0
    kinds: dict[str, str] = field(default_factory=dict)
    tied: list[list[str]] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    layer_kinds: dict[str, _Kind] = field(default_factory=dict, repr=False)


def _per_sample_copies(params: dict[str, torch.Tensor], names: list[str], b: int) -> dict[str, torch.Tensor]:
    """One copy per sample (leading axis ``b`` instead of 1) of the directly used parameters ``names``."""
    return {n: params[n].detach().expand((b,) + tuple(params[n].shape[1:])).clone().requires_grad_(True) for n in names}


def _build_plan(model: nn.Module, x: Any, *, fast_path: bool = True, who: str = "empirical_ntk") -> NTKPlan:
    """Decide the layerwise layers and the fallback parameters (forwards on one and two samples), before the
    self-check against autograd: ``probes.autodiff.ntk.planning.ntk_plan`` runs both, and documents the arguments,
    the result and the errors (this takes the same ``model``, ``x``, ``fast_path`` and ``who``).
    """
    args, P = _as_args(x, who)
    _check_modules(model, who)
    params = _trainable(model, who)
    name_of = {id(p): n for n, p in params.items()}
    plan = NTKPlan()
    candidates: dict[str, tuple[nn.Module, _Kind | str]] = {}
    direct: list[str] = []
    owners = _owners(model)
    paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
    for path, m in model.named_modules():
        direct_params = {n: p for n, p in m._parameters.items() if p is not None and p.requires_grad}
        kind: _Kind | str | None = _kind_of(m)
        label = path or "<root>"
        if kind is None and fast_path:
            kind = _candidate(m)
        if kind is None:
            base = next((b for k in _KINDS for b in k.bases if isinstance(m, b)), None)
            left = {
                n: p
                for n, p in direct_params.items()
                if not (fast_path and p.ndim >= 2 and p.shape[0] == 1 and len(owners[id(p)]) == 1)
            }
            direct += [name_of[id(p)] for n, p in direct_params.items() if n not in left]
            if base is not None and left:
                plan.reasons[label] = f"{type(m).__name__} overrides {base.__name__}.forward"
            elif base is not None and not direct_params and any(p.requires_grad for p in m.parameters()):
                plan.reasons[label] = "its weight or bias is computed (a parametrization), not a plain parameter"
            elif left:
                plan.reasons[label] = (
                    f"no layerwise formula for {type(m).__name__} (parameters used in its own "
                    "forward are taken only with a leading axis of 1, broadcast over samples)"
                )
            continue
        params_m = [p for n, p in m.named_parameters() if p.requires_grad]
        if not params_m:
            continue
        if len(direct_params) != len(params_m):
            plan.reasons[label] = "its weight or bias is computed (a parametrization), not a plain parameter"
        elif not fast_path:
            plan.reasons[label] = "fast_path=False"
        elif isinstance(kind, _Kind) and (why := kind.unsupported(m)) is not None:
            plan.reasons[label] = why
        else:
            candidates[path] = (m, kind)
    _drop_partial_ties(model, candidates, owners, paths, plan)

    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {p: [] for p in candidates}
    originals: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {p: [] for p in candidates}
    layouts: dict[str, list[str | None]] = {p: [] for p in candidates}
    shared: set[str] = set()
    recording = {"on": False, "b": 0}

    def make_hook(path: str, kind: _Kind | str):
        layout = (_LinearKind() if kind == "affine" else _Kind()) if isinstance(kind, str) else kind

        def hook(module, hargs, hkwargs, output):
            xin = _first(hargs, hkwargs)
            why = layout.layout(module, xin)
            b = recording["b"]
            one = (
                why is None
                and b > 1
                and int(xin.shape[0]) == 1
                and isinstance(output, torch.Tensor)
                and output.ndim >= 1
                and output.shape[0] == 1
            )
            if why is None and not one and int(xin.shape[0]) != b:
                why = "a call does not see the samples along the input's first axis"
            if (
                why is None
                and not one
                and not (isinstance(output, torch.Tensor) and output.ndim >= 1 and output.shape[0] == b)
            ):
                why = "a call does not return the samples along the output's first axis"
            layouts[path].append(why)
            if recording["on"] and isinstance(output, torch.Tensor):
                originals[path].append((_detached(hargs), _detached(hkwargs), output.detach()))
                if one:  # one input for all samples: one copy of the output per sample (its gradient per sample)
                    shared.add(path)
                    output = output.expand((b,) + tuple(output.shape[1:]))
                calls[path].append((_detached(hargs), _detached(hkwargs), output))
                return output.clone()  # later in-place ops must not alter the recorded output
            return None

        return hook

    handles = [m.register_forward_hook(make_hook(p, k), with_kwargs=True) for p, (m, k) in candidates.items()]
    b2 = min(P, 2)
    try:
        with torch.enable_grad():  # as in the measured passes (some modules take fused paths without grad)
            recording["b"] = 1
            out1 = _flat_output(model(*_take(args, 0, 1)), 1, who).detach()
        counts1 = {p: len(v) for p, v in layouts.items()}
        if b2 == 2:
            _second_pass(
                model,
                args,
                params,
                name_of,
                candidates,
                direct,
                calls,
                originals,
                layouts,
                counts1,
                shared,
                recording,
                out1,
                plan,
                who,
            )
        else:
            for path, (_m, kind) in candidates.items():
                reason = next((why for why in layouts[path] if why), None)
                if reason is None and isinstance(kind, str):
                    reason = "a module recognised by its structure is confirmed on two samples or more"
                if reason:
                    plan.reasons[path or "<root>"] = reason
            for name in direct:
                plan.reasons[name.rpartition(".")[0] or "<root>"] = (
                    f"{name} is used in its forward; such a parameter is taken layerwise after a check on two samples "
                    "or more"
                )
            direct.clear()
    finally:
        for h in handles:
            h.remove()
        calls.clear()
        originals.clear()
    plan.outputs = int(out1.shape[1])
    _drop_partial_ties(
        model, {p: c for p, c in candidates.items() if (p or "<root>") not in plan.reasons}, owners, paths, plan
    )
    for path, (m, kind) in candidates.items():
        if (path or "<root>") not in plan.reasons and counts1[path] > 0:
            plan.fast[path] = counts1[path]
            plan.layer_kinds[path] = kind
            plan.kinds[path] = _describe(kind, m)
            plan.modules[path] = m
    plan.shared = [p for p in plan.fast if p in shared]
    plan.direct = [n for n in direct if n in params]
    plan.tied = _tie_groups(plan)
    _refresh_fallback(plan, params)
    return plan


def _refresh_fallback(plan: NTKPlan, params: dict[str, torch.Tensor]) -> None:
    fast_ids = {id(p) for m in plan.modules.values() for p in _own_params(m).values()}
    fast_ids |= {id(params[n]) for n in plan.direct}
    plan.fallback = [n for n, p in params.items() if id(p) not in fast_ids]


def _drop_partial_ties(
    model: nn.Module,
    candidates: dict[str, tuple[nn.Module, Any]],
    owners: dict[int, set[int]],
    paths: dict[int, str],
    plan: NTKPlan,
) -> None:
    """Send to the fallback the candidates sharing a parameter with a module that is not a candidate (repeated
    until none is left): tied weights are layerwise only when every module that uses them is."""
    while True:
        ids = {id(m) for m, _ in candidates.values()}
        drop = [
            path
            for path, (m, _) in candidates.items()
            if any(not owners[id(p)] <= ids for p in _own_params(m).values())
        ]
        if not drop:
            return
        for path in drop:
            candidates.pop(path)
            m_ids = set().union(*(owners[id(p)] for p in _own_params(model.get_submodule(path)).values()))
            others = sorted(paths.get(i, "?") or "<root>" for i in m_ids if paths.get(i) != path)
            plan.reasons.setdefault(
                path or "<root>",
                "its parameters are registered in another module too (tied "
                f"weights: {', '.join(others)}) that is not on the layerwise path",
            )


def _tie_groups(plan: NTKPlan) -> list[list[str]]:
    """Groups (two layers or more) of layerwise layers connected by shared parameters."""
    by_param: dict[int, list[str]] = {}
    for path, m in plan.modules.items():
        for p in _own_params(m).values():
            by_param.setdefault(id(p), []).append(path)
    parent = {p: p for p in plan.modules}

    def root(p: str) -> str:
        while parent[p] != p:
            p = parent[p]
        return p

    for group in by_param.values():
        for other in group[1:]:
            parent[root(other)] = root(group[0])
    groups: dict[str, list[str]] = {}
    for p in plan.modules:
        groups.setdefault(root(p), []).append(p)
    return [g for g in groups.values() if len(g) > 1]


def _second_pass(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    params: dict[str, torch.Tensor],
    name_of: dict[int, str],
    candidates: dict[str, tuple[nn.Module, Any]],
    direct: list[str],
    calls: dict[str, list],
    originals: dict[str, list],
    layouts: dict[str, list[str | None]],
    counts1: dict[str, int],
    shared: set[str],
    recording: dict,
    out1: torch.Tensor,
    plan: NTKPlan,
    who: str,
) -> None:
    """The recorded forward and backward of two samples: each candidate's reason to fall back, if any, into
    ``plan.reasons``; the confirmed kinds of structural candidates into ``candidates``; ``direct`` pruned."""
    clones = {
        name_of[id(p)]: p.detach().clone().requires_grad_(True)
        for m, _ in candidates.values()
        for p in _own_params(m).values()
    }
    slots: dict[str, tuple[str, str]] = {}  # parameter name -> (a candidate holding it, its attribute there)
    for path, (m, _) in candidates.items():
        for attr, p in _own_params(m).items():
            slots.setdefault(name_of[id(p)], (path, attr))
    # FSDP2 replaces a unit's parameters with gathered tensors in its forward, over any substitution: there the
    # gradients are taken with respect to the tensors each candidate's forward uses (recorded before it runs)
    sharded = bool(units(model))
    recording["b"] = 2
    for name in _failing_copies(model, args, params, direct):
        direct.remove(name)
        plan.reasons[name.rpartition(".")[0] or "<root>"] = (
            f"{name} is used in its forward, and one copy of it per sample (leading axis 2) makes the forward fail "
            "(its leading axis is not the samples')"
        )
    copies = _per_sample_copies(params, direct, 2)
    recording.update(on=True, b=2)
    crossed: set[int] = set()
    try:
        with torch.enable_grad():
            with _used_params({p: m for p, (m, _) in candidates.items()}) if sharded else nullcontext({}) as live:
                out2 = _flat_output(
                    functional_call(model, copies if sharded else {**clones, **copies}, _take(args, 0, 2)), 2, who
                )
            if sharded:
                clones = {n: live.get(slots[n][0], {}).get(slots[n][1], c) for n, c in clones.items()}
            w = torch.linspace(1.0, 2.0, 7).to(out2.device, out2.dtype)
            w = w.repeat(out2.shape[1] // 7 + 1)[: out2.shape[1]]
            recorded = [o for p in candidates for _, _, o in calls[p]]
            split = [o for p in shared for _, _, o in calls[p] if o.stride(0) == 0] + list(copies.values())
            targets = list(clones.values()) + recorded + list(copies.values())
            if targets and out2.requires_grad:
                grads = list(
                    torch.autograd.grad((out2 * w).sum(), targets, allow_unused=True, retain_graph=bool(split))
                )
                for i in range(2) if split else ():  # sample i's output must not depend on the other's copy
                    gi = torch.autograd.grad((out2[i] * w).sum(), split, retain_graph=i == 0, allow_unused=True)
                    for t, g in zip(split, gi):
                        if g is not None and float(g[1 - i].abs().max()) > 1e3 * torch.finfo(g.dtype).eps * float(
                            g[i].abs().max()
                        ):
                            crossed.add(id(t))
            else:  # the output depends on none of these parameters
                grads = [None] * len(targets)
    finally:
        recording["on"] = False
    if shared or copies:  # the same forward without copies: they must not change the outputs
        with torch.enable_grad():
            plain = _flat_output(model(*_take(args, 0, 2)), 2, who).detach()
        _check_mixing(out1, plain, who)
        a, b = out2.detach(), plain
        changed = bool((a - b).abs().max() > 1e3 * torch.finfo(a.dtype).eps * b.abs().max())
    else:
        _check_mixing(out1, out2, who)
        changed = False
    for name in list(direct):
        if changed or id(copies[name]) in crossed:
            direct.remove(name)
            label = name.rpartition(".")[0] or "<root>"
            plan.reasons[label] = (
                f"{name} is used in its forward, and one copy of it per sample "
                + ("changes the outputs" if changed else "mixes the samples")
                + " (it is not broadcast along the samples)"
            )
    pgrad = dict(zip(clones, grads[: len(clones)]))
    ograd = iter(grads[len(clones) : len(clones) + len(recorded)])
    survivors: dict[str, tuple[nn.Module, Any]] = {}
    owned: dict[str, list[tuple[tuple, dict, torch.Tensor | None]]] = {}
    for path, (m, kind) in list(candidates.items()):
        gs = [next(ograd) for _ in calls[path]]
        reason = next((why for why in layouts[path] if why), None)
        if reason is None and len(calls[path]) != counts1[path]:
            reason = (
                f"called {counts1[path]} time(s) in a forward of one sample but {len(calls[path])} for "
                "two (data-dependent)"
            )
        if reason is None and path in shared and (changed or any(id(o) in crossed for _, _, o in calls[path])):
            reason = "called on one input for all samples, and one copy of its output per sample " + (
                "changes the outputs" if changed else "mixes the samples"
            )
        if reason is None and isinstance(kind, str):
            with gathered(model, [m]):  # FSDP2: the layer's whole parameters, its unit alone
                confirmed = _confirm(m, kind, originals[path])
            if isinstance(confirmed, str):
                reason = confirmed
            else:
                candidates[path] = (m, confirmed)
        if reason:
            plan.reasons[path or "<root>"] = reason
        else:
            survivors[path] = candidates[path]
            owned[path] = [(a, kw, g) for (a, kw, _), g in zip(originals[path], gs)]
    slot_names = {slot: n for n, slot in slots.items()}
    for path, (m, _) in survivors.items():  # every attribute holding a parameter, tied ones included
        for attr, p in _own_params(m).items():
            slot_names.setdefault((path, attr), name_of[id(p)])
    _check_own_gradients(model, survivors, owned, pgrad, slot_names, plan)


def _failing_copies(
    model: nn.Module, args: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor], names: list[str]
) -> list[str]:
    """The directly used parameters whose copies per sample make a forward of two samples raise."""

    def fails(subset: list[str]) -> bool:
        try:
            with torch.no_grad():
                functional_call(model, _per_sample_copies(params, subset, 2), _take(args, 0, 2))
        except Exception:  # noqa: BLE001 - any error: the copies do not broadcast like the parameter
            return True
        return False

    if not names or not fails(names):
        return []
    return [n for n in names if fails([n])]


def _check_own_gradients(
    model: nn.Module,
    survivors: dict[str, tuple[nn.Module, Any]],
    owned: dict[str, list[tuple[tuple, dict, torch.Tensor | None]]],
    pgrad: dict[str, torch.Tensor | None],
    slot_names: dict[tuple[str, str], str],
    plan: NTKPlan,
) -> None:
    """The layers' own calls (each module re-run on its recorded inputs with fresh leaves for its parameters,
    ``sum_calls <output, recorded output gradient>``) must account for autograd's whole gradient of every
    parameter, summed over the layers that share it; a parameter that gets gradient elsewhere sends its layers
    to the fallback."""
    total: dict[str, torch.Tensor] = {}
    users: dict[str, list[str]] = {}
    for path, (m, _) in survivors.items():
        with gathered(model, [m]):  # FSDP2: the layer's whole parameters (its unit alone)
            own = _own_params(m)
            names = [slot_names[(path, attr)] for attr in own]
            for n in names:
                users.setdefault(n, []).append(path)
            leaves = {k: p.detach().clone().requires_grad_(True) for k, p in own.items()}
            s = None
            with torch.enable_grad():
                for a, kw, g in owned[path]:
                    if g is None:
                        continue
                    out = _own_call(m, leaves, a, kw)
                    term = (out * g).sum()
                    s = term if s is None else s + term
            mine = (
                torch.autograd.grad(s, list(leaves.values()), allow_unused=True)
                if s is not None
                else [None] * len(leaves)
            )
        for n, leaf, dp in zip(names, leaves.values(), mine):
            dp = torch.zeros_like(leaf) if dp is None else (dp.to_dense() if dp.is_sparse else dp)
            total[n] = dp if n not in total else total[n] + dp
    for n, dp in total.items():
        ref = pgrad.get(n)
        ref = torch.zeros_like(dp) if ref is None else (ref.to_dense() if ref.is_sparse else ref)
        tol = torch.finfo(dp.dtype).eps ** 0.5 * (float(ref.abs().max()) + float(dp.abs().max())) + 1e-30
        if float((ref - dp).abs().max()) > tol:
            for path in users[n]:
                plan.reasons.setdefault(
                    path or "<root>",
                    "its parameters receive gradient from outside its own calls (used functionally elsewhere?)",
                )


def _own_call(m: nn.Module, leaves: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """``m(*args, **kwargs)`` with its own parameters replaced by ``leaves``. An FSDP2 unit's hooks would put its
    gathered parameters back over any substitution, so a unit's ``forward`` runs without its hooks (gathered by
    the caller); any other module through ``functional_call``, its hooks included."""
    if m not in units(m):
        return functional_call(m, leaves, args, kwargs)
    saved = {k: m._parameters[k] for k in leaves}
    try:
        m._parameters.update(leaves)
        return m.forward(*args, **kwargs)
    finally:
        m._parameters.update(saved)
