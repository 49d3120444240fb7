"""What the Lightning and Transformers callbacks share: spec parsing, the probe batch, the session's life.

A framework callback hands ``CallbackCore`` what its framework hands it (the model, a batch or a loader, the
trainer's step, a saved state) and calls ``start`` when training starts, ``advance`` after each optimizer step,
``close`` when training ends, and ``state_dict`` / ``load_state_dict`` for checkpoints. The probe spec is parsed
once, when the callback is made (``probes.engine.spec.ProbeSpec``), so a misspelled probe fails there and not
after the trainer has set up; the first run attaches the probes of that parse (a later run of the same callback,
new instances). A resumed run hands ``attach`` its state at the trainer's step (``probes.engine.resume``).

Cadences: when the framework knows the run's length (``total_steps`` at ``start``: the Trainer's ``state.max_steps``,
Lightning's ``estimated_stepping_batches``), the probes left at their default cadence (``every(k)``, no ``every=``
given) measure every ``ceil(total_steps / POINTS_PER_RUN)`` steps when that is sooner than their default, so a short
run gets about ``POINTS_PER_RUN`` points per probe (besides the one at attach) instead of two; said once, in one line.
A given ``every`` is kept, and a long run keeps the defaults.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import probes
from probes.engine import distributed
from probes.engine.failures import ProbesNoticeWarning, framework_driven, say
from probes.engine.resume import state_at
from probes.engine.session import Session
from probes.engine.spec import ProbeSpec
from probes.plugins import registry
from probes.schedules import every

__all__ = [
    "CallbackCore",
    "KeepRNG",
    "first_batch",
    "first_samples",
    "as_probe_data",
    "notice",
    "POINTS_PER_RUN",
    "run_cadence",
]

#: about how many points a probe at its default cadence gets over a run of known length (besides the one at attach)
POINTS_PER_RUN = 10


def notice(message: str) -> None:
    """Say ``message`` (one line) on rank 0 only, as the sessions a framework drives say things: a line on
    ``logging.getLogger("probes")`` (``probes.engine.failures.say``; a warning would point at the framework's code).

    Args:
        message: the line to say.
    """
    if distributed.rank_and_world()[0] == 0:
        say(message, ProbesNoticeWarning, framework=True)


def run_cadence(total_steps: Any) -> int | None:
    """The cadence that gives a run of ``total_steps`` optimizer steps about ``POINTS_PER_RUN`` points.

    Args:
        total_steps: the run's length as the framework knows it (None, 0, a negative number or infinity: unknown).

    Returns:
        ``ceil(total_steps / POINTS_PER_RUN)`` (at least 1), or None when the length is unknown.
    """
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, (int, float))
        or not math.isfinite(total_steps)
        or total_steps < 1
    ):
        return None
    return max(1, math.ceil(int(total_steps) / POINTS_PER_RUN))


class KeepRNG:
    """A context that restores the torch (CPU and CUDA), numpy and Python RNG states on exit.

    Drawing the probe batch (a loader's sampler, a dataset's random transform) must not move the user's random
    streams, or training would differ from a run without probes.
    """

    def __enter__(self) -> KeepRNG:
        self.py, self.np, self.cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        return self

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def first_batch(loaders: Any) -> Any:
    """The first batch of the first loader, drawn without moving any RNG.

    Args:
        loaders: a loader (any iterable of batches), a list/tuple of loaders, a dict of them, or None.

    Returns:
        The batch, or None when there is no loader or it is empty.
    """
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if not loaders:
            return None
        loaders = loaders[0]
    with KeepRNG():
        return next(iter(loaders), None)


def first_samples(dataset: Any, collate_fn: Any, n: int) -> Any:
    """The first ``n`` samples of a map-style dataset, in index order, collated into one batch.

    No sampler is touched and the RNG states are restored, so the training order is what it would be.

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        collate_fn: how the trainer collates samples (a loader's ``collate_fn``); None: ``default_collate``.
        n: how many samples (fewer when the dataset is shorter).

    Returns:
        The collated batch.

    Raises:
        TypeError: ``dataset`` is not map-style (an iterable dataset has no first ``n`` by index).
        ValueError: the dataset is empty.
    """
    if (
        isinstance(dataset, torch.utils.data.IterableDataset)
        or not hasattr(dataset, "__len__")
        or not hasattr(dataset, "__getitem__")
    ):
        raise TypeError(
            f"cannot take the first samples of a {type(dataset).__name__} by index (an iterable "
            "dataset): pass probe_data=(x, y) or a loader"
        )
    count = min(int(n), len(dataset))
    if count < 1:
        raise ValueError("the dataset for the probe batch is empty")
    collate = collate_fn if collate_fn is not None else torch.utils.data.default_collate
    with KeepRNG():
        return collate([dataset[i] for i in range(count)])


def as_probe_data(batch: Any, who: str) -> tuple[Any, str | None]:
    """A batch as ``probes.attach`` takes it.

    Args:
        batch: a tensor ``x``; a tuple/list ``(x, y, ...)``; a dict with ``"x"`` (and ``"y"``); or another dict
            batch (Hugging Face: the model is called as ``model(**inputs)``; ``"labels"`` inside are the targets).
        who: the callback's name, for the error message.

    Returns:
        ``(probe_data, label_key)`` for ``attach(probe_data=..., label_key=...)``.

    Raises:
        ValueError: a batch of another form (an empty sequence, a string, ...).
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "x" in batch:
            return (batch["x"], batch.get("y")), None
        return dict(batch), ("labels" if "labels" in batch else None)  # model(**inputs); no labels: none
    if isinstance(batch, (tuple, list)) and batch:
        return ((batch[0], batch[1]) if len(batch) >= 2 else batch[0]), None
    raise ValueError(
        f"{who}: cannot use a batch of type {type(batch).__name__} as the probe batch; pass "
        "probe_data=(x, y) to the callback"
    )


class CallbackCore:
    """One probe session per training run, driven by a framework callback.

    Args:
        who: the callback's name, for messages (``"ProbesCallback"``).
        probes: what ``probes.attach`` takes: names, classes, instances or ``{name: options}``.
        attach_kwargs: the other ``probes.attach`` keywords (``sinks``, ``strict``, ``output``, ...).

    Attributes:
        names: the probe names, in order.
        passive: the names of the passive probes (those that observe training forwards).
        needs_probe_batch: whether an active probe measures on a probe batch, so the callback must find one.
        session: the session of the current (or last) run; None before the first.

    Raises:
        TypeError: ``optimizer=`` among ``attach_kwargs`` (the step follows the trainer), or a bad spec.
        ValueError: a bad spec (an option a probe does not take, a name given twice).
        probes.plugins.UnknownProbeError: a probe name no plugin provides.
    """

    def __init__(self, who: str, probes: Any, attach_kwargs: Mapping[str, Any]) -> None:
        if "optimizer" in attach_kwargs:
            raise TypeError(f"{who}: the probe step follows the trainer's step; do not pass optimizer=")
        self.spec = ProbeSpec.parse(probes, registry)  # the one parse: the first run attaches these probes
        self.who = who
        self.probes = probes
        self.attach_kwargs = dict(attach_kwargs)
        self.names = self.spec.names
        self.passive = self.spec.passive
        self.needs_probe_batch = self.spec.needs_probe_batch
        self._spec_used = False
        self.session: Session | None = None
        self._pending: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None
        self._said_cadence = False

    @property
    def open(self) -> bool:
        """Whether a session is attached and not closed."""
        return self._live is not None

    @property
    def _live(self) -> Session | None:
        """The session while it is attached and not closed, else None."""
        return self.session if self.session is not None and not self.session.closed else None

    def start(
        self,
        model: nn.Module,
        probe_data: Any,
        *,
        step: int,
        state: Mapping[str, Any] | None = None,
        total_steps: Any = None,
        **attach_kwargs: Any,
    ) -> Session:
        """Attach a session for a training run that starts (or resumes) at ``step``.

        A fresh run (``step`` 0, no state) measures the initialization at step 0; a resumed one loads ``state``
        (else the state given to ``load_state_dict`` before) and writes no second step-0 point. When the state is
        of another step, or there is none, the probe step continues from ``step``.

        Args:
            model: the module to probe.
            probe_data: the probe batch, or None.
            step: the trainer's optimizer step now.
            state: a ``Session.state_dict()`` to resume from.
            total_steps: the run's length in optimizer steps when the framework knows it (None: unknown); the probes
                left at their default cadence then measure often enough for about ``POINTS_PER_RUN`` points.
            **attach_kwargs: more ``probes.attach`` keywords (``logdir``, ``writer``, ``label_key``, ``sinks``), over
                the callback's own ``attach_kwargs`` (the framework callback decides from those what to pass).

        Returns:
            The new session (also ``self.session``).

        Raises:
            ValueError: active probes and no probe batch; or what ``probes.attach`` raises.
        """
        if self.open:  # a previous run that raised left it open
            self.close()
        if probe_data is None and self.needs_probe_batch:
            raise ValueError(f"{self.who}: active probes need a probe batch: pass probe_data=(x, y) to the callback")
        if state is None:
            state, self._pending = self._pending, None
        kwargs = {**self.attach_kwargs, **attach_kwargs}
        kwargs["state"] = state_at(state, step)  # the one resume rule: a resumed run has no step-0 point
        spec, self._spec_used = (self.spec.fresh() if self._spec_used else self.spec), True
        with framework_driven():  # the session's notices and failures go to the "probes" log, not to warnings
            session = probes.attach(model, spec, probe_data=probe_data, **kwargs)
        self.session = session
        self._scale_cadences(session, total_steps)
        return session

    def _scale_cadences(self, session: Session, total_steps: Any) -> None:
        """Default ``every(k)`` cadences longer than ``run_cadence(total_steps)`` become that (said once)."""
        k = run_cadence(total_steps)
        if k is None:
            return
        scaled = []
        for name, probe in session.probes.items():
            schedule = session.schedules.get(name)
            if "every" in vars(probe) or not isinstance(schedule, every) or schedule.k <= k:
                continue  # a cadence given, a schedule of another kind, or already as frequent
            session.schedules[name] = every(k)
            scaled.append(f"{name} every {schedule.k}")
        if scaled and not self._said_cadence:
            self._said_cadence = True
            period = "every step" if k == 1 else f"every {k} steps"
            notice(
                f"{self.who}: a run of {int(total_steps)} steps: the probes at their default cadence measure "
                f"{period} (about {POINTS_PER_RUN} points each), not at their defaults ({', '.join(scaled)}); "
                "give every=... to keep a cadence"
            )

    def advance(self, step: int) -> None:
        """Move the session to the trainer's ``step`` and run what falls due there (nothing when it is not ahead).

        Args:
            step: the trainer's optimizer step.
        """
        live = self._live
        if live is not None and step > live.global_step:
            live.advance_to(int(step))

    def close(self) -> None:
        """Flush, write the last measurement and close the session (kept for ``state_dict``); harmless twice."""
        live = self._live
        if live is not None:
            self._last = live.state_dict()
            live.close()

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint keeps.

        Returns:
            The open session's ``state_dict()``; after ``close``, the state it closed with; before a session, the
            state waiting to be loaded (``{}`` when none).
        """
        live = self._live
        if live is not None:
            return live.state_dict()
        return dict(self._last or self._pending or {})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint's state: into the open session, else kept for the next ``start``.

        Args:
            state: what ``state_dict`` returned (``{}`` is ignored).
        """
        if not state:
            return
        live = self._live
        if live is not None:
            live.load_state_dict(state)
        else:
            self._pending = dict(state)

    @property
    def pending_state(self) -> dict[str, Any] | None:
        """The state that the next ``start`` loads, if any."""
        return self._pending
