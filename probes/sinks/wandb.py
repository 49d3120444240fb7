"""Weights & Biases sink: scalars, histograms (``wandb.Histogram``) and images (``wandb.Image``) at the record's
step, into the user's run (``wandb.run``) or one this sink starts (and finishes at ``close``).

``wandb`` is an optional extra (``pip install 'torch-probes[wandb]'``), imported when the sink is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probes.records import Histogram, Image, Record, Renderer, Scalar
from probes.sinks.base import Sink, import_tracker

__all__ = ["WandbSink"]


class WandbSink(Sink):
    """Write records to a Weights & Biases run.

    Scalars are logged under their tag, histograms as ``wandb.Histogram`` (the record's own bins; non-finite values
    as the scalar ``<tag>/nonfinite``), images as ``wandb.Image``; each ``write`` is one ``run.log(..., step=step)``,
    so the record's step is the run's step (or, with ``step_metric``, a metric of its own). The run is the one given,
    else ``wandb.run`` when one is active, else a new ``wandb.init(project=..., name=..., **init_options)``; it is
    found at the first ``write`` (a sink made on every rank starts nothing where the session does not write), and
    only a run this sink started is finished at ``close``.

    Args:
        project: the project of a run this sink starts (default: wandb's, e.g. ``WANDB_PROJECT``).
        name: the name of a run this sink starts.
        run: a run to share (default: ``wandb.run`` if active, else start one).
        renderer: what draws the pictures (``probes.records.Renderer``; None: ``default_renderer()``, at the
            first picture; without matplotlib pictures are left out after one notice).
        prefix: put before every key (``"probes/"``: the probes' charts in a section of their own).
        step_metric: log the step as this metric and plot the probes' keys against it (``define_metric``) instead
            of passing ``step=``: for a shared run whose own step runs ahead of the session's (several
            ``wandb.log`` calls per training step), where wandb drops data logged at an earlier step.
        **init_options: passed to ``wandb.init`` (``entity``, ``config``, ``dir``, ``mode``, ...).

    Raises:
        ImportError: wandb is not installed.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        run: Any = None,
        prefix: str = "",
        step_metric: str | None = None,
        renderer: Renderer | None = None,
        **init_options: Any,
    ) -> None:
        self._wandb = import_tracker("wandb", "wandb")
        self.renderer = renderer
        self._init = dict(init_options, project=project, name=name)
        self.run = run
        self.owns = False
        self.prefix = str(prefix)
        self.step_metric = step_metric
        self._defined: set[str] = set()
        self._closed = False

    @property
    def where(self) -> str | None:
        """The run's address (its directory when offline), for messages."""
        run = self.run
        if run is None:
            return None
        return getattr(run, "url", None) or getattr(run, "dir", None)

    def _active_run(self) -> Any:
        if self.run is None:
            if self._wandb.run is not None:
                self.run = self._wandb.run
            else:
                self.run = self._wandb.init(**{k: v for k, v in self._init.items() if v is not None})
                self.owns = True
        return self.run

    def write(self, records: Sequence[Record], step: int) -> None:
        """Log the records of one step in one ``run.log``.

        Args:
            records: the records of one step.
            step: their step.

        Raises:
            TypeError: something that is not a record.
            RuntimeError: the sink is closed.
        """
        if self._closed:
            raise RuntimeError("wandb sink: write after close")
        payload: dict[str, Any] = {}
        for r in records:
            key = self.prefix + r.tag
            if isinstance(r, Scalar):
                payload[key] = r.item()
            elif isinstance(r, Histogram):
                payload.update(self._histogram(key, r))
            elif isinstance(r, Image):
                if not r.pending or self._pictures() is not None:  # without matplotlib: left out, one notice
                    payload[key] = self._wandb.Image(r.as_uint8(self.renderer))
            else:
                raise TypeError(f"wandb sink: not a record: {r!r}")
        if not payload:
            return
        run = self._active_run()
        if self.step_metric is None:
            run.log(payload, step=int(step))
            return
        self._define(run, payload)
        run.log({**payload, self.step_metric: int(step)})

    def _histogram(self, key: str, r: Histogram) -> dict[str, Any]:
        h = r.on_host()
        out: dict[str, Any] = {}
        if int(h.nonfinite):
            out[f"{key}/nonfinite"] = int(h.nonfinite)
        if float(h.num) > 0:
            out[key] = self._wandb.Histogram(np_histogram=(h.counts.numpy(), h.edges.numpy()))
        return out

    def _define(self, run: Any, payload: dict[str, Any]) -> None:
        """Plot every key against ``step_metric``: one ``define_metric`` per first component, the first time."""
        step_metric = self.step_metric
        assert step_metric is not None  # ``write`` defines the metrics only with a step metric
        if not self._defined:
            run.define_metric(step_metric)
            self._defined.add(step_metric)
        for key in payload:
            glob = key.split("/")[0] + "/*" if "/" in key else key
            if glob not in self._defined:
                run.define_metric(glob, step_metric=self.step_metric)
                self._defined.add(glob)

    def close(self) -> None:
        """Finish the run if this sink started it (a shared run goes on). Harmless twice."""
        if self._closed:
            return
        self._closed = True
        if self.owns and self.run is not None:
            self.run.finish()
