"""The rank protocol: who measures, who writes, and how declared probe state is reduced over ranks.

Under ``torch.distributed`` passive state is reduced at every flush after a **layout check**: the
ranks first compare a signature of what they are about to reduce (failed or not, number of tensors,
a checksum of names, shapes and dtypes) in one small all-reduce. Ranks whose accumulators differ (a
rank that ran no training forward in the window, a site seen on some ranks only) would otherwise
pair unrelated tensors, hang, or crash training in the collective; instead the probe is switched off
on every rank with a message saying so. Only rank 0 writes.

Sharded models (FSDP2 ``fully_shard``, the legacy ``FullyShardedDataParallel``) all-gather
parameters inside every forward, so every rank must run the probe pass too, in the same order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["rank_and_world", "is_sharded", "ReduceOutcome", "reduce_states", "broadcast_flag"]


def rank_and_world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def is_sharded(model: nn.Module) -> bool:
    """True for a model with FSDP2 (``fully_shard``) or legacy FSDP modules anywhere inside."""
    kinds: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        kinds.append(FSDPModule)
    except ImportError:  # older torch
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
    except ImportError:
        pass
    return bool(kinds) and any(isinstance(m, tuple(kinds)) for m in model.modules())


def _flatten(value: Any, reduce: str, out: list[tuple[str, torch.Tensor]], where: str,
             device: torch.device) -> None:
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(value[k], reduce, out, f"{where}[{k}]", device)
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
    """What ``reduce_states`` decided for one probe: ok, or the reason it must be switched off."""

    def __init__(self, ok: bool, reason: BaseException | None = None) -> None:
        self.ok, self.reason = ok, reason


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
                _flatten(value, spec.reduce, parts, spec.name, device)
                flat += [(w, t, spec.reduce) for w, t in parts]
        except Exception as exc:  # noqa: BLE001 - reported below, on every rank alike
            error, items, flat = exc, [], []
    layout = ";".join(f"{w}:{tuple(t.shape)}/{t.dtype}/{r}" for w, t, r in flat)
    layout += "|" + ";".join(f"{n}:cat" for n, r, _ in items if r == "cat")
    sig = torch.tensor([int(error is not None or failed_here), len(flat), zlib.crc32(layout.encode())],
                       dtype=torch.int64, device=device)
    both = torch.cat([sig, -sig])
    d.all_reduce(both, op=d.ReduceOp.MAX)  # max and -min of every entry, in one collective
    hi, lo = both[:3].tolist(), (-both[3:]).tolist()
    if error is not None:
        return ReduceOutcome(False, error)
    if hi[0]:
        return ReduceOutcome(False, RuntimeError(
            f"probe {name!r} raised on another rank (or was switched off there) before the reduction at step {step}"))
    if hi != lo:
        return ReduceOutcome(False, RuntimeError(
            f"probe {name!r}: the ranks hold different accumulators at step {step} (rank {rank}: {len(flat)} "
            f"tensors [{layout or 'none'}]; the ranks hold {lo[1]} to {hi[1]}), e.g. a rank ran no training "
            "forward in the window or saw other sites; reducing them would mix unrelated counts"))
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
    return ReduceOutcome(True)


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    d = torch.distributed
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return bool(t.item())


def any_rank(fn: Callable[[], bool], device: torch.device) -> bool:
    return broadcast_flag(fn(), device)
