"""Eigen statistics of a symmetric positive semi-definite matrix (a kernel), in float64.

- eigenvalues ``lambda_1 <= ... <= lambda_P`` by ``torch.linalg.eigvalsh`` of ``(K + K^T) / 2`` in float64;
- ``trace = sum_k lambda_k`` (taken from the diagonal, exact), ``eig_max``, ``eig_min`` (for a singular
  kernel a rounding-level number, possibly slightly negative);
- condition number ``lambda_max / lambda_min``, ``inf`` when ``lambda_min <= P eps lambda_max`` (numerically
  singular: the smallest eigenvalue is rounding noise);
- effective rank ``exp(H(p))``, ``p_k = max(lambda_k, 0) / sum_k max(lambda_k, 0)``, ``H`` the Shannon entropy
  (Roy & Vetterli 2007): 1 for a rank-one kernel, ``P`` for a multiple of the identity;
- alignment with labels: centered alignment ``rho(K, Y Y^T)`` (Cortes, Mohri & Rostamizadeh 2012), through
  ``probes.functional.alignment.alignment``;
- distance between two kernels ``1 - <A, B>_F / (||A||_F ||B||_F)`` (the NTK "distance from init"; clamped
  at 0 against rounding);
- matrix-free, for kernels too large to hold: the ``k`` largest eigenvalues from products ``K V`` only
  (``top_eigenvalues``: block Krylov with full reorthogonalisation and Rayleigh-Ritz, float64), and the effective
  rank bracketed from those plus the exact trace (``effective_rank_bounds``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from probes.functional.alignment import alignment as _centered_alignment


@dataclass
class Spectrum:
    """Eigenvalues (ascending, float64) and the statistics derived from them (0-d float64 tensors).

    Attributes:
        eigenvalues: all eigenvalues, ascending.
        trace: their sum.
        eig_max: the largest.
        eig_min: the smallest.
        condition: ``eig_max / eig_min`` (inf when the matrix is numerically singular).
        effective_rank: ``exp`` of the entropy of the normalised non-negative eigenvalues.
    """

    eigenvalues: torch.Tensor
    trace: torch.Tensor
    eig_max: torch.Tensor
    eig_min: torch.Tensor
    condition: torch.Tensor
    effective_rank: torch.Tensor

    def top(self, k: int) -> torch.Tensor:
        """The ``k`` largest eigenvalues, largest first.

        Args:
            k: how many.

        Returns:
            At most ``k`` eigenvalues (float64), descending.
        """
        return self.eigenvalues.flip(0)[:k]


def _as_symmetric(K, who: str, rtol: float = 1e-6) -> torch.Tensor:
    if not isinstance(K, torch.Tensor):
        K = torch.as_tensor(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"{who}: need a non-empty square matrix, got shape {tuple(K.shape)}")
    if K.is_complex():
        raise TypeError(f"{who}: the matrix is complex; kernels here are real")
    K = K.to(torch.float64)
    norms = torch.stack(
        [torch.linalg.vector_norm(K - K.T), torch.linalg.vector_norm(K), (~torch.isfinite(K)).any().double()]
    ).tolist()
    if norms[2]:
        raise ValueError(f"{who}: the matrix contains NaN or infinite values")
    if norms[0] > rtol * norms[1]:
        raise ValueError(f"{who}: the matrix is not symmetric (||K - K^T|| / ||K|| = {norms[0] / norms[1]:.3g})")
    return (K + K.T) / 2


def eigenvalues(K: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric matrix ``K`` in ascending order (float64).

    Args:
        K: a symmetric ``n x n`` matrix (tensor or array-like); ``(K + K^T) / 2`` is decomposed.

    Returns:
        ``n`` eigenvalues, ascending, float64 on ``K``'s device.

    Raises:
        TypeError: ``K`` is complex.
        ValueError: ``K`` is empty, not square, not symmetric (relative tolerance 1e-6), or has NaN or infinite
            entries.
    """
    return torch.linalg.eigvalsh(_as_symmetric(K, "eigenvalues"))


