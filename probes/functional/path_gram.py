"""Path-gram mathematics (seed 000; Lakshminarayanan & Singh 2020, "Neural path features and neural path kernel").

A fully connected chain ``x -> Linear_1 -> gate_1 -> ... -> gate_{L-1} -> Linear_L`` with 0/1 gate
matrices ``A_l`` (``P x n_l``, ``A_l[i, j] = 1`` when unit ``j`` of hidden layer ``l`` is open for sample ``i``)
writes its output as a sum over input-to-output paths, ``f(x) = sum_p phi_p(x) v_p``: ``phi_p(x)`` is the
input coordinate the path starts from (1 for a path starting at a bias) times the product of the gates it
crosses, and ``v_p`` the product of the weights along it. The neural path kernel ``H = Phi Phi^T`` is

    bias-free:   H = (X X^T) * prod_l lambda_l,      lambda_l = A_l A_l^T   (elementwise products)
    with biases: S_0 = X X^T,  S_l = (S_{l-1} + b_l) * lambda_l,  H = S_{L-1} + b_L,

``b_k = 1`` when Linear ``k`` has a bias (the bias of layer ``k`` starts paths at layer ``k``), else 0.

Numerics: ``lambda_l`` counts units active for two samples, small integers that float32 products
hold exactly (below 2^24); they are converted to float64 for the Hadamard products. ``H`` itself (about
``(n/2)^{L-1} |x|^2``) overflows float32 at moderate depth (depth 20 width 1000: ~1e57) and float64 beyond
depth ~100 at width 1000, so the running product is divided by a power of two (exact) whenever a bound of
its magnitude leaves ``[2^-256, 2^256]``: ``path_gram`` returns ``h`` and the exponent ``e`` with
``H = 2^e h`` up to float64 rounding of the products themselves, finite for any depth and width.

On the CPU the symmetric products are computed blockwise on and below the diagonal only, which saves
up to half of the work as BLAS ``syrk`` would (``gram``); the matrices then hold their lower triangle only,
all that the Cholesky factorization reads.

``quadratic_form`` computes ``q = tr(Y^T M^{-1} Y)`` by a float64 Cholesky factorization, adding
``delta * mean(diag M) * I`` with ``delta`` growing tenfold from ``jitter_start`` when ``M`` is singular.
``condition_estimate`` gives ``lambda_max / lambda_min`` of the factorized matrix by block Lanczos on ``H``
and on ``H^{-1}`` (Rayleigh-Ritz), a lower bound that costs a fraction of one factorization.
``enumerate_paths`` lists every path explicitly (the brute-force reference of the tests).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

#: float32 holds every integer count exactly up to this width
EXACT_FLOAT32 = 2 ** 24


@dataclass
class PathGram:
    """``H = 2**exponent * h`` with ``h`` float64 P x P; when ``lower_only`` only the lower triangle of ``h``
    (diagonal included) holds values: the CPU route multiplies the row ``blocks`` on and below the diagonal."""

    h: torch.Tensor
    exponent: int
    lower_only: bool = False
    blocks: list[tuple[int, int]] = field(default_factory=list)

    def symmetric(self) -> torch.Tensor:
        """``h`` with both triangles filled."""
        if not self.lower_only:
            return self.h
        return torch.tril(self.h) + torch.tril(self.h, -1).T

    def full(self) -> torch.Tensor:
        """``H`` itself (float64; overflows for very deep nets: use ``h`` and ``exponent`` there)."""
        e = torch.tensor(self.exponent, dtype=torch.float64, device=self.h.device)
        return torch.ldexp(self.symmetric(), e)

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``h[rows[:, None], cols[None, :]]`` read from the lower triangle."""
        r, c = rows[:, None], cols[None, :]
        if not self.lower_only:
            return self.h[r, c]
        return self.h[torch.maximum(r, c), torch.minimum(r, c)]

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``h @ V`` for the symmetric ``h``, from the blocks on and below the diagonal (each diagonal block
        is filled on both sides)."""
        if not self.lower_only:
            return self.h @ V
        out = torch.zeros_like(V)
        for a, b in self.blocks:  # block row [a, b): its blocks left of and on the diagonal, as one panel
            out[a:b] += self.h[a:b, :b] @ V[:b]
            if a > 0:  # and their mirror images above the diagonal
                out[:a] += self.h[a:b, :a].T @ V[a:b]
        return out


def _pow2_at_least(n: int) -> int:
    """The smallest ``k`` with ``2**k >= n``."""
    return max(0, math.ceil(math.log2(n))) if n > 0 else 0


def row_blocks(P: int, device: torch.device) -> list[tuple[int, int]]:
    """Row blocks for symmetric products: on the CPU about ``P / 400`` of them (at most 8), one elsewhere."""
    nb = 1 if device.type != "cpu" else max(1, min(8, P // 400))
    edges = [round(i * P / nb) for i in range(nb + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Workspace:
    """P x P buffers that ``path_gram`` reuses from one call to the next (created zero-filled).

    Big fresh allocations cost page faults on every call; a probe that measures the same batch many times
    keeps one workspace. A ``PathGram`` computed with a workspace lives in it until the next call.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] != n or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.zeros(n, n, dtype=dtype, device=device)
        return buf


