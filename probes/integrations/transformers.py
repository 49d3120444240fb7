"""Hugging Face ``Trainer``: ``ProbesCallback`` attaches probes to the model the Trainer trains.

```python
from probes.integrations.transformers import ProbesCallback
trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]),
                  train_dataset=train, eval_dataset=val,
                  callbacks=[ProbesCallback({"relu_zeros": {"every": 10}, "alignment": {"every": 50}},
                                            probe_data=val)])   # the probe batch: the first samples of val
trainer.train()                     # probe tags land in the Trainer's own TensorBoard run
```

The callback takes everything from what the Trainer hands every callback event: ``args``, ``state`` and the
keyword arguments ``model``, ``train_dataloader`` and ``eval_dataloader``. It never looks for the Trainer itself,
so it works however the Trainer is built, subclassed or called (``callbacks=[...]``, ``trainer.add_callback``).

- Attaches at ``on_train_begin`` to the event's ``model`` (unwrapped), closes at ``on_train_end`` (flushing passive
  probes and writing a last measurement).
- The probe step follows ``state.global_step`` (optimizer steps: gradient accumulation counts once). The probes left
  at their default cadence measure every ``ceil(state.max_steps / 10)`` steps when that is sooner than their
  default, so a short run gets about 10 points per probe (said once); a given ``every`` is kept.
- Records go to ``logdir`` when given; else (``writer=`` or ``sinks=`` without ``logdir``: only there); else into
  the directory of the Trainer's TensorBoard run: ``$TENSORBOARD_LOGGING_DIR``, else the ``output_dir/runs/<date>_
  <host>`` that the Trainer's ``TensorBoardCallback`` made at this ``on_train_begin`` (4.x: ``args.logging_dir``),
  so the probe tags sit next to ``train/loss``. Only the world process zero writes.
- The probe batch: ``probe_data`` as a batch (``(x, y)``, or a dict batch with ``labels`` inside: the model is
  called as ``model(**inputs)`` and the labels are the targets), a loader (its first batch), or a map-style
  dataset such as the eval dataset (its first ``per_device_eval_batch_size`` samples, collated as the Trainer
  collates training batches): pass ``probe_data=eval_dataset`` to measure on held-out samples. Without
  ``probe_data`` it is **not** the eval set: a callback is not handed the Trainer's ``eval_dataset`` at train
  begin, so the probe batch is the first ``per_device_eval_batch_size`` samples of the **training set** in index
  order (or, when the Trainer has evaluated before training, the first batch of the event's ``eval_dataloader``),
  said once in one line. The sampler is not touched and the random number generators are left as they were, so
  training is unchanged.
- Checkpoints: ``on_save`` writes the probe state (step counter and probe accumulators; tensors and plain data
  only) to ``probes_state.pt`` in the checkpoint folder ``<output_dir>[/<trial>]/checkpoint-<step>``;
  ``trainer.train(resume_from_checkpoint=...)`` loads it with ``torch.load(weights_only=True)`` from the folder
  whose ``trainer_state.json`` is the state the Trainer resumed (``args.resume_from_checkpoint``, else the
  ``checkpoint-<step>`` folders under ``output_dir``), and the probe steps continue (no second step-0 point). A
  checkpoint without that file continues from the Trainer's step.
- Under ``torch.distributed`` the session sums passive counts over ranks and only rank 0 writes.

``transformers`` is an optional extra (``pip install 'torch-probes[transformers]'``); importing ``probes`` never
imports it.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "probes.integrations.transformers needs Hugging Face transformers: pip install 'torch-probes[transformers]'"
    ) from exc

from probes.engine.session import Session
from probes.inputs import iter_tensors
from probes.integrations.core import CallbackCore, as_probe_data, first_batch, first_samples, notice

__all__ = ["ProbesCallback", "STATE_FILE"]

#: the file the callback writes into each Trainer checkpoint folder
STATE_FILE = "probes_state.pt"
_FORMAT = 1
_TRAINER_STATE = "trainer_state.json"


# -- where the Trainer writes -------------------------------------------------------------------
def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is one of transformers' causal language models (``GPT2LMHeadModel``, ``*ForCausalLM``): its
    loss pairs the logits at position t with the label at t + 1."""
    causal: Mapping[str, str]
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
    except ImportError:  # a transformers without the auto mapping: the naming convention alone
        causal = {}
    name = type(model).__name__
    return name in set(causal.values()) or name.endswith("ForCausalLM")


def _reports_to_tensorboard(args: Any) -> bool:
    report_to = getattr(args, "report_to", None) or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    return "tensorboard" in report_to or "all" in report_to


