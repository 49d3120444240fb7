"""The one place where ``probes`` reads private torch internals (a compatibility module).

Each internal is read by one small function here; its comment names the public alternative, or says that none
exists and since when the internal is there (versions as first seen, to recheck when the torch bound moves). A test
(``tests/project/test_torch_internals.py``) keeps every other module off these names. See ``docs/architecture.md``.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from torch import nn

# No public alternative (there since torch 2.1): the context that sets aside the active ``torch.func`` transforms.
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack as _clear_interpreter_stack

# No public alternative (there since torch 2.0): this thread's TorchFunctionMode stack.
from torch.overrides import _get_current_function_mode_stack

# No public alternative (there since torch 2.0): the context that sets aside the active ``TorchDispatchMode``s.
from torch.utils._python_dispatch import _disable_current_modes

__all__ = [
    "in_backward",
    "in_functorch_transform",
    "any_autocast_enabled",
    "privateuse1_backend_name",
    "function_mode_depth",
    "function_modes",
    "pop_function_mode",
    "push_function_mode",
    "dispatch_mode_depth",
    "without_dispatch_modes",
    "without_functorch_transforms",
    "dynamo_module",
    "dynamo_frames_compiled",
    "compiled_original",
    "conv_padding",
    "fsdp_param_groups",
    "fsdp_schedule",
    "set_fsdp_schedule",
    "file_writer",
]


def in_backward() -> bool:
    """True while autograd runs a backward graph on this thread (checkpoint recomputation included)."""
    # No public alternative (torch._C._current_graph_task_id, there since torch 2.0).
    return torch._C._current_graph_task_id() != -1


def in_functorch_transform() -> bool:
    """True under a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...)."""
    # No public alternative (torch._C._functorch.peek_interpreter_stack, there since torch 2.0).
    return torch._C._functorch.peek_interpreter_stack() is not None


def any_autocast_enabled() -> bool:
    """True when autocast is on for any device type."""
    # Public alternative: any(torch.is_autocast_enabled(d) for d in device_types), one call per device type.
    return torch._C._is_any_autocast_enabled()


def privateuse1_backend_name() -> str:
    """The name of the private-use backend in this build (``privateuseone`` unless renamed)."""
    # No public getter (torch.utils.rename_privateuse1_backend only sets it); torch._C._get_privateuse1_backend_name
    # is there since torch 2.1.
    return torch._C._get_privateuse1_backend_name()


def function_mode_depth() -> int:
    """How many ``TorchFunctionMode``s are on this thread's stack (``with torch.device(...)`` is one)."""
    # No public alternative (torch._C._len_torch_function_stack, there since torch 2.0).
    return torch._C._len_torch_function_stack()


def function_modes() -> list[Any]:
    """This thread's ``TorchFunctionMode`` stack, outermost first (a copy)."""
    # No public alternative (torch.overrides._get_current_function_mode_stack, there since torch 2.0).
    return _get_current_function_mode_stack()


def pop_function_mode() -> Any:
    """Pop the innermost ``TorchFunctionMode`` and return it."""
    # No public alternative (torch._C._pop_torch_function_stack, there since torch 2.0).
    return torch._C._pop_torch_function_stack()


def push_function_mode(mode: Any) -> None:
    """Push ``mode`` back on the ``TorchFunctionMode`` stack."""
    # No public alternative (torch._C._push_on_torch_function_stack, there since torch 2.0).
    torch._C._push_on_torch_function_stack(mode)


def dispatch_mode_depth() -> int:
    """How many ``TorchDispatchMode``s are on this thread's stack (a FLOP counter is one)."""
    # No public alternative (torch._C._len_torch_dispatch_stack, there since torch 2.0).
    return torch._C._len_torch_dispatch_stack()


def without_dispatch_modes() -> AbstractContextManager[Any]:
    """A context in which the user's ``TorchDispatchMode``s are set aside, and put back on exit."""
    return _disable_current_modes()


def without_functorch_transforms() -> AbstractContextManager[Any]:
    """A context in which the active ``torch.func`` transforms are set aside, and put back on exit."""
    return _clear_interpreter_stack()


def dynamo_module() -> Any | None:
    """``torch._dynamo`` when something in this process imported it, else None (never imports it)."""
    # Public alternatives only in part: torch.compiler.reset() for dynamo.reset() (since torch 2.1); none for
    # dynamo.config.skip_nnmodule_hook_guards (there since torch 2.1).
    return sys.modules.get("torch._dynamo")


def dynamo_frames_compiled() -> bool:
    """Whether dynamo compiled any frame in this process (True when it cannot tell: its counters are not loaded)."""
    # No public alternative (torch._dynamo.utils.counters, there since torch 2.0).
    utils = sys.modules.get("torch._dynamo.utils")
    return utils is None or utils.counters["frames"].get("total", 0) > 0


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module that a ``torch.compile`` wrapper (``OptimizedModule``) compiles, or None for any other module."""
    # No public accessor for OptimizedModule._orig_mod (there since torch 2.0); model.compile() compiles in place
    # and makes no wrapper.
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None


def conv_padding(conv: nn.Module) -> list[int]:
    """A convolution's padding as ``F.pad`` takes it (last axis first, two numbers per axis)."""
    # Public alternative: derive it from conv.padding, kernel_size and dilation (the strings "same" and "valid"
    # included); _ConvNd._reversed_padding_repeated_twice holds it already (there since torch 1.5).
    return list(cast(Any, conv)._reversed_padding_repeated_twice)


def fsdp_param_groups(unit: nn.Module) -> list:
    """The FSDP2 parameter groups of a ``fully_shard``-ed unit (internals: callers catch what moved)."""
    # No public alternative: FSDPModule offers unshard()/reshard() but no query of whether a unit is sharded now.
    # _get_fsdp_state()._fsdp_param_groups is there since torch 2.6, _fsdp_param_group (one group) before it.
    state = cast(Any, unit)._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older FSDP2: one group per unit
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


#: the FSDP2 parameter group's settings that decide when it reshards and whether it reduces gradients
_SCHEDULE = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")


def fsdp_schedule(unit: nn.Module) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What ``set_reshard_after_forward``, ``set_reshard_after_backward`` and ``set_requires_gradient_sync`` change
    on a ``fully_shard``-ed unit, to put back with ``set_fsdp_schedule`` (internals: callers catch what moved)."""
    # No public alternative: FSDPModule has the setters but no getters. The state's _auto_reshard_after_forward
    # (there since torch 2.7; the root's default) and the groups' fields are what the setters write.
    state = cast(Any, unit)._get_fsdp_state()
    groups = [{k: getattr(g, k) for k in _SCHEDULE if hasattr(g, k)} for g in fsdp_param_groups(unit)]
    own = {k: getattr(state, k) for k in ("_auto_reshard_after_forward",) if hasattr(state, k)}
    return own, groups


def set_fsdp_schedule(unit: nn.Module, schedule: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """Put back what ``fsdp_schedule`` read."""
    own, groups = schedule
    state = cast(Any, unit)._get_fsdp_state()
    for k, v in own.items():
        setattr(state, k, v)
    for group, saved in zip(fsdp_param_groups(unit), groups):
        for k, v in saved.items():
            setattr(group, k, v)


def file_writer(writer: Any) -> Any:
    """The ``FileWriter`` of a ``SummaryWriter``, opened anew (a new event file, the logdir made again if it is gone)
    when the writer has none."""
    # No public alternative: SummaryWriter._get_file_writer (there since torch 1.1) is how it opens its file lazily.
    return writer._get_file_writer()
