"""Lightning: ``ProbesCallback`` attaches probes to the ``LightningModule`` when ``fit`` starts.

```python
from probes.integrations.lightning import ProbesCallback
trainer = L.Trainer(callbacks=[ProbesCallback(["relu_zeros", "alignment"])], max_epochs=10)
trainer.fit(model, train_loader, val_loader)
```

- The probe step follows ``trainer.global_step`` (optimizer steps, so gradient accumulation counts once).
- Records go to the trainer's ``TensorBoardLogger`` (its ``SummaryWriter``) when it has one, so the
  probe tags sit next to the module's own ``self.log`` curves; else to ``logdir``; else to memory
  (``callback.session.memory``).
- The probe batch is ``probe_data`` or, when not given, the first batch of the first validation
  loader (``(x, y, ...)``, ``{"x": .., "y": ..}`` or ``x``), moved to the module's device.
  Active probes call ``pl_module(x)``, so the module needs a ``forward``.
- Lightning saves the callback's ``state_dict`` (step counter and probe state) in its checkpoints
  and hands it back on resume; the session closes at the end of ``fit`` (or on an exception).
- Under a DDP strategy the session sums passive counts over ranks and only rank 0 writes.

``lightning`` is an optional extra (``pip install probes[lightning]``); ``pytorch_lightning`` works too.
Importing ``probes`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.callbacks import Callback
        from pytorch_lightning.loggers import TensorBoardLogger
    except ImportError as exc:
        raise ImportError("probes.integrations.lightning needs Lightning: pip install 'probes[lightning]' "
                          "(or pytorch_lightning)") from exc

import probes
from probes.engine.session import Session
from probes.integrations import needs_probe_data

__all__ = ["ProbesCallback"]


def _first_batch(loaders: Any) -> Any:
    """First batch of the first loader in ``loaders`` (a loader, or a list/dict of them)."""
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if not loaders:
            return None
        loaders = loaders[0]
    return next(iter(loaders), None)


def _as_probe_data(batch: Any) -> Any:
    """A validation batch as ``(x, y)`` / ``x`` for ``probes.attach``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "x" in batch:
            return (batch["x"], batch.get("y"))
        raise ValueError(f"ProbesCallback: a dict validation batch needs keys 'x' (and 'y'); got {sorted(batch)}; "
                         "pass probe_data=(x, y) to the callback")
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0], batch[1]) if len(batch) >= 2 else batch[0]
    raise ValueError(f"ProbesCallback: cannot use a validation batch of type {type(batch).__name__} as the probe "
                     "batch; pass probe_data=(x, y) to the callback")


class ProbesCallback(Callback):
    """Attach ``probes`` (names or ``{name: options}``) to the LightningModule for the length of ``fit``.

    ``probe_data``: the fixed probe batch ``(x, y)``; default: the first validation batch.
    ``logdir``: TensorBoard directory when the trainer has no ``TensorBoardLogger``.
    Other keyword arguments go to ``probes.attach`` (``sinks``, ``strict``, ``functional``, ``writer``).
    """

    def __init__(self, probes: Any, probe_data: Any = None, logdir: str | None = None, **attach_kwargs: Any) -> None:
        if "optimizer" in attach_kwargs:
            raise TypeError("ProbesCallback: the step follows trainer.global_step; do not pass optimizer=")
        self.probes = probes
        self.probe_data = probe_data
        self.logdir = logdir
        self.attach_kwargs = attach_kwargs
        self.session: Session | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_state: dict[str, Any] | None = None
        self._restored = False

    # -- the probe batch and the writer --------------------------------------------------
    def _validation_batch(self, trainer: pl.Trainer) -> Any:
        if getattr(trainer, "datamodule", None) is not None:
            try:
                batch = _first_batch(trainer.datamodule.val_dataloader())
                if batch is not None:
                    return batch
            except (NotImplementedError, AttributeError):
                pass
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        source = getattr(val_loop, "_data_source", None)
        if source is not None and not source.is_defined():
            return None  # no loader given to fit() and no val_dataloader() hook
        try:
            val_loop.setup_data()  # what the first validation would do; Lightning keeps the loaders
        except Exception as exc:  # noqa: BLE001 - Lightning's own complaint, with the way out added
            raise ValueError(f"ProbesCallback: could not load the first validation batch as the probe batch "
                             f"({exc}); pass probe_data=(x, y) to the callback") from exc
        batch = _first_batch(trainer.val_dataloaders)
        if batch is None and source is not None:
            batch = _first_batch(source.dataloader())
        return batch

    def _writer(self, trainer: pl.Trainer) -> Any:
        for logger in getattr(trainer, "loggers", []) or []:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe_data = self.probe_data
        if probe_data is None and needs_probe_data(self.probes):
            batch = self._validation_batch(trainer)
            if batch is None:
                raise ValueError("ProbesCallback: active probes need a probe batch: pass probe_data=(x, y) or give "
                                 "the trainer a validation loader (its first batch is used)")
            probe_data = _as_probe_data(batch)
        kwargs = dict(self.attach_kwargs)
        if self.logdir is None and "writer" not in kwargs:
            writer = self._writer(trainer)
            if writer is not None and trainer.global_rank == 0:
                kwargs["writer"] = writer
        # the first measurement waits for on_train_start, when the trainer's step is known: a fresh fit
        # measures the initialization at step 0, a resumed one does not write a stray step-0 point
        kwargs.setdefault("measure_at_attach", False)
        self.session = probes.attach(pl_module, self.probes, probe_data=probe_data, logdir=self.logdir, **kwargs)
        self._restored = self._pending_state is not None
        if self._pending_state is not None:
            self.session.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loops (and global_step) are restored after on_fit_start; a checkpoint without probe state
        # continues from the trainer's step instead of replaying the gap step by step
        if self.session is None:
            return
        if not self._restored and trainer.global_step > self.session.global_step:
            self.session.load_state_dict({"step": trainer.global_step})
        elif not self._restored and trainer.global_step == 0 and not self.attach_kwargs.get("measure_at_attach"):
            self.session.measure()  # the initialization, step 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.session is not None:
            self.session.advance_to(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.session is not None and not self.session.closed:
            self._last_state = self.session.state_dict()
            self.session.close()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.session is not None and not self.session.closed:
            return self.session.state_dict()
        return dict(self._last_state or self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.session is not None and not self.session.closed:
            self.session.load_state_dict(state_dict)
            self._restored = True
        else:
            self._pending_state = dict(state_dict)
