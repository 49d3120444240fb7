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

Memory: ``path_gram`` writes one P x P float64 matrix, the result, panel by panel: row block ``[a, b)`` of
``h`` starts from ``X X^T`` and is multiplied in place by ``A_l[a:b] A_l[:b]^T`` computed in float32 (exact
counts) into a reused panel buffer, never a P x P gate gram. ``factorize`` then works in that same buffer:
it mirrors ``H`` into the strict upper triangle, keeps the diagonal aside and overwrites the lower triangle
with the Cholesky factor (``cholesky_in_place``, blocked, ``P x 512`` temporaries), so ``H`` stays readable
for the condition estimate, the image and a retry with jitter. A measurement of the probe holds two P x P
float64 matrices: ``h`` and the cached ``X X^T`` of the fixed probe batch (at P = 10,000, 1.5 GiB).

``factorize`` also judges the condition: ``H`` counts as numerically singular when its float64 Cholesky
fails *or* its condition (block Lanczos and pivot bounds) exceeds ``1 / (P eps)``, where a float64 solve
has no reliable digit left; then ``H + delta * mean(diag H) * I`` is factorized, ``delta`` growing tenfold
from ``jitter_start``, until it factorizes with a resolvable condition. ``quadratic_form`` computes
``q = tr(Y^T M^{-1} Y)`` from the factor. ``condition_estimate`` gives ``lambda_max / lambda_min`` of the
factorized matrix by block Lanczos on ``H`` and on ``H^{-1}`` (Rayleigh-Ritz), a lower bound that costs a
fraction of one factorization.
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
    """``H = 2**exponent * h``, float64 P x P, in one of three layouts of the buffer ``h``:

    - full (``lower_only`` false, ``diag`` None): ``h`` holds all of ``H / 2^e``;
    - lower (``lower_only``, ``diag`` None): its lower triangle does (diagonal included; the CPU route multiplies
      the row ``blocks`` on and below the diagonal, whose diagonal blocks are filled on both sides);
    - factored (``diag`` set, by ``factorize``): the strict upper triangle holds ``H / 2^e`` (mirrored), ``diag``
      its diagonal, and the lower triangle the Cholesky factor of the factorized matrix.

    The methods read ``h`` in whichever layout it is.
    """

    h: torch.Tensor
    exponent: int
    lower_only: bool = False
    blocks: list[tuple[int, int]] = field(default_factory=list)
    diag: torch.Tensor | None = None

    @property
    def factored(self) -> bool:
        """True once ``factorize`` has put the Cholesky factor into the lower triangle of ``h``."""
        return self.diag is not None

    def diagonal(self) -> torch.Tensor:
        """The diagonal of ``h`` (of ``H / 2^e``) in any layout.

        Returns:
            ``P`` float64 values (a view or ``diag`` itself, not a copy).
        """
        return self.diag if self.diag is not None else torch.diagonal(self.h)

    def symmetric(self) -> torch.Tensor:
        """``h`` with both triangles filled.

        Returns:
            The symmetric ``P x P`` ``H / 2^e``: a new tensor unless the layout is full (then ``h`` itself).
        """
        if self.diag is not None:
            s = torch.triu(self.h, 1)
            s = s + s.T
            s.diagonal().copy_(self.diag)
            return s
        if not self.lower_only:
            return self.h
        return torch.tril(self.h) + torch.tril(self.h, -1).T

    def full(self) -> torch.Tensor:
        """``H`` itself.

        Returns:
            The symmetric ``P x P`` float64 ``H`` (infinite entries for very deep nets: use ``h`` and
            ``exponent`` there).
        """
        e = torch.tensor(self.exponent, dtype=torch.float64, device=self.h.device)
        return torch.ldexp(self.symmetric(), e)

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``h[rows[:, None], cols[None, :]]`` of the symmetric ``h``, read from the layout's triangle.

        Args:
            rows: row indices (1-D long tensor).
            cols: column indices (1-D long tensor).

        Returns:
            ``len(rows) x len(cols)`` entries of ``H / 2^e``.
        """
        r, c = rows[:, None], cols[None, :]
        if self.diag is not None:
            vals = self.h[torch.minimum(r, c), torch.maximum(r, c)]
            return torch.where(r == c, self.diag[rows][:, None], vals)
        if not self.lower_only:
            return self.h[r, c]
        return self.h[torch.maximum(r, c), torch.minimum(r, c)]

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``h @ V`` for the symmetric ``h``, blockwise from the triangle that holds it (temporaries of one
        block at a time).

        Args:
            V: a ``P x k`` float64 block on ``h``'s device.

        Returns:
            ``h V``, ``P x k``.
        """
        if self.diag is not None:
            P = self.h.shape[0]
            out = torch.zeros_like(V)
            for a, b in chunks(P):
                s = torch.triu(self.h[a:b, a:b], 1)
                s = s + s.T
                s.diagonal().copy_(self.diag[a:b])
                out[a:b] += s @ V[a:b]
                if b < P:  # rows a:b right of the diagonal block hold H; their mirror is the block below
                    R = self.h[a:b, b:]
                    out[a:b] += R @ V[b:]
                    out[b:] += R.T @ V[a:b]
            return out
        if not self.lower_only:
            return self.h @ V
        out = torch.zeros_like(V)
        for a, b in self.blocks:  # block row [a, b): its blocks left of and on the diagonal, as one panel
            out[a:b] += self.h[a:b, :b] @ V[:b]
            if a > 0:  # and their mirror images above the diagonal
                out[:a] += self.h[a:b, :a].T @ V[a:b]
        return out

    def mirror(self) -> None:
        """Copy the lower triangle into the strict upper one and keep the diagonal aside (``diag``): the layout
        ``factorize`` needs before it overwrites the lower triangle. Blockwise, no P x P temporary.

        Raises:
            ValueError: the layout is already factored.
        """
        if self.diag is not None:
            raise ValueError("path_gram: this path gram is already factored")
        h, P = self.h, self.h.shape[0]
        for a, b in chunks(P):
            D = h[a:b, a:b]
            D.copy_(torch.tril(D) + torch.tril(D, -1).T)
            _transpose_into(h, (a, b), (b, P), lower_to_upper=True)
        self.diag = torch.diagonal(h).clone()

    def restore_lower(self) -> None:
        """In the factored layout, overwrite the lower triangle (the factor) with ``H / 2^e`` again, from the
        strict upper triangle and ``diag``.

        Raises:
            ValueError: the layout is not factored.
        """
        if self.diag is None:
            raise ValueError("path_gram: restore_lower needs the factored layout")
        h, P = self.h, self.h.shape[0]
        for a, b in chunks(P):
            D = h[a:b, a:b]
            s = torch.triu(D, 1)
            s = s + s.T
            s.diagonal().copy_(self.diag[a:b])
            D.copy_(s)
            _transpose_into(h, (a, b), (b, P), lower_to_upper=False)


