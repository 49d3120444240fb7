"""Which outputs the kernel covers: one position of a sequence output, and a Gaussian sketch of the outputs.

A language model's logits ``(P, T, C)`` give ``T C`` outputs per sample, and the kernel's cost grows with them
(one backward pass per output). ``SelectedOutput`` wraps a model so that the kernel sees fewer:

- ``position``: a ``(P,)`` integer tensor, passed as the last positional argument (so that it is sliced with the
  samples, also one sample at a time in ``torch.func``): the output at that position along axis 1, e.g. the
  last kept token of each sample (``last_positions``);
- ``sketch``: a fixed ``C x k`` matrix ``S`` with i.i.d. ``N(0, 1/k)`` entries (``gaussian_sketch``): the
  outputs ``f(x) S``, so that the trace kernel is ``J S S^T J^T`` and ``E[J S S^T J^T] = J J^T`` (``E[S S^T] = I``),
  an unbiased estimate of the kernel summed over the ``C`` outputs.
"""

from __future__ import annotations

import torch
from torch import nn


def last_positions(mask: torch.Tensor | None, P: int, T: int, device: torch.device) -> torch.Tensor:
    """The last kept position of each sample: the last True of ``mask`` (``(P, T)``), else ``T - 1``.

    Args:
        mask: ``(P, T)`` bool (True at real tokens), or None; a mask of another shape is ignored.
        P: samples.
        T: positions of the output (its axis 1).
        device: where the result lives.

    Returns:
        ``(P,)`` int64 positions; a sample without any kept position takes ``T - 1``.
    """
    if mask is None or tuple(mask.shape) != (P, T):
        return torch.full((P,), T - 1, dtype=torch.long, device=device)
    m = mask.to(device=device, dtype=torch.bool)
    ranks = torch.arange(1, T + 1, device=device).expand(P, T) * m
    last = ranks.argmax(dim=1)
    return torch.where(m.any(dim=1), last, torch.full_like(last, T - 1))


def gaussian_sketch(C: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A ``C x k`` matrix with i.i.d. ``N(0, 1/k)`` entries from a generator seeded with ``seed`` (on the CPU, so
    the same on every device; the global random state is not touched).

    Args:
        C: outputs per sample.
        k: sketched outputs.
        seed: the generator's seed.
        dtype: the matrix's dtype.

    Returns:
        ``S``, with ``E[S S^T] = I_C``.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(C, k, generator=g, dtype=torch.float64).div_(k**0.5).to(dtype)


class SelectedOutput(nn.Module):
    """``model(*args)`` at one position per sample (``position`` given as the last argument) and/or sketched.

    Shares the model's parameters (registered as the submodule ``model``); ``sketch`` is a buffer.

    Args:
        model: the module whose output ``(P, T, ...)`` or ``(P, ...)`` is selected.
        position: whether the last positional argument is a ``(P,)`` integer tensor of positions along axis 1.
        sketch: a ``C x k`` matrix the flattened outputs are multiplied by, or None.
    """

    def __init__(self, model: nn.Module, *, position: bool, sketch: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.position = position
        self.register_buffer("sketch", sketch, persistent=False)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.position:
            *front, where = args
            args = tuple(front)
        out = self.model(*args)
        if self.position:
            idx = where.reshape((-1, 1) + (1,) * (out.ndim - 2)).expand((out.shape[0], 1) + tuple(out.shape[2:]))
            out = out.gather(1, idx).squeeze(1)
        out = out.reshape(out.shape[0], -1)
        if self.sketch is not None:
            out = out @ self.sketch.to(out.device, out.dtype)
        return out
