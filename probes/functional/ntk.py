"""The empirical neural tangent kernel ``Theta(x, x') = J(x) J(x')^T`` of any model, exactly.

``J(x)`` is the Jacobian of the flattened output ``f(x)`` (``C`` values per sample) with respect to
every trainable parameter (``requires_grad=True``). Two kernels are offered:

- ``mode="trace"`` (default): the ``P x P`` kernel summed over outputs,
  ``Theta_ij = sum_c J_c(x_i) . J_c(x_j)`` (the sum of the PyTorch NTK tutorial;
  ``reduction="mean"`` divides by ``C``, which is neural-tangents' default ``trace_axes=(-1,)``);
- ``mode="full"``: the ``PC x PC`` kernel ``Theta_(i,a),(j,b) = J_a(x_i) . J_b(x_j)``, row ``i * C + a``
  (``.reshape(P, C, P, C)`` gives neural-tangents' ``(P, P, C, C)`` layout after a transpose).

Fast path (Linear layers). For an ``nn.Linear`` with inputs ``z`` and output gradients
``g = df_c / d(output)``, the per-sample weight gradient is ``sum_k g_k z_k^T`` and the bias gradient
``sum_k g_k`` (``k`` runs over the calls of the layer within one sample's forward and over positions
of a sequence axis). Hence

    Theta_ij += sum_{k,k'} (g_ik . g_jk') (z_ik . z_jk' + 1_bias),

which for a layer called once per sample is ``(G G^T) * (Z Z^T + 1)``. ``Z`` comes from a forward hook,
``G`` from one ``torch.autograd.grad`` per output ``c`` of ``sum_i f_c(x_i)`` with respect to the
layer's outputs (valid because samples do not interact, which is checked). No ``P x n_params``
Jacobian is formed. Pairs of calls are summed (nngeometry's ``Linear`` handler counts a layer called
twice wrongly); when a layer has many positions, the per-sample outer products ``sum_k g_k z_k^T``
are contracted instead, whichever costs fewer operations.

Fallback (everything else: convolutions, norm layers, embeddings, a Linear whose weight is tied or
used outside its own ``forward``, any custom module). Per-sample Jacobians of those parameters only,
``torch.func.vmap(jacrev(functional_call))``, in chunks of samples, contracted block by block.

A Linear is on the fast path when, in two small discovery passes (1 and 2 samples), every call sees
the sample axis first (``input.shape[0] ==`` batch size) and the gradients from the hooks reproduce
autograd's gradient of its weight and bias; ``ntk_plan`` shows the decision and the reasons.

Samples must not interact: a BatchNorm that normalises with batch statistics (training mode, or
``track_running_stats=False``) is rejected by name, active dropout too, and the output of sample 0 alone
must match its output within a batch of two. The ``ntk`` probe always runs the model in eval mode.
Nothing here changes the model: no ``.grad`` is written (``torch.autograd.grad`` only), no mode and no
parameter is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

MODES = ("trace", "full")
REDUCTIONS = ("sum", "mean")

#: bytes of fallback Jacobians (all samples) kept at once; above it, blocks are recomputed per pair
FALLBACK_BUDGET = 1 << 30
#: bytes of one chunk of per-sample Jacobians in the fallback (sets its default chunk size)
FALLBACK_CHUNK_BYTES = 1 << 27
#: bytes of the temporaries of one row strip of the layerwise products (sets the strip height)
STRIP_BYTES = 1 << 28
#: default samples per forward/backward of the fast path
FAST_CHUNK = 2048
#: how a Linear called k > 1 times is contracted: "auto" (fewer operations), "pairs" or "outer" (for tests)
PAIRS_METHOD = "auto"


class SampleMixingError(ValueError):
    """The model's output for one sample depends on other samples of the batch: no per-sample NTK."""


@dataclass
class NTKPlan:
    """How ``empirical_ntk`` splits a model: Linear modules on the fast path, parameters for ``torch.func``.

    ``fast``: module path -> number of calls per forward; ``fallback``: parameter names handled by
    per-sample Jacobians; ``reasons``: module path -> why a Linear was left off the fast path;
    ``outputs``: ``C``, the number of output values per sample.
    """

    fast: dict[str, int] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    outputs: int = 0
    modules: dict[str, nn.Linear] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _as_args(x: Any, who: str) -> tuple[tuple[torch.Tensor, ...], int]:
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(f"{who}: x must be a tensor (or a tuple of tensors, the model's positional inputs) "
                        f"with the samples along the first axis, got {type(x).__name__}")
    if any(a.ndim == 0 for a in args):
        raise ValueError(f"{who}: x must have the samples along its first axis, got a 0-d tensor")
    P = int(args[0].shape[0])
    if any(int(a.shape[0]) != P for a in args):
        raise ValueError(f"{who}: the inputs have different numbers of samples {[int(a.shape[0]) for a in args]}")
    if P == 0:
        raise ValueError(f"{who}: x has no samples")
    for a in args:
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise ValueError(f"{who}: x contains NaN or infinite values")
    return args, P