#: rows per block of the blockwise copies and products on the factored layout
CHUNK = 512
#: rows of one tile of the transposed copies (cache-friendly: tile by tile, a small clone each)
_TILE = 64


def _transpose_into(h: torch.Tensor, cols: tuple[int, int], rows: tuple[int, int], lower_to_upper: bool) -> None:
    """Mirror the block ``h[rows, cols]`` (below the diagonal) onto ``h[cols, rows]`` (above it), or back."""
    (a, b), (r0, r1) = cols, rows
    for r in range(r0, r1, _TILE):
        t = min(r + _TILE, r1)
        if lower_to_upper:
            h[a:b, r:t].copy_(h[r:t, a:b].T.clone())
        else:
            h[r:t, a:b].copy_(h[a:b, r:t].T.clone())


def chunks(P: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """``[(0, size), (size, 2 size), ..., (., P)]``.

    Args:
        P: rows.
        size: rows per chunk.

    Returns:
        Half-open ``(start, stop)`` ranges covering ``0:P``.
    """
    return [(a, min(a + size, P)) for a in range(0, P, size)]


def _pow2_at_least(n: int) -> int:
    """The smallest ``k`` with ``2**k >= n``."""
    return max(0, math.ceil(math.log2(n))) if n > 0 else 0


def row_blocks(P: int, device: torch.device) -> list[tuple[int, int]]:
    """Row blocks for symmetric products: on the CPU about ``P / 400`` of them (at most 8), one elsewhere.

    Args:
        P: rows.
        device: where the product runs.

    Returns:
        Half-open ``(start, stop)`` ranges of nearly equal size covering ``0:P``.
    """
    nb = 1 if device.type != "cpu" else max(1, min(8, P // 400))
    edges = [round(i * P / nb) for i in range(nb + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Workspace:
    """Buffers that ``path_gram`` reuses from one call to the next (P x P ones created zero-filled).

    Big fresh allocations cost page faults on every call; a probe that measures the same batch many times
    keeps one workspace. A ``PathGram`` computed with a workspace lives in it until the next call.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The ``n x n`` buffer ``name``: the one held if it matches, else a new zero-filled one.

        Args:
            name: the buffer's name.
            n: its size.
            dtype: its dtype.
            device: its device.

        Returns:
            The buffer, holding whatever the last user left in it.
        """
        buf = self.buffers.get(name)
        if buf is None or buf.shape != (n, n) or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.zeros(n, n, dtype=dtype, device=device)
        return buf

    def flat(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-d buffer of at least ``numel`` elements (uninitialised; grown when too small).

        Args:
            name: the buffer's name.
            numel: the elements needed.
            dtype: its dtype.
            device: its device.

        Returns:
            The buffer (possibly longer than ``numel``).
        """
        buf = self.buffers.get(name)
        if buf is None or buf.ndim != 1 or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf


def gram(M: torch.Tensor, dtype: torch.dtype = torch.float64, out: torch.Tensor | None = None,
         blocks: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, bool]:
    """``M M^T`` in ``dtype``, and whether only its lower triangle was computed.

    With several row ``blocks`` (default ``row_blocks``: on the CPU) only the blocks on and below the
    diagonal are multiplied, ``(nb + 1) / (2 nb)`` of the work of ``M @ M.T``; the blocks above keep what
    ``out`` held (zeros in a fresh buffer).

    Args:
        M: a ``P x n`` matrix.
        dtype: the precision of the product.
        out: a ``P x P`` buffer of that dtype to write into.
        blocks: row blocks (default ``row_blocks(P, M.device)``).

    Returns:
        ``(gram, lower_only)``.
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
    ``n <= 2^24``, float64 beyond), converted after.

    Args:
        A: a ``P x n`` 0/1 (or bool) matrix.
        workspace: reuse its ``lam32`` / ``lam64`` buffers.
        blocks: row blocks, as for ``gram``.

    Returns:
        ``(gram, lower_only)`` as for ``gram``, the gram in float64.
    """
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
    """``X X^T`` in float64 (``X`` flattened to P x d).

    Args:
        X: inputs, samples first.

    Returns:
        ``(gram, lower_only)`` as for ``gram``.
    """
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
    ``|s|`` (``max diag X X^T`` times the widths so far) leaves ``[2^-256, 2^256]``; the bound does not depend on
    the gates, so the whole sequence of operations is fixed first and then applied panel by panel.
    On the CPU the products are computed blockwise on and below the diagonal; the result then holds the lower
    triangle only (``PathGram.lower_only``). Each row block ``[a, b)`` is finished before the next: its panel
    ``h[a:b, :b]`` starts from ``X X^T`` and is multiplied in place by ``A_l[a:b] A_l[:b]^T`` (float32 counts,
    exact below 2^24 units, in a reused panel buffer), so no P x P gate gram is ever held: the result is the
    only P x P matrix written. ``xx``: ``input_gram(X)`` computed before (the probe batch is fixed, so a probe
    computes it once); it is not modified. ``workspace``: reuse its buffers (the result then lives in the
    workspace until the next call).

    Args:
        X: ``P x d`` inputs.
        gates: the ``L - 1`` gate matrices, each ``P x n_l``, bool or 0/1.
        bias: ``L`` flags, whether each Linear has a bias (default: none has).
        xx: ``input_gram(X)``, computed before.
        workspace: buffers to reuse.

    Returns:
        The ``PathGram`` (``h``, ``exponent`` and the layout).

    Raises:
        ValueError: ``X`` is not 2-D, the number of bias flags is not ``len(gates) + 1``, or a gate matrix is
            not ``P x n``.
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
    dev = X.device
    if xx is None:  # X X^T straight into the result buffer
        out = workspace.get("h", P, torch.float64, dev) if workspace is not None else None
        base, lower = gram(X.reshape(P, -1), torch.float64, out=out)
        h, copy_base = base, False
    else:
        base, lower = xx
        if tuple(base.shape) != (P, P) or base.dtype != torch.float64:
            raise ValueError(f"path_gram: xx must be the float64 {P} x {P} input gram, got {tuple(base.shape)}")
        h = (workspace.get("h", P, torch.float64, base.device) if workspace is not None
             else torch.zeros(P, P, dtype=torch.float64, device=base.device))
        copy_base = True
        dev = base.device
    blocks = row_blocks(P, dev) if lower else [(0, P)]
    dmax = float(torch.diagonal(base).max()) if P else 0.0
    if not math.isfinite(dmax):
        raise ValueError("path_gram: X X^T is not finite (inputs too large for float64, or NaN)")

    # the operations on s = 2^-e S, in order: ("add", c), ("scale", c), ("gate", l)
    ops: list[tuple[str, float | int]] = []
    e = 0
    bound = math.log2(dmax) if dmax > 0 else 0.0

    def rescale() -> None:
        nonlocal e, bound
        if abs(bound) > _LIMIT:
            m = int(round(bound))
            ops.append(("scale", math.ldexp(1.0, -m)))  # exact: a power of two
            e, bound = e + m, bound - m

    rescale()
    for l, A in enumerate(gates):
        if flags[l]:
            ops.append(("add", math.ldexp(1.0, -e)))
            bound = max(bound, -e) + 1.0
        ops.append(("gate", l))
        bound += math.log2(max(A.shape[1], 1))
        rescale()
    if flags[-1]:
        ops.append(("add", math.ldexp(1.0, -e)))

    mats = [A.detach().to(device=dev, dtype=torch.float32 if A.shape[1] <= EXACT_FLOAT32 else torch.float64)
            for A in gates]
    widest = max(((b - a) * b for a, b in blocks), default=0)

    def panel(name: str, dtype: torch.dtype, a: int, b: int) -> torch.Tensor:
        n = (b - a) * b
        buf = workspace.flat(name, widest, dtype, dev) if workspace is not None else torch.empty(n, dtype=dtype,
                                                                                                 device=dev)
        return buf[:n].view(b - a, b)

    widen = dev.type == "cpu"  # a float32 operand of an in-place float64 product costs a float64 copy on the CPU

    def wide_buffer(cols: int) -> torch.Tensor:
        n = _WIDEN_ROWS * cols
        buf = (workspace.flat("panel_wide", _WIDEN_ROWS * P, torch.float64, dev) if workspace is not None
               else torch.empty(n, dtype=torch.float64, device=dev))
        return buf[:n].view(_WIDEN_ROWS, cols)
    for a, b in blocks:
        hb = h[a:b, :b]
        if copy_base:
            hb.copy_(base[a:b, :b])
        for kind, v in ops:
            if kind == "add":
                hb.add_(v)
            elif kind == "scale":
                hb.mul_(v)
            else:
                M = mats[int(v)]
                lam = torch.matmul(M[a:b], M[:b].T, out=panel(f"panel_{M.dtype}", M.dtype, a, b))
                if widen and lam.dtype != torch.float64:  # widened a slice of rows at a time, in a reused buffer
                    wide = wide_buffer(b)
                    for r in range(0, b - a, _WIDEN_ROWS):
                        rows = min(_WIDEN_ROWS, b - a - r)
                        hb[r:r + rows].mul_(wide[:rows].copy_(lam[r:r + rows]))
                else:
                    hb.mul_(lam)
    return PathGram(h, e, lower, blocks)


# -- factorization -------------------------------------------------------------------------------

#: rows of a float32 gate-gram panel widened to float64 and multiplied into the result at a time (on the CPU
#: the mixed-dtype in-place product would make a fresh float64 copy of the whole operand)
_WIDEN_ROWS = 128

#: columns per step of the blocked in-place Cholesky factorization
CHOLESKY_BLOCK = 512


@dataclass
class Factorization:
    """Cholesky factor ``L`` of ``M = H + jitter * mean(diag H) * I`` (``jitter`` relative, 0 when none), read
    from its lower triangle (the strict upper triangle may hold other data: ``factorize`` keeps ``H`` there).

    ``singular``: ``H`` itself was numerically singular (its factorization failed, or its condition exceeded
    ``1 / rcond``), so the jitter route was taken. ``condition``: ``lambda_max / lambda_min`` of ``M`` as
    ``factorize`` judged it (a 0-d float64 tensor; see ``factorize`` for the method), None from ``cholesky_jitter``.
    """

    L: torch.Tensor
    jitter: float
    shift: float  # the absolute value added to the diagonal
    singular: bool = False
    condition: torch.Tensor | None = None


def cholesky_jitter(M: torch.Tensor, jitter_start: float = 1e-12, jitter_max: float = 1e-2,
                    who: str = "pathgram") -> Factorization:
    """Cholesky of the float64 SPD matrix ``M`` (a new factor; ``M`` unchanged); on failure add
    ``delta * mean(diag M)`` to the diagonal, ``delta = jitter_start, 10 jitter_start, ...`` up to ``jitter_max``.
    ``factorize`` is the in-place route of the probe, which also judges the condition.

    Args:
        M: a symmetric positive semi-definite matrix.
        jitter_start: the first relative shift tried.
        jitter_max: the largest relative shift tried.
        who: the name that error messages start with.

    Returns:
        The ``Factorization`` (``singular`` when a shift was needed; ``condition`` None).

    Raises:
        ValueError: the mean diagonal is not positive and finite, or no shift up to ``jitter_max`` factorizes.
    """
    M = M.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return Factorization(L, 0.0, 0.0)
    scale = float(torch.diagonal(M).mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{who}: the matrix has mean diagonal {scale}; it is not positive definite "
                         "(all inputs zero, or non-finite values)")
    delta = jitter_start
    while delta <= jitter_max * (1 + 1e-9):
        shifted = M.clone()
        shifted.diagonal().add_(delta * scale)
        L, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            return Factorization(L, delta, delta * scale, singular=True)
        delta *= 10.0
    raise ValueError(f"{who}: Cholesky failed even with jitter {jitter_max:g} * mean(diag); the matrix is "
                     "not positive semi-definite (non-finite values?)")


def cholesky_in_place(h: torch.Tensor, block: int = CHOLESKY_BLOCK) -> int:
    """Overwrite the lower triangle (diagonal included) of the square float64 ``h`` with the Cholesky factor of
    the symmetric matrix that triangle holds; the strict upper triangle is neither read nor written.

    Blocked left-looking Cholesky (``block`` columns per step): ``torch.linalg.cholesky_ex`` of each diagonal
    block after its ``addmm`` update, then one triangular solve for the panel below it. Temporaries: one
    ``P x block`` panel.

    Args:
        h: a square float64 matrix whose lower triangle holds a symmetric matrix; overwritten in place.
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


def _extremes(pg: PathGram, fact: Factorization, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``(lmax, lmin)`` of the extreme eigenvalues of the factorized ``M = h + shift I`` (0-d tensors):
    ``lmax`` from below, ``lmin`` from above, so ``lmax / lmin`` bounds the condition from below.

    ``"exact"``: all eigenvalues. Otherwise (``"estimate"``, ``"off"``) block Lanczos (``condition_estimate``)
    combined with the pivot bounds ``lambda_max >= max diag M`` and ``lambda_min <= min_i L_ii^2`` (the
    eigenvalues of the triangular ``L`` are its diagonal and lie between its extreme singular values). The
    pivot bounds alone are free but miss singular matrices (by up to 100x on rank-deficient 10 x 10 path
    grams), so the Lanczos estimate runs even when the condition is not logged: a few percent of the
    factorization at large P.
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


def factorize(pg: PathGram, jitter_start: float = 1e-12, jitter_max: float = 1e-2, condition: str = "estimate",
              rcond: float | None = None, block: int = CHOLESKY_BLOCK, who: str = "pathgram") -> Factorization:
    """Cholesky factorization of ``H`` in ``pg``'s own buffer, treating a numerically singular ``H`` as singular.

    ``pg`` is put in the factored layout (``PathGram.mirror``: ``H`` mirrored into the strict upper triangle,
    its diagonal kept aside) and its lower triangle overwritten by the factor (``cholesky_in_place``): no second
    P x P matrix. Then the condition of the factorized matrix is judged (``condition``: ``"estimate"`` and
    ``"off"`` block Lanczos combined with the pivot bounds ``max diag H / min L_ii^2``, ``"exact"`` all
    eigenvalues, with P x P temporaries). ``H`` is *numerically singular* when the factorization
    fails or its condition exceeds ``1 / rcond`` (default ``rcond = P * eps``, float64's ``eps = 2.2e-16``: the
    tolerance of ``numpy.linalg.matrix_rank``, beyond which ``H^{-1} Y`` has no reliable digit). Then
    ``H + delta * mean(diag H) * I`` is factorized instead, ``delta`` growing tenfold from ``jitter_start``
    (skipping ahead to the smallest shift whose condition bound ``(lambda_max + s) / s`` fits, with
    ``lambda_max`` from block Lanczos on ``H``, so one retry usually suffices), until it
    factorizes with a condition within ``1 / rcond``, at most ``jitter_max``; past that the last successful
    factorization is returned (still flagged), and an error is raised when none succeeded.

    Args:
        pg: the path gram; its buffer is overwritten (factored layout).
        jitter_start: the first relative shift tried.
        jitter_max: the largest relative shift tried.
        condition: ``"estimate"``, ``"exact"`` or ``"off"``.
        rcond: reciprocal of the largest condition accepted (default ``P eps``).
        block: columns per step of ``cholesky_in_place``.
        who: the name that error messages start with.

    Returns:
        The ``Factorization`` (``L`` is ``pg.h``, read as its lower triangle) with ``jitter``, ``shift``,
        ``singular`` and ``condition`` (the lower bound just described, of the matrix finally factorized).

    Raises:
        ValueError: an unknown ``condition``, a mean diagonal that is not positive and finite, or no shift up
            to ``jitter_max`` factorizes.
    """
    if condition not in ("estimate", "exact", "off"):
        raise ValueError(f"{who}: condition must be 'estimate', 'exact' or 'off', got {condition!r}")
    h = pg.h
    P = h.shape[0]
    tol = P * torch.finfo(torch.float64).eps if rcond is None else float(rcond)
    limit = 1.0 / tol
    if pg.factored:  # factorized before: start again from H
        pg.restore_lower()
    else:
        pg.mirror()
    scale = float(pg.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{who}: the matrix has mean diagonal {scale}; it is not positive definite "
                         "(all inputs zero, or non-finite values)")
    delta, singular, first = 0.0, False, True
    while True:
        if not first:
            pg.restore_lower()
        first = False
        shift = delta * scale
        if shift:
            torch.diagonal(h).add_(shift)
        ok: Factorization | None = None
        if cholesky_in_place(h, block) == 0:
            ok = Factorization(h, delta, shift, singular)
            lmax, lmin = _extremes(pg, ok, condition)
            ok.condition = _ratio(lmax, lmin)
            if float(ok.condition) <= limit:
                return ok
            ok.singular = singular = True
            # lambda_min(H + s I) >= s: the smallest s with (lambda_max(H) + s) / s <= limit / 2, as a step of delta
            need = 2.0 * max(float(lmax) - shift, 0.0) / max(limit - 2.0, 1.0) / scale
        else:  # size the shift from lambda_max(H), read from H above the diagonal (the failure left it intact)
            singular = True
            top = max(float(_lanczos_top(pg)), float(pg.diagonal().max()))
            need = 2.0 * top / max(limit - 2.0, 1.0) / scale
            need = need if math.isfinite(need) else 0.0
        delta = jitter_start if delta == 0 else delta * 10.0
        while delta < need:
            delta *= 10.0
        if delta > jitter_max * (1 + 1e-9):
            if ok is not None:
                return ok
            raise ValueError(f"{who}: Cholesky failed even with jitter {jitter_max:g} * mean(diag); the matrix is "
                             "not positive semi-definite (non-finite values?)")


# -- quadratic form ------------------------------------------------------------------------------

def quadratic_form(fact: Factorization, Y: torch.Tensor) -> torch.Tensor:
    """``tr(Y^T M^{-1} Y) = ||L^{-1} Y||_F^2`` from the factorization of ``M``.

    Args:
        fact: the factorization of ``M``.
        Y: ``P`` values or a ``P x C`` matrix.

    Returns:
        A 0-d float64 tensor.
    """
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


def _lanczos_extremes(pg: PathGram, fact: Factorization, block: int = 4, steps: int = 3,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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


def condition_estimate(pg: PathGram, fact: Factorization, block: int = 4, steps: int = 3,
                       seed: int = 0) -> torch.Tensor:
    """``lambda_max / lambda_min`` of the factorized matrix ``M = h + shift I``, as a float64 0-d tensor.

    Block Lanczos (Rayleigh-Ritz on a block Krylov space with full reorthogonalization): ``lambda_max``
    from the space of ``M`` (products with the symmetric ``h``), ``lambda_min`` from the space of ``M^{-1}``
    (two triangular solves with the Cholesky factor per step; the Ritz matrix ``Q^T M^{-1} Q = Z^T Z`` with
    ``Z = L^{-1} Q``). ``block`` start vectors (the first all ones), ``steps`` Krylov steps. Ritz values lie
    inside the spectrum, so the result is a lower bound of the condition number; with the defaults it came
    within 8% of the exact value on the path grams tried (P = 200-2000, nonnegative and centered inputs;
    tests check 20%). ``factorize`` combines it with the pivot bounds (``_extremes``).
    Cost: ``steps + 1``
    products ``h V`` and ``2 steps + 1`` triangular solves with ``P x block (steps + 1)`` blocks, no host sync.

    Args:
        pg: the path gram, factored by ``factorize``.
        fact: its factorization.
        block: start vectors.
        steps: Krylov steps.
        seed: seed of the random start vectors.

    Returns:
        A 0-d float64 tensor, ``inf`` when the smallest Ritz value is not positive.
    """
    top, low = _lanczos_extremes(pg, fact, block, steps, seed)
    return torch.where(torch.isfinite(low), top / low, torch.full_like(top, math.inf))


def condition_exact(pg: PathGram, fact: Factorization) -> torch.Tensor:
    """``lambda_max / lambda_min`` of ``h + shift I`` from all eigenvalues (float64; O(P^3), several times the
    cost of the factorization, and P x P temporaries).

    Args:
        pg: the path gram (any layout).
        fact: its factorization (for the shift).

    Returns:
        A 0-d float64 tensor, ``inf`` when the smallest eigenvalue is not positive.
    """
    return _ratio(*_extremes(pg, fact, "exact"))


# -- brute force -----------------------------------------------------------------------------------

def enumerate_paths(x: np.ndarray, gates: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                    biases: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Every input-to-output path of a Linear->gate chain, listed one by one (a reference for tests).

    ``x`` P x d, ``gates[l]`` P x n_{l+1} (0/1), ``weights[k]`` the ``out x in`` matrix of Linear ``k+1``,
    ``biases[k]`` its bias or None. A path starts at an input coordinate ``i`` or at a unit ``j`` of a
    layer whose Linear has a bias, visits one unit per later hidden layer, and ends at the output layer
    (a path's value is a vector over the C outputs; the output bias is one path of length zero).

    Args:
        x: ``P x d`` inputs.
        gates: ``L - 1`` gate matrices, ``P x n_l`` (0/1).
        weights: the ``L`` weight matrices, ``out x in``.
        biases: the ``L`` biases, or None where a Linear has none.

    Returns:
        ``(Phi, V)``: ``Phi`` (P x #paths: the start value ``x_i`` or 1 times the gates crossed) and ``V``
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
