"""What the path-gram buffers hold: ``PathGram`` (the kernel ``H = 2^e h`` in one of three layouts of one P x P
float64 buffer) and ``Factorization`` (a Cholesky factor read from a lower triangle).

The neural path kernel (Lakshminarayanan & Singh 2020, "Neural path features and neural path kernel") of a
Linear->gate chain is ``H = Phi Phi^T``, computed by ``kernel.path_gram`` as ``H = 2^e h`` so that ``h`` stays
finite at any depth. The one buffer ``h`` moves through three layouts:

- full: ``h`` holds all of ``H / 2^e`` (one row block, off the CPU);
- lower: its lower triangle does (the CPU route multiplies only the row blocks on and below the diagonal);
- factored (``solve.factorize``): ``H / 2^e`` mirrored into the strict upper triangle, its diagonal kept aside,
  and the lower triangle overwritten by the Cholesky factor ``L`` of ``M = H + shift I``, ``M = L L^T``.

The methods here read ``h`` in whichever layout it is, block by block, with no P x P temporary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: rows per block of the blockwise copies and products on the factored layout
CHUNK = 512
#: rows of one tile of the transposed copies (cache-friendly: tile by tile, a small clone each)
_TILE = 64


def chunks(P: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``size`` rows that cover ``range(P)``.

    Args:
        P: the number of rows.
        size: rows per range.

    Returns:
        ``[(0, size), (size, 2 size), ..., (., P)]`` (empty when ``P`` is 0).
    """
    return [(a, min(a + size, P)) for a in range(0, P, size)]


def _transpose_into(h: torch.Tensor, cols: tuple[int, int], rows: tuple[int, int], lower_to_upper: bool) -> None:
    """Mirror the block ``h[rows, cols]`` (below the diagonal) onto ``h[cols, rows]`` (above it), or back."""
    (a, b), (r0, r1) = cols, rows
    for r in range(r0, r1, _TILE):
        t = min(r + _TILE, r1)
        if lower_to_upper:
            h[a:b, r:t].copy_(h[r:t, a:b].T.clone())
        else:
            h[r:t, a:b].copy_(h[a:b, r:t].T.clone())


@dataclass
class PathGram:
    """``H = 2**exponent * h``, float64 P x P, in one of three layouts of the buffer ``h``.

    - full (``lower_only`` false, ``diag`` None): ``h`` holds all of ``H / 2^e``;
    - lower (``lower_only``, ``diag`` None): its lower triangle does (diagonal included; the CPU route multiplies
      the row ``blocks`` on and below the diagonal, whose diagonal blocks are filled on both sides);
    - factored (``diag`` set, by ``factorize``): the strict upper triangle holds ``H / 2^e`` (mirrored), ``diag``
      its diagonal, and the lower triangle the Cholesky factor of the factorized matrix.

    The methods read ``h`` in whichever layout it is.

    Attributes:
        h: the P x P float64 buffer.
        exponent: ``e`` in ``H = 2^e h``.
        lower_only: only the lower triangle of ``h`` was computed.
        blocks: the row blocks ``[(a, b), ...]`` the lower layout was computed in.
        diag: the diagonal of ``h`` kept aside in the factored layout, else None.
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
        """The diagonal of ``h`` in any layout.

        Returns:
            The P diagonal entries of ``H / 2^e`` (a view of ``h`` or ``diag``).
        """
        return self.diag if self.diag is not None else torch.diagonal(self.h)

    def symmetric(self) -> torch.Tensor:
        """``h`` with both triangles filled.

        Returns:
            The symmetric P x P ``H / 2^e``: ``h`` itself in the full layout, else a new tensor.
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
            The symmetric P x P float64 ``2^e h`` (it overflows for very deep nets: use ``h`` and ``exponent``
            there).
        """
        e = torch.tensor(self.exponent, dtype=torch.float64, device=self.h.device)
        return torch.ldexp(self.symmetric(), e)

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Entries of the symmetric ``h``, read from the triangle of the layout that holds them.

        Args:
            rows: 1-d integer row indices.
            cols: 1-d integer column indices.

        Returns:
            ``h[rows[:, None], cols[None, :]]``, ``len(rows) x len(cols)``.
        """
        r, c = rows[:, None], cols[None, :]
        if self.diag is not None:
            vals = self.h[torch.minimum(r, c), torch.maximum(r, c)]
            return torch.where(r == c, self.diag[rows][:, None], vals)
        if not self.lower_only:
            return self.h[r, c]
        return self.h[torch.maximum(r, c), torch.minimum(r, c)]

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``h @ V`` for the symmetric ``h``, blockwise from the triangle that holds it.

        Temporaries of one block at a time.

        Args:
            V: a P x k float64 block.

        Returns:
            The P x k product ``h V``.
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
        """Copy the lower triangle into the strict upper one and keep the diagonal aside (``diag``).

        This is the layout ``factorize`` needs before it overwrites the lower triangle. Blockwise, no P x P
        temporary.

        Raises:
            ValueError: the path gram is already in the factored layout.
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
        """Overwrite the lower triangle (the factor) with ``H / 2^e`` again, from the upper triangle and ``diag``.

        Raises:
            ValueError: the path gram is not in the factored layout.
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


@dataclass
class Factorization:
    """Cholesky factor ``L`` of ``M = H + jitter * mean(diag H) * I``, read from its lower triangle.

    The strict upper triangle of ``L`` may hold other data: ``factorize`` keeps ``H`` there.

    Attributes:
        L: the factor (its lower triangle, diagonal included).
        jitter: the relative shift ``delta`` (0 when none was added).
        shift: the absolute value added to the diagonal, ``delta * mean(diag H)``.
        singular: ``H`` itself was numerically singular (its factorization failed, or its condition exceeded
            ``1 / rcond``), so the jitter route was taken.
        condition: ``lambda_max / lambda_min`` of ``M`` as ``factorize`` judged it (a 0-d float64 tensor; see
            ``factorize`` for the method), None from ``cholesky_jitter``.
    """

    L: torch.Tensor
    jitter: float
    shift: float  # the absolute value added to the diagonal
    singular: bool = False
    condition: torch.Tensor | None = None