def _default_tensorboard_dir(args: Any, state: Any = None) -> str:
    """The directory of the Trainer's TensorBoard run, as its ``TensorBoardCallback`` chooses it.

    Args:
        args: the ``TrainingArguments``.
        state: the ``TrainerState`` (for the trial of a hyperparameter search); None: no trial.

    Returns:
        ``args.logging_dir`` (transformers 4.x), else ``$TENSORBOARD_LOGGING_DIR``, else
        ``output_dir/runs/<date>_<host>[/<trial>]``: the one that the ``TensorBoardCallback`` made in this second or
        the last (it runs first at ``on_train_begin``), else the name for now.
    """
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:  # transformers 4.x
        return str(logging_dir)
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    trial = getattr(state, "trial_name", None) if getattr(state, "is_hyper_param_search", False) else None
    if env and not trial:
        return os.path.expanduser(env)
    import socket

    now = datetime.now()
    names = [
        os.path.join("runs", t.strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname())
        for t in (now, now - timedelta(seconds=1))
    ]  # transformers' default_logdir(), now and a second ago
    candidates = [os.path.join(args.output_dir, n, *([trial] if trial else [])) for n in names]
    if _reports_to_tensorboard(args):
        for path in candidates:
            if os.path.isdir(path):
                return path
    return candidates[0]