def effective_rank(eigs: torch.Tensor) -> torch.Tensor:
    """``exp(entropy(lambda / sum lambda))`` of non-negative eigenvalues (negatives count as 0).

    Args:
        eigs: eigenvalues, any order.

    Returns:
        A 0-d float64 tensor: 1 for rank one, ``n`` for equal eigenvalues, 0 when none is positive.
    """
    lam = eigs.to(torch.float64).clamp(min=0)
    total = lam.sum()
    p = lam / torch.where(total > 0, total, torch.ones_like(total))
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return torch.where(total > 0, torch.exp(h), torch.zeros_like(h))


def condition_number(eigs: torch.Tensor) -> torch.Tensor:
    """``lambda_max / lambda_min``; ``inf`` when ``lambda_min <= n eps lambda_max`` (numerically singular).

    Args:
        eigs: ``n`` eigenvalues, any order.

    Returns:
        A 0-d float64 tensor.
    """
    lam = eigs.to(torch.float64)
    lo, hi = lam.min(), lam.max()
    floor = lam.numel() * torch.finfo(torch.float64).eps * hi.abs()
    return torch.where(lo > floor, hi / torch.where(lo > 0, lo, torch.ones_like(lo)), torch.full_like(hi, float("inf")))


def spectrum(K: torch.Tensor) -> Spectrum:
    """Eigenvalues and statistics of the symmetric PSD matrix ``K`` (float64, on ``K``'s device).

    Args:
        K: a symmetric ``n x n`` matrix.

    Returns:
        The ``Spectrum``: eigenvalues (ascending), trace, largest and smallest eigenvalue, condition number,
        effective rank.

    Raises:
        TypeError: ``K`` is complex.
        ValueError: ``K`` is empty, not square, not symmetric (relative tolerance 1e-6), or has NaN or infinite
            entries.
    """
    S = _as_symmetric(K, "spectrum")
    lam = torch.linalg.eigvalsh(S)
    return Spectrum(lam, torch.diagonal(S).sum(), lam[-1], lam[0], condition_number(lam), effective_rank(lam))