def gram(M: torch.Tensor, dtype: torch.dtype = torch.float64, out: torch.Tensor | None = None,
         blocks: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, bool]:
    """``M M^T`` in ``dtype``, and whether only its lower triangle was computed.

    With several row ``blocks`` (default ``row_blocks``: on the CPU) only the blocks on and below the
    diagonal are multiplied, ``(nb + 1) / (2 nb)`` of the work of ``M @ M.T``; the blocks above keep what
    ``out`` held (zeros in a fresh buffer). ``out``: a P x P buffer of that dtype.
    """
    m = M.detach().to(dtype)
    P = m.shape[0]
    blocks = row_blocks(P, m.device) if blocks is None else blocks
    if len(blocks) <= 1:
        return (m @ m.T if out is None else torch.matmul(m, m.T, out=out)), False
    if out is None:
        out = torch.zeros(P, P, dtype=dtype, device=m.device)
    for i, (a, b) in enumerate(blocks):
        for c, d in blocks[:i + 1]:
            torch.matmul(m[a:b], m[c:d].T, out=out[a:b, c:d])
    return out, True


def gate_gram(A: torch.Tensor, workspace: Workspace | None = None,
              blocks: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, bool]:
    """``A A^T`` for a 0/1 matrix ``A`` (P x n) as exact float64 counts: products in float32 (exact while
    ``n <= 2^24``, float64 beyond), converted after; ``(gram, lower_only)`` as for ``gram``."""
    dtype = torch.float32 if A.shape[1] <= EXACT_FLOAT32 else torch.float64
    if workspace is None:
        lam, lower = gram(A, dtype, blocks=blocks)
        return lam.to(torch.float64), lower
    P, dev = A.shape[0], A.device
    if dtype == torch.float64:
        return gram(A, dtype, workspace.get("lam64", P, torch.float64, dev), blocks)
    lam, lower = gram(A, dtype, workspace.get("lam32", P, torch.float32, dev), blocks)
    return workspace.get("lam64", P, torch.float64, dev).copy_(lam), lower


