"""The rank protocol: who measures, who writes, and how declared probe state is reduced over ranks.

Under ``torch.distributed`` passive state is reduced at every flush after a **layout check**: the
ranks first compare a signature of what they are about to reduce (failed or not, number of tensors,
a checksum of names, shapes and dtypes) in one small all-reduce. Ranks whose accumulators differ (a
rank that ran no training forward in the window, a site seen on some ranks only) would otherwise
pair unrelated tensors, hang, or crash training in the collective; instead the probe is switched off
on every rank with a message saying so. Only rank 0 writes.

Sharded models (FSDP2 ``fully_shard``, the legacy ``FullyShardedDataParallel``) all-gather
parameters inside every forward, so every rank must run the probe pass too, in the same order and on
the same probe batch (``same_probe_batch`` checks it at attach and hands every rank rank 0's batch when
they differ). A probe that raises during the pass on one rank only would leave the ranks disagreeing
about which probes run next time, and the next pass would then hang in FSDP's all-gathers; after each
sharded measurement ``failed_anywhere`` tells every rank which probes failed on any rank, so that they
are switched off everywhere (``broadcast_flag`` does the same for a probe whose ``setup`` raises on one
rank: attach raises on every rank). A forward without backward leaves FSDP2's root gathered, so the
session ``reshard``s what ``sharded_now`` found sharded before each probe pass. Passive flushes
(``reduce_states``) run in ``Session.step()``, after the optimizer step, outside FSDP's own forward and
backward collectives.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from probes.autodiff.fsdp import is_gathered, units
from probes.inputs import iter_tensors, map_tensors

__all__ = [
    "rank_and_world",
    "is_sharded",
    "legacy_sharded",
    "ReduceOutcome",
    "reduce_states",
    "broadcast_flag",
    "failed_anywhere",
    "same_probe_batch",
    "sharded_now",
    "reshard",
]


def rank_and_world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def is_sharded(model: nn.Module) -> bool:
    """True for a model with FSDP2 (``fully_shard``) or legacy FSDP modules anywhere inside."""
    return bool(units(model)) or legacy_sharded(model)


def legacy_sharded(model: nn.Module) -> bool:
    """True for a model wrapped in the legacy ``FullyShardedDataParallel`` (flat parameters, no FSDP2 units)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def sharded_now(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules of ``model`` whose parameters are sharded now.

    A forward without a backward (the probe pass: eval, no_grad) leaves the parameters of the root FSDP
    module gathered (FSDP2 does not reshard the root after forward, expecting the backward), so the
    model would hold plain unsharded tensors where training leaves DTensors (``state_dict``, memory).
    The session takes this list before a probe pass and ``reshard``s these modules after it. ``reshard``
    is local (no collective).
    """
    return [u for u in units(model) if not is_gathered(u)]


def reshard(modules: list[Any]) -> None:
    """``FSDPModule.reshard()`` on each module (FSDP2 units: free the gathered parameters, register the shards
    again)."""
    for m in modules:
        m.reshard()


def max_and_min(values: list[int], device: torch.device) -> tuple[list[int], list[int]]:
    """The max and the min of every entry over the ranks, in one collective (an all-reduce of ``[v, -v]``)."""
    sig = torch.tensor(values, dtype=torch.int64, device=device)
    both = torch.cat([sig, -sig])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    n = len(values)
    return both[:n].tolist(), (-both[n:]).tolist()


def _flatten(value: Any, out: list[tuple[str, torch.Tensor]], where: str, device: torch.device) -> None:
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(value[k], out, f"{where}[{k}]", device)
    elif isinstance(value, torch.Tensor):
        out.append((where, value))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        dtype = torch.int64 if isinstance(value, int) else torch.float64
        out.append((where, torch.tensor(value, dtype=dtype, device=device)))
    else:
        raise TypeError(f"state {where}: cannot reduce a {type(value).__name__} over ranks")


def _unflatten(value: Any, reduced: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _unflatten(v, reduced, f"{where}[{k}]") for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return reduced[where]
    if isinstance(value, (int, float)):
        t = reduced[where]
        return int(t) if isinstance(value, int) else float(t)
    return value


class ReduceOutcome:
    """What ``reduce_states`` decided for one probe: ok (no reason), or the reason it must be switched off."""

    def __init__(self, reason: BaseException | None = None) -> None:
        self.reason = reason

    @property
    def ok(self) -> bool:
        """Whether the states were reduced (no reason to switch the probe off)."""
        return self.reason is None


def reduce_states(probe: Any, failed_here: bool, device: torch.device, step: int, rank: int) -> ReduceOutcome:
    """Reduce the declared states of ``probe`` over all ranks in place (every rank must call this)."""
    d = torch.distributed
    name = probe.name
    error: BaseException | None = None
    items: list[tuple[str, str, Any]] = []
    flat: list[tuple[str, torch.Tensor, str]] = []
    if not failed_here:
        try:
            probe.settle()
            for spec in probe.states.values():
                if spec.reduce is None:
                    continue
                value = getattr(probe, spec.name)
                items.append((spec.name, spec.reduce, value))
                if spec.reduce == "cat":
                    continue
                parts: list[tuple[str, torch.Tensor]] = []
                _flatten(value, parts, spec.name, device)
                flat += [(w, t, spec.reduce) for w, t in parts]
        except Exception as exc:  # noqa: BLE001 - reported below, on every rank alike
            error, items, flat = exc, [], []
    layout = ";".join(f"{w}:{tuple(t.shape)}/{t.dtype}/{r}" for w, t, r in flat)
    layout += "|" + ";".join(f"{n}:cat" for n, r, _ in items if r == "cat")
    hi, lo = max_and_min([int(error is not None or failed_here), len(flat), zlib.crc32(layout.encode())], device)
    if error is not None:
        return ReduceOutcome(error)
    if hi[0]:
        return ReduceOutcome(
            RuntimeError(
                f"probe {name!r} raised on another rank (or was switched off there) before the reduction at step {step}"
            ),
        )
    if hi != lo:
        return ReduceOutcome(
            RuntimeError(
                f"probe {name!r}: the ranks hold different accumulators at step {step} (rank {rank}: {len(flat)} "
                f"tensors [{layout or 'none'}]; the ranks hold {lo[1]} to {hi[1]}), e.g. a rank ran no training "
                "forward in the window or saw other sites; reducing them would mix unrelated counts"
            ),
        )
    ops = {"sum": d.ReduceOp.SUM, "max": d.ReduceOp.MAX, "min": d.ReduceOp.MIN}
    reduced: dict[str, torch.Tensor] = {}
    for where, t, r in flat:
        t = t.clone() if not t.is_contiguous() else t
        d.all_reduce(t, op=ops[r])
        reduced[where] = t
    for state_name, r, value in items:
        if r == "cat":
            gathered: list[Any] = [None] * d.get_world_size()
            d.all_gather_object(gathered, [v.cpu() if isinstance(v, torch.Tensor) else v for v in value])
            setattr(probe, state_name, [v for part in gathered for v in part])
        else:
            setattr(probe, state_name, _unflatten(value, reduced, state_name))
    return ReduceOutcome()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    return bool(max_and_min([int(flag)], device)[0][0])


def raise_if_failed_elsewhere(failed_here: bool, device: torch.device) -> None:
    """At attach under a sharded model: raise on every rank where attach went well when it failed on another."""
    if broadcast_flag(failed_here, device) and not failed_here:
        raise RuntimeError(
            "attach failed on another rank (the ranks measure together; a probe's setup raised there; "
            "that rank's error says which)"
        )


def failed_anywhere(names: list[str], failed_here: set[str], device: torch.device) -> set[str]:
    """The probes among ``names`` that failed on any rank (every rank must call this with the same ``names``).

    One all-reduce of a 0/1 mask, so it costs one small collective per sharded measurement.
    """
    if not names:
        return set()
    hi, _ = max_and_min([int(n in failed_here) for n in names], device)
    return {n for n, bad in zip(names, hi) if bad}


def _batch_layout(x: Any, y: Any) -> tuple[str, list[torch.Tensor]]:
    tensors = list(iter_tensors(x)) + ([("y", y)] if isinstance(y, torch.Tensor) else [])
    layout = f"x:{x is not None};y:{y is not None};" + ";".join(f"{w}:{tuple(t.shape)}/{t.dtype}" for w, t in tensors)
    return layout, [t for _, t in tensors]


def _checksum(t: torch.Tensor) -> int:
    """A checksum of the bytes of ``t`` (exact: equal tensors give equal sums on every rank)."""
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return zlib.crc32(raw)


def same_probe_batch(x: Any, y: Any, device: torch.device) -> tuple[Any, Any, bool]:
    """Make sure every rank holds rank 0's probe batch (every rank must call this).

    Returns ``(x, y, replaced)``: the ranks compare a checksum of layout and bytes in one all-reduce; when
    the batches differ but have the same layout, rank 0's tensors are broadcast (``replaced`` is True on
    every rank); a different layout (shapes, dtypes, a rank without probe data) is a ``ValueError`` on
    every rank alike, raised at attach instead of a mismatched all-gather later.
    """
    d = torch.distributed
    layout, tensors = _batch_layout(x, y)
    crc = zlib.crc32(layout.encode())
    content = zlib.crc32(b"".join(_checksum(t).to_bytes(4, "little") for t in tensors))
    hi, lo = max_and_min([crc, content], device)
    if hi[0] != lo[0]:
        raise ValueError(
            "probe_data differs in shape, dtype or presence between the ranks, which measure together "
            f"(a sharded model, or ntk's split probe batch) (rank {d.get_rank()}: {layout}); every "
            "rank runs the probe pass, so every rank must pass the same probe batch to attach"
        )
    if hi[1] == lo[1]:
        return x, y, False
    received = iter([_broadcast_copy(t) for t in tensors])  # same layout, other values: rank 0's batch
    x = map_tensors(x, lambda _t: next(received))
    y = next(received) if isinstance(y, torch.Tensor) else y
    return x, y, True


def _broadcast_copy(t: torch.Tensor) -> torch.Tensor:
    buf = t.detach().clone().contiguous()
    wire = buf.to(torch.uint8) if buf.dtype == torch.bool else buf  # gloo has no bool
    torch.distributed.broadcast(wire, src=0)
    return wire.to(torch.bool) if buf.dtype == torch.bool else wire
