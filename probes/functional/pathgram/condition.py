"""The condition number ``kappa(M) = lambda_max / lambda_min`` of a factorized path gram ``M = h + shift I``.

``M = L L^T`` is the (shifted) neural path kernel of Lakshminarayanan & Singh 2020, "Neural path features and
neural path kernel", factorized by ``solve.factorize``. Block Lanczos (Rayleigh-Ritz on a block Krylov space with
full reorthogonalization) gives Ritz values inside the spectrum::

    top <= lambda_max(M)          from span[V, M V, ..., M^s V]        (products with h)
    low >= lambda_min(M)          1 / the largest Ritz value of M^{-1}  (triangular solves with L)

so ``top / low`` bounds ``kappa(M)`` from below. ``factorize`` combines it with the pivot bounds
``lambda_max >= max diag M`` and ``lambda_min <= min_i L_ii^2``; ``condition_exact`` takes all eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from probes.functional.pathgram.layout import Factorization, PathGram


def _orth(V: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(V).Q.contiguous()


def _krylov_basis(apply: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthonormal basis of the block Krylov space ``[V0, A V0, ..., A^steps V0]`` (full reorthogonalization)."""
    Q = _orth(V0)
    k = Q.shape[1]
    for _ in range(steps):
        if Q.shape[1] + k > Q.shape[0]:
            break
        W = apply(Q[:, -k:])
        W = W - Q @ (Q.T @ W)
        # a Householder QR of the whole basis stays orthonormal even when W has (numerically) no new direction
        Q = _orth(torch.cat([Q, W - Q @ (Q.T @ W)], dim=1))
    return Q


def _start_block(P: int, device: torch.device, block: int, steps: int, seed: int) -> torch.Tensor:
    k = max(1, min(block, P // (steps + 1) or 1))
    g = torch.Generator(device="cpu").manual_seed(seed)
    V0 = torch.randn(P, k, generator=g, dtype=torch.float64).to(device)
    V0[:, 0] = 1.0
    return V0


def _largest(T: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh((T + T.T) / 2)[-1]


def _lanczos_top(pg: PathGram, shift: float = 0.0, block: int = 4, steps: int = 3, seed: int = 0) -> torch.Tensor:
    """The largest Ritz value of ``h + shift I`` (a lower bound of ``lambda_max``), from products with ``h`` only:
    no factor needed, so ``factorize`` can size the jitter after a failed factorization."""
    V0 = _start_block(pg.h.shape[0], pg.h.device, block, steps, seed)

    def apply(V: torch.Tensor) -> torch.Tensor:
        W = pg.matmul(V)
        return W + shift * V if shift else W

    Q = _krylov_basis(apply, V0, steps)
    return _largest(Q.T @ apply(Q))


def _lanczos_extremes(
    pg: PathGram, fact: Factorization, block: int = 4, steps: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values ``(top, low)``: ``top <= lambda_max`` of ``M = h + shift I`` from its block Krylov space and
    ``low >= lambda_min`` from that of ``M^{-1}`` (``inf`` when the Ritz value of ``M^{-1}`` is not positive)."""
    Lf = fact.L
    V0 = _start_block(Lf.shape[0], Lf.device, block, steps, seed)

    def apply_inverse(V: torch.Tensor) -> torch.Tensor:
        Z = torch.linalg.solve_triangular(Lf, V, upper=False)
        return torch.linalg.solve_triangular(Lf.T, Z, upper=True)

    largest = _largest
    top = _lanczos_top(pg, fact.shift, block, steps, seed)
    Q = _krylov_basis(apply_inverse, V0, steps)
    Z = torch.linalg.solve_triangular(Lf, Q, upper=False)
    inv_top = largest(Z.T @ Z)  # the largest Ritz value of M^{-1}: at most 1 / lambda_min
    low = torch.where(inv_top > 0, 1.0 / inv_top, torch.full_like(inv_top, math.inf))
    return top, low


def _extremes(pg: PathGram, fact: Factorization, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``(lmax, lmin)`` of the extreme eigenvalues of the factorized ``M = h + shift I`` (0-d tensors):
    ``lmax`` from below, ``lmin`` from above, so ``lmax / lmin`` bounds the condition from below.

    ``"exact"``: all eigenvalues. Otherwise (``"estimate"``, ``"off"``) block Lanczos (``condition_estimate``)
    combined with the pivot bounds ``lambda_max >= max diag M`` and ``lambda_min <= min_i L_ii^2`` (the
    eigenvalues of the triangular ``L`` are its diagonal and lie between its extreme singular values). The
    pivot bounds alone are free but miss singular matrices (by up to 100x on rank-deficient 10 x 10 path
    grams), so the Lanczos estimate runs even when the condition is not logged.
    """
    if method == "exact":
        ev = torch.linalg.eigvalsh(pg.symmetric() if pg.factored else pg.h, UPLO="L") + fact.shift
        return ev[-1], ev[0]
    lmax = pg.diagonal().max() + fact.shift
    lmin = torch.diagonal(fact.L).min().square()
    top, low = _lanczos_extremes(pg, fact)
    return torch.maximum(lmax, top), torch.minimum(lmin, low)


def _ratio(lmax: torch.Tensor, lmin: torch.Tensor) -> torch.Tensor:
    return torch.where(lmin > 0, lmax / lmin, torch.full_like(lmax, math.inf))


def condition_estimate(
    pg: PathGram, fact: Factorization, block: int = 4, steps: int = 3, seed: int = 0
) -> torch.Tensor:
    """``lambda_max / lambda_min`` of the factorized matrix ``M = h + shift I``, estimated by block Lanczos.

    ``lambda_max`` comes from the block Krylov space of ``M`` (products with the symmetric ``h``), ``lambda_min``
    from that of ``M^{-1}`` (two triangular solves with the Cholesky factor per step; the Ritz matrix
    ``Q^T M^{-1} Q = Z^T Z`` with ``Z = L^{-1} Q``). Ritz values lie inside the spectrum, so the result is a lower
    bound of the condition number; with the defaults it came within 8% of the exact value on the path grams
    tried (P = 200-2000, nonnegative and centered inputs; tests check 20%). ``factorize`` combines it with the
    pivot bounds. Work: ``steps + 1`` products ``h V`` and ``2 steps + 1`` triangular solves with
    ``P x block (steps + 1)`` blocks, no host sync.

    Args:
        pg: the path gram, in any layout.
        fact: the factorization of ``M = h + fact.shift I`` (``fact.L`` read as its lower triangle).
        block: start vectors (the first all ones, the others from ``seed``).
        steps: Krylov steps.
        seed: seed of the random start vectors.

    Returns:
        The estimate, a float64 0-d tensor (``inf`` when the Ritz value of ``M^{-1}`` is not positive).
    """
    top, low = _lanczos_extremes(pg, fact, block, steps, seed)
    return torch.where(torch.isfinite(low), top / low, torch.full_like(top, math.inf))


def condition_exact(pg: PathGram, fact: Factorization) -> torch.Tensor:
    """``lambda_max / lambda_min`` of ``h + shift I`` from all eigenvalues.

    O(P^3), several times the work of the factorization, with P x P temporaries.

    Args:
        pg: the path gram, in any layout.
        fact: its factorization (only ``fact.shift`` is read).

    Returns:
        The condition number, a float64 0-d tensor, ``inf`` when the smallest eigenvalue is not positive.
    """
    return _ratio(*_extremes(pg, fact, "exact"))
