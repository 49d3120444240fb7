"""What a probe declares in ``Needs``, checked once at attach by the engine (not by each probe).

Each check raises with the one message for its need, naming the probe: labels, a probe batch of one floating
tensor. The engine runs them before the probe's own ``check`` (and the old contract's ``setup``).
"""

from __future__ import annotations

from typing import Any

import torch

from probes.probe import Probe


def labels(name: str, y: torch.Tensor | None) -> None:
    """``Needs(labels=True)``: the probe batch has labels.

    Args:
        name: the probe's name, for the message.
        y: the probe labels, or None.

    Raises:
        ValueError: no labels, saying what to pass.
    """
    if y is None:
        raise ValueError(f"{name}: this probe needs labels; pass probe_data=(x, y) to probes.attach")


def tensor_input(name: str, x: Any) -> None:
    """``Needs(tensor_input=True)``: the probe inputs are one floating tensor with samples first.

    Args:
        name: the probe's name, for the message.
        x: the probe inputs.

    Raises:
        TypeError: inputs of another kind (a tuple, a dict, integer token ids).
    """
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        raise TypeError(f"{name}: the probe batch x must be one floating tensor with samples first")


def check_declared(name: str, probe: Probe, x: Any, y: torch.Tensor | None) -> None:
    """Every check that ``probe.needs`` asks for, on the probe batch as given.

    Args:
        name: the probe's name, for messages.
        probe: the probe.
        x: the probe inputs (or None).
        y: the probe labels (or None).
    """
    needs = type(probe).needs
    if needs.labels:
        labels(name, y)
    if needs.tensor_input and x is not None:
        tensor_input(name, x)
