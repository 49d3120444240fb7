"""The dense kernel ``empirical_ntk``: ``P x P`` (or ``PC x PC``) products, row strip by row strip.

The strips cover the upper triangle (about ``P / 4`` rows each, their temporaries under
``settings.STRIP_BYTES``) and are mirrored below the diagonal, so the kernel is exactly symmetric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from probes.functional.ntk import progress, settings
from probes.functional.ntk.factors import _layer_terms
from probes.functional.ntk.fallback import _fallback_blocks
from probes.functional.ntk.plan import NTKPlan
from probes.functional.ntk.planning import _inputs_and_plan
from probes.functional.ntk.terms import _Embed, _Grad, _Pairs, _Term


def _strip_rows(P: int, per_pair: int, itemsize: int, chunk: int | None) -> int:
    """Rows per strip: ``chunk`` if given, else about P/4 (so that the strips above the diagonal skip ~3/8 of
    the products of a full ``P x P`` product) and small enough that a strip's temporaries, ``per_pair``
    numbers per pair of samples, stay under STRIP_BYTES."""
    if chunk is not None:
        return max(1, min(P, chunk))
    rows = max(128, -(-P // 4))
    return max(1, min(P, rows, settings.STRIP_BYTES // max(1, P * per_pair * itemsize)))


def _add_strip(theta: torch.Tensor, blk: torch.Tensor, s: int, e: int, Ce: int) -> None:
    """Add the strip ``rows s:e x columns s:P`` (sample units) and its mirror image below the diagonal."""
    r0, r1 = s * Ce, e * Ce
    diag = blk[:, :r1 - r0]
    diag.copy_((diag + diag.T) / 2)  # the diagonal block exactly symmetric, like the mirrored blocks
    theta[r0:r1, r0:] += blk
    if blk.shape[1] > r1 - r0:
        theta[r1:, r0:r1] += blk[:, r1 - r0:].T


def _accumulate_gram(theta: torch.Tensor, D: torch.Tensor, Ce: int, chunk: int | None) -> None:
    """``theta += D D^T`` for rows ``D`` (P Ce, n), strip by strip."""
    P = D.shape[0] // Ce
    rows = _strip_rows(P, Ce * Ce, D.element_size(), chunk)
    for s in range(0, P, rows):
        e = min(P, s + rows)
        _add_strip(theta, D[s * Ce:e * Ce] @ D[s * Ce:].T, s, e, Ce)


def _accumulate_pairs(theta: torch.Tensor, G: torch.Tensor, Z: torch.Tensor, chunk: int | None) -> None:
    """``theta += sum_{k,k'} (G_k G_k'^T) * (Z_k Z_k'^T)`` for one group, ``G`` (P, Ce, K, n), ``Z`` (P, K, d)."""
    P, Ce, K, n = G.shape
    d = Z.shape[2]
    rows = _strip_rows(P, Ce * Ce * K * K * 2, G.element_size(), chunk)
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


def _accumulate_embed(theta: torch.Tensor, t: _Embed, chunk: int | None) -> None:
    """``theta += sum_{k,k'} [T_k = T_k'] (G_k G_k'^T)``, strip by strip."""
    P, Ce, K, d = t.G.shape
    rows = _strip_rows(P, Ce * Ce * K * K * 2, t.G.element_size(), chunk)
    for s in range(0, P, rows):
        e = min(P, s + rows)
        gg = (t.G[s:e].reshape(-1, d) @ t.G[s:].reshape(-1, d).T).view(e - s, Ce, K, P - s, Ce, K)
        same = (t.T[s:e].view(e - s, 1, K, 1, 1, 1) == t.T[s:].view(1, 1, 1, P - s, 1, K))
        blk = gg.mul_(same.to(gg.dtype)).sum(dim=(2, 5)).reshape((e - s) * Ce, (P - s) * Ce)
        _add_strip(theta, blk, s, e, Ce)


def _accumulate_term(theta: torch.Tensor, t: _Term, chunk: int | None) -> None:
    if isinstance(t, _Grad):
        P, Ce = t.D.shape[:2]
        _accumulate_gram(theta, t.D.reshape(P * Ce, -1), Ce, chunk)
    elif isinstance(t, _Pairs):
        for j in range(t.G.shape[3]):
            _accumulate_pairs(theta, t.G[:, :, :, j], t.Z[:, :, j], chunk)
    else:
        _accumulate_embed(theta, t, chunk)


def _accumulate_fallback(theta: torch.Tensor, model: nn.Module, args: tuple[torch.Tensor, ...], P: int,
                         names: Sequence[str], C: int, mode: str, chunk: int | None, dtype: torch.dtype,
                         who: str) -> None:
    Ce = C if mode == "full" else 1
    for done, (_, J, streamed) in enumerate(_fallback_blocks(model, args, P, names, C, mode, chunk, dtype, who)):
        progress.report(f"torch.func fallback ({len(names)} parameters), blocks", done + 1, None)
        if J is not None:
            _accumulate_gram(theta, J, Ce, chunk)
            del J
            continue
        # one parameter too large to hold for all samples: sample blocks, recomputed per pair of blocks
        jac, bounds = streamed
        for a, (s, e) in enumerate(bounds):
            Ja = jac(s, e)
            blk = Ja @ Ja.T
            theta[s * Ce:e * Ce, s * Ce:e * Ce] += (blk + blk.T) / 2
            for s2, e2 in bounds[a + 1:]:
                blk = Ja @ jac(s2, e2).T
                theta[s * Ce:e * Ce, s2 * Ce:e2 * Ce] += blk
                theta[s2 * Ce:e2 * Ce, s * Ce:e * Ce] += blk.T


def empirical_ntk(model: nn.Module, x: Any, *, mode: str = "trace", reduction: str = "sum",
                  chunk_size: int | None = None, dtype: torch.dtype = torch.float64,
                  fast_path: bool = True, plan: NTKPlan | None = None) -> torch.Tensor:
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
    who = "empirical_ntk"
    args, P, plan = _inputs_and_plan(model, x, mode, reduction, chunk_size, dtype, fast_path, plan, who)
    C = plan.outputs
    Ce = C if mode == "full" else 1
    theta = torch.zeros(P * Ce, P * Ce, dtype=dtype, device=args[0].device)
    with progress.measuring(who):
        if plan.fast:
            terms = _layer_terms(model, args, P, plan, mode, chunk_size, dtype, who, "dense")
            for i, path in enumerate(list(terms)):
                _accumulate_term(theta, terms.pop(path), chunk_size)
                progress.report("kernel products, layers", i + 1, len(plan.fast))
        if plan.fallback:
            _accumulate_fallback(theta, model, args, P, plan.fallback, C, mode, chunk_size, dtype, who)
    if reduction == "mean":
        theta /= C
    return theta


def trace_over_outputs(theta_full: torch.Tensor, outputs: int) -> torch.Tensor:
    """The trace over outputs of a full kernel: ``Theta_ij = sum_c Theta_(i,c),(j,c)``.

    Args:
        theta_full: a ``PC x PC`` kernel with row ``i * C + c`` (``empirical_ntk(..., mode="full")``).
        outputs: ``C``, output values per sample.

    Returns:
        The ``P x P`` kernel, equal to ``empirical_ntk(..., mode="trace")``.
    """
    n = theta_full.shape[0] // outputs
    return theta_full.view(n, outputs, n, outputs).diagonal(dim1=1, dim2=3).sum(-1)
