"""Which module's ``forward`` is running: a walk up the Python stack (used by traces of functional calls)."""

from __future__ import annotations

import sys

from torch import nn


def calling_module(paths: dict[nn.Module, str]) -> nn.Module | None:
    """The nearest module of ``paths`` whose ``forward`` (or hook) is on the stack of the caller; None if none."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(obj, nn.Module) and obj in paths:
            return obj
        frame = frame.f_back
    return None
