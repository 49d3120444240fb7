"""Snapshot I/O: boolean gate arrays saved with ``np.packbits`` in an ``.npz``, read back without pickle.

One file per snapshot holds, for every site, the packed bits and the array's shape, the site names as a
unicode array, the step, and optionally the probe labels. ``load_gates`` checks the format and returns
the boolean arrays; nothing is ever unpickled (``np.load(..., allow_pickle=False)``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

FORMAT = "probes.gates.v1"
_NAME = re.compile(r"^step_(\d+)\.npz$")


@dataclass
class GateSnapshot:
    """One saved snapshot of gate patterns.

    Attributes:
        step: the step it was taken at.
        gates: site name -> bool array (samples first), in the order they were saved.
        labels: the probe batch's labels, when saved with them.
    """

    step: int
    gates: dict[str, np.ndarray]
    labels: np.ndarray | None = field(default=None, repr=False)


def _as_bool(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype != np.bool_:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"snapshots: gates of site {name!r} must be boolean or 0/1, got dtype {a.dtype}")
        a = a.astype(np.bool_)
    return a


def snapshot_path(directory: str | os.PathLike, step: int) -> Path:
    """The file of the snapshot at ``step`` in ``directory``.

    Args:
        directory: the snapshot folder.
        step: the training step.

    Returns:
        ``directory / "step_XXXXXXXX.npz"`` (the step zero-padded to 8 digits).
    """
    return Path(directory) / f"step_{int(step):08d}.npz"


def save_gates(
    path: str | os.PathLike,
    gates: Mapping[str, np.ndarray | torch.Tensor],
    step: int,
    labels: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write ``gates`` (site -> bool array) packed 8 per byte to ``path`` (a compressed ``.npz``).

    The file is written beside ``path`` and renamed onto it, so a reader never sees half a snapshot.

    Args:
        path: the file to write (its folder is created).
        gates: site name -> boolean (or 0/1) array or tensor, samples first.
        step: the training step stored with the gates.
        labels: the probe labels to store with them, a numeric array or tensor.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: gates that are neither boolean nor 0/1.
        TypeError: labels that are not numeric.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(gates)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "step": np.array(int(step), dtype=np.int64),
        "names": np.array(names, dtype=np.str_) if names else np.zeros(0, dtype="<U1"),
    }
    for i, name in enumerate(names):
        a = _as_bool(gates[name], name)
        arrays[f"bits_{i}"] = np.packbits(a.reshape(-1))
        arrays[f"shape_{i}"] = np.array(a.shape, dtype=np.int64)
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.dtype == object:
            raise TypeError("snapshots: labels must be a numeric array")
        arrays["labels"] = lab
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **cast("dict[str, Any]", arrays))  # no key is 'allow_pickle'
    os.replace(tmp, path)
    return path


def load_gates(path: str | os.PathLike) -> GateSnapshot:
    """Read a snapshot written by ``save_gates``; nothing is unpickled.

    Args:
        path: a file written by ``save_gates``.

    Returns:
        The ``GateSnapshot``: its step, site name -> bool array, and the labels if they were saved.

    Raises:
        ValueError: a foreign file (no ``probes.gates.v1`` format entry), or a damaged one (missing entries, a
            wrong number of bytes for a shape), or an object array that would need pickle.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if "format" not in keys or str(data["format"]) != FORMAT:
            raise ValueError(f"{path}: not a probes gate snapshot (format {FORMAT!r} expected)")
        names = [str(n) for n in data["names"]]
        gates: dict[str, np.ndarray] = {}
        for i, name in enumerate(names):
            if f"bits_{i}" not in keys or f"shape_{i}" not in keys:
                raise ValueError(f"{path}: site {name!r} has no bits/shape entries; the file is damaged")
            shape = tuple(int(s) for s in data[f"shape_{i}"])
            count = int(np.prod(shape)) if shape else 1
            bits = data[f"bits_{i}"]
            if bits.dtype != np.uint8 or bits.size != (count + 7) // 8:
                raise ValueError(
                    f"{path}: site {name!r} holds {bits.size} bytes for {count} gates; the file is damaged"
                )
            gates[name] = np.unpackbits(bits, count=count).astype(np.bool_).reshape(shape)
        labels = data["labels"] if "labels" in keys else None
        return GateSnapshot(int(data["step"]), gates, labels)


def list_snapshots(directory: str | os.PathLike) -> list[Path]:
    """The ``step_XXXXXXXX.npz`` files in ``directory``, by step.

    Args:
        directory: the snapshot folder.

    Returns:
        The files in order of step; empty when the folder does not exist.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_all(directory: str | os.PathLike) -> list[GateSnapshot]:
    """Every snapshot in ``directory``, by step.

    Args:
        directory: the snapshot folder.

    Returns:
        One ``GateSnapshot`` per file of ``list_snapshots``.

    Raises:
        ValueError: as ``load_gates``.
    """
    return [load_gates(p) for p in list_snapshots(directory)]
