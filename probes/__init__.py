"""probes: instrument PyTorch training for people who study how networks learn.

``probes.attach(model, ["pathgram", "relu_zeros"], probe_data=(x, y), logdir="runs/exp1")``
hooks probes onto any ``nn.Module``; each probe returns records that the session hands
to TensorBoard (or any other sink). Third-party packages add probes through the
``probes`` entry-point group.

The distribution is ``torch-probes`` (``pip install torch-probes``); the import name, the ``probes``
command and the entry-point group are ``probes``. Documentation: the MkDocs site under ``docs/``.
"""

from __future__ import annotations

from probes import records, schedules
from probes.engine.attach import attach
from probes.engine.session import (
    ProbeFailedWarning,
    ProbesClosedError,
    ProbesNoticeWarning,
    Session,
    SinkFailedWarning,
)
from probes.hookspecs import hookimpl
from probes.plugins import ProbeInfo
from probes.probe import Activation, Context, Needs, Probe, ProbeBatch, ProbeContext, Site
from probes.records import Histogram, Image, Scalar

# the one place the version is written: pyproject.toml reads it (dynamic = ["version"]), and so
# does tests/test_release.py for the archives
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
