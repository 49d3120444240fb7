"""What the sinks share: the ``Sink`` contract (defined in ``probes.sink``, beside ``probes.probe``, so that the
engine imports no sink) and the import of a tracker's package."""

from __future__ import annotations

import importlib
from typing import Any

from probes.sink import Sink, notice_no_renderer

__all__ = ["Sink", "notice_no_renderer", "import_tracker"]


def import_tracker(module: str, extra: str) -> Any:
    """Import a tracker's package, or raise an ImportError that says how to install it.

    Args:
        module: the package to import (``"wandb"``, ``"mlflow"``).
        extra: the extra of ``torch-probes`` that installs it.

    Returns:
        The module.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the {extra} sink needs {module}: pip install 'torch-probes[{extra}]' (or pip install {module}); {exc}"
        ) from exc
