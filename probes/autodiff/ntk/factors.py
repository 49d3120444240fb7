"""The layerwise factors of every planned layer for all ``P`` samples, chunk by chunk.

Each chunk is one forward with hooks on the planned layers (their inputs and outputs recorded) and one
backward pass vectorised over the ``C`` output cotangents (``is_grads_batched``; one pass per output where the
model's backward cannot be vectorised) giving ``g = df_c / d(output)`` of every call. A recorded output is not
copied unless the forward changes it in place after its layer (its ``_version`` moves); that chunk then runs again
with a copy of it. Each layer's term is then reduced to its route (``_route``) and written into buffers for all
``P`` samples.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from probes.autodiff.ntk import progress, settings
from probes.autodiff.ntk.inputs import _detached, _flat_output, _take
from probes.autodiff.ntk.layers import _first, _kind_of, _own_params
from probes.autodiff.ntk.plan import NTKPlan, _per_sample_copies
from probes.functional.ntk.terms import (
    _alloc,
    _as_dtype,
    _copy_rows,
    _Grad,
    _materialized,
    _merge,
    _outer_features,
    _outer_into,
    _route,
    _Term,
    _term_bytes,
    _traced,
)
from probes.autodiff.ntk.tied import _tied_term


def _term_params(model: nn.Module, plan: NTKPlan) -> dict[str, list[torch.Tensor]]:
    """The parameters of each term ``_layer_terms`` returns, under the same keys: a layer's path, a tie group's
    paths joined by ``+``, a directly used parameter's name."""
    params = dict(model.named_parameters())
    tied = {p for group in plan.tied for p in group}
    out = {path: list(_own_params(m).values()) for path, m in plan.modules.items() if path not in tied}
    for group in plan.tied:
        ps = {id(p): p for path in group for p in _own_params(plan.modules[path]).values()}
        out["+".join(group)] = list(ps.values())
    out.update({name: [params[name]] for name in plan.direct})
    return out