def _take(args: tuple[torch.Tensor, ...], start: int, stop: int) -> tuple[torch.Tensor, ...]:
    return tuple(a[start:stop] for a in args)


def _flat_output(out: Any, rows: int, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who}: the model returned a {type(out).__name__}; the NTK needs a tensor output "
                        "(wrap the model so that it returns one tensor with the samples first)")
    if out.ndim == 0 or int(out.shape[0]) != rows:
        raise ValueError(f"{who}: the model output has shape {tuple(out.shape)} for {rows} input sample(s); "
                         "it must have the samples along its first axis")
    if not out.is_floating_point():
        raise TypeError(f"{who}: the model output has dtype {out.dtype}; it must be floating point")
    return out.reshape(rows, -1)


def _check_modules(model: nn.Module, who: str) -> None:
    """Reject modules that make a sample's output depend on the rest of the batch or on randomness."""
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_mean is None:
                why = "is in training mode" if m.training else "has track_running_stats=False"
                raise SampleMixingError(
                    f"{who}: {type(m).__name__} {path or '<root>'!r} {why}, so it normalises with the statistics "
                    "of the batch and every output depends on every sample: the per-sample NTK is undefined. "
                    "Call model.eval() first (the ntk probe runs the model in eval mode by design)")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"{who}: {type(m).__name__} {path or '<root>'!r} is active (training mode), so the "
                             "model is random and has no fixed Jacobian; call model.eval() first")


def _trainable(model: nn.Module, who: str) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{who}: the model has no trainable parameters (requires_grad=True), so its NTK is zero")
    return params