def label_alignment(K: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Centered alignment of the ``P x P`` kernel ``K`` with ``Y Y^T`` (``Y`` P x C, e.g. +-1 labels or one-hot).

    ``<Kc, (YY^T)c>_F / (||Kc||_F ||(YY^T)c||_F)``.

    Args:
        K: a ``P x P`` kernel.
        Y: labels, ``P`` rows (more than 2-D: flattened per row).

    Returns:
        A 0-d float64 tensor.

    Raises:
        ValueError: ``Y`` does not have ``P`` rows, and the errors of ``probes.functional.alignment.alignment``.
        DegenerateKernelError: constant labels, or a kernel that centers to zero.
    """
    Y = Y.to(torch.float64).reshape(Y.shape[0], -1)
    if Y.shape[0] != K.shape[0]:
        raise ValueError(f"label_alignment: {Y.shape[0]} label rows for a {K.shape[0]} x {K.shape[1]} kernel")
    Y = Y.to(K.device)
    return _centered_alignment(K.to(torch.float64), Y @ Y.T)


def kernel_distance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``1 - <A, B>_F / (||A||_F ||B||_F)`` (0 for proportional kernels; in [0, 1] for PSD kernels).

    Args:
        A: a kernel.
        B: a kernel of the same shape.

    Returns:
        A 0-d float64 tensor on ``A``'s device, clamped at 0 against rounding.

    Raises:
        ValueError: the shapes differ.
    """
    if A.shape != B.shape:
        raise ValueError(f"kernel_distance: shapes {tuple(A.shape)} and {tuple(B.shape)} differ")
    a, b = A.reshape(-1).to(torch.float64), B.reshape(-1).to(torch.float64).to(A.device)
    cos = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return (1.0 - cos).clamp(min=0.0)  # rounding can push the cosine of equal kernels just above 1


@dataclass
class TopEigen:
    """The ``k`` largest eigenvalues (descending, float64), Ritz vectors (n x k), residual norms
    ``||K u - theta u||``, whether every one met the tolerance, and the number of products ``K v`` used.

    Attributes:
        values: the eigenvalues, descending.
        vectors: the Ritz vectors, ``n x k``.
        residuals: ``||K u - theta u||`` of each.
        converged: whether every residual met the tolerance.
        products: the number of products ``K v`` used.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    products: int


def _ritz_accepted(theta: torch.Tensor, res: torch.Tensor, kk: int, n: int, tol: float) -> bool:
    """Whether the top ``kk`` Ritz pairs meet ``min(r_j, r_j^2 / delta_j) <= tol * max(|theta_j|, n eps
    theta_max)`` (Kato-Temple; ``delta_j`` the gap from ``theta_j`` to the nearest other Ritz value)."""
    m, eps = theta.numel(), torch.finfo(torch.float64).eps
    gaps = torch.full((kk,), float("inf"), dtype=torch.float64, device=theta.device)
    if m > 1:
        diffs = (theta[:kk, None] - theta[None, :]).abs()
        idx = torch.arange(kk, device=theta.device)
        diffs[idx, idx] = float("inf")
        gaps = diffs.min(dim=1).values
    bound = torch.minimum(res, res * res / gaps.clamp(min=1e-300))
    floor = torch.clamp(theta[:kk].abs(), min=n * eps * float(theta.abs().max()))
    return bool((bound <= tol * floor).all())


def top_eigenvalues(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int,
    *,
    block: int | None = None,
    tol: float = 1e-10,
    max_basis: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> TopEigen:
    """The ``k`` largest eigenvalues of a symmetric ``n x n`` matrix given only ``V -> K V`` (float64).

    Block Krylov (block Lanczos with full reorthogonalisation; Golub & Underwood 1977, Musco & Musco 2015):
    the basis ``V = orth[Q, K Q, K^2 Q, ...]`` of a random ``n x b`` start ``Q`` grows one block per product;
    each step the Rayleigh-Ritz pairs ``(theta_j, u_j)`` of ``V^T K V`` (kept products, no extra ``K V``) are
    tested by their residuals ``r_j = ||K u_j - theta_j u_j||``: ``theta_j`` is within ``r_j`` of an eigenvalue,
    and within ``r_j^2 / delta_j`` (Kato-Temple; ``delta_j`` the gap to the next Ritz value), so a pair is
    accepted when ``min(r_j, r_j^2 / delta_j) <= tol * max(|theta_j|, n eps theta_max)``.
    Stops when all ``k`` are accepted, the basis reaches ``n`` (then exact) or ``max_basis`` columns
    (default ``min(n, max(300, 20 b))``; ``converged=False``). Block ``b`` default ``max(4, ceil(k / 2))``.
    Memory: ``2 n max_basis`` numbers.

    Args:
        matmat: ``V -> K V`` for an ``n x b`` float64 block ``V`` (e.g. ``NTKOperator.matmat``).
        n: the matrix size.
        k: how many eigenvalues (at most ``n``).
        block: ``b``, columns per product.
        tol: relative accuracy at which a Ritz value is accepted.
        max_basis: largest basis, in columns.
        device: where the basis lives (default: the CPU).
        seed: seed of the random start block.

    Returns:
        ``TopEigen``: the values (descending), Ritz vectors, residual norms, whether all met ``tol``, and the
        number of products.

    Raises:
        ValueError: ``k < 1`` or ``n < 1``.
    """
    if k < 1 or n < 1:
        raise ValueError(f"top_eigenvalues: need k >= 1 and n >= 1, got k={k}, n={n}")
    k = min(k, n)
    b = min(n, int(block) if block else max(4, (k + 1) // 2))
    cap = min(n, int(max_basis) if max_basis else max(300, 20 * b))
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64).to(device))[0]
    basis, images = [Q], [matmat(Q).to(torch.float64)]
    products = b
    eps = torch.finfo(torch.float64).eps
    while True:
        V, AV = torch.cat(basis, 1), torch.cat(images, 1)
        H = V.T @ AV
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        theta, S = theta.flip(0), S.flip(1)
        m = theta.numel()
        kk = min(k, m)
        U = V @ S[:, :kk]
        res = torch.linalg.vector_norm(AV @ S[:, :kk] - U * theta[:kk], dim=0)
        top = float(theta.abs().max())
        ok = _ritz_accepted(theta, res, kk, n, tol) and kk == k
        exhausted = m >= n
        if ok or exhausted or m >= cap:
            return TopEigen(theta[:k], U[:, :k], res[:k], ok or exhausted, products)
        W = images[-1]
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            W = W - V @ (V.T @ W)
        Qn, R = torch.linalg.qr(W)
        keep = R.diagonal().abs() > n * eps * max(top, 1e-300)
        if not bool(keep.any()):  # an invariant subspace: the Ritz values are exact
            return TopEigen(theta[:k], U[:, :k], res[:k], True, products)
        Qn = Qn[:, keep][:, : cap - m]
        basis.append(Qn)
        images.append(matmat(Qn).to(torch.float64))
        products += Qn.shape[1]


def effective_rank_bounds(top: torch.Tensor, trace: float | torch.Tensor, n: int) -> tuple[float, float, float]:
    """``(estimate, lower, upper)`` of the effective rank ``exp(H(lambda / tr))`` from the ``k`` largest
    eigenvalues and the exact trace of an ``n x n`` PSD matrix.

    The ``n - k`` unknown eigenvalues lie in ``[0, lambda_k]`` and sum to ``R = tr - sum top``. Entropy is
    concave, so it is largest when the tail is flat (``R / (n - k)`` each: the upper bound) and smallest when the
    tail is packed into as few eigenvalues as possible (``floor(R / lambda_k)`` copies of ``lambda_k`` and the
    rest in one: the lower bound). The estimate is the geometric mean of the two, within a factor
    ``sqrt(upper / lower)`` of the truth; all three agree when ``k = n`` or the tail is empty.

    Args:
        top: the ``k`` largest eigenvalues (negatives count as 0).
        trace: the exact trace.
        n: the matrix size.

    Returns:
        ``(estimate, lower, upper)`` as floats; all 0 when the trace is not positive.
    """
    lam = top.to(torch.float64).clamp(min=0).flatten().tolist()
    T = float(trace)
    if T <= 0 or not lam:
        return 0.0, 0.0, 0.0
    head = -sum(v / T * math.log(v / T) for v in lam if v > 0)
    R = max(T - sum(lam), 0.0)
    m = n - len(lam)
    if m <= 0 or R <= 0:
        h = math.exp(head)
        return h, h, h
    r, a = R / T, min(lam) / T
    hi = head - r * math.log(r / m)
    if a <= 0:
        lo = hi
    else:
        j = min(m, math.floor(r / a))
        rest = r - j * a
        lo = head - (j * a * math.log(a) if j else 0.0) - (rest * math.log(rest) if rest > 0 else 0.0)
    lo, hi = math.exp(min(lo, hi)), math.exp(hi)
    return math.sqrt(lo * hi), lo, hi


__all__ = [
    "TopEigen",
    "top_eigenvalues",
    "effective_rank_bounds",
    "Spectrum",
    "eigenvalues",
    "effective_rank",
    "condition_number",
    "spectrum",
    "label_alignment",
    "kernel_distance",
]


# -- symmetric indefinite operators (the Hessian): Lanczos and stochastic Lanczos quadrature -------------------
@dataclass
class LanczosRun:
    """One Lanczos run on a symmetric operator ``A`` from a unit start ``q_1`` (float64).

    ``T = Q^T A Q`` is tridiagonal with ``alpha`` on its diagonal and ``beta`` beside it (a 0 where the run broke
    down and restarted orthogonally: ``T`` is then block diagonal). Its eigenpairs ``(theta_j, s_j)`` are the Ritz
    pairs; ``|beta_m s_{m j}|`` bounds ``||A Q s_j - theta_j Q s_j||`` (Paige 1971), and ``s_{1 j}^2`` are the
    quadrature weights of the spectral measure of ``q_1`` (Golub & Meurant 1994).

    Attributes:
        alpha: ``(m,)`` diagonal of ``T``.
        beta: ``(m - 1,)`` off-diagonal of ``T``.
        last: ``beta_m``, the norm of the residual after the last step (0 when the basis spans an invariant space).
        products: the products ``A v`` used.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    last: torch.Tensor
    products: int

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta, S)``: the eigenvalues of ``T`` (ascending) and its eigenvectors (columns)."""
        T = torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)
        return torch.linalg.eigh(T)

    def residuals(self, S: torch.Tensor) -> torch.Tensor:
        """``|beta_m s_{m j}|``: the residual norm of each Ritz pair."""
        return (self.last * S[-1, :]).abs()


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``w`` minus its projection on the columns of ``Q``, twice (classical Gram-Schmidt, full reorthogonalisation;
    Parlett 1980, "twice is enough")."""
    for _ in range(2):
        w = w - Q @ (Q.T @ w)
    return w


