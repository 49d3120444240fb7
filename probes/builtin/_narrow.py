"""Narrowing for the type checker: the values that the built-in probes know are there.

``probes.options.integer`` and ``number`` are annotated ``... | None`` for their ``optional=True`` case; an option
checked without it is never None (``required``). A probe that declares ``Needs(labels=True)`` or
``Needs(probe_data=True)`` is only measured with the labels and the output there; ``labels`` and ``output`` say so to
the type checker, and name the probe if they are called on a batch without them.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from probes.probe import ProbeBatch

T = TypeVar("T")


def required(value: T | None) -> T:
    """``value``, an option checked by ``probes.options`` without ``optional=True`` (never None)."""
    assert value is not None, "an option checked without optional=True is never None"
    return value


def labels(who: str, batch: ProbeBatch) -> torch.Tensor:
    """``batch.y``, which ``Needs(labels=True)`` makes ``attach`` require."""
    if batch.y is None:
        raise ValueError(f"{who}: the probe batch has no labels (y), which this probe needs")
    return batch.y


def output(who: str, batch: ProbeBatch) -> torch.Tensor:
    """``batch.output``, which ``Needs(probe_data=True)`` makes ``attach`` require."""
    if batch.output is None:
        raise ValueError(f"{who}: the probe batch has no output (no probe data), which this probe needs")
    return batch.output


def kept(who: str, site: str, value: torch.Tensor | None, what: str) -> torch.Tensor:
    """``value``, what the probe pass kept of ``site`` (``Activation.pre`` or ``post``), which the probe's
    ``Needs(sites=...)`` asks for; ``what`` names it for the message (``"input"``, ``"output"``)."""
    if value is None:
        raise ValueError(f"{who}: site {site!r} kept no {what} on the probe pass")
    return value
