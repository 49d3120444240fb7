"""Hugging Face ``Trainer``: ``ProbesCallback`` attaches probes to the model the Trainer trains.

```python
from probes.integrations.transformers import ProbesCallback
trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]),
                  train_dataset=train, eval_dataset=val,
                  callbacks=[ProbesCallback({"relu_zeros": {"every": 10}, "alignment": {"every": 50}})])
trainer.train()                     # probe tags land in the Trainer's own TensorBoard run
```

- Attaches at ``on_train_begin`` to the Trainer's model (``trainer.model``, unwrapped), closes at
  ``on_train_end`` (flushing passive probes and writing a last measurement).
- The probe step follows ``state.global_step`` (optimizer steps: gradient accumulation counts once).
- Records go to ``logdir`` when given; else, when the Trainer's ``TensorBoardCallback`` is active
  (``report_to=["tensorboard"]``), into its ``SummaryWriter``, next to the Trainer's own curves;
  else into the directory that callback would use (transformers 5: ``$TENSORBOARD_LOGGING_DIR``, else
  ``output_dir/runs/<date>_<host>``; 4.x: ``args.logging_dir``). Passing ``sinks=`` or ``writer=``
  without ``logdir`` sends records only there.
- The probe batch is ``probe_data`` or, when not given, the first batch of the Trainer's eval
  dataloader (a dict batch with ``labels`` inside: the model is called as ``model(**inputs)`` and the
  labels are the targets, ``label_key="labels"``), moved to the model's device. Drawing it leaves the
  random number generators as they were, so training is unchanged.
- Checkpoints: ``on_save`` writes the probe state (step counter and probe accumulators; tensors and
  plain data only) to ``probes_state.pt`` in the checkpoint folder (``output_dir/checkpoint-<step>``);
  ``trainer.train(resume_from_checkpoint=...)`` loads it with ``torch.load(weights_only=True)`` and the
  probe steps continue (no second step-0 point). A checkpoint without that file continues from the
  Trainer's step.
- Under ``torch.distributed`` the session sums passive counts over ranks and only rank 0 writes.

The Trainer does not hand callbacks the Trainer itself; the callback finds it on the call stack at
``on_train_begin`` (for the eval dataloader, the TensorBoard callback and the checkpoint being
resumed). ``transformers`` is an optional extra (``pip install probes[transformers]``); importing
``probes`` never imports it.
"""

from __future__ import annotations

import inspect
import os
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("probes.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'probes[transformers]'") from exc

import probes
from probes.engine.session import Session
from probes.integrations import needs_probe_data

__all__ = ["ProbesCallback", "STATE_FILE"]

#: the file the callback writes into each Trainer checkpoint folder
STATE_FILE = "probes_state.pt"
_FORMAT = 1


# -- finding the Trainer ----------------------------------------------------------------------
def _find_trainer(max_depth: int = 30) -> tuple[Any, dict[str, Any]]:
    """The ``transformers.Trainer`` whose method called this hook, and that frame's locals."""
    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < max_depth:
            obj = frame.f_locals.get("self")
            if isinstance(obj, transformers.Trainer):
                return obj, dict(frame.f_locals)
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    return None, {}


def _tensorboard_callback(trainer: Any) -> Any:
    from transformers.integrations import TensorBoardCallback

    handler = getattr(trainer, "callback_handler", None)
    for cb in getattr(handler, "callbacks", []) or []:
        if isinstance(cb, TensorBoardCallback):
            return cb
    return None


def _default_tensorboard_dir(args: Any) -> str:
    """Where the Trainer's ``TensorBoardCallback`` writes (transformers 5; 4.x: ``args.logging_dir``)."""
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:  # transformers 4.x
        return str(logging_dir)
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    try:
        from transformers.integrations.integration_utils import default_logdir
    except ImportError:  # pragma: no cover - layout of other versions
        import socket
        from datetime import datetime

        def default_logdir() -> str:
            return os.path.join("runs", datetime.now().strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname())
    return os.path.join(args.output_dir, default_logdir())


def _writer_is_closed(writer: Any) -> bool:
    return writer is not None and hasattr(writer, "all_writers") and writer.all_writers is None


# -- the probe batch --------------------------------------------------------------------------
class _KeepRNG:
    """Restore torch (CPU and CUDA), numpy and Python RNG states: drawing a batch must not move them."""

    def __enter__(self) -> _KeepRNG:
        self.py, self.np, self.cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        return self

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _first_eval_batch(trainer: Any, eval_dataloader: Any) -> Any:
    loader = eval_dataloader
    if loader is None and trainer is not None and getattr(trainer, "eval_dataset", None) is not None:
        eval_dataset = trainer.eval_dataset
        if isinstance(eval_dataset, Mapping):  # several eval sets: the first one
            eval_dataset = next(iter(eval_dataset.values()))
        with _KeepRNG():
            loader = trainer.get_eval_dataloader(eval_dataset)
    if loader is None:
        return None
    with _KeepRNG():
        return next(iter(loader), None)


# -- checkpoint files ---------------------------------------------------------------------------
def _safe(value: Any, where: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors and plain data."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_safe(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds only tensors and plain data")


def _safe_state(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _safe(v, k) for k, v in state.items() if k != "probes"}
    probes_state: dict[str, Any] = {}
    for name, sub in (state.get("probes") or {}).items():
        try:
            probes_state[name] = _safe(sub, f"probe {name!r} state")
        except TypeError as exc:
            warnings.warn(f"ProbesCallback: {exc}; that probe's state is left out of the checkpoint", stacklevel=3)
    out["probes"] = probes_state
    return out


