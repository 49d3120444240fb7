"""Data loading: the embedded digits and real MNIST IDX files (written here, never downloaded)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from probes import data


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)


def test_digits_embedded():
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x47, y47 = data.load_digits(classes=(4, 7), size=28)
    assert set(y47.tolist()) == {4, 7} and x47.shape[1] == 784


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=10, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    x, y = data.load_mnist(tmp_path, train=False)
    assert x.shape == (10, 784)
    np.testing.assert_allclose(x.numpy(), images.reshape(10, -1) / 255.0, rtol=1e-6)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    x3, y3 = data.load("mnist", root=tmp_path, train=False, classes=(labels[0],))
    assert (y3 == int(labels[0])).all()


def test_idx_rejects_truncated(tmp_path):
    write_idx(tmp_path / "bad", np.zeros((4, 3), dtype=np.uint8))
    raw = (tmp_path / "bad").read_bytes()
    (tmp_path / "bad").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="promises"):
        data.read_idx(tmp_path / "bad")


def test_missing_mnist_says_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.load_mnist(tmp_path)


def test_balanced_subset():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    idx = data.balanced_subset(y, 2, torch.Generator().manual_seed(0))
    assert sorted(y[idx].tolist()) == [0, 0, 1, 1]
