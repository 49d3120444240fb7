"""The dense kernel ``empirical_ntk``: ``P x P`` (or ``PC x PC``) products, row strip by row strip.

The strips cover the upper triangle (about ``P / 4`` rows each, their temporaries under
``settings.strip_bytes``) and are mirrored below the diagonal, so the kernel is exactly symmetric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from probes.autodiff.fsdp import tops_gathered
from probes.autodiff.ntk import progress
from probes.autodiff.ntk.factors import _layer_terms
from probes.autodiff.ntk.fallback import _fallback_blocks
from probes.autodiff.ntk.plan import NTKPlan
from probes.autodiff.ntk.planning import _inputs_and_plan, _share
from probes.autodiff.ntk.ranks import Share, gather_term, together
from probes.functional.ntk.settings import DEFAULT, NTKSettings
from probes.functional.ntk.terms import _Embed, _Grad, _Pairs, _Term


def _strip_rows(P: int, per_pair: int, itemsize: int, chunk: int | None, settings: NTKSettings = DEFAULT) -> int:
    """Rows per strip: ``chunk`` if given, else about P/4 (so that the strips above the diagonal skip ~3/8 of
    the products of a full ``P x P`` product) and small enough that a strip's temporaries, ``per_pair``
    numbers per pair of samples, stay under ``settings.strip_bytes``."""
    if chunk is not None:
        return max(1, min(P, chunk))
    rows = max(32, -(-P // 4))
    return max(1, min(P, rows, settings.strip_bytes // max(1, P * per_pair * itemsize)))


def _add_strip(theta: torch.Tensor, blk: torch.Tensor, s: int, e: int, Ce: int) -> None:
    """Add the strip ``rows s:e x columns s:P`` (sample units) and its mirror image below the diagonal."""
    r0, r1 = s * Ce, e * Ce
    diag = blk[:, : r1 - r0]
    diag.copy_((diag + diag.T) / 2)  # the diagonal block exactly symmetric, like the mirrored blocks
    theta[r0:r1, r0:] += blk
    if blk.shape[1] > r1 - r0:
        theta[r1:, r0:r1] += blk[:, r1 - r0 :].T


def _rows(t: _Term, s: int, e: int) -> _Term:
    """The term of samples ``s:e`` (views)."""
    if isinstance(t, _Grad):
        return _Grad(t.D[s:e])
    if isinstance(t, _Pairs):
        return _Pairs(t.G[s:e], t.Z[s:e], t.bias)
    return _Embed(t.G[s:e], t.T[s:e], t.V)


def _block(a: _Term, b: _Term) -> torch.Tensor:
    """The kernel block ``Theta[A, B]`` of one term between two sets of samples: ``(|A| Ce, |B| Ce)``.

    ``_Grad``: ``D_A D_B^T``; ``_Pairs``: ``sum_grp sum_{k,k'} (G_Ak G_Bk'^T) * (Z_Ak Z_Bk'^T)``; ``_Embed``:
    ``sum_{k,k'} [T_Ak = T_Bk'] G_Ak G_Bk'^T``.
    """
    # ``a`` and ``b`` are rows of one term: of one kind
    if isinstance(a, _Grad):
        bD = cast(_Grad, b).D
        Pa, Ce = a.D.shape[:2]
        return a.D.reshape(Pa * Ce, -1) @ bD.reshape(bD.shape[0] * Ce, -1).T
    if isinstance(a, _Embed):
        be = cast(_Embed, b)
        Pa, Ce, K, d = a.G.shape
        Pb = be.G.shape[0]
        gg = (a.G.reshape(-1, d) @ be.G.reshape(-1, d).T).view(Pa, Ce, K, Pb, Ce, K)
        same = a.T.view(Pa, 1, K, 1, 1, 1) == be.T.view(1, 1, 1, Pb, 1, K)
        return gg.mul_(same.to(gg.dtype)).sum(dim=(2, 5)).reshape(Pa * Ce, Pb * Ce)
    bp = cast(_Pairs, b)
    blk = None
    for j in range(a.G.shape[3]):
        part = _pairs_block(a.G[:, :, :, j], a.Z[:, :, j], bp.G[:, :, :, j], bp.Z[:, :, j])
        blk = part if blk is None else blk.add_(part)
    assert blk is not None  # a layer has at least one group
    return blk


def _pairs_block(Ga: torch.Tensor, Za: torch.Tensor, Gb: torch.Tensor, Zb: torch.Tensor) -> torch.Tensor:
    """``sum_{k,k'} (G_ak G_bk'^T) * (Z_ak Z_bk'^T)`` for one group, ``G`` (P, Ce, K, n), ``Z`` (P, K, d)."""
    Pa, Ce, K, n = Ga.shape
    Pb, d = Gb.shape[0], Za.shape[2]
    if K == 1:
        gg = Ga.reshape(-1, n) @ Gb.reshape(-1, n).T  # (Pa Ce, Pb Ce)
        zz = Za[:, 0] @ Zb[:, 0].T  # (Pa, Pb)
        if Ce == 1:
            return gg.mul_(zz)
        return gg.view(Pa, Ce, Pb, Ce).mul_(zz[:, None, :, None]).view(gg.shape)
    gg = (Ga.reshape(-1, n) @ Gb.reshape(-1, n).T).view(Pa, Ce, K, Pb, Ce, K)
    zz = (Za.reshape(-1, d) @ Zb.reshape(-1, d).T).view(Pa, 1, K, Pb, 1, K)
    return gg.mul_(zz).sum(dim=(2, 5)).reshape(Pa * Ce, Pb * Ce)


def _pair_bytes(t: _Term) -> int:
    """Numbers of a block's temporaries per pair of samples (``_strip_rows``)."""
    if isinstance(t, _Grad):
        return t.D.shape[1] ** 2
    Ce, K = t.G.shape[1], t.G.shape[2]
    return Ce * Ce * K * K * 2


def _accumulate_term(
    theta: torch.Tensor,
    t: _Term,
    chunk: int | None,
    rows_of: tuple[int, int] | None = None,
    settings: NTKSettings = DEFAULT,
) -> None:
    """``theta += Theta_term``, strip by strip over the upper triangle (mirrored below the diagonal); ``rows_of``:
    only the strips of rows ``s:e`` (across ranks, each rank its own)."""
    first = t.D if isinstance(t, _Grad) else t.G
    P, Ce, itemsize = first.shape[0], first.shape[1], first.element_size()
    start, stop = rows_of if rows_of is not None else (0, P)
    groups = (
        [t]
        if not isinstance(t, _Pairs) or t.G.shape[3] == 1
        else [_Pairs(t.G[:, :, :, j : j + 1], t.Z[:, :, j : j + 1]) for j in range(t.G.shape[3])]
    )
    for part in groups:  # one group at a time: the strips' temporaries stay under settings.strip_bytes
        rows = _strip_rows(P, _pair_bytes(part), itemsize, chunk, settings)
        for s in range(start, stop, rows):
            e = min(stop, s + rows)
            _add_strip(theta, _block(_rows(part, s, e), _rows(part, s, P)), s, e, Ce)


def _accumulate_fallback(
    theta: torch.Tensor,
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
) -> None:
    Ce = C if mode == "full" else 1
    blocks = _fallback_blocks(model, args, P, names, C, mode, chunk, dtype, who, settings)
    for done, (_, J, streamed) in enumerate(blocks):
        progress.report(f"torch.func fallback ({len(names)} parameters), blocks", done + 1, None)
        if J is not None:
            _accumulate_term(theta, _Grad(J.view(P, Ce, -1)), chunk, None, settings)
            del J
            continue
        # one parameter too large to hold for all samples: sample blocks, recomputed per pair of blocks
        jac, bounds = streamed
        for a, (s, e) in enumerate(bounds):
            Ja = jac(s, e)
            blk = Ja @ Ja.T
            theta[s * Ce : e * Ce, s * Ce : e * Ce] += (blk + blk.T) / 2
            for s2, e2 in bounds[a + 1 :]:
                blk = Ja @ jac(s2, e2).T
                theta[s * Ce : e * Ce, s2 * Ce : e2 * Ce] += blk
                theta[s2 * Ce : e2 * Ce, s * Ce : e * Ce] += blk.T


def _kernel_across_ranks(
    theta: torch.Tensor,
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    plan: NTKPlan,
    share: Share,
    mode: str,
    chunk: int | None,
    dtype: torch.dtype,
    who: str,
    settings: NTKSettings = DEFAULT,
) -> None:
    """``theta`` (zeros, ``P Ce`` square) filled with the kernel on every rank: this rank's factors of its share,
    every term's factors all-gathered, this rank's row strips of the upper triangle (``Share.strips``), one
    all-reduce (``probes.autodiff.ntk.ranks``)."""
    C = plan.outputs
    Ce = C if mode == "full" else 1
    local = share.take(args)
    with together(share, who):  # a rank that fails here does not leave the others waiting in the exchange
        terms = (
            list(_layer_terms(model, local, share.S, plan, mode, chunk, dtype, who, "dense", None, settings).values())
            if plan.fast
            else []
        )
        for names, J, _ in (
            _fallback_blocks(model, local, share.S, plan.fallback, C, mode, chunk, dtype, who, settings)
            if plan.fallback
            else []
        ):
            if J is None:
                raise ValueError(
                    f"{who}: distributed=True: the torch.func Jacobian of {list(names)} does not fit "
                    "settings.fallback_budget for one share of the samples; raise it, or use more ranks"
                )
            terms.append(_Grad(J.view(share.S, Ce, -1)))
    strips = share.strips(share.P)
    # every rank's share of each term, all-gathered; the next term's exchange runs while this one's strips compute
    pending = gather_term(share, terms[0]) if terms else None
    for i in range(len(terms)):
        assert pending is not None  # set for every term: the first before the loop, the next in it
        full = pending()
        pending = gather_term(share, terms[i + 1]) if i + 1 < len(terms) else None
        terms[i] = None  # type: ignore[call-overload]
        for rows in strips:
            _accumulate_term(theta, full, chunk, rows, settings)
        del full
        progress.report("kernel products across ranks, terms", i + 1, len(terms))
    share.all_reduce(theta)  # every entry comes from exactly one rank: the sum with zeros is exact


def empirical_ntk(
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
) -> torch.Tensor:
    """The empirical NTK ``J J^T`` of ``model`` on the samples ``x``, over every trainable parameter.

    The model is used as it is (its train/eval mode is not changed, no ``.grad`` is written); the forward and
    backward passes run in the model's own precision.

    Args:
        model: any ``nn.Module`` that does not mix samples, taking ``x`` positionally.
        x: a tensor, or a tuple or list of tensors (the model's positional inputs), samples along the first axis.
        mode: ``"trace"``: the ``P x P`` kernel summed over the ``C`` outputs; ``"full"``: the ``PC x PC`` kernel,
            row ``i * C + c``.
        reduction: ``"sum"`` or ``"mean"`` over outputs (``"mean"`` divides by ``C``, neural-tangents'
            default; ``mode="trace"`` only).
        chunk_size: samples per forward/backward and rows per block of products (default: automatic).
        dtype: the precision of the products and of the result.
        fast_path: ``False`` sends every parameter through ``torch.func`` (a reference).
        plan: a result of ``ntk_plan`` for this model and input shape, to skip its two discovery passes when the
            same kernel is measured repeatedly.
        distributed: split the samples over the ranks of ``group`` (``torch.distributed``; every rank calls with
            the same ``x`` and gets the whole kernel): each rank computes the factors of its ``P / world`` samples,
            and the kernel's blocks come from factors exchanged between ranks (``probes.autodiff.ntk.ranks``).
            Works on DDP replicas and FSDP2-sharded models (no rank needs a whole parameter).
        group: the process group (None: the default group).
        settings: the memory budgets and switches (``probes.functional.ntk.settings.NTKSettings``).

    Returns:
        The symmetric kernel, ``P x P`` or ``PC x PC``, in ``dtype`` on the inputs' device.

    Raises:
        ValueError: an unknown ``mode`` or ``reduction``, ``reduction="mean"`` with ``mode="full"``, a
            ``chunk_size`` below 1, and the input errors of ``ntk_plan``.
        TypeError: ``dtype`` is not a floating dtype, ``model`` is not an ``nn.Module``, and the type errors of
            ``ntk_plan``.
        SampleMixingError: the model mixes samples.
        RuntimeError: the model cannot be differentiated one sample at a time (the fallback's last route), or
            calls a planned layer a different number of times than in the plan.
    """
    with tops_gathered(model):
        return _empirical_ntk(
            model, x, mode, reduction, chunk_size, dtype, fast_path, plan, distributed, group, settings
        )


def _empirical_ntk(
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
) -> torch.Tensor:
    who = "empirical_ntk"
    args, P, plan = _inputs_and_plan(model, x, mode, reduction, chunk_size, dtype, fast_path, plan, who)
    C = plan.outputs
    Ce = C if mode == "full" else 1
    theta = torch.zeros(P * Ce, P * Ce, dtype=dtype, device=args[0].device)
    share = _share(distributed, group, P, who)
    with progress.measuring(who):
        if share is not None:
            _kernel_across_ranks(theta, model, args, plan, share, mode, chunk_size, dtype, who, settings)
        if share is None and plan.fast:
            terms = _layer_terms(model, args, P, plan, mode, chunk_size, dtype, who, "dense", None, settings)
            for i, path in enumerate(list(terms)):
                _accumulate_term(theta, terms.pop(path), chunk_size, None, settings)
                progress.report("kernel products, layers", i + 1, len(plan.fast))
        if share is None and plan.fallback:
            _accumulate_fallback(theta, model, args, P, plan.fallback, C, mode, chunk_size, dtype, who, settings)
    if reduction == "mean":
        theta /= C
    return theta
