"""FSDP2 units: which unit owns a module's parameters, and whole parameters one unit at a time.

Under FSDP2 (``fully_shard``) each unit's parameters are ``DTensor`` shards outside its forward and backward; a
unit's ``unshard()`` all-gathers them (every rank must call it, in the same order) and ``reshard()`` frees them
again (local). ``gathered`` gives a block in which the modules asked for hold their whole parameters
(``ProbeBatch.gathered`` for probes; the NTK's checks of a layer's formula); ``tops_gathered`` holds the top units
gathered for the NTK's passes, as after a forward; ``all_gathered`` holds every unit's whole parameters through
forwards and backwards of the block (the Hessian's double backward, per-sample gradients); ``sharded_parameters``
names the parameters that are shards now.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

from torch import nn

from probes import _torch

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = ["units", "owners", "gathered", "is_gathered", "tops_gathered", "all_gathered", "sharded_parameters"]


def _unit_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of ``model`` (``fully_shard``-ed modules), in ``modules()`` order; empty without FSDP2.

    Args:
        model: a model.

    Returns:
        The units.
    """
    kind = _unit_class()
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


def owners(model: nn.Module, modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP2 units that own the parameters of ``modules`` (each module's nearest unit above it, itself
    included), once each, in the order given; empty for a model without FSDP2 units.

    Args:
        model: the root the modules belong to.
        modules: submodules of ``model``.

    Returns:
        The owning units.
    """
    kind = _unit_class()
    if kind is None:
        return []
    parent: dict[int, nn.Module | None] = {id(model): None}
    for m in model.modules():
        for child in m.children():
            parent.setdefault(id(child), m)
    found: dict[int, nn.Module] = {}
    for m in modules:
        at: nn.Module | None = m
        while at is not None and not isinstance(at, kind):
            at = parent.get(id(at))
        if at is not None:
            found.setdefault(id(at), at)
    return list(found.values())


def is_gathered(unit: nn.Module) -> bool:
    """Whether an FSDP2 unit holds its whole parameters now (after ``unshard``, or a forward without backward).

    Args:
        unit: an FSDP2 unit (``fully_shard``-ed module).

    Returns:
        True when gathered (or when it manages no parameters).
    """
    try:
        flags = [g.is_sharded() if callable(g.is_sharded) else g.is_sharded for g in _param_groups(unit)]
        return not flags or not all(flags)
    except Exception:  # noqa: BLE001 - internals moved: take it as sharded (an unshard is then a no-op if not)
        return False


def _fsdp(unit: nn.Module) -> FSDPModule:
    """A unit as FSDP2's class, for the type checker (``units`` and ``owners`` give only ``FSDPModule``s)."""
    return cast("FSDPModule", unit)


def _param_groups(unit: nn.Module) -> list:
    """The FSDP2 parameter groups of a unit (FSDP2 internals: callers catch what moved)."""
    return _torch.fsdp_param_groups(unit)


@contextmanager
def gathered(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """The whole parameters of ``modules`` on this rank inside the block.

    Each FSDP2 unit owning them (``owners``) that is sharded now is ``unshard()``-ed on entry (an all-gather:
    every rank must enter the same blocks in the same order) and ``reshard()``-ed on exit; a unit already gathered
    (the root after a forward) is left as it is. Nothing happens for a model without FSDP2 units.

    Args:
        model: the root the modules belong to.
        modules: the modules whose parameters the block reads.
    """
    units = [u for u in owners(model, modules) if not is_gathered(u)]
    done: list[nn.Module] = []
    try:
        for u in units:
            _fsdp(u).unshard()
            done.append(u)
        yield
    finally:
        for u in done:
            _fsdp(u).reshard()


def _top_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of ``model`` with no unit above them."""
    every = units(model)
    inner = {id(c) for u in every for c in u.modules() if c is not u}
    return [u for u in every if id(u) not in inner]


@contextmanager
def tops_gathered(model: nn.Module) -> Iterator[None]:
    """An FSDP2-sharded model with its top units' own parameters gathered for the block (``unshard``; every rank
    enters alike), as after any forward: FSDP2 keeps the root gathered between a forward and its backward, so the
    kernel's passes, some without a backward, see the same parameter tensors throughout; the other units gather
    and free themselves in each forward and backward. The top units do not reshard after the kernel's backward
    passes inside the block, and are left gathered after it (the caller's next backward, or ``reshard``, frees
    them, as after a forward). Nothing for a model without FSDP2 units.

    Args:
        model: the model (or a wrapper around it).
    """
    tops = _top_units(model)
    before = [_reshards_after_backward(u) for u in tops]
    for unit in tops:
        _fsdp(unit).unshard()
        _fsdp(unit).set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for unit, flag in zip(tops, before):
            _fsdp(unit).set_reshard_after_backward(flag, recurse=False)


def _reshards_after_backward(unit: nn.Module) -> bool:
    try:
        return all(bool(g.reshard_after_backward) for g in _param_groups(unit))
    except Exception:  # noqa: BLE001 - internals moved: FSDP2's default
        return True


@contextmanager
def all_gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` holding its whole parameters through the block, forwards and backwards included.

    The units sharded now are ``unshard()``-ed on entry (all-gathers: every rank enters alike). Inside the block no
    unit reshards after a forward or a backward, nor reduces gradients (``set_reshard_after_forward(False)``,
    ``set_reshard_after_backward(False)``, ``set_requires_gradient_sync(False)``), so ``model.parameters()`` are
    the whole (unsharded) parameters and autograd through the model sees them throughout: gradients with their
    graph, double backward (Hessian-vector products), ``torch.func`` over ``functional_call``. On exit each unit's
    settings are put back as they were, and the units gathered on entry are ``reshard()``-ed; a unit gathered
    already (the root after a forward) is left gathered. Memory: the whole model on every rank for the block.
    Nothing happens for a model without FSDP2 units.

    Args:
        model: the model (or a wrapper around it).
    """
    every = units(model)
    if not every:
        yield
        return
    saved = [_torch.fsdp_schedule(u) for u in every]
    done: list[nn.Module] = []
    try:
        for u in every:
            if not is_gathered(u):
                _fsdp(u).unshard()
                done.append(u)
            _fsdp(u).set_reshard_after_forward(False, recurse=False)
            _fsdp(u).set_reshard_after_backward(False, recurse=False)
            _fsdp(u).set_requires_gradient_sync(False, recurse=False)
        yield
    finally:
        for u, schedule in zip(every, saved):
            _torch.set_fsdp_schedule(u, schedule)
        for u in done:
            _fsdp(u).reshard()


def sharded_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """The parameters among ``names`` that are sharded now (``DTensor``): the ``torch.func`` fallback needs them
    whole.

    Args:
        model: the model.
        names: parameter names.

    Returns:
        The sharded ones.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return []
    params = dict(model.named_parameters())
    return [n for n in names if isinstance(params.get(n), DTensor)]
