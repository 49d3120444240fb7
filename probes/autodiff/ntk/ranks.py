"""The kernel across ranks: each rank takes ``P / world`` of the samples, the ranks exchange factors.

Under ``torch.distributed`` (DDP, or an FSDP2-sharded model, whose forward and backward all-gather one unit at a
time) every rank calls ``empirical_ntk(..., distributed=True)`` or ``ntk_operator(..., distributed=True)`` with the
same samples. Rank ``r`` keeps the contiguous share ``[r S, (r + 1) S)`` of the ``P`` samples, ``S = ceil(P /
world)`` (a short share is padded with copies of a real sample, so that every rank runs the same forwards and
backwards, hence the same FSDP collectives; padded rows are dropped), and computes the layerwise factors of its
share alone: forwards, output gradients, per-sample gradients. No rank needs a whole parameter beyond what FSDP
gathers for its own forward and backward.

- Dense kernel: the factors of every term are all-gathered (``world`` times the factors of one share reach every
  rank); the upper triangle's row strips of ``2 world`` sample blocks are dealt over the ranks in balanced pairs,
  each rank computes its strips, and one all-reduce of the ``P x P`` kernel (every entry computed on exactly one
  rank, zeros elsewhere: the sum is exact) gives every rank the kernel a single process computes, to rounding.
- Operator (``Theta V``, matrix-free): no factor moves. For each term the ranks sum their partial products
  ``W_r = sum_{j in r} f_j v_j^T`` in one all-reduce of all terms' ``W`` together, each rank applies ``W`` to its
  own samples, and one all-gather assembles ``Theta V`` on every rank; no rank holds ``P x P``, and every rank
  runs the same Krylov iterations on the same vectors.

Work per rank: the factor passes and the products at about ``1 / world``; exchanged: the factors once (dense), or
``W`` and ``Theta V`` per product (operator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from probes.functional.ntk.terms import _Embed, _Grad, _Pairs, _Term


def share(P: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share ``[r S, (r + 1) S)`` of ``P`` samples, ``S = ceil(P / world)``: the last
    shares shorter or empty (the NTK's ``Share`` pads them; ``hessian`` and ``grad_noise`` take them as they are).

    Args:
        P: all samples.
        rank: this rank.
        world: the ranks.

    Returns:
        The rows of rank ``rank``.
    """
    S = max(1, -(-P // world))
    return slice(min(P, rank * S), min(P, (rank + 1) * S))


@dataclass(frozen=True)
class Share:
    """Rank ``rank``'s samples of ``P``: real rows ``start:stop`` of the padded share ``[rank S, (rank + 1) S)``.

    Attributes:
        rank: this rank.
        world: the ranks.
        P: all samples.
        S: samples per rank, padded (``ceil(P / world)``).
        group: the process group (None: the default group).
    """

    rank: int
    world: int
    P: int
    S: int
    group: Any = None

    @classmethod
    def of(cls, P: int, group: Any = None) -> Share:
        """This rank's share of ``P`` samples in ``group``.

        Args:
            P: all samples.
            group: the process group (None: the default group).

        Returns:
            The ``Share``.
        """
        d = torch.distributed
        rank, world = d.get_rank(group), d.get_world_size(group)
        return cls(rank, world, P, max(1, -(-P // world)), group)

    @property
    def start(self) -> int:
        return share(self.P, self.rank, self.world).start

    @property
    def stop(self) -> int:
        return share(self.P, self.rank, self.world).stop

    def real(self, rank: int) -> int:
        """Real (not padded) samples of ``rank``.

        Args:
            rank: a rank of the group.

        Returns:
            How many of its ``S`` samples are real.
        """
        return max(0, min(self.P, (rank + 1) * self.S) - rank * self.S)

    def take(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's ``S`` samples of ``args``, padded with copies of its last real sample (of sample 0 when it
        has none).

        Args:
            args: the model's positional inputs, samples first.

        Returns:
            The inputs of this rank's share.
        """
        n, out = self.stop - self.start, []
        for a in args:
            rows = a[self.start : self.stop] if n else a[:1]
            missing = self.S - rows.shape[0]
            if missing:
                rows = torch.cat([rows, rows[-1:].expand((missing,) + tuple(rows.shape[1:]))])
            out.append(rows)
        return tuple(out)

    def gather_rows(self, local: torch.Tensor, per_sample: int = 1) -> torch.Tensor:
        """Every rank's ``local`` (its ``S * per_sample`` rows) stacked in rank order, padded rows dropped: the
        rows of all ``P`` samples, on every rank (one all-gather).

        Args:
            local: this rank's rows (same shape on every rank).
            per_sample: rows per sample.

        Returns:
            ``P * per_sample`` rows.
        """
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(parts, local, group=self.group)
        return torch.cat([p[: self.real(r) * per_sample] for r, p in enumerate(parts)])

    def gather_rows_async(self, local: torch.Tensor, per_sample: int = 1) -> Callable[[], torch.Tensor]:
        """``gather_rows`` started now (``async_op``): returns the function that waits for it and gives the rows,
        so that the exchange overlaps the caller's work until then.

        Args:
            local: this rank's rows (same shape on every rank).
            per_sample: rows per sample.

        Returns:
            A function returning the ``P * per_sample`` rows.
        """
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        work = torch.distributed.all_gather(parts, local, group=self.group, async_op=True)

        def rows() -> torch.Tensor:
            work.wait()
            return torch.cat([p[: self.real(r) * per_sample] for r, p in enumerate(parts)])

        return rows

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place.

        Args:
            t: a tensor of the same shape on every rank.

        Returns:
            ``t``.
        """
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def strips(self, P: int) -> list[tuple[int, int]]:
        """This rank's row strips of the upper triangle: ``P`` samples in ``2 world`` contiguous blocks, strip
        ``i`` the rows of block ``i`` against the columns from block ``i`` on; rank ``r`` takes strips ``r`` and
        ``2 world - 1 - r``, so every rank has ``2 world + 1`` blocks of products, in GEMMs as tall as one
        process's strips.

        Args:
            P: samples.

        Returns:
            The ``(s, e)`` sample ranges of this rank's strips (columns ``s:P`` each).
        """
        n = 2 * self.world
        edges = [round(i * P / n) for i in range(n + 1)]
        mine = sorted({self.rank, n - 1 - self.rank})
        return [(edges[i], edges[i + 1]) for i in mine if edges[i + 1] > edges[i]]


@contextmanager
def together(share: Share, who: str) -> Iterator[None]:
    """A block of work local to each rank, after which the ranks agree that it went well everywhere: an error on
    one rank (memory, a bad input) raises there, and on every other rank a ``RuntimeError`` saying so, instead of
    leaving them waiting in the next exchange. One small all-reduce.

    Args:
        share: this rank's share.
        who: the name error messages start with.
    """
    failed = torch.zeros(1, dtype=torch.int32)
    try:
        yield
    except BaseException:
        failed.fill_(1)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=share.group)
        raise
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=share.group)
    if int(failed):
        raise RuntimeError(
            f"{who}: another rank failed while computing the factors of its share of the samples (its error says why)"
        )


def gather_term(share: Share, t: _Term) -> Callable[[], _Term]:
    """The term of all ``P`` samples from every rank's share (all-gathered, padded rows dropped), started now.

    Args:
        share: this rank's share.
        t: the term of its ``S`` samples.

    Returns:
        A function that waits for the exchange and returns the term of all ``P`` samples.
    """
    if isinstance(t, _Grad):
        D = share.gather_rows_async(t.D)
        return lambda: _Grad(D())
    if isinstance(t, _Pairs):
        G, Z = share.gather_rows_async(t.G), share.gather_rows_async(t.Z)
        return lambda: _Pairs(G(), Z(), t.bias)
    G, T = share.gather_rows_async(t.G), share.gather_rows_async(t.T)
    return lambda: _Embed(G(), T(), t.V)


def local_rows(share: Share, V: torch.Tensor, Ce: int) -> torch.Tensor:
    """This rank's rows of ``V`` (``P Ce`` rows), zero rows for its padded samples: ``S Ce`` rows.

    Args:
        share: this rank's share.
        V: ``P Ce`` rows.
        Ce: rows per sample.

    Returns:
        ``S Ce`` rows.
    """
    rows = V[share.start * Ce : share.stop * Ce]
    missing = share.S * Ce - rows.shape[0]
    return torch.cat([rows, rows.new_zeros((missing,) + tuple(rows.shape[1:]))]) if missing else rows
