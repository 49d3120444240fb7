"""Cholesky factorization of the path gram in its own buffer, with a jitter for numerically singular ones, and
the quadratic form ``q = tr(Y^T M^{-1} Y)``.

The matrix is the neural path kernel ``H = Phi Phi^T`` of Lakshminarayanan & Singh 2020, "Neural path features
and neural path kernel" (``kernel.path_gram``). ``H`` counts as numerically singular when its float64 Cholesky
fails *or* its condition (``condition``: block Lanczos and pivot bounds) exceeds ``1 / (P eps)``, where a float64
solve has no reliable digit left; then::

    M = H + delta * mean(diag H) * I = L L^T,      delta = jitter_start, 10 jitter_start, ...

is factorized until it factorizes with a resolvable condition, and ``q = tr(Y^T M^{-1} Y) = ||L^{-1} Y||_F^2``.

Memory: ``factorize`` works in the buffer of the ``PathGram``: it mirrors ``H`` into the strict upper triangle,
keeps the diagonal aside and overwrites the lower triangle with the Cholesky factor (``cholesky_in_place``,
blocked, ``P x 512`` temporaries), so ``H`` stays readable for the condition estimate, the image and a retry with
jitter. A measurement of the probe holds two P x P float64 matrices: ``h`` and the cached ``X X^T`` of the fixed
probe batch (at P = 10,000, 1.5 GiB).
"""

from __future__ import annotations

import math

import torch

from probes.functional.pathgram.condition import _extremes, _lanczos_top, _ratio
from probes.functional.pathgram.layout import Factorization, PathGram

#: columns per step of the blocked in-place Cholesky factorization
CHOLESKY_BLOCK = 512


def cholesky_jitter(
    M: torch.Tensor, jitter_start: float = 1e-12, jitter_max: float = 1e-2, who: str = "pathgram"
) -> Factorization:
    """Cholesky of the float64 SPD matrix ``M`` into a new factor, ``M`` unchanged, with a jitter on failure.

    On failure ``delta * mean(diag M)`` is added to the diagonal, ``delta = jitter_start, 10 jitter_start, ...``
    up to ``jitter_max``. ``factorize`` is the in-place route of the probe, which also judges the condition.

    Args:
        M: a symmetric positive semi-definite matrix (converted to float64).
        jitter_start: the first relative jitter tried.
        jitter_max: the largest relative jitter tried.
        who: the name that starts the error messages.

    Returns:
        The ``Factorization`` (``condition`` None).

    Raises:
        ValueError: the mean diagonal of ``M`` is not positive and finite, or the factorization failed even
            with ``jitter_max``.
    """
    M = M.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return Factorization(L, 0.0, 0.0)
    scale = float(torch.diagonal(M).mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"{who}: the matrix has mean diagonal {scale}; it is not positive definite "
            "(all inputs zero, or non-finite values)"
        )
    delta = jitter_start
    while delta <= jitter_max * (1 + 1e-9):
        shifted = M.clone()
        shifted.diagonal().add_(delta * scale)
        L, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            return Factorization(L, delta, delta * scale, singular=True)
        delta *= 10.0
    raise ValueError(
        f"{who}: Cholesky failed even with jitter {jitter_max:g} * mean(diag); the matrix is "
        "not positive semi-definite (non-finite values?)"
    )


def cholesky_in_place(h: torch.Tensor, block: int = CHOLESKY_BLOCK) -> int:
    """Overwrite the lower triangle of ``h`` with the Cholesky factor of the symmetric matrix that triangle holds.

    The strict upper triangle is neither read nor written. Blocked left-looking Cholesky (``block`` columns per
    step): ``torch.linalg.cholesky_ex`` of each diagonal block after its ``addmm`` update, then one triangular
    solve for the panel below it. Temporaries: one ``P x block`` panel.

    Args:
        h: a square float64 matrix whose lower triangle (diagonal included) holds the symmetric matrix.
        block: columns per step.

    Returns:
        0, or the 1-based index of the first pivot that is not positive (the lower triangle is then partly
        overwritten).
    """
    P = h.shape[0]
    for j0 in range(0, P, block):
        j1 = min(j0 + block, P)
        D = h[j0:j1, j0:j1]
        Lj = h[j0:j1, :j0]
        upd = torch.addmm(D, Lj, Lj.T, alpha=-1) if j0 else D.clone()
        Ljj, info = torch.linalg.cholesky_ex(upd)  # reads the lower triangle of upd only
        bad = int(info)
        if bad:
            return j0 + bad
        D.copy_(Ljj + torch.triu(D, 1))  # the factor below and on the diagonal; the strict upper part kept
        if j1 < P:
            B = h[j1:, j0:j1]
            if j0:
                B.addmm_(h[j1:, :j0], Lj.T, alpha=-1)
            B.copy_(torch.linalg.solve_triangular(Ljj.T, B, upper=True, left=False))  # B Ljj^-T
    return 0


