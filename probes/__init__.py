"""probes: instrument PyTorch training for people who study how networks learn.

``probes.attach(model, ["pathgram", "relu_zeros"], probe_data=(x, y), logdir="runs/exp1")``
hooks probes onto any ``nn.Module``; each probe returns records that the session hands
to TensorBoard (or any other sink). Third-party packages add probes through the
``probes`` entry-point group.

The distribution is ``torch-probes`` (``pip install torch-probes``); the import name, the ``probes``
command and the entry-point group are ``probes``. Documentation: the MkDocs site under ``docs/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from probes import plugins, records, schedules
from probes.engine.session import (
    ProbeFailedWarning,
    ProbesClosedError,
    ProbesNoticeWarning,
    Session,
    SinkFailedWarning,
)
from probes.engine.spec import DEFAULT_PROBE_BATCH_SIZE, Options
from probes.hookspecs import hookimpl
from probes.plugins import ProbeInfo
from probes.probe import Activation, Context, Needs, Probe, ProbeBatch, ProbeContext, Site
from probes.records import Histogram, Image, Scalar
from probes.sinks.build import plan_sinks

# the one place the version is written: pyproject.toml reads it (dynamic = ["version"]), and so
# does tests/project/test_release.py for the archives
__version__ = "0.1.0"

__all__ = [
    "attach",
    "available",
    "Session",
    "Probe",
    "ProbeBatch",
    "ProbeContext",
    "Needs",
    "Context",
    "Site",
    "Activation",
    "ProbeInfo",
    "hookimpl",
    "records",
    "schedules",
    "Scalar",
    "Histogram",
    "Image",
    "ProbesClosedError",
    "ProbeFailedWarning",
    "ProbesNoticeWarning",
    "SinkFailedWarning",
    "__version__",
]


def available() -> list[ProbeInfo]:
    """Every probe that ``attach`` accepts: the built-in ones, those of installed plugins, registered ones.

    Returns:
        One ``ProbeInfo`` per probe: its name, one-line description, class and where it came from
        (``builtin``, ``registered``, or the distribution that added it).
    """
    from probes.plugins import available as _available

    return _available()


def attach(
    model: nn.Module,
    probes: Any,
    *,
    probe_data: Any = None,
    label_key: str | None = None,
    output: Any = None,
    logdir: str | None = None,
    writer: Any = None,
    sinks: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = False,
    functional: bool | None = None,
    measure_at_attach: bool = True,
    state: Mapping[str, Any] | None = None,
    probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE,
    overhead: float | str | None = "auto",
    mask: str | None = "attention_mask",
    norm_stats: str = "running",
    label_shift: int = 0,
    grad_scaler: Any = None,
) -> Session:
    """Attach probes to ``model`` and return the ``Session`` (or raise and leave nothing behind).

    Args:
        model: any ``nn.Module`` (DDP, ``torch.compile`` and FSDP2-sharded models too).
        probes: a list of names, or ``{name: options}``; ``every`` (an int or a schedule from
            ``probes.schedules``) sets a probe's cadence. ``"auto"``: every available probe that applies to this
            model at its defaults; each one left out is said in one line (explicit names raise instead).
        probe_data: the fixed probe batch of active probes: ``(x, y)`` or ``x``, with ``x`` a tensor
            (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``); or a dict batch with the
            labels inside under ``label_key``. The samples are the leading dimension of every tensor. At each
            measurement the tensors follow the model's current device, floating ones its current dtype.
        label_key: the key of the labels in a dict ``probe_data`` (Hugging Face batches: ``"labels"``).
        output: which tensor of what the model returns the probes use: a key or attribute name, or a callable
            ``output -> tensor`` (default: a tensor itself, ``logits`` of a ModelOutput/dict, the first tensor
            of a tuple).
        logdir: the TensorBoard log directory.
        writer: a user's ``SummaryWriter`` to share instead (not closed by the session); not with ``logdir``.
        sinks: more sinks by name or instance, or ``{name: options}`` (each made by ``Sink.from_run(run,
            **options)``); default ``memory`` when there is no logdir.
        optimizer: step automatically after every ``optimizer.step()``.
        strict: re-raise a probe's error instead of switching the probe off.
        functional: catch functional activations (``F.relu`` in ``forward``); default auto.
        measure_at_attach: measure the active probes once now, the initialization (step 0). Without it each
            probe's ``check`` still checks the probe batch at attach.
        state: a ``Session.state_dict()`` to resume from (no step-0 measurement is written).
        probe_batch_size: the probe pass runs the probe batch in chunks of this many samples, keeping of each
            site only what the due probes read (gates as bits for ``patterns``); None: one pass.
        overhead: a fraction of training time (e.g. 0.05) for the active probes together: a probe whose
            measurements would cost more than its equal share at its ``every(k)`` cadence measures less often
            (``k`` rounded up to 1, 2, 5 x 10^n), timed on its own measurements; said once. "auto" (default): 10%,
            for probes left at their default cadence only, once they have spent 2 s measuring; a cadence you give
            is kept. None: every cadence exactly as it is.
        mask: the keyword argument (or dict entry) of the model's forward that holds the attention mask, ``(batch,
            positions)`` with 0 at padding: passive probes leave padded positions of site tensors shaped ``(batch,
            positions, ...)`` out, and active probes get the probe batch's mask as ``ProbeBatch.mask``. None: no
            masking.
        norm_stats: what batch-norm layers normalise by in the probe pass (eval mode): "running" (their running
            statistics; a notice says once when the predictions disagree sharply with batch statistics) or "batch"
            (the statistics of the probe batch, of each chunk; the running statistics are left untouched).
        label_shift: with token labels ``(P, T)`` (``-100`` where a position has none), the features at position
            ``t`` pair with the label at ``t + label_shift``: 1 for a causal language model with ``labels =
            input_ids``, as in its own loss (the Transformers callback sets it for causal LMs); 0 otherwise.
        grad_scaler: the ``torch.amp.GradScaler`` that steps ``optimizer``: iterations it skipped (inf or NaN
            gradients, so ``optimizer.step()`` did not run and the session's step did not advance) are counted and
            logged as ``train/skipped_steps`` (cumulative) at the next real step and at ``close()``.

    Returns:
        The ``Session``: ``step()``, ``close()`` (or use it as a context manager), ``state_dict()``.

    Raises:
        TypeError: an option of the wrong type (the message names the option or the probe).
        ValueError: a bad option value, probe batch or label, or a probe that cannot apply to this model.
    """
    return Session(
        model,
        probes,
        Options(
            probe_data=probe_data,
            label_key=label_key,
            output=output,
            logdir=logdir,
            writer=writer,
            sinks=sinks,
            optimizer=optimizer,
            strict=strict,
            functional=functional,
            measure_at_attach=measure_at_attach,
            state=state,
            probe_batch_size=probe_batch_size,
            overhead=overhead,
            mask=mask,
            norm_stats=norm_stats,
            label_shift=label_shift,
            grad_scaler=grad_scaler,
        ),
        sinks=plan_sinks,  # sinks are made above the engine, each through Sink.from_run
        catalog=plugins.registry,  # the engine looks names up here and imports no registry
    )
