"""The fallback: per-sample Jacobians of the parameters the plan left out, each computed once.

For a parameter of any other module, a layer whose weight is tied to another module, used outside its own
``forward``, or computed by a parametrization: ``torch.func.vmap(jacrev(functional_call))`` over the samples
(then ``jacrev`` one sample at a time, then plain autograd one output at a time, for models the transforms
refuse). The parameters are split into groups whose Jacobians for all ``P`` samples fit
``settings.fallback_budget`` (a larger tensor into slices along its first axis); only when one row of one
parameter does not fit are its sample blocks recomputed per pair of blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from probes.autodiff.ntk.inputs import _flat_output, _take
from probes.functional.ntk.settings import DEFAULT, NTKSettings


def _fallback_groups(
    sizes: dict[str, int], rows: int, itemsize: int, settings: NTKSettings = DEFAULT
) -> list[list[str]]:
    """Consecutive parameters grouped so that a group's Jacobian for all samples, ``rows x n_grp``, fits
    ``settings.fallback_budget`` (a parameter larger than that alone forms its own group)."""
    cap = max(1, settings.fallback_budget // max(1, rows * itemsize))
    groups: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n, k in sizes.items():
        if cur and size + k > cap:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += k
    if cur:
        groups.append(cur)
    return groups


def _jacobian_fn(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: Sequence[str],
    C: int,
    mode: str,
    dtype: torch.dtype,
    who: str,
    rows: tuple[int, int] | None = None,
) -> Callable[[int, int], torch.Tensor]:
    """``jac(s, e)``: per-sample Jacobians of the parameters ``names`` for samples ``s:e``, as rows
    ``(e - s) x (C n)`` (trace) or ``(e - s) C x n`` (full), in ``dtype``. ``rows=(a, b)`` (one parameter):
    only with respect to its slice ``[a:b]`` along the first axis (the rest held constant)."""
    params = dict(model.named_parameters())
    sub = {n: params[n].detach() for n in names}
    Ce = C if mode == "full" else 1
    if rows is not None:
        (name,) = names
        whole, (a, b) = sub[name], rows
        sub = {name: whole[a:b]}

    def f(p: dict[str, torch.Tensor], *xi: torch.Tensor) -> torch.Tensor:
        if rows is not None:
            p = {name: torch.cat([whole[:a], p[name], whole[b:]])}
        return functional_call(model, p, tuple(t.unsqueeze(0) for t in xi)).reshape(-1)

    one = jacrev(f)
    jac_fn = vmap(one, in_dims=(None,) + (0,) * len(args))
    # 0: vmap over samples; 1: jacrev one sample at a time (vmap refused the model: data-dependent control flow,
    # e.g. attention-mask checks); 2: plain autograd, one sample and one output at a time (jacrev's own vmap over
    # the outputs refused a kernel without a batching rule, e.g. nn.LSTM)
    level = [0]

    def per_sample(s: int, e: int) -> dict[str, torch.Tensor]:
        parts = [one(sub, *(a[i] for a in args)) for i in range(s, e)]
        return {k: torch.stack([part[k] for part in parts]) for k in parts[0]}

    def by_autograd(s: int, e: int) -> dict[str, torch.Tensor]:
        live = [params[n] for n in names]
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with torch.enable_grad():
            for i in range(s, e):
                y = _flat_output(model(*(a[i : i + 1] for a in args)), 1, who)[0]
                for c in range(y.shape[0]):
                    grads = torch.autograd.grad(y[c], live, retain_graph=c < y.shape[0] - 1, allow_unused=True)
                    for n, p, g in zip(names, live, grads):
                        g = torch.zeros_like(p) if g is None else g
                        out[n].append(g[rows[0] : rows[1]] if rows is not None else g)
        return {n: torch.stack(v).reshape((e - s, C) + v[0].shape) for n, v in out.items()}

    def jac(s: int, e: int) -> torch.Tensor:
        # torch's "performance drop ... batching rule" warnings (attention under vmap) are about this computation
        # only: filtered here, not for the user's own code
        with torch.no_grad(), warnings.catch_warnings():  # the transforms still differentiate
            warnings.filterwarnings("ignore", message="There is a performance drop")
            j = None
            for lvl, fn in enumerate(
                (lambda: jac_fn(sub, *_take(args, s, e)), lambda: per_sample(s, e), lambda: by_autograd(s, e))
            ):
                if lvl < level[0]:
                    continue
                try:
                    j = fn()
                    break
                except Exception as exc:  # noqa: BLE001 - the next, slower route; the last one says why
                    level[0] = lvl + 1
                    if lvl == 2:
                        raise RuntimeError(
                            f"{who}: could not take per-sample Jacobians of {list(names)[:6]}"
                            f"{'...' if len(names) > 6 else ''} ({type(exc).__name__}: {exc}); the model must work "
                            "on one sample at a time (no .item() on values that need gradients)"
                        ) from exc
        if j is None:  # every route failed on an earlier call, which raised
            raise RuntimeError(f"{who}: could not take per-sample Jacobians of {list(names)[:6]} (no route left)")
        flat = torch.cat([v.reshape(e - s, C, -1) for v in j.values()], dim=2).to(dtype)
        return flat.reshape((e - s) * Ce, -1)

    return jac


def _fallback_chunk(
    model: nn.Module, names: Sequence[str], P: int, C: int, chunk: int | None, settings: NTKSettings = DEFAULT
) -> int:
    if chunk is not None:
        return max(1, min(P, int(chunk)))
    params = dict(model.named_parameters())
    n = sum(params[k].numel() for k in names)
    return max(1, min(P, settings.fallback_chunk_bytes // max(1, 3 * C * n * params[names[0]].element_size())))


def _fallback_blocks(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    P: int,
    names: Sequence[str],
    C: int,
    mode: str,
    chunk: int | None,
    dtype: torch.dtype,
    who: str,
    settings: NTKSettings = DEFAULT,
):
    """Yield ``(group, J, jac)``: for each parameter group, its Jacobian rows for all samples (computed once,
    sample chunk by sample chunk). A parameter whose Jacobian alone exceeds ``settings.fallback_budget`` is split
    into slices along its first axis that fit (each entry still computed once); only when one slice of one row does
    not fit, ``J = None`` comes with the chunk function ``jac`` (its blocks are then recomputed per pair)."""
    params = dict(model.named_parameters())
    Ce = C if mode == "full" else 1
    itemsize = torch.finfo(dtype).bits // 8
    sizes = {n: params[n].numel() * (C // Ce) for n in names}
    for group in _fallback_groups(sizes, P * Ce, itemsize, settings):
        step = _fallback_chunk(model, group, P, C, chunk, settings)
        bounds = [(s, min(P, s + step)) for s in range(0, P, step)]
        slices: list[tuple[int, int] | None] = [None]
        if P * Ce * sum(sizes[n] for n in group) * itemsize > settings.fallback_budget:
            p = params[group[0]]
            per_row = P * Ce * (sizes[group[0]] // max(1, p.shape[0] if p.ndim else 1)) * itemsize
            if p.ndim == 0 or per_row > settings.fallback_budget:
                yield group, None, (_jacobian_fn(model, args, group, C, mode, dtype, who), bounds)
                continue
            height = max(1, settings.fallback_budget // per_row)
            slices = [(a, min(p.shape[0], a + height)) for a in range(0, p.shape[0], height)]
        for rows in slices:
            jac = _jacobian_fn(model, args, group, C, mode, dtype, who, rows)
            J = torch.cat([jac(s, e) for s, e in bounds]) if len(bounds) > 1 else jac(*bounds[0])
            yield group, J, None
