"""Lightning: ``ProbesCallback`` attaches probes to the ``LightningModule`` while ``fit`` trains.

```python
from probes.integrations.lightning import ProbesCallback
trainer = L.Trainer(callbacks=[ProbesCallback(["relu_zeros", "alignment"])], max_epochs=10)
trainer.fit(model, train_loader, val_loader)
```

- The probe cadence follows ``trainer.global_step`` (optimizer steps, so gradient accumulation counts once). The
  probes left at their default cadence measure every ``ceil(trainer.estimated_stepping_batches / 10)`` steps when
  that is sooner than their default, so a short ``fit`` gets about 10 points per probe (said once); a given
  ``every`` is kept, and a run of unknown length keeps the defaults.
- Points land on the steps of Lightning's logger, next to the module's own ``self.log`` points. Lightning logs what
  a training batch computes at the number of optimizer steps before that batch's own step (``self.log`` in
  ``training_step`` of the first batch writes at step 0; with ``log_every_n_steps=2`` at 1, 3, 5, ...). So a passive
  probe (which observes the training forwards, as ``training_step`` does) writes its window at the logger step of
  the window's last batch: with ``every=2``, at 1, 3, 5, ..., on the points of ``self.log`` with
  ``log_every_n_steps=2``. An active probe measures the weights after ``k`` optimizer steps and writes at step
  ``k``, the logger step of the batch whose forward uses exactly those weights (step 0 is the initialization).
- Records go to the trainer's ``TensorBoardLogger`` (its ``SummaryWriter``) when it has one; else to ``logdir``;
  else to memory (``callback.session.memory``).
- The probe batch is ``probe_data`` or, when not given, the first batch of the first validation loader
  (``(x, y, ...)``, ``{"x": .., "y": ..}``, a dict batch for ``model(**batch)`` with ``labels`` as the targets, or
  ``x``), moved to the module's device.
  Active probes call ``pl_module(x)``, so the module needs a ``forward``.
- Lightning saves the callback's ``state_dict`` (step counter and probe state) in its checkpoints under
  ``state_key``, which holds the probe names, so two callbacks in one Trainer keep separate states; a resumed
  ``fit`` continues the probe step. The session closes at the end of ``fit`` (or on an exception).
- Under a DDP strategy the session sums passive counts over ranks and only rank 0 writes.

``lightning`` is an optional extra (``pip install 'torch-probes[lightning]'``); ``pytorch_lightning`` works too.
Importing ``probes`` never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]
        from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[assignment]
    except ImportError as exc:
        raise ImportError(
            "probes.integrations.lightning needs Lightning: pip install 'torch-probes[lightning]' "
            "(or pytorch_lightning)"
        ) from exc

from probes import plugins
from probes.engine.run import Run
from probes.engine.session import Session
from probes.integrations.core import CallbackCore, as_probe_data, first_batch
from probes.records import Record
from probes.sinks.base import Sink
from probes.sinks.build import plan_sinks

__all__ = ["ProbesCallback"]


class _AtLoggerStep:
    """A sink mixin: the records of passive probes go one step earlier, to Lightning's logger step of the last
    batch of their window (the session's step counts the optimizer steps done, that batch's included)."""

    passive: frozenset[str] = frozenset()

    def write(self, records: Sequence[Record], step: int) -> None:
        passive = [r for r in records if r.tag.split("/", 1)[0] in self.passive]
        others = [r for r in records if r.tag.split("/", 1)[0] not in self.passive]
        if passive:
            super().write(passive, max(step - 1, 0))  # type: ignore[misc]
        if others:
            super().write(others, step)  # type: ignore[misc]


class _AtLoggerStepProxy(Sink):
    """A sink instance the user made, written through at Lightning's logger steps."""

    def __init__(self, inner: Sink, passive: frozenset[str]) -> None:
        self.inner, self.passive = inner, passive

    def write(self, records: Sequence[Record], step: int) -> None:
        passive = [r for r in records if r.tag.split("/", 1)[0] in self.passive]
        others = [r for r in records if r.tag.split("/", 1)[0] not in self.passive]
        if passive:
            self.inner.write(passive, max(step - 1, 0))
        if others:
            self.inner.write(others, step)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def _logger_step_sinks(sinks: Any, logdir: str | None, writer: Any, passive: frozenset[str]) -> list[Sink]:
    """The sinks ``attach`` would make from ``sinks``/``logdir``/``writer`` (the same plan, each named sink made by
    ``from_run`` of a subclass), writing at Lightning's logger steps."""

    def shifted(cls: type[Sink]) -> type[Sink]:
        return type(cls.__name__, (_AtLoggerStep, cls), {"passive": passive, "__module__": cls.__module__})

    plan = plan_sinks(sinks, logdir, writer, plugins.sink_class)
    made = plan.build(Run(logdir=logdir, writer=writer), wrap=shifted)
    return [_AtLoggerStepProxy(s, passive) if any(s is e for e in plan.entries) else s for s in made]


