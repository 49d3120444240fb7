"""Data sets for the examples and the demo. Nothing here downloads anything.

- ``load_digits``: scikit-learn's 1,797 handwritten digits (8 x 8, UCI), shipped inside
  the package as ``_data/digits.npz`` (read with ``allow_pickle=False``).
- ``load_mnist``: reads the four MNIST IDX files (optionally gzipped) from a directory the
  user already has; ``read_idx`` is the plain IDX reader.
- ``load_mnist_torchvision``: torchvision's MNIST, only where torchvision imports.
"""

from __future__ import annotations

import gzip
import os
import struct
from importlib import resources
from pathlib import Path

import numpy as np
import torch

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_digits(classes: tuple[int, ...] | None = None, size: int | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits as ``(x, y)``: ``x`` of shape (N, size*size) in [0, 1], ``y`` class indices.

    ``classes`` keeps only those digits (labels stay the digit values); ``size`` resizes the
    8 x 8 images bilinearly (28 gives MNIST-sized 784-dimensional inputs).
    """
    with resources.files("probes").joinpath("_data/digits.npz").open("rb") as f:
        data = np.load(f, allow_pickle=False)
        images, target = data["images"].astype(np.float32) / 16.0, data["target"].astype(np.int64)
    x = torch.from_numpy(images)
    y = torch.from_numpy(target)
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    if size is not None and size != 8:
        x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return x.reshape(x.shape[0], -1).to(dtype), y


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not, without pickle."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    kind, ndim = raw[2], raw[3]
    if kind not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{kind:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dt = np.dtype(_IDX_TYPES[kind])
    expected = int(np.prod(shape)) * dt.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data, file has {len(body)}")
    return np.frombuffer(body, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {root}; probes never downloads data: "
                            "put the four IDX files there (or use --data digits)")


def load_mnist(root: str | os.PathLike, train: bool = True, classes: tuple[int, ...] | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the IDX files in ``root`` (also ``root/MNIST/raw``, torchvision's layout).

    Returns ``x`` (N, 784) in [0, 1] and ``y`` class indices.
    """
    root = Path(root)
    if (root / "MNIST" / "raw").is_dir():
        root = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(images.shape[0], -1)
    y = torch.from_numpy(labels.astype(np.int64))
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    return x.to(dtype), y


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises all sorts of errors
        return False
    return True


def load_mnist_torchvision(root: str | os.PathLike, train: bool = True,
                           classes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST through torchvision (which may download it into ``root``) where torchvision works."""
    if not torchvision_available():
        raise RuntimeError("torchvision does not import here; install the 'torchvision' extra on a machine "
                           "where it matches torch, or use load_mnist(root) on IDX files you have")
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=train, download=True)
    x = ds.data.float().div(255.0).reshape(len(ds), -1)
    y = ds.targets.long()
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    return x, y


def load(name: str, root: str | os.PathLike = "data", train: bool = True,
         classes: tuple[int, ...] | None = None, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``name`` is ``digits`` (embedded) or ``mnist`` (IDX files in ``root``, else torchvision)."""
    if name == "digits":
        return load_digits(classes=classes, size=size)
    if name == "mnist":
        try:
            return load_mnist(root, train=train, classes=classes)
        except FileNotFoundError:
            if torchvision_available():
                return load_mnist_torchvision(root, train=train, classes=classes)
            raise
    raise ValueError(f"unknown data set {name!r}: use 'digits' or 'mnist'")


def balanced_subset(y: torch.Tensor, per_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``per_class`` random samples of every class in ``y`` (a class-balanced probe batch)."""
    picks = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < per_class:
            raise ValueError(f"class {int(c)} has {idx.numel()} samples, fewer than {per_class}")
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(picks)
