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

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

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


def _candidate_layers(
    model: nn.Module, name_of: dict[int, str], owners: dict[int, set[int]], fast_path: bool, plan: NTKPlan
) -> tuple[dict[str, tuple[nn.Module, _Kind | str]], list[str]]:
    """The modules that may take the layerwise path (a kind, or a structure to confirm), and the parameters with a
    leading axis of 1 used directly in a module's own forward; every other module's reason into ``plan.reasons``."""
    candidates: dict[str, tuple[nn.Module, _Kind | str]] = {}
    direct: list[str] = []
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
    return candidates, direct


@dataclass
class _Discovery:
    """What the hooks of the discovery passes record per candidate layer: why a call does not fit (``layouts``),
    and while ``on``, its calls (outputs expanded per sample where one input serves all samples) and the calls
    as they were (``originals``); ``b`` is the pass's number of samples."""

    candidates: dict[str, tuple[nn.Module, _Kind | str]]
    direct: list[str]
    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = field(default_factory=dict)
    originals: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = field(default_factory=dict)
    layouts: dict[str, list[str | None]] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)
    on: bool = False
    b: int = 0

    def __post_init__(self) -> None:
        for table in (self.calls, self.originals, self.layouts):
            table.update({p: [] for p in self.candidates})

    def hook(self, path: str, kind: _Kind | str):
        layout = (_LinearKind() if kind == "affine" else _Kind()) if isinstance(kind, str) else kind

        def record(module, hargs, hkwargs, output):
            xin = _first(hargs, hkwargs)
            why = layout.layout(module, xin)
            b = self.b
            is_tensor = isinstance(output, torch.Tensor) and output.ndim >= 1
            one = why is None and b > 1 and int(xin.shape[0]) == 1 and is_tensor and output.shape[0] == 1
            if why is None and not one and int(xin.shape[0]) != b:
                why = "a call does not see the samples along the input's first axis"
            if why is None and not one and not (is_tensor and output.shape[0] == b):
                why = "a call does not return the samples along the output's first axis"
            self.layouts[path].append(why)
            if self.on and isinstance(output, torch.Tensor):
                self.originals[path].append((_detached(hargs), _detached(hkwargs), output.detach()))
                if one:  # one input for all samples: one copy of the output per sample (its gradient per sample)
                    self.shared.add(path)
                    output = output.expand((b,) + tuple(output.shape[1:]))
                self.calls[path].append((_detached(hargs), _detached(hkwargs), output))
                return output.clone()  # later in-place ops must not alter the recorded output
            return None

        return record


def _one_sample_reasons(d: _Discovery, plan: NTKPlan) -> None:
    """With one sample only: what cannot be decided without a second one goes to the fallback."""
    for path, (_m, kind) in d.candidates.items():
        reason = next((why for why in d.layouts[path] if why), None)
        if reason is None and isinstance(kind, str):
            reason = "a module recognised by its structure is confirmed on two samples or more"
        if reason:
            plan.reasons[path or "<root>"] = reason
    for name in d.direct:
        plan.reasons[name.rpartition(".")[0] or "<root>"] = (
            f"{name} is used in its forward; such a parameter is taken layerwise after a check on two samples or more"
        )
    d.direct.clear()


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
    owners = _owners(model)
    paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
    candidates, direct = _candidate_layers(model, name_of, owners, fast_path, plan)
    _drop_partial_ties(model, candidates, owners, paths, plan)
    d = _Discovery(candidates, direct)
    handles = [m.register_forward_hook(d.hook(p, k), with_kwargs=True) for p, (m, k) in candidates.items()]
    try:
        with torch.enable_grad():  # as in the measured passes (some modules take fused paths without grad)
            d.b = 1
            out1 = _flat_output(model(*_take(args, 0, 1)), 1, who).detach()
        counts1 = {p: len(v) for p, v in d.layouts.items()}
        if min(P, 2) == 2:
            _second_pass(model, args, params, name_of, d, counts1, out1, plan, who)
        else:
            _one_sample_reasons(d, plan)
    finally:
        for h in handles:
            h.remove()
        d.calls.clear()
        d.originals.clear()
    plan.outputs = int(out1.shape[1])
    _drop_partial_ties(
        model, {p: c for p, c in candidates.items() if (p or "<root>") not in plan.reasons}, owners, paths, plan
    )
    for path, (m, kind) in candidates.items():
        if (path or "<root>") not in plan.reasons and counts1[path] > 0:
            # a structural candidate left without a reason was confirmed: its kind replaced the structure
            assert not isinstance(kind, str)
            plan.fast[path] = counts1[path]
            plan.layer_kinds[path] = kind
            plan.kinds[path] = _describe(kind, m)
            plan.modules[path] = m
    plan.shared = [p for p in plan.fast if p in d.shared]
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
    for path in plan.modules:
        groups.setdefault(root(path), []).append(path)
    return [g for g in groups.values() if len(g) > 1]