class ProbesCallback(TrainerCallback):
    """Attach ``probes`` (names or ``{name: options}``) to the model a ``transformers.Trainer`` trains.

    ``probe_data``: the fixed probe batch (``(x, y)``, or a dict batch with ``labels`` inside);
    default: the first batch of the Trainer's eval dataloader.
    ``logdir``: TensorBoard directory; default: the Trainer's own TensorBoard run.
    Other keyword arguments go to ``probes.attach`` (``sinks``, ``strict``, ``output``, ``label_key``, ...).
    """

    def __init__(self, probes: Any, probe_data: Any = None, logdir: str | None = None, **attach_kwargs: Any) -> None:
        if "optimizer" in attach_kwargs:
            raise TypeError("ProbesCallback: the step follows the Trainer's state.global_step; do not pass optimizer=")
        self.probes = probes
        self.probe_data = probe_data
        self.logdir = logdir
        self.attach_kwargs = attach_kwargs
        self.session: Session | None = None
        self.resumed_from: str | None = None  # the checkpoint folder whose probe state was loaded
        self._shared_writer: Any = None

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def _open(self) -> bool:
        return self.session is not None and not self.session.closed

    def _output(self, args: Any, state: Any, trainer: Any, attach_kwargs: dict[str, Any]) -> str | None:
        """The logdir for ``probes.attach``; may put the Trainer's writer into ``attach_kwargs``."""
        if self.logdir is not None:
            return str(self.logdir)
        if "writer" in attach_kwargs or "sinks" in attach_kwargs:
            return None  # the user said where records go
        if not state.is_world_process_zero:
            return None  # only rank 0 writes
        tb = _tensorboard_callback(trainer) if trainer is not None else None
        if tb is not None and getattr(tb, "tb_writer", None) is not None:
            attach_kwargs["writer"] = self._shared_writer = tb.tb_writer
            return None
        if tb is not None and getattr(tb, "logging_dir", None):
            return str(tb.logging_dir)
        return _default_tensorboard_dir(args)

    def _resume_dir(self, args: Any, state: Any, frame_locals: Mapping[str, Any]) -> str | None:
        if state.global_step <= 0:
            return None
        path = frame_locals.get("resume_from_checkpoint")
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            return str(path)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        guess = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return guess if os.path.isdir(guess) else None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._open:  # a previous train() that raised left it open
            self.session.close()
        trainer, frame_locals = _find_trainer()
        if model is None and trainer is not None:
            model = trainer.model
        if model is None:
            raise ValueError("ProbesCallback: the Trainer passed no model to on_train_begin")
        probe_data = self.probe_data
        if probe_data is None and needs_probe_data(self.probes):
            probe_data = _first_eval_batch(trainer, kwargs.get("eval_dataloader"))
            if probe_data is None:
                raise ValueError("ProbesCallback: active probes need a probe batch: pass probe_data=(x, y) (or a "
                                 "dict batch with 'labels') or give the Trainer an eval_dataset (its first batch is "
                                 "used)")

        attach_kwargs = dict(self.attach_kwargs)
        if isinstance(probe_data, Mapping) and "labels" in probe_data:
            attach_kwargs.setdefault("label_key", "labels")  # the labels leave the inputs and become the targets
        self._shared_writer = None
        logdir = self._output(args, state, trainer, attach_kwargs)

        resume_dir = self._resume_dir(args, state, frame_locals)
        saved = self._load(resume_dir) if resume_dir is not None else None
        resuming = state.global_step > 0
        # a fresh run measures the initialization (step 0); a resumed one must not write a second step-0 point
        attach_kwargs.setdefault("measure_at_attach", not resuming)
        self.session = probes.attach(model, self.probes, probe_data=probe_data, logdir=logdir, **attach_kwargs)
        self.resumed_from = None
        if saved is not None:
            self.session.load_state_dict(saved)
            self.resumed_from = resume_dir
        if resuming and self.session.global_step != state.global_step:
            # no probe state in the checkpoint (or another step's): continue from the Trainer's step
            self.session.load_state_dict({"step": int(state.global_step)})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._open:
            return
        step = int(state.global_step)
        if step > self.session.global_step:
            advance = getattr(self.session, "advance_to", None)
            if advance is not None:
                advance(step)  # jump to the Trainer's step and run what falls due there
            else:  # engines before advance_to: set_step stepped through
                self.session.set_step(step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._open or not getattr(args, "should_save", state.is_world_process_zero):
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder = os.path.join(args.output_dir, name)
        if not os.path.isdir(folder):  # a hyperparameter search saves under output_dir/run-<trial>
            trainer, frame_locals = _find_trainer()
            if trainer is not None and hasattr(trainer, "_get_output_dir"):
                folder = os.path.join(trainer._get_output_dir(trial=frame_locals.get("trial")), name)
        if not os.path.isdir(folder):
            warnings.warn(f"ProbesCallback: checkpoint folder {folder} not found; probe state not saved", stacklevel=2)
            return
        payload = {"format": _FORMAT, "global_step": int(state.global_step),
                   "session": _safe_state(self.session.state_dict())}
        torch.save(payload, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._open:
            return
        writer = self._shared_writer
        closed_before = _writer_is_closed(writer)  # the TensorBoardCallback closes its writer first
        try:
            self.session.close()
        finally:
            if closed_before and not _writer_is_closed(writer):
                writer.close()  # the last records reopened it: close what they opened
            self._shared_writer = None

    # -- checkpoint files ---------------------------------------------------------------------------
    @staticmethod
    def _load(folder: str) -> dict[str, Any] | None:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            return None
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, Mapping) or "session" not in payload:
            raise ValueError(f"ProbesCallback: {path} is not a probes state file")
        return dict(payload["session"])

