"""The neural path kernel of a Linear->gate chain, computed panel by panel in one P x P float64 buffer.

Source: Lakshminarayanan & Singh 2020, "Neural path features and neural path kernel". A fully connected chain
``x -> Linear_1 -> gate_1 -> ... -> gate_{L-1} -> Linear_L`` with 0/1 gate matrices ``A_l`` (``P x n_l``,
``A_l[i, j] = 1`` when unit ``j`` of hidden layer ``l`` is open for sample ``i``) writes its output as a sum over
input-to-output paths, ``f(x) = sum_p phi_p(x) v_p``: ``phi_p(x)`` is the input coordinate the path starts from
(1 for a path starting at a bias) times the product of the gates it crosses, and ``v_p`` the product of the
weights along it. The neural path kernel ``H = Phi Phi^T`` is::

    bias-free:   H = (X X^T) * prod_l lambda_l,      lambda_l = A_l A_l^T   (elementwise products)
    with biases: S_0 = X X^T,  S_l = (S_{l-1} + b_l) * lambda_l,  H = S_{L-1} + b_L,

``b_k = 1`` when Linear ``k`` has a bias (the bias of layer ``k`` starts paths at layer ``k``), else 0.

Numerics: ``lambda_l`` counts units active for two samples, small integers that float32 products hold exactly
(below 2^24); they are converted to float64 for the Hadamard products. ``H`` itself (about
``(n/2)^{L-1} |x|^2``) overflows float32 at moderate depth (depth 20 width 1000: ~1e57) and float64 beyond
depth ~100 at width 1000, so the running product is divided by a power of two (exact) whenever a bound of its
magnitude leaves ``[2^-256, 2^256]``: ``path_gram`` returns ``h`` and the exponent ``e`` with ``H = 2^e h`` up to
float64 rounding of the products themselves, finite for any depth and width.

On the CPU the symmetric products are computed blockwise on and below the diagonal only, which saves up to half
of the work as BLAS ``syrk`` would (``gram``); the matrices then hold their lower triangle only, all that the
Cholesky factorization reads.

Memory: ``path_gram`` writes one P x P float64 matrix, the result, panel by panel: row block ``[a, b)`` of ``h``
starts from ``X X^T`` and is multiplied in place by ``A_l[a:b] A_l[:b]^T`` computed in float32 (exact counts)
into a reused panel buffer, never a P x P gate gram.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from probes.functional.pathgram.layout import PathGram

#: float32 holds every integer count exactly up to this width
EXACT_FLOAT32 = 2**24
#: rescale the running product once its magnitude bound leaves [2^-LIMIT, 2^LIMIT]
_LIMIT = 256
#: rows of a float32 gate-gram panel widened to float64 and multiplied into the result at a time (on the CPU
#: the mixed-dtype in-place product would make a fresh float64 copy of the whole operand)
_WIDEN_ROWS = 128


def row_blocks(P: int, device: torch.device) -> list[tuple[int, int]]:
    """Row blocks for symmetric products: on the CPU about ``P / 400`` of them (at most 8), one elsewhere.

    Args:
        P: the number of rows.
        device: where the product is computed.

    Returns:
        Consecutive ranges ``[(0, b_1), (b_1, b_2), ..., (., P)]`` of about equal size.
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
        """The square buffer ``name``, created zero-filled when missing or of another shape, dtype or device.

        Args:
            name: the buffer's key.
            n: rows and columns.
            dtype: its dtype.
            device: its device.

        Returns:
            An ``n x n`` tensor that keeps what the previous user of ``name`` wrote in it.
        """
        buf = self.buffers.get(name)
        if buf is None or buf.shape != (n, n) or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.zeros(n, n, dtype=dtype, device=device)
        return buf

    def flat(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-d buffer of at least ``numel`` elements (uninitialised; grown when too small).

        Args:
            name: the buffer's key.
            numel: the least number of elements.
            dtype: its dtype.
            device: its device.

        Returns:
            A 1-d tensor of ``numel`` elements or more.
        """
        buf = self.buffers.get(name)
        if buf is None or buf.ndim != 1 or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf


def gram(
    M: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    out: torch.Tensor | None = None,
    blocks: list[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, bool]:
    """``M M^T`` in ``dtype``, and whether only its lower triangle was computed.

    With several row ``blocks`` only the blocks on and below the diagonal are multiplied, ``(nb + 1) / (2 nb)``
    of the work of ``M @ M.T``; the blocks above keep what ``out`` held (zeros in a fresh buffer).

    Args:
        M: a P x d matrix (detached and converted to ``dtype``).
        dtype: the dtype of the products and of the result.
        out: a P x P buffer of that dtype to write into (default: a new one).
        blocks: row blocks (default ``row_blocks``: several on the CPU, one elsewhere).

    Returns:
        ``(gram, lower_only)``: the P x P product and whether only its lower triangle holds it.
    """
    m = M.detach().to(dtype)
    P = m.shape[0]
    blocks = row_blocks(P, m.device) if blocks is None else blocks
    if len(blocks) <= 1:
        return (m @ m.T if out is None else torch.matmul(m, m.T, out=out)), False
    if out is None:
        out = torch.zeros(P, P, dtype=dtype, device=m.device)
    for i, (a, b) in enumerate(blocks):
        for c, d in blocks[: i + 1]:
            torch.matmul(m[a:b], m[c:d].T, out=out[a:b, c:d])
    return out, True


def gate_gram(
    A: torch.Tensor, workspace: Workspace | None = None, blocks: list[tuple[int, int]] | None = None
) -> tuple[torch.Tensor, bool]:
    """``lambda = A A^T`` for a 0/1 matrix ``A`` as exact float64 counts.

    The products are done in float32 (exact while ``n <= 2^24``, float64 beyond) and converted after.

    Args:
        A: a P x n 0/1 (or bool) gate matrix.
        workspace: reuse its buffers ``lam32`` and ``lam64`` (the result then lives in the workspace).
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
    """``X X^T`` in float64, ``X`` flattened to P x d.

    Args:
        X: P samples of any shape ``(P, ...)``.

    Returns:
        ``(gram, lower_only)`` as for ``gram``.
    """
    return gram(X.reshape(X.shape[0], -1), torch.float64)


def path_gram(
    X: torch.Tensor,
    gates: Sequence[torch.Tensor],
    bias: Sequence[bool] | None = None,
    xx: tuple[torch.Tensor, bool] | None = None,
    workspace: Workspace | None = None,
) -> PathGram:
    """The neural path kernel of a Linear->gate chain, rescaled: ``H = 2**e h``.

    Recursion ``S_0 = X X^T``, ``S_l = (S_{l-1} + b_l) * A_l A_l^T``, ``H = S_{L-1} + b_L`` on ``s = 2^{-e} S``,
    where ``e`` grows by a power of two (an exact rescaling) whenever a bound of ``|s|`` (``max diag X X^T`` times
    the widths so far) leaves ``[2^-256, 2^256]``; the bound does not depend on the gates, so the whole sequence
    of operations is fixed first and then applied panel by panel. On the CPU the products are computed blockwise
    on and below the diagonal; the result then holds the lower triangle only (``PathGram.lower_only``). Each row
    block ``[a, b)`` is finished before the next: its panel ``h[a:b, :b]`` starts from ``X X^T`` and is
    multiplied in place by ``A_l[a:b] A_l[:b]^T`` (float32 counts, exact below 2^24 units, in a reused panel
    buffer), so no P x P gate gram is ever held: the result is the only P x P matrix written.

    Args:
        X: P x d inputs.
        gates: the L-1 gate matrices (bool or 0/1, P x n_l) in order.
        bias: L flags, ``bias[k]`` true when Linear ``k+1`` has a bias (default: none has).
        xx: ``input_gram(X)`` computed before (the probe batch is fixed, so a probe computes it once); it is
            not modified.
        workspace: reuse its buffers (the result then lives in the workspace until the next call).

    Returns:
        The ``PathGram`` ``(h, e)`` with ``H = 2^e h``, in the full or the lower layout.

    Raises:
        ValueError: ``X`` is not 2-d, the number of bias flags is not ``len(gates) + 1``, a gate matrix is not
            ``P x n``, ``xx`` is not the float64 P x P input gram, or ``X X^T`` is not finite.
    """
    flags = _checked_flags(X, gates, bias)
    P = X.shape[0]
    h, base, lower, copy_base = _start(X, xx, workspace)
    dev = base.device
    blocks = row_blocks(P, dev) if lower else [(0, P)]
    dmax = float(torch.diagonal(base).max()) if P else 0.0
    if not math.isfinite(dmax):
        raise ValueError("path_gram: X X^T is not finite (inputs too large for float64, or NaN)")
    ops, e = _operations(dmax, [A.shape[1] for A in gates], flags)
    mats = [
        A.detach().to(device=dev, dtype=torch.float32 if A.shape[1] <= EXACT_FLOAT32 else torch.float64) for A in gates
    ]
    panels = _Panels(workspace, dev, max(((b - a) * b for a, b in blocks), default=0), P)
    for a, b in blocks:
        hb = h[a:b, :b]
        if copy_base:
            hb.copy_(base[a:b, :b])
        _apply(hb, ops, mats, a, b, panels)
    return PathGram(h, e, lower, blocks)


def _checked_flags(X: torch.Tensor, gates: Sequence[torch.Tensor], bias: Sequence[bool] | None) -> list[bool]:
    """The ``L`` bias flags, after checking the shapes of ``X`` and the gate matrices."""
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
    return flags


def _start(
    X: torch.Tensor, xx: tuple[torch.Tensor, bool] | None, workspace: Workspace | None
) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """``(h, base, lower, copy_base)``: the result buffer, the input gram ``X X^T`` (written straight into ``h``
    when it is not given), its layout, and whether each panel starts by copying it."""
    P = X.shape[0]
    if xx is None:  # X X^T straight into the result buffer
        out = workspace.get("h", P, torch.float64, X.device) if workspace is not None else None
        base, lower = gram(X.reshape(P, -1), torch.float64, out=out)
        return base, base, lower, False
    base, lower = xx
    if tuple(base.shape) != (P, P) or base.dtype != torch.float64:
        raise ValueError(f"path_gram: xx must be the float64 {P} x {P} input gram, got {tuple(base.shape)}")
    h = (
        workspace.get("h", P, torch.float64, base.device)
        if workspace is not None
        else torch.zeros(P, P, dtype=torch.float64, device=base.device)
    )
    return h, base, lower, True


def _operations(dmax: float, widths: list[int], flags: list[bool]) -> tuple[list[tuple[str, float | int]], int]:
    """The operations on ``s = 2^-e S`` in order, ``("add", c)``, ``("scale", c)``, ``("gate", l)``, and the final
    ``e``: a power-of-two rescaling (exact) whenever the bound ``log2 max|s|`` (``max diag X X^T`` times the
    widths so far) leaves ``[-_LIMIT, _LIMIT]``."""
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
    for l, n in enumerate(widths):
        if flags[l]:
            ops.append(("add", math.ldexp(1.0, -e)))
            bound = max(bound, -e) + 1.0
        ops.append(("gate", l))
        bound += math.log2(max(n, 1))
        rescale()
    if flags[-1]:
        ops.append(("add", math.ldexp(1.0, -e)))
    return ops, e


class _Panels:
    """The reused buffers of the row-block products: a gate-gram panel per dtype and, on the CPU, a float64 slice
    that widens a float32 panel a few rows at a time (a float32 operand of an in-place float64 product costs a
    float64 copy there)."""

    def __init__(self, workspace: Workspace | None, dev: torch.device, widest: int, P: int) -> None:
        self.workspace, self.dev, self.widest, self.P = workspace, dev, widest, P
        self.widen = dev.type == "cpu"

    def panel(self, name: str, dtype: torch.dtype, a: int, b: int) -> torch.Tensor:
        n = (b - a) * b
        buf = (
            self.workspace.flat(name, self.widest, dtype, self.dev)
            if self.workspace is not None
            else torch.empty(n, dtype=dtype, device=self.dev)
        )
        return buf[:n].view(b - a, b)

    def wide(self, cols: int) -> torch.Tensor:
        n = _WIDEN_ROWS * cols
        buf = (
            self.workspace.flat("panel_wide", _WIDEN_ROWS * self.P, torch.float64, self.dev)
            if self.workspace is not None
            else torch.empty(n, dtype=torch.float64, device=self.dev)
        )
        return buf[:n].view(_WIDEN_ROWS, cols)


def _apply(
    hb: torch.Tensor, ops: list[tuple[str, float | int]], mats: list[torch.Tensor], a: int, b: int, panels: _Panels
) -> None:
    """The operations on the row block ``h[a:b, :b]``, in place: adds, exact rescalings and the products by
    ``A_l[a:b] A_l[:b]^T``."""
    for kind, v in ops:
        if kind == "add":
            hb.add_(v)
        elif kind == "scale":
            hb.mul_(v)
        else:
            M = mats[int(v)]
            lam = torch.matmul(M[a:b], M[:b].T, out=panels.panel(f"panel_{M.dtype}", M.dtype, a, b))
            if panels.widen and lam.dtype != torch.float64:  # widened a slice of rows at a time, in a reused buffer
                wide = panels.wide(b)
                for r in range(0, b - a, _WIDEN_ROWS):
                    rows = min(_WIDEN_ROWS, b - a - r)
                    hb[r : r + rows].mul_(wide[:rows].copy_(lam[r : r + rows]))
            else:
                hb.mul_(lam)
