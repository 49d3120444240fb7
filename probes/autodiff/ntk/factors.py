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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.func import functional_call

from probes.autodiff.ntk import progress
from probes.autodiff.ntk.inputs import _detached, _flat_output, _take
from probes.autodiff.ntk.layers import _first, _kind_of, _own_params
from probes.autodiff.ntk.plan import NTKPlan, _per_sample_copies
from probes.autodiff.ntk.tied import _tied_term
from probes.functional.ntk.settings import DEFAULT, NTKSettings
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


@dataclass
class _Recorder:
    """What the hooks of one ``_layer_terms`` call record: each planned layer's calls ``(args, kwargs, output)`` in
    the current chunk of ``b`` samples (``b = 0``: not recording), and the outputs that a forward changed in place.

    A recorded output flows on as it is (no copy) unless the forward changed it in place after its layer
    (``out += shortcut``, an in-place ReLU, a later hook): then the gradient at it would be the one after the
    change, so the chunk is run again with a copy for those layers (``copied``; from then on, every chunk).
    """

    plan: NTKPlan
    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]]
    b: int = 0
    copied: set[str] = field(default_factory=set)
    versions: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)

    def hook(self, path: str) -> Callable[..., torch.Tensor | None]:
        shared = path in self.plan.shared

        def record(module, hargs, hkwargs, output):
            if not self.b:  # a layer re-run while its terms are computed
                return None
            if shared and self.b > 1 and output.shape[0] == 1:  # one copy per sample of a shared output
                output = output.expand((self.b,) + tuple(output.shape[1:]))
                self.calls[path].append((hargs, hkwargs, output))
                return output.clone()
            self.calls[path].append((hargs, hkwargs, output))
            if path in self.copied:
                return output.clone()
            self.versions.append((path, output, output._version))  # autograd's own count of in-place changes
            return None

        return record

    def clear(self) -> None:
        for v in self.calls.values():
            v.clear()
        self.versions.clear()


def _forward(
    model: nn.Module, rec: _Recorder, xs: tuple, params: dict[str, torch.Tensor], who: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One recorded forward of a chunk (again, with copies, while some recorded output is changed in place):
    the flat output ``(b, C)`` and the per-sample copies of the directly used parameters."""
    while True:
        rec.clear()
        copies = _per_sample_copies(params, rec.plan.direct, rec.b)
        out = _flat_output(functional_call(model, copies, xs) if copies else model(*xs), rec.b, who)
        changed = {path for path, o, v in rec.versions if o._version != v}
        rec.versions.clear()
        if not changed:
            return out, copies
        rec.copied.update(changed)


def _recorded_outputs(rec: _Recorder, m: int, who: str) -> list[torch.Tensor]:
    """The outputs of every planned call of the chunk, in plan order, checked against the plan's call counts."""
    plan, recorded = rec.plan, []
    for path, k in plan.fast.items():
        if len(rec.calls[path]) != k:
            raise RuntimeError(
                f"{who}: {plan.kinds[path]} {path!r} was called {len(rec.calls[path])} times "
                f"in a forward of {m} samples and {k} times for one sample"
            )
        for _, _, o in rec.calls[path]:
            if int(o.shape[0]) != m:
                raise RuntimeError(
                    f"{who}: {plan.kinds[path]} {path!r} returned an output of shape "
                    f"{tuple(o.shape)} in a forward of {m} samples (sample axis not first)"
                )
            recorded.append(o)
    return recorded


@dataclass
class _Buffers:
    """The terms of all ``P`` samples being filled chunk by chunk, and each layer's route (fixed at its first
    chunk)."""

    P: int
    C: int
    mode: str
    target: str
    dtype: torch.dtype
    settings: NTKSettings
    full: dict[str, _Term] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)

    def add(self, path: str, t: _Term, rows: tuple[int, int], tied: bool) -> None:
        """Writes one layer's chunk term ``t`` (all ``C`` outputs) at ``rows``, reduced to the layer's route."""
        start, stop = rows
        if path not in self.routes:
            Ce = self.C if self.mode == "full" else 1
            itemsize = torch.finfo(self.dtype).bits // 8
            self.routes[path] = "outer" if tied else _route(t, self.P, itemsize, self.target, Ce, self.settings)
        if self.routes[path] == "outer":  # per-sample gradients written in place, all outputs: (P, C, F)
            if path not in self.full:
                ref = t.D if isinstance(t, _Grad) else t.G
                self.full[path] = _Grad(ref.new_empty(self.P, self.C, _outer_features(t), dtype=self.dtype))
            _outer_into(t, cast(_Grad, self.full[path]).D[start:stop])  # an outer route's term is a _Grad
            return
        t = _traced(_materialized(t), self.mode)
        if self.target == "dense":
            t = _as_dtype(t, self.dtype)
        if path not in self.full:  # all P samples preallocated (no second copy from concatenating chunks)
            self.full[path] = _alloc(t, self.P)
        _copy_rows(self.full[path], t, start)

    def add_direct(self, name: str, gb: torch.Tensor | None, numel: int, rows: tuple[int, int], device) -> None:
        """A directly used parameter's chunk: the gradients of its per-sample copies."""
        if name not in self.full:
            self.full[name] = _Grad(torch.zeros(self.P, self.C, numel, dtype=self.dtype, device=device))
            self.routes[name] = "outer"
        if gb is not None:
            cast(_Grad, self.full[name]).D[rows[0] : rows[1]] = gb.transpose(0, 1).reshape(
                rows[1] - rows[0], self.C, -1
            )