def _two_sample_gradients(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    d: _Discovery,
    clones: dict[str, torch.Tensor],
    slots: dict[str, tuple[str, str]],
    copies: dict[str, torch.Tensor],
    who: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list, list[torch.Tensor], set[int]]:
    """The recorded forward of two samples and the gradient of a weighted sum of its outputs with respect to the
    candidates' parameters (clones), their recorded outputs and the per-sample copies; also which shared outputs
    and copies mix the samples (sample ``i``'s output depends on the other's copy). Returns ``(out2, clones,
    grads, recorded, crossed)``."""
    # FSDP2 replaces a unit's parameters with gathered tensors in its forward, over any substitution: there the
    # gradients are taken with respect to the tensors each candidate's forward uses (recorded before it runs)
    sharded = bool(units(model))
    crossed: set[int] = set()
    d.on, d.b = True, 2
    try:
        with torch.enable_grad():
            used: AbstractContextManager[dict[str, dict[str, torch.Tensor]]] = (
                _used_params({p: m for p, (m, _) in d.candidates.items()}) if sharded else nullcontext({})
            )
            with used as live:
                out2 = _flat_output(
                    functional_call(model, copies if sharded else {**clones, **copies}, _take(args, 0, 2)), 2, who
                )
            if sharded:
                clones = {n: live.get(slots[n][0], {}).get(slots[n][1], c) for n, c in clones.items()}
            w = torch.linspace(1.0, 2.0, 7).to(out2.device, out2.dtype)
            w = w.repeat(out2.shape[1] // 7 + 1)[: out2.shape[1]]
            recorded = [o for p in d.candidates for _, _, o in d.calls[p]]
            split = [o for p in d.shared for _, _, o in d.calls[p] if o.stride(0) == 0] + list(copies.values())
            targets = list(clones.values()) + recorded + list(copies.values())
            if not (targets and out2.requires_grad):  # the output depends on none of these parameters
                return out2, clones, [None] * len(targets), recorded, crossed
            grads = list(torch.autograd.grad((out2 * w).sum(), targets, allow_unused=True, retain_graph=bool(split)))
            for i in range(2) if split else ():  # sample i's output must not depend on the other's copy
                gi = torch.autograd.grad((out2[i] * w).sum(), split, retain_graph=i == 0, allow_unused=True)
                for t, g in zip(split, gi):
                    if g is not None and float(g[1 - i].abs().max()) > 1e3 * torch.finfo(g.dtype).eps * float(
                        g[i].abs().max()
                    ):
                        crossed.add(id(t))
    finally:
        d.on = False
    return out2, clones, grads, recorded, crossed


def _copies_change_outputs(
    model: nn.Module, args: tuple, d: _Discovery, copies: dict, out1: torch.Tensor, out2: torch.Tensor, who: str
) -> bool:
    """Whether the per-sample copies (of shared outputs, of direct parameters) change the outputs of two samples;
    checks on the way that the model does not mix samples."""
    if not (d.shared or copies):
        _check_mixing(out1, out2, who)
        return False
    with torch.enable_grad():  # the same forward without copies: they must not change the outputs
        plain = _flat_output(model(*_take(args, 0, 2)), 2, who).detach()
    _check_mixing(out1, plain, who)
    a, b = out2.detach(), plain
    return bool((a - b).abs().max() > 1e3 * torch.finfo(a.dtype).eps * b.abs().max())


def _candidate_reason(
    model: nn.Module, d: _Discovery, path: str, counts1: dict[str, int], changed: bool, crossed: set[int]
) -> str | None:
    """Why a candidate layer leaves the layerwise path after two samples (None: it stays; a structural candidate
    confirmed on its recorded calls gets its kind in ``d.candidates``)."""
    m, kind = d.candidates[path]
    calls = d.calls[path]
    reason = next((why for why in d.layouts[path] if why), None)
    if reason is None and len(calls) != counts1[path]:
        reason = f"called {counts1[path]} time(s) in a forward of one sample but {len(calls)} for two (data-dependent)"
    if reason is None and path in d.shared and (changed or any(id(o) in crossed for _, _, o in calls)):
        reason = "called on one input for all samples, and one copy of its output per sample " + (
            "changes the outputs" if changed else "mixes the samples"
        )
    if reason is None and isinstance(kind, str):
        with gathered(model, [m]):  # FSDP2: the layer's whole parameters, its unit alone
            confirmed = _confirm(m, kind, d.originals[path])
        if isinstance(confirmed, str):
            reason = confirmed
        else:
            d.candidates[path] = (m, confirmed)
    return reason


def _second_pass(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    params: dict[str, torch.Tensor],
    name_of: dict[int, str],
    d: _Discovery,
    counts1: dict[str, int],
    out1: torch.Tensor,
    plan: NTKPlan,
    who: str,
) -> None:
    """The recorded forward and backward of two samples: each candidate's reason to fall back, if any, into
    ``plan.reasons``; the confirmed kinds of structural candidates into ``d.candidates``; ``d.direct`` pruned."""
    clones = {
        name_of[id(p)]: p.detach().clone().requires_grad_(True)
        for m, _ in d.candidates.values()
        for p in _own_params(m).values()
    }
    slots: dict[str, tuple[str, str]] = {}  # parameter name -> (a candidate holding it, its attribute there)
    for path, (m, _) in d.candidates.items():
        for attr, p in _own_params(m).items():
            slots.setdefault(name_of[id(p)], (path, attr))
    d.b = 2
    for name in _failing_copies(model, args, params, d.direct):
        d.direct.remove(name)
        plan.reasons[name.rpartition(".")[0] or "<root>"] = (
            f"{name} is used in its forward, and one copy of it per sample (leading axis 2) makes the forward fail "
            "(its leading axis is not the samples')"
        )
    copies = _per_sample_copies(params, d.direct, 2)
    out2, clones, grads, recorded, crossed = _two_sample_gradients(model, args, d, clones, slots, copies, who)
    changed = _copies_change_outputs(model, args, d, copies, out1, out2, who)
    for name in list(d.direct):
        if changed or id(copies[name]) in crossed:
            d.direct.remove(name)
            plan.reasons[name.rpartition(".")[0] or "<root>"] = (
                f"{name} is used in its forward, and one copy of it per sample "
                + ("changes the outputs" if changed else "mixes the samples")
                + " (it is not broadcast along the samples)"
            )
    pgrad = dict(zip(clones, grads[: len(clones)]))
    ograd = iter(grads[len(clones) : len(clones) + len(recorded)])
    survivors: dict[str, tuple[nn.Module, Any]] = {}
    owned: dict[str, list[tuple[tuple, dict, torch.Tensor | None]]] = {}
    for path in list(d.candidates):
        gs = [next(ograd) for _ in d.calls[path]]
        reason = _candidate_reason(model, d, path, counts1, changed, crossed)
        if reason:
            plan.reasons[path or "<root>"] = reason
        else:
            survivors[path] = d.candidates[path]
            owned[path] = [(a, kw, g) for (a, kw, _), g in zip(d.originals[path], gs)]
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
        cast("dict[str, Any]", m._parameters).update(leaves)
        return m.forward(*args, **kwargs)
    finally:
        m._parameters.update(saved)