def _checkpoint_folders(args: Any, step: int) -> list[str]:
    """``checkpoint-<step>`` folders where the Trainer may have put this step: ``output_dir`` and its trial runs."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
    found = [os.path.join(args.output_dir, name)] + sorted(
        glob.glob(os.path.join(glob.escape(args.output_dir), "*", name))
    )
    return [f for f in found if os.path.isdir(f)]


def _trainer_state(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, _TRAINER_STATE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_this_run(folder: str, state: Any) -> bool:
    """Whether ``folder`` holds the Trainer state ``state`` was saved as (its step and log history)."""
    saved = _trainer_state(folder)
    return (
        saved is not None
        and saved.get("global_step") == state.global_step
        and saved.get("log_history") == list(state.log_history)
    )


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


def _load(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, Mapping) or "session" not in payload:
        raise ValueError(f"ProbesCallback: {path} is not a probes state file")
    return dict(payload["session"])


class ProbesCallback(TrainerCallback):
    """Attach ``probes`` to the model a ``transformers.Trainer`` trains, for the length of ``train()``.

    Args:
        probes: names, or ``{name: options}`` (what ``probes.attach`` takes).
        probe_data: the fixed probe batch: a batch (``(x, y)``, or a dict batch with ``labels`` inside), a loader
            (its first batch) or a map-style dataset (its first ``per_device_eval_batch_size`` samples, collated
            as the Trainer collates); ``probe_data=eval_dataset`` measures on the eval set. Default: the first
            ``per_device_eval_batch_size`` samples of the training set (the callback does not see the Trainer's
            ``eval_dataset`` at train begin), or the first batch of the event's eval dataloader when the Trainer has
            evaluated before training; said once.
        logdir: TensorBoard directory; default: the Trainer's own TensorBoard run.
        **attach_kwargs: more ``probes.attach`` keywords (``sinks``, ``strict``, ``output``, ``label_key``, ...).

    Attributes:
        session: the ``probes`` session of the current (or last) ``train()``.
        resumed_from: the checkpoint folder whose probe state was loaded, if any.

    Raises:
        TypeError: ``optimizer=`` given (the step follows ``state.global_step``), or a bad probe spec.
        probes.plugins.UnknownProbeError: a probe name no plugin provides.
    """

    def __init__(self, probes: Any, probe_data: Any = None, logdir: str | None = None, **attach_kwargs: Any) -> None:
        self.core = CallbackCore("ProbesCallback", probes, attach_kwargs)
        self.probes = probes
        self.probe_data = probe_data
        self.logdir = logdir
        self.attach_kwargs = attach_kwargs
        self.resumed_from: str | None = None

    @property
    def session(self) -> Session | None:
        """The session of the current (or last) ``train()``; None before the first."""
        return self.core.session

    # -- helpers ----------------------------------------------------------------------------------
    def _output(self, args: Any, state: Any) -> str | None:
        """The logdir for ``probes.attach`` (None: the user's ``writer``/``sinks``, or not world process zero)."""
        if self.logdir is not None:
            return str(self.logdir)
        if "writer" in self.attach_kwargs or "sinks" in self.attach_kwargs or not state.is_world_process_zero:
            return None
        return _default_tensorboard_dir(args, state)

    def _probe_batch(self, args: Any, kwargs: Mapping[str, Any]) -> Any:
        data = self.probe_data
        if data is None and not self.core.needs_probe_batch:
            return None
        what = None  # where a default probe batch comes from, said once
        if data is None and kwargs.get("eval_dataloader") is not None:
            data = kwargs["eval_dataloader"]
            what = "the first batch of the Trainer's eval dataloader (it evaluated before training)"
        train = kwargs.get("train_dataloader")
        size = int(getattr(args, "per_device_eval_batch_size", 0) or getattr(train, "batch_size", 0) or 8)
        if data is None:
            if train is None or getattr(train, "dataset", None) is None:
                return None
            data = train.dataset
            what = "the first {n} samples of the training set (in index order), not the eval set"
        if isinstance(data, torch.utils.data.DataLoader):
            batch = first_batch(data)
        elif isinstance(data, torch.utils.data.Dataset):
            try:
                batch = first_samples(data, getattr(train, "collate_fn", None), size)
            except TypeError as exc:
                raise ValueError(f"ProbesCallback: {exc}") from exc
        else:
            batch = data
        if what is not None and batch is not None:
            found = [t for _, t in iter_tensors(batch) if t.ndim > 0]
            n = int(found[0].shape[0]) if found else size
            notice(
                f"ProbesCallback: without probe_data the probe batch is {what.format(n=n)}; pass "
                "probe_data=eval_dataset (or a batch, a loader) to choose it"
            )
        return batch

    def _resume_dir(self, args: Any, state: Any) -> str | None:
        if state.global_step <= 0:
            return None
        given = getattr(args, "resume_from_checkpoint", None)
        candidates = (
            [str(given)] if isinstance(given, (str, os.PathLike)) and os.path.isdir(given) else []
        ) + _checkpoint_folders(args, state.global_step)
        for folder in candidates:
            if os.path.isfile(os.path.join(folder, STATE_FILE)) and _is_this_run(folder, state):
                return folder
        return None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Attach to the event's ``model``; on a resumed run, load the probe state of the checkpoint.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            model: the model the Trainer trains.
            **kwargs: the rest of the event: ``train_dataloader``, ``eval_dataloader``, ``optimizer``, ...

        Raises:
            ValueError: no model, or active probes and no probe batch.
        """
        if model is None:
            raise ValueError("ProbesCallback: the Trainer passed no model to on_train_begin")
        batch = self._probe_batch(args, kwargs)
        if batch is None and self.core.needs_probe_batch:
            raise ValueError(
                "ProbesCallback: active probes need a probe batch: pass probe_data=(x, y), a dict "
                "batch with 'labels', a loader or a dataset (the eval dataset, say)"
            )
        probe_data, label_key = as_probe_data(batch, "ProbesCallback") if batch is not None else (None, None)
        extra: dict[str, Any] = {"logdir": self._output(args, state)}
        if label_key is not None and "label_key" not in self.attach_kwargs:
            extra["label_key"] = label_key  # the labels leave the inputs and become the targets
        if "label_shift" not in self.attach_kwargs and is_causal_lm(model):
            extra["label_shift"] = 1  # token labels: the features at position t pair with the label at t + 1
        resume_dir = self._resume_dir(args, state)
        saved = _load(resume_dir) if resume_dir is not None else None
        if state.global_step > 0 and saved is None:
            warnings.warn(
                f"ProbesCallback: training resumes at step {state.global_step} but no {STATE_FILE} of "
                "this run was found (set TrainingArguments.resume_from_checkpoint to the folder, or keep it "
                "under output_dir); the probes continue from that step with fresh state",
                stacklevel=2,
            )
        self.resumed_from = resume_dir if saved is not None else None
        self.core.start(
            model,
            probe_data,
            step=int(state.global_step),
            state=saved,
            total_steps=getattr(state, "max_steps", None),
            **extra,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Follow the Trainer's step and run what falls due there.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the rest of the event.
        """
        self.core.advance(int(state.global_step))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the probe state into the checkpoint folder the Trainer has just written.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the rest of the event.
        """
        if not self.core.open or not getattr(args, "should_save", state.is_world_process_zero):
            return
        folders = [f for f in _checkpoint_folders(args, state.global_step) if _is_this_run(f, state)]
        if not folders:
            warnings.warn(
                f"ProbesCallback: no {PREFIX_CHECKPOINT_DIR}-{state.global_step} folder of this run under "
                f"{args.output_dir}; probe state not saved",
                stacklevel=2,
            )
            return
        # several trials of a search may hold this step: the one written last is this one
        folder = max(folders, key=lambda f: os.path.getmtime(os.path.join(f, _TRAINER_STATE)))
        payload = {
            "format": _FORMAT,
            "global_step": int(state.global_step),
            "session": _safe_state(self.core.state_dict()),
        }
        torch.save(payload, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush passive probes, write the last measurement and close the session.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the rest of the event.
        """
        self.core.close()