def _owners(model: nn.Module) -> dict[int, set[int]]:
    """Parameter id -> ids of the modules that register it (more than one: tied weights)."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return owners


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _linear_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


# ------------------------------------------------------------------------------------------------
# plan: which Linear layers take the fast path
# ------------------------------------------------------------------------------------------------
def ntk_plan(model: nn.Module, x: Any, *, fast_path: bool = True, who: str = "empirical_ntk") -> NTKPlan:
    """Decide the fast-path Linears and the fallback parameters (two forwards on one and two samples).

    Also checks that samples do not interact (``SampleMixingError``).
    """
    args, P = _as_args(x, who)
    _check_modules(model, who)
    params = _trainable(model, who)
    name_of = {id(p): n for n, p in params.items()}
    plan = NTKPlan()
    candidates: dict[str, nn.Linear] = {}
    owners = _owners(model)
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        own = [p for p in (m.weight, m.bias) if p is not None and p.requires_grad]
        if not own:
            continue
        direct = all(any(p is q for q in m._parameters.values()) for p in own)
        if not fast_path:
            plan.reasons[path] = "fast_path=False"
        elif not direct:
            plan.reasons[path] = "its weight or bias is computed (a parametrization), not a plain parameter"
        elif not _is_plain_linear(m):
            plan.reasons[path] = f"{type(m).__name__} overrides Linear.forward"
        elif any(len(owners.get(id(p), ())) > 1 for p in own):
            plan.reasons[path] = "its parameters are registered in another module too (tied weights)"
        else:
            candidates[path] = m

    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in candidates}
    leading: dict[str, list[tuple[int, int]]] = {p: [] for p in candidates}  # (batch size, input.shape[0])
    recording = {"on": False, "b": 0}

    def make_hook(path: str):
        def hook(module, hargs, hkwargs, output):
            z = _linear_input(hargs, hkwargs)
            leading[path].append((recording["b"], int(z.shape[0]) if z.ndim else -1))
            if recording["on"]:
                calls[path].append((z.detach(), output))
                return output.clone()  # later in-place ops must not alter the recorded output
            return None
        return hook

    handles = [m.register_forward_hook(make_hook(p), with_kwargs=True) for p, m in candidates.items()]
    b2 = min(P, 2)
    weights = torch.linspace(1.0, 2.0, 7)
    try:
        with torch.no_grad():
            recording["b"] = 1
            out1 = _flat_output(model(*_take(args, 0, 1)), 1, who)
        counts1 = {p: len(v) for p, v in leading.items()}
        if b2 == 2:
            clones = {name_of[id(p)]: p.detach().clone().requires_grad_(True)
                      for m in candidates.values() for p in (m.weight, m.bias) if p is not None and p.requires_grad}
            recording.update(on=True, b=2)
            with torch.enable_grad():
                out2 = _flat_output(functional_call(model, clones, _take(args, 0, 2)), 2, who)
                w = weights.to(out2.device, out2.dtype).repeat(out2.shape[1] // 7 + 1)[:out2.shape[1]]
                recorded = [o for p in candidates for _, o in calls[p]]
                targets = list(clones.values()) + recorded
                if targets and out2.requires_grad:
                    grads = list(torch.autograd.grad((out2 * w).sum(), targets, allow_unused=True))
                else:  # the output depends on none of these parameters
                    grads = [None] * len(targets)
            recording["on"] = False
            _check_mixing(out1, out2, who)
            pgrad = dict(zip(clones, grads[:len(clones)]))
            ograd = iter(grads[len(clones):])
            for path, m in candidates.items():
                gs = [next(ograd) for _ in calls[path]]
                reason = _check_linear(path, m, leading[path], counts1[path], calls[path], gs, pgrad, name_of)
                if reason:
                    plan.reasons[path] = reason
        else:
            for path in candidates:
                if any(b != lead for b, lead in leading[path]):
                    plan.reasons[path] = "a call does not see the samples along the input's first axis"
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    plan.outputs = int(out1.shape[1])
    for path, m in candidates.items():
        if path not in plan.reasons and counts1[path] > 0:
            plan.fast[path] = counts1[path]
            plan.modules[path] = m
    fast_ids = {id(p) for m in plan.modules.values() for p in (m.weight, m.bias) if p is not None}
    plan.fallback = [n for n, p in params.items() if id(p) not in fast_ids]
    return plan


def _check_mixing(out1: torch.Tensor, out2: torch.Tensor, who: str) -> None:
    """Sample 0 alone and within a batch of two must give the same output (up to rounding)."""
    a, b = out1[0].detach(), out2[0].detach()
    eps = torch.finfo(a.dtype).eps
    scale = torch.maximum(a.abs().max(), b.abs().max())
    diff = (a - b).abs().max()
    if bool(diff > 1e3 * eps * scale + torch.finfo(a.dtype).tiny):
        raise SampleMixingError(
            f"{who}: the output for sample 0 changes by {float(diff):.3g} (scale {float(scale):.3g}) when another "
            "sample is in the batch: the model mixes samples (batch statistics, attention over the batch, ...), "
            "so the per-sample NTK is undefined. Evaluate in eval mode without cross-sample operations")


def _check_linear(path: str, m: nn.Linear, leading: list[tuple[int, int]], calls1: int,
                  calls: list[tuple[torch.Tensor, torch.Tensor]], grads: list[torch.Tensor | None],
                  pgrad: dict[str, torch.Tensor | None], name_of: dict[int, str]) -> str | None:
    """Why this Linear cannot take the fast path, or None."""
    if any(b != lead for b, lead in leading):
        return "a call does not see the samples along the input's first axis"
    if len(calls) != calls1:
        return f"called {calls1} time(s) in a forward of one sample but {len(calls)} for two (data-dependent)"
    if not calls:
        return None
    dw = torch.zeros_like(m.weight)
    db = torch.zeros_like(m.bias) if m.bias is not None else None
    for (z, _), g in zip(calls, grads):
        if g is None:
            continue
        g2 = g.reshape(-1, g.shape[-1])
        dw += g2.T @ z.reshape(-1, z.shape[-1]).to(g2.dtype)
        if db is not None:
            db += g2.sum(0)
    for p, mine in ((m.weight, dw), (m.bias, db)):
        if p is None or not p.requires_grad:
            continue
        ref = pgrad.get(name_of[id(p)])
        ref = torch.zeros_like(p) if ref is None else ref
        tol = torch.finfo(p.dtype).eps ** 0.5 * (float(ref.abs().max()) + float(mine.abs().max())) + 1e-30
        if float((ref - mine).abs().max()) > tol:
            return "its parameters receive gradient from outside its own calls (used functionally elsewhere?)"
    return None


# ------------------------------------------------------------------------------------------------
# fast path: factors Z and G of each Linear
# ------------------------------------------------------------------------------------------------
@dataclass
class _Factors:
    G: list[torch.Tensor]  # per chunk: (m, Ce, K, n_out)
    Z: list[torch.Tensor]  # per chunk: (m, K, d), d = n_in (+1 with a trainable bias)


def _linear_factors(model: nn.Module, args: tuple[torch.Tensor, ...], P: int, plan: NTKPlan, mode: str,
                    chunk: int, dtype: torch.dtype, who: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``G`` (P, Ce, K, n_out) and ``Z`` (P, K, d) in ``dtype`` for every fast-path Linear."""
    C = plan.outputs
    factors = {p: _Factors([], []) for p in plan.fast}
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in plan.fast}

    def make_hook(path: str):
        def hook(module, hargs, hkwargs, output):
            calls[path].append((_linear_input(hargs, hkwargs).detach(), output))
            return output.clone()
        return hook

    handles = [m.register_forward_hook(make_hook(p), with_kwargs=True) for p, m in plan.modules.items()]
    try:
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            m = stop - start
            for v in calls.values():
                v.clear()
            with torch.enable_grad():
                out = _flat_output(model(*_take(args, start, stop)), m, who)
                if out.shape[1] != C:
                    raise ValueError(f"{who}: the model gives {out.shape[1]} outputs per sample for a batch of {m} "
                                     f"but {C} for one sample")
                recorded = []
                for path, k in plan.fast.items():
                    if len(calls[path]) != k:
                        raise RuntimeError(f"{who}: Linear {path!r} was called {len(calls[path])} times in a forward "
                                           f"of {m} samples and {k} times for one sample")
                    for z, o in calls[path]:
                        if int(z.shape[0]) != m:
                            raise RuntimeError(f"{who}: Linear {path!r} saw an input of shape {tuple(z.shape)} in a "
                                               f"forward of {m} samples (sample axis not first)")
                        recorded.append(o)
                per_c: list[tuple[torch.Tensor | None, ...]] = []
                for c in range(C):
                    if not out.requires_grad:  # no fast-path layer reaches the output
                        per_c.append((None,) * len(recorded))
                        continue
                    per_c.append(torch.autograd.grad(out[:, c].sum(), recorded, retain_graph=c < C - 1,
                                                     allow_unused=True))
            del out
            i = 0
            for path, k in plan.fast.items():
                mod = plan.modules[path]
                zs, gs = [], []
                for j, (z, o) in enumerate(calls[path]):
                    n_out = o.shape[-1]
                    zs.append(z.reshape(m, -1, z.shape[-1]))
                    g = torch.stack([o.new_zeros(o.shape) if per_c[c][i + j] is None else per_c[c][i + j]
                                     for c in range(C)], dim=1)  # (m, C, *, n_out)
                    gs.append(g.reshape(m, C, -1, n_out))
                i += k
                G = torch.cat(gs, dim=2).to(dtype)  # (m, C, K, n_out)
                if mode == "trace":
                    G = G.permute(0, 2, 1, 3).reshape(m, 1, G.shape[2], C * G.shape[3])
                Zc = torch.cat(zs, dim=1).to(dtype)  # (m, K, n_in)
                parts = []
                if mod.weight.requires_grad:
                    parts.append(Zc)
                if mod.bias is not None and mod.bias.requires_grad:
                    parts.append(Zc.new_ones(Zc.shape[0], Zc.shape[1], 1))
                factors[path].G.append(G)
                factors[path].Z.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
            del per_c
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    out_f: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, f in factors.items():
        G = f.G[0] if len(f.G) == 1 else torch.cat(f.G)
        Z = f.Z[0] if len(f.Z) == 1 else torch.cat(f.Z)
        f.G.clear()
        f.Z.clear()
        out_f[path] = (G, Z)
    return out_f


