"""Data sets for the examples and the demo. Nothing here downloads anything.

- ``load_digits``: scikit-learn's 1,797 handwritten digits (8 x 8, UCI), shipped inside
  the package as ``_data/digits.npz`` (read with ``allow_pickle=False``).
- ``load_mnist``: reads the four MNIST IDX files (optionally gzipped) from a directory the
  user already has; ``read_idx`` is the plain IDX reader.
- ``load_mnist_torchvision``: torchvision's MNIST, only where torchvision imports. torchvision is not a
  dependency of probes: install the build that matches your torch yourself (see Getting started).
- ``load``: one of the above by name (``--data digits`` / ``--data mnist`` in the examples);
  ``balanced_subset`` picks a class-balanced probe batch.
"""

from __future__ import annotations

import gzip
import os
import struct
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import numpy.typing as npt

_IDX_TYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def load_digits(
    classes: tuple[int, ...] | None = None, size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits (scikit-learn's 1,797 8 x 8 images), read without pickle.

    Args:
        classes: keep only these digits (the labels stay the digit values); None keeps all ten.
        size: resize the 8 x 8 images bilinearly to ``size x size`` (28 gives MNIST-sized 784-dimensional
            inputs); None keeps 8 x 8.
        dtype: the dtype of ``x``.

    Returns:
        ``(x, y)``: ``x`` of shape (N, size * size) with values in [0, 1], ``y`` the int64 class indices.
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
    """Read one IDX file (the MNIST format), gzipped or not, without pickle.

    Args:
        path: the file; a ``.gz`` suffix is read through gzip.

    Returns:
        The array, with the shape and element type its header gives, in native byte order.

    Raises:
        ValueError: the file is not an IDX file, has an unknown element type, or is shorter or longer than
            its header promises.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    kind, ndim = raw[2], raw[3]
    if kind not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{kind:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dt = np.dtype(_IDX_TYPES[kind])
    expected = int(np.prod(shape)) * dt.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data, file has {len(body)}")
    return np.frombuffer(body, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found in {root}; probes never downloads data: "
        "put the four IDX files there (or use --data digits)"
    )


def load_mnist(
    root: str | os.PathLike,
    train: bool = True,
    classes: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from IDX files you already have; nothing is downloaded.

    Args:
        root: the directory holding ``train-images-idx3-ubyte`` and the three other files (gzipped or
            not; ``.idx`` spellings too), or one whose ``MNIST/raw`` does (torchvision's layout).
        train: the 60,000 training images, else the 10,000 test images.
        classes: keep only these digits; None keeps all ten.
        dtype: the dtype of ``x``.

    Returns:
        ``(x, y)``: ``x`` of shape (N, 784) with values in [0, 1], ``y`` the int64 class indices.

    Raises:
        FileNotFoundError: a file is missing (the message says where to put it).
        ValueError: the images and labels do not match.
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
    """Whether torchvision imports here (a torchvision built for another torch fails in many ways).

    Returns:
        True when ``import torchvision`` succeeds.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises all sorts of errors
        return False
    return True


def load_mnist_torchvision(
    root: str | os.PathLike, train: bool = True, classes: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST through torchvision's dataset class, which may download it into ``root``.

    Args:
        root: where torchvision keeps (or downloads) MNIST.
        train: the training images, else the test images.
        classes: keep only these digits; None keeps all ten.

    Returns:
        ``(x, y)`` as :func:`load_mnist` returns them (float32 ``x``).

    Raises:
        RuntimeError: torchvision does not import here.
    """
    if not torchvision_available():
        raise RuntimeError(
            "torchvision does not import here; install the torchvision build that "
            "matches your torch (with --no-deps), or use load_mnist(root) on IDX files you have"
        )
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=train, download=True)
    x = ds.data.float().div(255.0).reshape(len(ds), -1)
    y = ds.targets.long()
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    return x, y


def load(
    name: str,
    root: str | os.PathLike = "data",
    train: bool = True,
    classes: tuple[int, ...] | None = None,
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set by name, as the examples' ``--data`` option gives it.

    Args:
        name: ``"digits"`` (embedded) or ``"mnist"`` (IDX files in ``root``, else torchvision where it
            imports).
        root: the MNIST directory (ignored for the digits).
        train: MNIST's training or test split (the digits have one split).
        classes: keep only these classes; None keeps all.
        size: the digits' image side (see :func:`load_digits`); ignored for MNIST.

    Returns:
        ``(x, y)``: flattened images in [0, 1] and int64 class indices.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: MNIST files are missing and torchvision does not import.
    """
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
    """Indices of ``per_class`` random samples of every class in ``y``: a class-balanced probe batch.

    Args:
        y: class labels, one per sample.
        per_class: how many samples of each class.
        generator: the random generator (None: torch's global one).

    Returns:
        The indices, class by class in increasing class order.

    Raises:
        ValueError: a class has fewer than ``per_class`` samples.
    """
    picks = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < per_class:
            raise ValueError(f"class {int(c)} has {idx.numel()} samples, fewer than {per_class}")
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(picks)