class ProbesCallback(Callback):
    """Attach ``probes`` to the LightningModule for the length of ``fit``.

    Args:
        probes: names, or ``{name: options}`` (what ``probes.attach`` takes).
        probe_data: the fixed probe batch ``(x, y)``; default: the first validation batch.
        logdir: TensorBoard directory when the trainer has no ``TensorBoardLogger``.
        **attach_kwargs: more ``probes.attach`` keywords (``sinks``, ``strict``, ``functional``, ``writer``).

    Attributes:
        session: the ``probes`` session of the current (or last) ``fit``.

    Raises:
        TypeError: ``optimizer=`` given (the step follows ``trainer.global_step``), or a bad probe spec.
        probes.plugins.UnknownProbeError: a probe name no plugin provides.
    """

    def __init__(self, probes: Any, probe_data: Any = None, logdir: str | None = None, **attach_kwargs: Any) -> None:
        self.core = CallbackCore("ProbesCallback", probes, attach_kwargs)
        self.probes = probes
        self.probe_data = probe_data
        self.logdir = logdir
        self.attach_kwargs = attach_kwargs

    @property
    def session(self) -> Session | None:
        """The session of the current (or last) ``fit``; None before the first."""
        return self.core.session

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class and the probe names.

        Returns:
            e.g. ``"ProbesCallback{'probes': ['relu_zeros', 'alignment']}"``.
        """
        return self._generate_state_key(probes=list(self.core.names))

    # -- the probe batch and the writer --------------------------------------------------
    @staticmethod
    def _validation_batch(trainer: pl.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            try:
                batch = first_batch(datamodule.val_dataloader())
                if batch is not None:
                    return batch
            except (NotImplementedError, AttributeError):
                pass
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()  # what the first validation does; Lightning keeps them
        except Exception as exc:  # noqa: BLE001 - Lightning's own complaint, with the way out added
            raise ValueError(
                f"ProbesCallback: could not load the first validation batch as the probe batch "
                f"({exc}); pass probe_data=(x, y) to the callback"
            ) from exc
        return first_batch(trainer.val_dataloaders)

    @staticmethod
    def _total_steps(trainer: pl.Trainer) -> Any:
        """The optimizer steps ``fit`` will take (``estimated_stepping_batches``), or None when Lightning cannot
        tell (an infinite or unsized loader without ``max_steps``)."""
        try:
            return trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - Lightning's own complaint: the length is unknown, the defaults stay
            return None

    @staticmethod
    def _writer(trainer: pl.Trainer) -> Any:
        for logger in getattr(trainer, "loggers", []) or []:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    # -- hooks ------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach, once the trainer's step is known (restored from a checkpoint or 0).

        Args:
            trainer: the Trainer.
            pl_module: the module it trains.

        Raises:
            ValueError: active probes and no probe batch.
        """
        probe_data, label_key = self.probe_data, None
        if probe_data is None and self.core.needs_probe_batch:
            batch = self._validation_batch(trainer)
            if batch is None:
                raise ValueError(
                    "ProbesCallback: active probes need a probe batch: pass probe_data=(x, y) or give "
                    "the trainer a validation loader (its first batch is used)"
                )
            probe_data, label_key = as_probe_data(batch, "ProbesCallback")
        writer = self.attach_kwargs.get("writer")
        if self.logdir is None and writer is None and trainer.global_rank == 0:
            writer = self._writer(trainer)
        extra: dict[str, Any] = {"logdir": self.logdir, "writer": writer}
        if label_key is not None and "label_key" not in self.attach_kwargs:
            extra["label_key"] = label_key
        sinks = (
            _logger_step_sinks(self.attach_kwargs.get("sinks"), self.logdir, writer, self.core.passive)
            if trainer.global_rank == 0
            else []
        )
        try:
            self.core.start(
                pl_module,
                probe_data,
                step=trainer.global_step,
                sinks=sinks,
                total_steps=self._total_steps(trainer),
                **extra,
            )
        except BaseException:
            for sink in sinks:
                sink.close()
            raise

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Follow ``trainer.global_step`` and run what falls due there.

        Args:
            trainer: the Trainer.
            pl_module: the module it trains.
            outputs: what ``training_step`` returned.
            batch: the batch.
            batch_idx: its index.
        """
        self.core.advance(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Flush passive probes, write the last measurement and close the session.

        Args:
            trainer: the Trainer.
            pl_module: the module it trained.
        """
        self.core.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Close the session when ``fit`` raises.

        Args:
            trainer: the Trainer.
            pl_module: the module it trained.
            exception: what was raised.
        """
        self.core.close()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The probe state Lightning keeps in a checkpoint (step counter and probe state).

        Returns:
            The session's state (the last one after ``fit``, the pending one before).
        """
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the probe state from a checkpoint; loaded into the session when ``fit`` trains.

        Args:
            state_dict: what ``state_dict`` returned.
        """
        self.core.load_state_dict(state_dict)