def input_gram(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``X X^T`` in float64 (``X`` flattened to P x d); ``(gram, lower_only)`` as for ``gram``."""
    return gram(X.reshape(X.shape[0], -1), torch.float64)


#: rescale the running product once its magnitude bound leaves [2^-LIMIT, 2^LIMIT]
_LIMIT = 256


def path_gram(X: torch.Tensor, gates: Sequence[torch.Tensor], bias: Sequence[bool] | None = None,
              xx: tuple[torch.Tensor, bool] | None = None, workspace: Workspace | None = None) -> PathGram:
    """The neural path kernel of a Linear->gate chain, rescaled: ``H = 2**e h``.

    ``X``: P x d inputs; ``gates``: the L-1 gate matrices (bool or 0/1, P x n_l) in order;
    ``bias``: L flags, ``bias[k]`` true when Linear ``k+1`` has a bias (default: none has).
    Recursion ``S_0 = X X^T``, ``S_l = (S_{l-1} + b_l) * A_l A_l^T``, ``H = S_{L-1} + b_L`` on
    ``s = 2^{-e} S``, where ``e`` grows by a power of two (an exact rescaling) whenever a bound of
    ``|s|`` (``max diag X X^T`` times the widths so far) leaves ``[2^-256, 2^256]``.
    On the CPU the products are computed blockwise on and below the diagonal (``gram``); the result then
    holds the lower triangle only (``PathGram.lower_only``). ``xx``: ``input_gram(X)`` computed before
    (the probe batch is fixed, so a probe computes it once); it is not modified. ``workspace``: reuse its
    buffers (the result then lives in the workspace until the next call).
    """
    if X.ndim != 2:
        raise ValueError(f"path_gram: X must be P x d, got shape {tuple(X.shape)}")
    P = X.shape[0]
    L = len(gates) + 1
    flags = [False] * L if bias is None else [bool(b) for b in bias]
    if len(flags) != L:
        raise ValueError(f"path_gram: {len(gates)} gate matrices need {L} bias flags, got {len(flags)}")
    for l, A in enumerate(gates, start=1):
        if A.ndim != 2 or A.shape[0] != P:
            raise ValueError(f"path_gram: gate matrix {l} must be {P} x n, got shape {tuple(A.shape)}")
    base, lower = input_gram(X) if xx is None else xx
    if tuple(base.shape) != (P, P) or base.dtype != torch.float64:
        raise ValueError(f"path_gram: xx must be the float64 {P} x {P} input gram, got {tuple(base.shape)}")
    blocks = row_blocks(P, base.device) if lower else [(0, P)]
    dmax = float(torch.diagonal(base).max()) if P else 0.0
    if not math.isfinite(dmax):
        raise ValueError("path_gram: X X^T is not finite (inputs too large for float64, or NaN)")
    e = 0
    bound = math.log2(dmax) if dmax > 0 else 0.0
    s = base
    owned = xx is None  # the first operation on a cached input gram writes a new tensor

    def fresh() -> torch.Tensor | None:
        return workspace.get("h", P, torch.float64, base.device) if workspace is not None else None

    def mul(t) -> None:
        nonlocal s, owned
        if owned:
            s.mul_(t)
        else:
            buf = fresh()
            s = torch.mul(s, t) if buf is None else torch.mul(s, t, out=buf)
        owned = True

    def add(c: float) -> None:
        nonlocal s, owned
        if owned:
            s.add_(c)
        else:
            buf = fresh()
            s = torch.add(s, c) if buf is None else torch.add(s, c, out=buf)
        owned = True

    def rescale() -> None:
        nonlocal e, bound
        if abs(bound) > _LIMIT:
            m = int(round(bound))
            mul(math.ldexp(1.0, -m))  # exact: a power of two
            e, bound = e + m, bound - m

    rescale()
    for l, A in enumerate(gates):
        if flags[l]:
            add(math.ldexp(1.0, -e))
            bound = max(bound, -e) + 1.0
        mul(gate_gram(A, workspace, blocks)[0])
        bound += math.log2(max(A.shape[1], 1))
        rescale()
    if flags[-1]:
        add(math.ldexp(1.0, -e))
    if not owned:
        buf = fresh()
        s = s.clone() if buf is None else buf.copy_(s)
    return PathGram(s, e, lower, blocks)


# -- quadratic form ------------------------------------------------------------------------------

@dataclass
class Factorization:
    """Cholesky factor ``L`` of ``M + jitter * mean(diag M) * I`` (``jitter`` relative, 0 when none)."""

    L: torch.Tensor
    jitter: float
    shift: float  # the absolute value added to the diagonal


def cholesky_jitter(M: torch.Tensor, jitter_start: float = 1e-12, jitter_max: float = 1e-2,
                    who: str = "pathgram") -> Factorization:
    """Cholesky of the float64 SPD matrix ``M``; on failure add ``delta * mean(diag M)`` to the diagonal,
    ``delta = jitter_start, 10 jitter_start, ...`` up to ``jitter_max``."""
    M = M.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return Factorization(L, 0.0, 0.0)
    scale = float(torch.diagonal(M).mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{who}: the matrix has mean diagonal {scale}; it is not positive definite "
                         "(all inputs zero, or non-finite values)")
    delta = jitter_start
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    while delta <= jitter_max * (1 + 1e-9):
        L, info = torch.linalg.cholesky_ex(M + (delta * scale) * eye)
        if int(info) == 0:
            return Factorization(L, delta, delta * scale)
        delta *= 10.0
    raise ValueError(f"{who}: Cholesky failed even with jitter {jitter_max:g} * mean(diag); the matrix is "
                     "not positive semi-definite (non-finite values?)")


def quadratic_form(fact: Factorization, Y: torch.Tensor) -> torch.Tensor:
    """``tr(Y^T M^{-1} Y) = ||L^{-1} Y||_F^2`` (float64 0-d tensor) from the factorization of ``M``."""
    Y = Y.to(device=fact.L.device, dtype=torch.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    Z = torch.linalg.solve_triangular(fact.L, Y, upper=False)
    return (Z * Z).sum()


def _orth(V: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(V).Q.contiguous()


def _krylov_basis(apply, V0: torch.Tensor, steps: int) -> torch.Tensor:
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


def condition_estimate(pg: PathGram, fact: Factorization, block: int = 4, steps: int = 3,
                       seed: int = 0) -> torch.Tensor:
    """``lambda_max / lambda_min`` of the factorized matrix ``M = h + shift I``, as a float64 0-d tensor.

    Block Lanczos (Rayleigh-Ritz on a block Krylov space with full reorthogonalization): ``lambda_max``
    from the space of ``M`` (products with the symmetric ``h``), ``lambda_min`` from the space of ``M^{-1}``
    (two triangular solves with the Cholesky factor per step; the Ritz matrix ``Q^T M^{-1} Q = Z^T Z`` with
    ``Z = L^{-1} Q``). ``block`` start vectors (the first all ones), ``steps`` Krylov steps. Ritz values lie
    inside the spectrum, so the result is a lower bound of the condition number; with the defaults it came
    within 8% of the exact value on the path grams tried (P = 200-2000, nonnegative and centered inputs;
    tests check 20%).
    Cost: ``steps + 1``
    products ``h V`` and ``2 steps + 1`` triangular solves with ``P x block (steps + 1)`` blocks, no host sync.
    """
    Lf = fact.L
    P = Lf.shape[0]
    k = max(1, min(block, P // (steps + 1) or 1))
    g = torch.Generator(device="cpu").manual_seed(seed)
    V0 = torch.randn(P, k, generator=g, dtype=torch.float64).to(Lf.device)
    V0[:, 0] = 1.0

    def apply(V: torch.Tensor) -> torch.Tensor:
        W = pg.matmul(V)
        return W + fact.shift * V if fact.shift else W

    def apply_inverse(V: torch.Tensor) -> torch.Tensor:
        Z = torch.linalg.solve_triangular(Lf, V, upper=False)
        return torch.linalg.solve_triangular(Lf.T, Z, upper=True)

    def largest(T: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh((T + T.T) / 2)[-1]

    Q = _krylov_basis(apply, V0, steps)
    top = largest(Q.T @ apply(Q))
    Q = _krylov_basis(apply_inverse, V0, steps)
    Z = torch.linalg.solve_triangular(Lf, Q, upper=False)
    inv_top = largest(Z.T @ Z)  # the largest Ritz value of M^{-1}: at most 1 / lambda_min
    return torch.where(inv_top > 0, top * inv_top, torch.full_like(top, math.inf))


def condition_exact(pg: PathGram, fact: Factorization) -> torch.Tensor:
    """``lambda_max / lambda_min`` of ``h + shift I`` from all eigenvalues (float64, lower triangle; O(P^3),
    several times the cost of the factorization). ``inf`` when the smallest eigenvalue is not positive."""
    ev = torch.linalg.eigvalsh(pg.h, UPLO="L") + fact.shift
    return torch.where(ev[0] > 0, ev[-1] / ev[0], torch.full_like(ev[-1], math.inf))


# -- brute force -----------------------------------------------------------------------------------

def enumerate_paths(x: np.ndarray, gates: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                    biases: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Every input-to-output path of a Linear->gate chain, listed one by one (a reference for tests).

    ``x`` P x d, ``gates[l]`` P x n_{l+1} (0/1), ``weights[k]`` the ``out x in`` matrix of Linear ``k+1``,
    ``biases[k]`` its bias or None. A path starts at an input coordinate ``i`` or at a unit ``j`` of a
    layer whose Linear has a bias, visits one unit per later hidden layer, and ends at the output layer
    (a path's value is a vector over the C outputs; the output bias is one path of length zero).
    Returns ``Phi`` (P x #paths: the start value ``x_i`` or 1 times the gates crossed) and ``V``
    (#paths x C: the product of the weights along the path, times the bias for bias paths), so that
    ``Phi @ V`` is the network output and ``Phi @ Phi.T`` the path gram.
    """
    P, d = x.shape
    L = len(weights)
    widths = [w.shape[0] for w in weights]  # out sizes: n_1 .. n_{L-1}, C
    C = widths[-1]
    phis: list[np.ndarray] = []
    values: list[np.ndarray] = []
    # start layer 0 = inputs; start layer k >= 1 = the bias of Linear k (units of layer k, or outputs if k == L)
    for start in range(L + 1):
        if start > 0 and biases[start - 1] is None:
            continue
        hidden_from = max(start, 1)  # hidden layers visited: hidden_from .. L-1
        start_units = range(d) if start == 0 else range(widths[start - 1])
        if start == L:  # the output bias: one path of length zero, its value the bias vector
            phis.append(np.ones(P))
            values.append(np.asarray(biases[L - 1], dtype=np.float64).copy())
            continue
        later = [range(widths[l - 1]) for l in range(start + 1, L)]  # hidden layers after the start
        for s in start_units:
            for rest in itertools.product(*later):
                units = (s, *rest) if start > 0 else rest  # unit per hidden layer from hidden_from
                phi = x[:, s].astype(np.float64).copy() if start == 0 else np.ones(P)
                val = 1.0 if start == 0 else float(biases[start - 1][s])
                prev = s
                for offset, j in enumerate(units):
                    layer = hidden_from + offset  # hidden layer index (1-based)
                    phi = phi * gates[layer - 1][:, j]
                    if not (start > 0 and offset == 0):  # the bias path starts at unit j: no weight into it
                        val *= float(weights[layer - 1][j, prev])
                    prev = j
                v = np.array([val * float(weights[L - 1][o, prev]) for o in range(C)])
                phis.append(phi)
                values.append(v)
    return np.stack(phis, axis=1), np.stack(values, axis=0)