def _unit_start(n: int, generator: torch.Generator, device: torch.device | str | None) -> torch.Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    return v / torch.linalg.vector_norm(v)


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    steps: int,
    *,
    done: Callable[[LanczosRun], bool] | None = None,
    generator: torch.Generator | None = None,
) -> LanczosRun:
    """Lanczos with full reorthogonalisation on a symmetric operator ``v -> A v`` (float64), from ``start``.

    Each step ``w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}`` is orthogonalised against every kept ``q`` (twice),
    so ``Q`` stays orthonormal to rounding and the Ritz values carry no ghost copies. When ``beta_j`` falls to
    rounding (an invariant subspace: fewer distinct eigenvalues in reach than steps), the run goes on from a random
    unit vector orthogonal to ``Q`` with ``beta_j = 0``, so repeated eigenvalues are found too. Memory: ``n x
    steps`` numbers.

    Args:
        matvec: ``v -> A v`` for a float64 vector ``v`` of length ``n``.
        start: ``q_1`` (normalised here).
        steps: the most steps (at most ``n``).
        done: called with the run so far after each step while it has at most 16 steps, then every ``m // 16``
            steps (so that its ``m x m`` eigen-decompositions cost less than the products); True stops it.
        generator: draws the restart vectors (default: seed 0).

    Returns:
        A ``LanczosRun``.
    """
    n = start.numel()
    steps = max(1, min(int(steps), n))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    Q = torch.empty(n, steps, dtype=torch.float64, device=start.device)
    alpha: list[torch.Tensor] = []
    beta: list[torch.Tensor] = []
    q = start.to(torch.float64) / torch.linalg.vector_norm(start.to(torch.float64))
    norm = torch.zeros((), dtype=torch.float64, device=start.device)
    run = LanczosRun(alpha=q.new_zeros(0), beta=q.new_zeros(0), last=norm, products=0)
    for j in range(steps):
        Q[:, j] = q
        w = matvec(q).to(torch.float64)
        a = torch.dot(q, w)
        alpha.append(a)
        w = _orthogonalise(w, Q[:, : j + 1])
        b = torch.linalg.vector_norm(w)
        norm = torch.maximum(norm, a.abs() + b)
        run = LanczosRun(torch.stack(alpha), torch.stack(beta) if beta else q.new_zeros(0), b, j + 1)
        if j + 1 == steps or (done is not None and (j + 1) % max(1, (j + 1) // 16) == 0 and done(run)):
            break
        if b <= n * torch.finfo(torch.float64).eps * norm:  # invariant subspace: go on orthogonally
            w = _orthogonalise(_unit_start(n, generator, start.device), Q[:, : j + 1])
            beta.append(torch.zeros((), dtype=torch.float64, device=start.device))
            q = w / torch.linalg.vector_norm(w)
        else:
            beta.append(b)
            q = w / b
    return run


@dataclass
class Extremes:
    """The ``k`` largest eigenvalues (descending) and the smallest of a symmetric operator, from one Lanczos run.

    Attributes:
        top: ``(k,)`` float64, descending.
        min: the smallest (most negative) eigenvalue, 0-d float64.
        converged: whether every one met the tolerance.
        run: the Lanczos run (its Ritz values and weights give one sample of the spectral density).
    """

    top: torch.Tensor
    min: torch.Tensor
    converged: bool
    run: LanczosRun


def extreme_eigenvalues(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int,
    *,
    tol: float = 1e-8,
    max_steps: int | None = None,
    min_steps: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Extremes:
    """The ``k`` largest and the smallest eigenvalue of a symmetric (indefinite) ``n x n`` operator from products
    ``A v`` only: Lanczos with full reorthogonalisation (``lanczos``) in float64 from a Gaussian start.

    A Ritz value ``theta_j`` lies within its residual ``r_j = |beta_m s_{m j}|`` of an eigenvalue (and within
    ``r_j^2 / delta_j``, ``delta_j`` the gap to the other Ritz values; Kato-Temple), so the run stops once the ``k``
    largest and the smallest Ritz values each have ``min(r_j, r_j^2 / delta_j) <= tol * max_j |theta_j|``, or the
    basis reaches ``n`` (exact) or ``max_steps`` (default ``min(n, max(100, 10 k))``; ``converged=False``). A
    repeated eigenvalue may show once: like every Krylov method, the run sees one copy per start vector until the
    others appear through restarts.

    Args:
        matvec: ``v -> A v`` for a float64 vector of length ``n``.
        n: the size.
        k: how many of the largest (at most ``n``).
        tol: relative accuracy at which the Ritz values are accepted.
        max_steps: the most steps.
        min_steps: at least this many steps (more Ritz values for a density), at most ``n``.
        seed: the start vector's and the restarts' generator seed.
        device: where the vectors live.

    Returns:
        ``Extremes``.
    """
    k = max(1, min(int(k), n))
    max_steps = min(n, max_steps if max_steps is not None else max(100, 10 * k))
    min_steps = min(int(min_steps), max_steps)
    generator = torch.Generator().manual_seed(seed)
    start = _unit_start(n, generator, device)

    def accepted(run: LanczosRun) -> bool:
        if run.products < max(k + 1, min_steps):
            return False
        theta, S = run.ritz()
        return bool(_accepted(theta, run.residuals(S), k, tol).all())

    run = lanczos(matvec, start, max_steps, done=accepted, generator=generator)
    theta, S = run.ritz()
    ok = bool(_accepted(theta, run.residuals(S), k, tol).all()) or run.products == n
    m = theta.numel()
    return Extremes(theta.flip(0)[: min(k, m)], theta[0], ok, run)


def _accepted(theta: torch.Tensor, r: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Whether the ``k`` largest and the smallest Ritz values meet ``min(r, r^2 / gap) <= tol * max |theta|``."""
    m = theta.numel()
    scale = theta.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    gaps = torch.full_like(theta, float("inf"))
    if m > 1:
        d = theta[1:] - theta[:-1]
        gaps[:-1] = d
        gaps[1:] = torch.minimum(gaps[1:], d)
    bound = torch.minimum(r, r * r / gaps.clamp_min(torch.finfo(torch.float64).tiny))
    which = torch.cat([theta.new_zeros(1, dtype=torch.long), torch.arange(max(0, m - k), m, device=theta.device)])
    return bound[which] <= tol * scale


@dataclass
class Quadrature:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Ubaru, Chen & Saad 2017): for each of ``V``
    start vectors ``v``, nodes ``theta_j`` (Ritz values) and weights ``s_{1 j}^2`` (summing to 1) such that
    ``v^T f(A) v / |v|^2 ~ sum_j w_j f(theta_j)``; averaged over the vectors, the spectral density
    ``phi(t) = (1/n) sum_i delta(t - lambda_i)``.

    Attributes:
        nodes: list of ``(m_v,)`` float64 Ritz values, one per start vector.
        weights: list of ``(m_v,)`` float64 weights.
    """

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]

    @classmethod
    def of_runs(cls, runs: list[LanczosRun]) -> Quadrature:
        """The nodes and weights of Lanczos runs (each from a unit start vector)."""
        nodes, weights = [], []
        for run in runs:
            theta, S = run.ritz()
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
        return cls(nodes, weights)

    def all_nodes(self) -> torch.Tensor:
        """Every Ritz value of every vector (for a histogram)."""
        return torch.cat(self.nodes)


def slq_runs(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    steps: int,
    vectors: int,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[LanczosRun]:
    """``vectors`` Lanczos runs of ``steps`` steps from Rademacher start vectors (the SLQ samples), float64.

    Args:
        matvec: ``v -> A v``.
        n: the size.
        steps: Lanczos steps per vector (at most ``n``).
        vectors: how many start vectors.
        seed: their generator's seed.
        device: where the vectors live.

    Returns:
        The runs, one per vector.
    """
    generator = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(vectors):
        v = (torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1).to(device)
        runs.append(lanczos(matvec, v, steps, generator=generator))
    return runs


def spectral_density(quadrature: Quadrature, grid: torch.Tensor, width: float) -> torch.Tensor:
    """The smoothed spectral density on ``grid``: ``phi(t) = mean_v sum_j w_j N(t; theta_j, width^2)``
    (Ghorbani et al. 2019, eq. 4; a Gaussian kernel of standard deviation ``width``). Integrates to 1.

    Args:
        quadrature: SLQ nodes and weights.
        grid: ``(G,)`` points ``t``.
        width: the Gaussian's standard deviation (> 0).

    Returns:
        ``(G,)`` float64 densities.
    """
    grid = grid.to(torch.float64)
    total = torch.zeros_like(grid)
    for theta, w in zip(quadrature.nodes, quadrature.weights):
        z = (grid[:, None] - theta.to(grid.device)[None, :]) / width
        total += (torch.exp(-0.5 * z * z) * w.to(grid.device)[None, :]).sum(dim=1)
    return total / (len(quadrature.nodes) * width * math.sqrt(2 * math.pi))


def density_grid(quadrature: Quadrature, points: int = 512, width: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid over the Ritz values (padded by ``5 width`` of their range on both sides) and the SLQ density on it,
    the Gaussian's standard deviation ``width`` times the range (PyHessian's choice, relative).

    Args:
        quadrature: SLQ nodes and weights.
        points: grid points.
        width: the Gaussian's standard deviation, relative to the range of the Ritz values.

    Returns:
        ``(grid, density)``, float64.
    """
    nodes = quadrature.all_nodes()
    lo, hi = nodes.min(), nodes.max()
    span = torch.clamp(hi - lo, min=max(float(hi.abs()), 1.0) * 1e-6)
    sigma = width * span
    grid = torch.linspace(float(lo - 5 * sigma), float(hi + 5 * sigma), points, dtype=torch.float64)
    return grid, spectral_density(quadrature, grid, float(sigma))