def _strip_rows(P: int, per_pair: int, itemsize: int, chunk: int | None) -> int:
    """Rows per strip: ``chunk`` if given, else about P/4 (so that the strips above the diagonal skip ~3/8 of
    the products of a full ``P x P`` product) and small enough that a strip's temporaries, ``per_pair``
    numbers per pair of samples, stay under STRIP_BYTES."""
    if chunk is not None:
        return max(1, min(P, chunk))
    rows = max(128, -(-P // 4))
    return max(1, min(P, rows, STRIP_BYTES // max(1, P * per_pair * itemsize)))


def _add_strip(theta: torch.Tensor, blk: torch.Tensor, s: int, e: int, Ce: int) -> None:
    """Add the strip ``rows s:e x columns s:P`` (sample units) and its mirror image below the diagonal."""
    r0, r1 = s * Ce, e * Ce
    diag = blk[:, :r1 - r0]
    diag.copy_((diag + diag.T) / 2)  # the diagonal block exactly symmetric, like the mirrored blocks
    theta[r0:r1, r0:] += blk
    if blk.shape[1] > r1 - r0:
        theta[r1:, r0:r1] += blk[:, r1 - r0:].T


def _accumulate_linear(theta: torch.Tensor, G: torch.Tensor, Z: torch.Tensor, chunk: int | None) -> None:
    """``theta += sum_{k,k'} (G_k G_k'^T) * (Z_k Z_k'^T)`` for one layer, row strip by row strip."""
    P, Ce, K, n = G.shape
    d = Z.shape[2]
    itemsize = G.element_size()
    pair_cost = Ce * Ce * K * K * n + K * K * d
    outer_cost = Ce * Ce * n * d
    fits = P * Ce * n * d * itemsize <= FALLBACK_BUDGET
    if K == 1:  # (G G^T) * (Z Z^T) = D D^T with D_i = g_i z_i^T: cheaper when g or z has one entry
        use_outer = fits and outer_cost < Ce * Ce * n + d
    else:
        use_outer = fits and (PAIRS_METHOD == "outer" or (PAIRS_METHOD == "auto" and outer_cost < pair_cost))
    if use_outer:
        D = torch.einsum("pckn,pkd->pcnd", G, Z).reshape(P * Ce, n * d)
        rows = _strip_rows(P, Ce * Ce, itemsize, chunk)
        for s in range(0, P, rows):
            e = min(P, s + rows)
            _add_strip(theta, D[s * Ce:e * Ce] @ D[s * Ce:].T, s, e, Ce)
        return
    rows = _strip_rows(P, Ce * Ce * K * K * 2, itemsize, chunk)
    for s in range(0, P, rows):
        e = min(P, s + rows)
        ga, gc = G[s:e], G[s:]
        if K == 1:
            gg = ga.reshape(-1, n) @ gc.reshape(-1, n).T  # ((e-s) Ce, (P-s) Ce)
            zz = Z[s:e, 0] @ Z[s:, 0].T  # (e-s, P-s)
            if Ce == 1:
                blk = gg.mul_(zz)
            else:
                blk = gg.view(e - s, Ce, P - s, Ce).mul_(zz[:, None, :, None]).view(gg.shape)
        else:
            gg = (ga.reshape(-1, n) @ gc.reshape(-1, n).T).view(e - s, Ce, K, P - s, Ce, K)
            zz = (Z[s:e].reshape(-1, d) @ Z[s:].reshape(-1, d).T).view(e - s, 1, K, P - s, 1, K)
            blk = gg.mul_(zz).sum(dim=(2, 5)).reshape((e - s) * Ce, (P - s) * Ce)
        _add_strip(theta, blk, s, e, Ce)


# ------------------------------------------------------------------------------------------------
# fallback: per-sample Jacobians with torch.func
# ------------------------------------------------------------------------------------------------
def _accumulate_fallback(theta: torch.Tensor, model: nn.Module, args: tuple[torch.Tensor, ...], P: int,
                         names: Sequence[str], C: int, mode: str, chunk: int | None, dtype: torch.dtype,
                         who: str) -> None:
    params = dict(model.named_parameters())
    sub = {n: params[n].detach() for n in names}
    n_params = sum(p.numel() for p in sub.values())
    Ce = C if mode == "full" else 1

    def f(p: dict[str, torch.Tensor], *xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, tuple(t.unsqueeze(0) for t in xi))
        return out.reshape(-1)

    jac_fn = vmap(jacrev(f), in_dims=(None,) + (0,) * len(args))
    src_item = next(iter(sub.values())).element_size()
    if chunk is None:
        chunk = max(1, min(P, FALLBACK_CHUNK_BYTES // max(1, 3 * C * n_params * src_item)))

    def jac(s: int, e: int) -> torch.Tensor:
        try:
            with torch.no_grad():  # the transform still differentiates; no graph to the other parameters
                j = jac_fn(sub, *_take(args, s, e))
        except Exception as exc:  # noqa: BLE001 - add which parameters and why
            raise RuntimeError(f"{who}: torch.func could not take per-sample Jacobians of {list(names)[:6]}"
                               f"{'...' if len(names) > 6 else ''} ({type(exc).__name__}: {exc}); the model must "
                               "work on one sample at a time under torch.func.vmap (no .item(), no data-dependent "
                               "Python control flow)") from exc
        flat = torch.cat([v.reshape(e - s, C, -1) for v in j.values()], dim=2).to(dtype)
        return flat.reshape((e - s) * Ce, -1)  # trace: (m, C N); full: (m C, N)

    bounds = [(s, min(P, s + chunk)) for s in range(0, P, chunk)]
    if P * C * n_params * torch.finfo(dtype).bits // 8 <= FALLBACK_BUDGET:
        J = torch.cat([jac(s, e) for s, e in bounds]) if len(bounds) > 1 else jac(*bounds[0])
        for s, e in bounds:
            _add_strip(theta, J[s * Ce:e * Ce] @ J[s * Ce:].T, s, e, Ce)
        return
    # too large to hold: recompute the column blocks for every row block (n_blocks (n_blocks + 1) / 2 Jacobians)
    for a, (s, e) in enumerate(bounds):
        Ja = jac(s, e)
        blk = Ja @ Ja.T
        theta[s * Ce:e * Ce, s * Ce:e * Ce] += (blk + blk.T) / 2
        for s2, e2 in bounds[a + 1:]:
            blk = Ja @ jac(s2, e2).T
            theta[s * Ce:e * Ce, s2 * Ce:e2 * Ce] += blk
            theta[s2 * Ce:e2 * Ce, s * Ce:e * Ce] += blk.T


# ------------------------------------------------------------------------------------------------
# public
# ------------------------------------------------------------------------------------------------
def empirical_ntk(model: nn.Module, x: Any, *, mode: str = "trace", reduction: str = "sum",
                  chunk_size: int | None = None, dtype: torch.dtype = torch.float64,
                  fast_path: bool = True, plan: NTKPlan | None = None) -> torch.Tensor:
    """The empirical NTK ``J J^T`` of ``model`` on the samples ``x`` (samples along the first axis).

    ``mode="trace"``: ``P x P``, summed over the ``C`` outputs (``reduction="mean"`` divides by ``C``, as
    neural-tangents does by default); ``mode="full"``: ``PC x PC`` with row ``i * C + c``.
    Every trainable parameter counts. ``chunk_size`` bounds the samples per forward/backward and the rows
    per block of products (default: automatic); ``dtype`` is the precision of the products and of the result
    (the forward and backward run in the model's own precision). ``fast_path=False`` sends every parameter
    through ``torch.func`` (a reference). The model is used as it is (its train/eval mode is not changed);
    it must not mix samples (``SampleMixingError``). ``plan``: a result of ``ntk_plan`` for this model and
    input shape, to skip the two discovery passes when the same kernel is measured repeatedly.
    """
    who = "empirical_ntk"
    if mode not in MODES:
        raise ValueError(f"{who}: mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mode == "full" and reduction != "sum":
        raise ValueError(f"{who}: reduction={reduction!r} applies to the trace over outputs; mode='full' keeps "
                         "every output pair (use reduction='sum')")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be a floating torch.dtype, got {dtype!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"{who}: chunk_size must be a positive number of samples, got {chunk_size}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    args, P = _as_args(x, who)
    if plan is None:
        plan = ntk_plan(model, args, fast_path=fast_path, who=who)
    else:
        _check_modules(model, who)
    C = plan.outputs
    Ce = C if mode == "full" else 1
    device = args[0].device
    theta = torch.zeros(P * Ce, P * Ce, dtype=dtype, device=device)
    if plan.fast:
        fchunk = min(P, int(chunk_size) if chunk_size is not None else FAST_CHUNK)
        factors = _linear_factors(model, args, P, plan, mode, fchunk, dtype, who)
        for path in list(factors):
            G, Z = factors.pop(path)
            _accumulate_linear(theta, G, Z, chunk_size)
            del G, Z
    if plan.fallback:
        _accumulate_fallback(theta, model, args, P, plan.fallback, C, mode, chunk_size, dtype, who)
    if reduction == "mean":
        theta /= C
    return theta


def trace_over_outputs(theta_full: torch.Tensor, outputs: int) -> torch.Tensor:
    """``P x P`` sum over outputs of a full ``PC x PC`` kernel (row ``i * C + c``)."""
    n = theta_full.shape[0] // outputs
    return theta_full.view(n, outputs, n, outputs).diagonal(dim1=1, dim2=3).sum(-1)


__all__ = ["empirical_ntk", "ntk_plan", "NTKPlan", "SampleMixingError", "trace_over_outputs", "MODES", "REDUCTIONS"]