def _reduce_chunk(
    rec: _Recorder, kinds: dict, grads: list, buffers: _Buffers, rows: tuple[int, int], tied: set[str]
) -> int:
    """Each planned layer's term of one chunk from its calls and output gradients, written into ``buffers``;
    returns the bytes of the chunk's terms (which size the next chunk)."""
    plan, m, C = rec.plan, rows[1] - rows[0], buffers.C
    i, chunk_bytes = 0, 0
    for path, k in plan.fast.items():
        mod, kind = plan.modules[path], kinds[path]
        terms = []
        for j, (a, kw, o) in enumerate(rec.calls[path]):
            gb = grads[i + j]
            g = (o.new_zeros((C,) + tuple(o.shape)) if gb is None else gb).transpose(0, 1)  # (m, C, *out)
            terms.append(kind.term_call(mod, *_per_sample_call(a, kw, m), g, buffers.settings))
            grads[i + j] = None
        i += k
        t = _merge(terms)
        del terms
        chunk_bytes += _term_bytes(t)
        buffers.add(path, t, rows, path in tied)
        del t
    return chunk_bytes


def _next_chunk(chunk_bytes: int, m: int, device: torch.device, settings: NTKSettings) -> int:
    """After the first chunk: as many samples as ``factor_chunk_bytes`` of factors allow (``fast_chunk`` at most)."""
    per_sample = max(1, chunk_bytes // m)
    budget = settings.cpu_factor_chunk_bytes if device.type == "cpu" else settings.factor_chunk_bytes
    return max(1, min(settings.fast_chunk, budget // per_sample))


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
    settings: NTKSettings = DEFAULT,
) -> dict[str, _Term]:
    """One term per layerwise layer over all ``P`` samples, each reduced to its route (``_route``).

    Terms whose route is "outer" are per-sample gradients ``D`` in ``dtype``; "pairs" factors are in ``dtype``
    for ``target="dense"`` and in the precision they were computed in for ``target="operator"`` (converted
    block by block later; exact, and half the memory for a float32 model). A tie group gives one term (its
    layers' per-sample gradients summed per parameter), a directly used parameter one (its copies' gradients).
    ``project`` (``C`` weights): the kernel of the one output ``f . project`` instead (the self-check's).
    """
    C = plan.outputs if project is None else 1
    rec = _Recorder(plan, {p: [] for p in plan.fast})
    kinds = {p: plan.layer_kinds.get(p) or _kind_of(m) for p, m in plan.modules.items()}
    tied = {p for group in plan.tied for p in group}
    params: dict[str, torch.Tensor] = dict(model.named_parameters()) if plan.direct else {}
    buffers = _Buffers(P, C, mode, target, dtype, settings)
    handles = [m.register_forward_hook(rec.hook(p), with_kwargs=True) for p, m in plan.modules.items()]
    try:
        start, size = 0, min(P, int(chunk) if chunk is not None else 8)
        while start < P:
            stop = min(P, start + size)
            rec.b = m = stop - start
            with torch.enable_grad():
                out, copies = _forward(model, rec, _take(args, start, stop), params, who)
                if out.shape[1] != plan.outputs:
                    raise ValueError(
                        f"{who}: the model gives {out.shape[1]} outputs per sample for a batch of {m} "
                        f"but {plan.outputs} for one sample"
                    )
                if project is not None:
                    out = out @ project.to(out.device, out.dtype)[:, None]
                recorded = _recorded_outputs(rec, m, who) + list(copies.values())
                grads = _output_grads(out, recorded, C, settings)
            rec.b = 0
            for v in rec.calls.values():  # nothing refers to the graph any more: it is freed
                v[:] = [(_detached(a), _detached(kw), o.detach()) for a, kw, o in v]
            del out, recorded, copies
            chunk_bytes = _reduce_chunk(rec, kinds, grads, buffers, (start, stop), tied)
            for name, gb in zip(plan.direct, grads[sum(plan.fast.values()) :]):
                buffers.add_direct(name, gb, params[name].numel(), (start, stop), args[0].device)
            del grads
            rec.clear()
            start = stop
            progress.report("per-sample factors, samples", start, P)
            if chunk is None:
                size = _next_chunk(chunk_bytes, m, args[0].device, settings)
    finally:
        for h in handles:
            h.remove()
        rec.calls.clear()
    return _final_terms(plan, kinds, buffers, tied, mode)


def _final_terms(plan: NTKPlan, kinds: dict, buffers: _Buffers, tied: set[str], mode: str) -> dict[str, _Term]:
    """The terms of all samples by key, per-sample gradients traced, each tie group's gradients summed."""
    full, routes = buffers.full, buffers.routes
    terms = {
        path: _traced(full[path], mode) if routes[path] == "outer" else full[path]
        for path in list(plan.fast) + list(plan.direct)
        if path not in tied
    }
    for group in plan.tied:
        # tied layers take the outer route: their terms are _Grad
        t = _tied_term([(kinds[p], plan.modules[p], cast(_Grad, full.pop(p)).D) for p in group])
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


def _output_grads(
    out: torch.Tensor, recorded: list[torch.Tensor], C: int, settings: NTKSettings = DEFAULT
) -> list[torch.Tensor | None]:
    """``g_c = d(sum_i f_c(x_i)) / d(recorded)`` for every output ``c``, as one (C, B, *shape) tensor per recorded
    tensor (None: not reached).

    One backward pass vectorised over the ``C`` cotangents (the rows of the identity, ``is_grads_batched``);
    if the model's backward cannot be vectorised, ``C`` passes of ``sum_i f_c(x_i)`` (same values).
    """
    if not recorded or not out.requires_grad:  # no layerwise layer reaches the output
        return [None] * len(recorded)
    if settings.batched_grads:
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
