"""Sinks: where records go. ``tensorboard`` (default with a logdir or writer), ``memory``, ``wandb`` and
``mlflow`` (optional extras, imported only when such a sink is made). ``plan_sinks`` parses ``attach``'s sink spec
and builds every sink through one constructor protocol (``Sink.from_run(run, **options)``)."""

from __future__ import annotations

from probes.hookspecs import hookimpl
from probes.sinks.base import Sink
from probes.sinks.build import NamedSink, SinkPlan, plan_sinks
from probes.sinks.memory import MemorySink
from probes.sinks.mlflow import MlflowSink
from probes.sinks.tensorboard import TensorBoardSink
from probes.sinks.wandb import WandbSink

__all__ = ["Sink", "MemorySink", "TensorBoardSink", "WandbSink", "MlflowSink", "SinkPlan", "NamedSink", "plan_sinks"]


@hookimpl
def probes_add_sinks() -> dict[str, type[Sink]]:
    return {"tensorboard": TensorBoardSink, "memory": MemorySink, "wandb": WandbSink, "mlflow": MlflowSink}
