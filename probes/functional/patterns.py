"""The gate patterns of the ``patterns`` probe as bits: a boolean gate matrix packed one bit per gate (``pack_rows``,
most significant bit first as ``np.packbits``), unpacked back (``PackedGates``), and the number of distinct rows
(the linear regions met by the probe batch, ``distinct_rows``).

Saving and loading snapshots of them is ``probes.snapshots``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


class PackedGates:
    """A boolean gate tensor (samples first) kept at one bit per gate: ``bits`` is P x ceil(n / 8) uint8.

    Args:
        bits: the packed rows, ``P x ceil(n / 8)`` uint8 (``pack_rows``).
        shape: the shape of the boolean tensor they pack, samples first (``n`` its entries per sample).
    """

    __slots__ = ("bits", "shape")

    def __init__(self, bits: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.bits, self.shape = bits, shape

    @classmethod
    def of(cls, gates: torch.Tensor) -> PackedGates:
        """Pack a boolean tensor.

        Args:
            gates: booleans, samples first.
        """
        return cls(pack_rows(gates.reshape(gates.shape[0], -1)), tuple(gates.shape))

    def unpack(self, device: torch.device | None = None) -> torch.Tensor:
        """The boolean tensor again, of shape ``shape``.

        Args:
            device: where to unpack (None: where the bits are).
        """
        bits = self.bits if device is None else self.bits.to(device)
        n = math.prod(self.shape[1:])
        unpacked = (bits.unsqueeze(-1) & _BIT_WEIGHTS.to(bits.device)).ne(0).reshape(bits.shape[0], -1)[:, :n]
        return unpacked.reshape(self.shape)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """P x B booleans -> P x ceil(B / 8) bytes, most significant bit first (as ``np.packbits``).

    Args:
        bits: a ``P x B`` boolean matrix.
    """
    P, B = bits.shape
    pad = (-B) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(P, pad)], dim=1)
    weights = _BIT_WEIGHTS.to(bits.device)
    return (bits.reshape(P, -1, 8).to(torch.uint8) * weights).sum(dim=2, dtype=torch.uint8)


def distinct_packed_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Number of distinct rows of row-packed gate matrices placed side by side.

    Args:
        parts: ``P x B_k`` uint8 matrices of packed rows, one per site.
    """
    if not parts:
        return torch.tensor(0)
    rows = np.ascontiguousarray(torch.cat(list(parts), dim=1).cpu().numpy())
    if rows.shape[1] == 0:
        return torch.tensor(1 if rows.shape[0] else 0)
    # each row as one opaque value: numpy sorts them without the per-element copies of torch.unique(dim=0)
    return torch.tensor(np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel()).shape[0])


def distinct_rows(bits: torch.Tensor) -> torch.Tensor:
    """Number of distinct rows of a P x B boolean matrix (packed into bytes, then ``torch.unique``).

    Args:
        bits: a ``P x B`` boolean matrix.
    """
    P, B = bits.shape
    if B == 0:
        return torch.tensor(1 if P else 0)
    return distinct_packed_rows([pack_rows(bits)])
