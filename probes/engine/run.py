"""The run context: what every part of a session knows about the run it measures, built once at attach and shared
by reference (the session, the active and passive drivers, the output). Only the step clock moves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Run", "StepClock"]


@dataclass
class StepClock:
    """The session's step counter, shared by reference: the session moves it, the drivers read ``step``."""

    step: int = 0


@dataclass(frozen=True)
class Run:
    """The settings of one attached run (frozen); ``clock`` is the one thing that moves.

    Args:
        rank, world_size: this process's rank and the number of ranks (0 and 1 without ``torch.distributed``).
        device: the model's device at attach (the device of the ranks' collectives; the CPU unless given).
        sharded: the model is sharded (FSDP): every forward all-gathers, so every rank runs the probe passes.
        collective: the ranks measure together (a sharded model, or a ``sharding="per_sample"`` probe under DDP).
        logdir: where the session writes (``attach(logdir=...)``, or the user's writer's folder); writer: that
            writer (``attach(writer=...)``), shared by the TensorBoard sink.
        mask_key: the probe inputs' entry holding the attention mask; label_shift: ``ProbeBatch.label_shift``.
        strict: a probe's error is raised instead of switching the probe off.
        optimizer: the optimizer given to ``attach`` (``batch.context.optimizer``), or None.
        clock: the session's step.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False
    collective: bool = False
    logdir: str | None = None
    writer: Any = None
    mask_key: str | None = None
    label_shift: int = 0
    strict: bool = False
    optimizer: Any = None
    clock: StepClock = field(default_factory=StepClock, compare=False)

    @property
    def writes(self) -> bool:
        """Whether this rank writes (rank 0 only)."""
        return self.rank == 0

    @property
    def step(self) -> int:
        """The session's current step."""
        return self.clock.step