def _layer_terms(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    P: int,
    plan: NTKPlan,
    mode: str,
    chunk: int | None,
    dtype: torch.dtype,
    who: str,
    target: str = "dense",
    project: torch.Tensor | None = None,
) -> dict[str, _Term]:
    """One term per layerwise layer over all ``P`` samples, each reduced to its route (``_route``).

    Terms whose route is "outer" are per-sample gradients ``D`` in ``dtype``; "pairs" factors are in ``dtype``
    for ``target="dense"`` and in the precision they were computed in for ``target="operator"`` (converted
    block by block later; exact, and half the memory for a float32 model). A tie group gives one term (its
    layers' per-sample gradients summed per parameter), a directly used parameter one (its copies' gradients).
    ``project`` (``C`` weights): the kernel of the one output ``f . project`` instead (the self-check's).
    """
    C = plan.outputs if project is None else 1
    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {p: [] for p in plan.fast}
    kinds = {p: plan.layer_kinds.get(p) or _kind_of(m) for p, m in plan.modules.items()}
    tied = {p for group in plan.tied for p in group}
    params = dict(model.named_parameters()) if plan.direct else {}
    full: dict[str, _Term] = {}
    routes: dict[str, str] = {}
    batch = {"b": 0}
    # A recorded output flows on as it is (no copy) unless the forward changed it in place after its layer
    # (``out += shortcut``, an in-place ReLU, a later hook): then the gradient at it would be the one after the
    # change, so the chunk is run again with a copy for those layers (from then on, every chunk).
    copied: set[str] = set()
    versions: list[tuple[str, torch.Tensor, int]] = []

    def make_hook(path: str):
        shared = path in plan.shared

        def hook(module, hargs, hkwargs, output):
            if not batch["b"]:  # a layer re-run while its terms are computed
                return None
            if shared and batch["b"] > 1 and output.shape[0] == 1:  # one copy per sample of a shared output
                output = output.expand((batch["b"],) + tuple(output.shape[1:]))
                calls[path].append((hargs, hkwargs, output))
                return output.clone()
            calls[path].append((hargs, hkwargs, output))
            if path in copied:
                return output.clone()
            versions.append((path, output, output._version))  # autograd's own count of in-place changes
            return None

        return hook

    handles = [m.register_forward_hook(make_hook(p), with_kwargs=True) for p, m in plan.modules.items()]
    try:
        start, size = 0, min(P, int(chunk) if chunk is not None else 8)
        while start < P:
            stop = min(P, start + size)
            m = stop - start
            batch["b"] = m
            with torch.enable_grad():
                xs = _take(args, start, stop)
                while True:
                    for v in calls.values():
                        v.clear()
                    versions.clear()
                    copies = _per_sample_copies(params, plan.direct, m)
                    out = _flat_output(functional_call(model, copies, xs) if copies else model(*xs), m, who)
                    changed = {path for path, o, v in versions if o._version != v}
                    versions.clear()
                    if not changed:
                        break
                    copied.update(changed)
                if out.shape[1] != plan.outputs:
                    raise ValueError(
                        f"{who}: the model gives {out.shape[1]} outputs per sample for a batch of {m} "
                        f"but {plan.outputs} for one sample"
                    )
                if project is not None:
                    out = out @ project.to(out.device, out.dtype)[:, None]
                recorded = []
                for path, k in plan.fast.items():
                    if len(calls[path]) != k:
                        raise RuntimeError(
                            f"{who}: {plan.kinds[path]} {path!r} was called {len(calls[path])} times "
                            f"in a forward of {m} samples and {k} times for one sample"
                        )
                    for _, _, o in calls[path]:
                        if int(o.shape[0]) != m:
                            raise RuntimeError(
                                f"{who}: {plan.kinds[path]} {path!r} returned an output of shape "
                                f"{tuple(o.shape)} in a forward of {m} samples (sample axis not first)"
                            )
                        recorded.append(o)
                recorded += list(copies.values())
                grads = _output_grads(out, recorded, C)
            batch["b"] = 0
            for v in calls.values():  # nothing refers to the graph any more: it is freed
                v[:] = [(_detached(a), _detached(kw), o.detach()) for a, kw, o in v]
            del out, recorded, copies
            i, chunk_bytes = 0, 0
            Ce = C if mode == "full" else 1
            for path, k in plan.fast.items():
                mod, kind = plan.modules[path], kinds[path]
                terms = []
                for j, (a, kw, o) in enumerate(calls[path]):
                    gb = grads[i + j]
                    g = (o.new_zeros((C,) + tuple(o.shape)) if gb is None else gb).transpose(0, 1)  # (m, C, *out)
                    terms.append(kind.term_call(mod, *_per_sample_call(a, kw, m), g))
                    grads[i + j] = None
                i += k
                t = _merge(terms)
                del terms
                chunk_bytes += _term_bytes(t)
                if path not in routes:
                    routes[path] = "outer" if path in tied else _route(t, P, torch.finfo(dtype).bits // 8, target, Ce)
                if routes[path] == "outer":  # per-sample gradients written in place, all outputs: (P, C, F)
                    if path not in full:
                        full[path] = _Grad(g.new_empty(P, C, _outer_features(t), dtype=dtype))
                    _outer_into(t, full[path].D[start:stop])
                    del t
                    continue
                t = _traced(_materialized(t), mode)
                if target == "dense":
                    t = _as_dtype(t, dtype)
                if path not in full:  # all P samples preallocated (no second copy from concatenating chunks)
                    full[path] = _alloc(t, P)
                _copy_rows(full[path], t, start)
                del t
            for name, gb in zip(plan.direct, grads[i:]):  # a directly used parameter: its copies' gradients
                if name not in full:
                    full[name] = _Grad(torch.zeros(P, C, params[name].numel(), dtype=dtype, device=args[0].device))
                    routes[name] = "outer"
                if gb is not None:
                    full[name].D[start:stop] = gb.transpose(0, 1).reshape(m, C, -1)
            del grads
            for v in calls.values():
                v.clear()
            start = stop
            progress.report("per-sample factors, samples", start, P)
            if chunk is None:  # after the first chunk: as many samples as FACTOR_CHUNK_BYTES of factors allow
                per_sample = max(1, chunk_bytes // m)
                cpu = args[0].device.type == "cpu"
                budget = settings.CPU_FACTOR_CHUNK_BYTES if cpu else settings.FACTOR_CHUNK_BYTES
                size = max(1, min(settings.FAST_CHUNK, budget // per_sample))
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    terms = {
        path: _traced(full[path], mode) if routes[path] == "outer" else full[path]
        for path in list(plan.fast) + list(plan.direct)
        if path not in tied
    }
    for group in plan.tied:
        t = _tied_term([(kinds[p], plan.modules[p], full.pop(p).D) for p in group])
        terms["+".join(group)] = _traced(t, mode)
    return terms


def _per_sample_call(args: tuple, kwargs: dict, b: int) -> tuple[tuple, dict]:
    """A call's arguments with its input expanded to ``b`` samples when it was shared (leading axis 1)."""
    x = _first(args, kwargs)
    if b == 1 or not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] != 1:
        return args, kwargs
    xb = x.expand((b,) + tuple(x.shape[1:]))
    if args:
        return (xb,) + tuple(args[1:]), kwargs
    key = "input" if "input" in kwargs else next(k for k, v in kwargs.items() if v is x)
    return args, {**kwargs, key: xb}


def _output_grads(out: torch.Tensor, recorded: list[torch.Tensor], C: int) -> list[torch.Tensor | None]:
    """``g_c = d(sum_i f_c(x_i)) / d(recorded)`` for every output ``c``, as one (C, B, *shape) tensor per recorded
    tensor (None: not reached).

    One backward pass vectorised over the ``C`` cotangents (the rows of the identity, ``is_grads_batched``);
    if the model's backward cannot be vectorised, ``C`` passes of ``sum_i f_c(x_i)`` (same values).
    """
    if not recorded or not out.requires_grad:  # no layerwise layer reaches the output
        return [None] * len(recorded)
    if settings.BATCHED_GRADS:
        eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, out.shape[0], C)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return list(
                    torch.autograd.grad(out, recorded, eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
                )
        except Exception:  # noqa: BLE001 - an operation without a batching rule for its backward: one pass each
            pass
    per_c = [
        torch.autograd.grad(out[:, c].sum(), recorded, retain_graph=c < C - 1, allow_unused=True) for c in range(C)
    ]
    return [None if per_c[0][r] is None else torch.stack([p[r] for p in per_c]) for r in range(len(recorded))]
