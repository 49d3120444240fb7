"""MLflow sink: scalars as metrics at the record's step, histograms as metrics of their quantiles, images with
``log_image(key=, step=)``, into the active run (``mlflow.active_run()``) or one this sink starts (and ends at
``close``).

``mlflow`` (or the lighter ``mlflow-skinny``) is an optional extra (``pip install 'torch-probes[mlflow]'``),
imported when the sink is made.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from probes.records import Histogram, Image, Record, Renderer, Scalar
from probes.sinks.base import Sink, import_tracker

__all__ = ["MlflowSink", "histogram_quantiles", "metric_key"]

#: the quantiles a histogram is logged as, beside its min, max and mean
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

_BAD = re.compile(r"[^/\w.\- ]")


def metric_key(tag: str) -> str:
    """An MLflow metric name for a tag: characters MLflow refuses (``#`` of ``act#2``) become ``_``.

    Args:
        tag: a record's tag.

    Returns:
        The metric name.
    """
    return _BAD.sub("_", tag)


def histogram_quantiles(h: Histogram, quantiles: Sequence[float] = QUANTILES) -> dict[str, float]:
    """Summary statistics of a binned histogram: ``min``, ``max``, ``mean`` exact, quantiles interpolated linearly
    inside their bin (exact to one bin width).

    Args:
        h: the histogram (on any device).
        quantiles: in [0, 1].

    Returns:
        ``{"min", "max", "mean", "p05", "p25", ...}``; empty when the histogram holds no finite value.
    """
    h = h.on_host()
    num = float(h.num)
    if num <= 0:
        return {}
    counts, edges = h.counts.double(), h.edges.double()
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0)])  # values below each edge
    out = {"min": float(h.min), "max": float(h.max), "mean": float(h.sum) / num}
    for q in quantiles:
        target = min(max(float(q), 0.0), 1.0) * float(cum[-1])
        i = int(torch.searchsorted(cum[1:], torch.tensor(target, dtype=torch.float64)).clamp(max=counts.numel() - 1))
        inside = (target - float(cum[i])) / float(counts[i]) if float(counts[i]) > 0 else 0.0
        value = float(edges[i]) + inside * float(edges[i + 1] - edges[i])
        out[f"p{round(q * 100):02d}"] = min(max(value, out["min"]), out["max"])
    return out


class MlflowSink(Sink):
    """Write records to an MLflow run.

    Scalars are metrics named by their tag (``metric_key``) at the record's step, one ``log_batch`` per ``write``.
    A histogram becomes the metrics ``<tag>/min``, ``/max``, ``/mean`` and ``/p05`` ... ``/p95``
    (``histogram_quantiles``; ``/nonfinite`` when it left values out), line charts in the MLflow UI; an image goes
    to ``log_image(image, key=tag, step=step)`` (Pillow needed). The run is ``run_id`` when given, else
    ``mlflow.active_run()`` when one is active, else a new run in ``experiment`` (by name, made if missing;
    default: ``MLFLOW_EXPERIMENT_NAME`` or ``Default``) on ``tracking_uri`` (default: MLflow's). It is found at
    the first ``write``, and only a run this sink started is ended (``FINISHED``) at ``close``.

    Args:
        experiment: the experiment of a run this sink starts.
        run_name: the name of a run this sink starts.
        tracking_uri: where a run this sink starts is tracked (``sqlite:///mlflow.db``, ``http://host:5000``).
        run_id: a run to share (default: the active run, else start one).
        prefix: put before every metric name.
        quantiles: the quantiles a histogram is logged as.
        renderer: what draws the pictures (``probes.records.Renderer``; None: ``default_renderer()``, at the
            first picture; without matplotlib pictures are left out after one notice).

    Raises:
        ImportError: MLflow is not installed.
    """

    def __init__(
        self,
        experiment: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        prefix: str = "",
        quantiles: Sequence[float] = QUANTILES,
        renderer: Renderer | None = None,
    ) -> None:
        self._mlflow = import_tracker("mlflow", "mlflow")
        self.renderer = renderer
        self.experiment, self.run_name, self.tracking_uri = experiment, run_name, tracking_uri
        self.run_id = run_id
        self.owns = False
        self.prefix = str(prefix)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.client: Any = None
        self._closed = False

    @property
    def where(self) -> str | None:
        """The tracking URI and the run, for messages."""
        if self.client is None:
            return self.tracking_uri
        return f"{self.client.tracking_uri} run {self.run_id}"

    def _run(self) -> str:
        if self.client is not None:
            assert self.run_id is not None  # set with the client, on each of the paths below
            return self.run_id
        mlflow = self._mlflow
        if self.run_id is not None:  # a run given: on tracking_uri (default: MLflow's)
            self.client = mlflow.MlflowClient(self.tracking_uri)
            return self.run_id
        active = mlflow.active_run()
        if active is not None:  # the user's run, where the fluent API tracks it
            self.client, self.run_id = mlflow.MlflowClient(), active.info.run_id
            return self.run_id
        client = mlflow.MlflowClient(self.tracking_uri)
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        self.client, self.owns = client, True
        return self.run_id

    def write(self, records: Sequence[Record], step: int) -> None:
        """Log the scalars and histogram summaries of one step in one ``log_batch``, then the images.

        Args:
            records: the records of one step.
            step: their step.

        Raises:
            TypeError: something that is not a record.
            RuntimeError: the sink is closed.
        """
        if self._closed:
            raise RuntimeError("mlflow sink: write after close")
        values: dict[str, float] = {}
        images: list[Image] = []
        for r in records:
            key = metric_key(self.prefix + r.tag)
            if isinstance(r, Scalar):
                values[key] = r.item()
            elif isinstance(r, Histogram):
                values.update({f"{key}/{k}": v for k, v in histogram_quantiles(r, self.quantiles).items()})
                nonfinite = int(r.nonfinite)
                if nonfinite:
                    values[f"{key}/nonfinite"] = float(nonfinite)
            elif isinstance(r, Image):
                if not r.pending or self._pictures() is not None:  # without matplotlib: left out, one notice
                    images.append(r)
            else:
                raise TypeError(f"mlflow sink: not a record: {r!r}")
        if not values and not images:
            return
        run_id = self._run()
        if values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, int(step)) for k, v in values.items()])
        for r in images:
            self.client.log_image(
                run_id, r.as_uint8(self.renderer), key=metric_key(self.prefix + r.tag), step=int(step)
            )

    def close(self) -> None:
        """End the run if this sink started it (a shared run goes on). Harmless twice."""
        if self._closed:
            return
        self._closed = True
        if self.owns and self.client is not None:
            self.client.set_terminated(self.run_id, "FINISHED")