def factorize(
    pg: PathGram,
    jitter_start: float = 1e-12,
    jitter_max: float = 1e-2,
    condition: str = "estimate",
    rcond: float | None = None,
    block: int = CHOLESKY_BLOCK,
    who: str = "pathgram",
) -> Factorization:
    """Cholesky factorization of ``H`` in ``pg``'s own buffer, treating a numerically singular ``H`` as singular.

    ``pg`` is put in the factored layout (``PathGram.mirror``: ``H`` mirrored into the strict upper triangle, its
    diagonal kept aside) and its lower triangle overwritten by the factor (``cholesky_in_place``): no second
    P x P matrix. Then the condition of the factorized matrix is judged. ``H`` is *numerically singular* when the
    factorization fails or its condition exceeds ``1 / rcond``. Then ``H + delta * mean(diag H) * I`` is
    factorized instead, ``delta`` growing tenfold from ``jitter_start`` (skipping ahead to the smallest shift
    whose condition bound ``(lambda_max + s) / s`` fits, with ``lambda_max`` from block Lanczos on ``H``, so one
    retry usually suffices), until it factorizes with a condition within ``1 / rcond``, at most ``jitter_max``;
    past that the last successful factorization is returned (still flagged), and an error is raised when none
    succeeded.

    Args:
        pg: the path gram; left in the factored layout (factorized before: it starts again from ``H``).
        jitter_start: the first relative jitter tried once ``H`` is found singular.
        jitter_max: the largest relative jitter tried.
        condition: ``"estimate"`` and ``"off"``: block Lanczos combined with the pivot bounds
            ``max diag H / min L_ii^2``; ``"exact"``: all eigenvalues, with P x P temporaries.
        rcond: the reciprocal condition below which ``H`` counts as singular (default ``P * eps``, float64's
            ``eps = 2.2e-16``: the tolerance of ``numpy.linalg.matrix_rank``, beyond which ``H^{-1} Y`` has no
            reliable digit).
        block: columns per step of ``cholesky_in_place``.
        who: the name that starts the error messages.

    Returns:
        The ``Factorization`` (``L`` is ``pg.h``, read as its lower triangle) with ``jitter``, ``shift``,
        ``singular`` and ``condition`` (the lower bound just described, of the matrix finally factorized).

    Raises:
        ValueError: ``condition`` is not one of the three methods, the mean diagonal of ``H`` is not positive and
            finite, or no factorization succeeded up to ``jitter_max``.
    """
    limit, scale = _prepared(pg, condition, rcond, who)
    delta, singular, first = 0.0, False, True
    while True:
        if not first:
            pg.restore_lower()
        first = False
        ok, fits, need, singular = _attempt(pg, delta, scale, singular, condition, limit, block)
        if fits:
            assert ok is not None  # within the limit: a factorization was made
            return ok
        delta = jitter_start if delta == 0 else delta * 10.0
        while delta < need:
            delta *= 10.0
        if delta > jitter_max * (1 + 1e-9):
            if ok is not None:
                return ok
            raise ValueError(
                f"{who}: Cholesky failed even with jitter {jitter_max:g} * mean(diag); the matrix is "
                "not positive semi-definite (non-finite values?)"
            )


def _prepared(pg: PathGram, condition: str, rcond: float | None, who: str) -> tuple[float, float]:
    """``pg`` in the factored layout holding ``H``, and ``(1 / rcond, mean(diag H))``, after the checks."""
    if condition not in ("estimate", "exact", "off"):
        raise ValueError(f"{who}: condition must be 'estimate', 'exact' or 'off', got {condition!r}")
    P = pg.h.shape[0]
    tol = P * torch.finfo(torch.float64).eps if rcond is None else float(rcond)
    if pg.factored:  # factorized before: start again from H
        pg.restore_lower()
    else:
        pg.mirror()
    scale = float(pg.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"{who}: the matrix has mean diagonal {scale}; it is not positive definite "
            "(all inputs zero, or non-finite values)"
        )
    return 1.0 / tol, scale


def _attempt(
    pg: PathGram, delta: float, scale: float, singular: bool, condition: str, limit: float, block: int
) -> tuple[Factorization | None, bool, float, bool]:
    """One Cholesky of ``H + delta * scale * I`` in place: ``(factorization or None, whether it is within the
    condition limit, the smallest relative jitter to try next, singular)``."""
    h, shift = pg.h, delta * scale
    if shift:
        torch.diagonal(h).add_(shift)
    if cholesky_in_place(h, block) == 0:
        ok = Factorization(h, delta, shift, singular)
        lmax, lmin = _extremes(pg, ok, condition)
        ok.condition = _ratio(lmax, lmin)
        if float(ok.condition) <= limit:
            return ok, True, 0.0, singular
        ok.singular = True
        # lambda_min(H + s I) >= s: the smallest s with (lambda_max(H) + s) / s <= limit / 2, as a step of delta
        return ok, False, 2.0 * max(float(lmax) - shift, 0.0) / max(limit - 2.0, 1.0) / scale, True
    # sized from lambda_max(H), read from H above the diagonal (the failure left it intact)
    top = max(float(_lanczos_top(pg)), float(pg.diagonal().max()))
    need = 2.0 * top / max(limit - 2.0, 1.0) / scale
    return None, False, need if math.isfinite(need) else 0.0, True


def quadratic_form(fact: Factorization, Y: torch.Tensor) -> torch.Tensor:
    """``tr(Y^T M^{-1} Y) = ||L^{-1} Y||_F^2`` from the factorization of ``M``.

    Args:
        fact: the factorization ``M = L L^T`` (``fact.L`` read as its lower triangle).
        Y: P values or a P x C matrix (converted to float64 on the factor's device).

    Returns:
        The quadratic form, a float64 0-d tensor.
    """
    Y = Y.to(device=fact.L.device, dtype=torch.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    Z = torch.linalg.solve_triangular(fact.L, Y, upper=False)
    return (Z * Z).sum()
