"""Sinks: where records go. ``tensorboard`` (default with a logdir or writer), ``memory``."""

from __future__ import annotations

from probes.hookspecs import hookimpl
from probes.sinks.base import Sink
from probes.sinks.memory import MemorySink
from probes.sinks.tensorboard import TensorBoardSink

__all__ = ["Sink", "MemorySink", "TensorBoardSink"]


@hookimpl
def probes_add_sinks() -> dict[str, type[Sink]]:
    return {"tensorboard": TensorBoardSink, "memory": MemorySink}
