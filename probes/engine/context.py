"""The probes' own context: a measurement runs as at top level, whatever the user's code wraps around the step.

The optimizer's step hook and ``session.step()`` run inside whatever the user entered around them: autocast (any
device type), ``no_grad``, ``inference_mode``, a ``torch.func`` transform, a ``TorchFunctionMode`` (``with
torch.device(...)`` is one) or a ``TorchDispatchMode`` (a FLOP counter). None of these may change a measured value
or see the probes' work: ``isolated()`` sets them all aside for its body and puts them back afterwards, exactly as
they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch

from probes import _torch

__all__ = ["isolated", "autocast_devices"]


def autocast_devices() -> tuple[str, ...]:
    """The device types that autocast knows in this build of torch (the private-use backend included)."""
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "maia", "ipu", _torch.privateuse1_backend_name()]
    found = []
    for name in dict.fromkeys(names):
        try:
            if torch.amp.is_autocast_available(name):
                found.append(name)
        except (RuntimeError, ValueError):  # a device type this build does not know
            continue
    return tuple(found)


_AUTOCAST = autocast_devices()


class _Nothing:
    """The context when there is nothing to set aside (the common case: a step at top level)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING = _Nothing()


def isolated() -> AbstractContextManager[None]:
    """Autocast off on every device type, gradients enabled outside inference mode, no ``torch.func`` transform and
    no user ``TorchFunctionMode``/``TorchDispatchMode`` while inside; everything restored afterwards."""
    if (
        torch.is_grad_enabled()
        and not _torch.any_autocast_enabled()
        and not torch.is_inference_mode_enabled()
        and _torch.function_mode_depth() == 0
        and _torch.dispatch_mode_depth() == 0
        and not _torch.in_functorch_transform()
    ):
        return _NOTHING
    return _isolated()


@contextmanager
def _isolated() -> Iterator[None]:
    with ExitStack() as stack:
        if _torch.function_mode_depth() > 0:  # first: the user's modes must not see the checks below
            stack.enter_context(_without_function_modes())
        if _torch.dispatch_mode_depth() > 0:
            stack.enter_context(_torch.without_dispatch_modes())
        if _torch.in_functorch_transform():
            stack.enter_context(_torch.without_functorch_transforms())
        for device in _AUTOCAST:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        yield


@contextmanager
def _without_function_modes() -> Iterator[None]:
    """The user's ``TorchFunctionMode`` stack set aside (innermost first) and pushed back in order."""
    popped = []
    while _torch.function_mode_depth() > 0:
        popped.append(_torch.pop_function_mode())
    try:
        yield
    finally:
        for mode in reversed(popped):
            _torch.push_function_mode(mode)
