"""Pictures are data (``probes.records``: ``Matrix``, ``Gates``, ``Trails``, ``Spectrum``, ``Curves``) that a
renderer draws: host copies taken when the probe measures, a drawing-process protocol of plain arrays and strings
that gives back what the kind draws here, and a clear error where nothing can draw."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

import probes.records
from probes.app import render
from probes.app.render import background
from probes.records import Curves, Gates, Image, Matrix, Spectrum, Trails

pytest.importorskip("matplotlib")


def _kinds() -> list:
    rng = np.random.default_rng(0)
    lam = np.sort(rng.lognormal(0, 2, 40))[::-1]
    cur = rng.normal(size=(12, 2))
    return [
        Matrix(np.eye(6) + 0.1, (3,), ("a", "b"), title="m", colorbar_label="c", vmax=1.0),
        Gates(rng.random((20, 8)) > 0.5, (10,), ("0", "1"), title="g", padding=np.zeros((20, 8), bool)),
        Trails(
            cur,
            np.cumsum(rng.normal(size=(5, 12, 2)) * 0.1, axis=0),
            cur[:, 0] > 0,
            rng.normal(size=(2, 2)),
            None,
            3.0,
            title="t",
            axis_labels=("x1", "x2"),
            size=240,
        ),
        Spectrum(lam, lam / 3, step=5, reference_step=0, title="s", ylabel="eigenvalue"),
        Curves((("a", np.arange(5.0), np.arange(5.0) ** 2), ("b", np.arange(5.0), np.ones(5))), title="c", logy=True),
    ]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("figure", _kinds(), ids=lambda f: type(f).__name__)
def test_the_protocol_carries_every_kind_as_plain_data(figure):
    header, blocks = background.encode_figure(figure)
    assert all(isinstance(b, bytes) for b in blocks) and header["kind"] == type(figure).__name__
    back = background.decode_figure(header, blocks)
    assert type(back) is type(figure)
    for f in dataclasses.fields(figure):
        assert _same(getattr(back, f.name), getattr(figure, f.name)), f.name


def test_an_array_of_objects_is_not_sent():
    with pytest.raises(background.NotSendable):
        background.encode_figure(Matrix(np.array([["a"]], dtype=object)))


def test_picture_data_holds_host_copies_taken_when_made():
    source = torch.ones(3, 3)
    values = np.zeros(4)
    m, s = Matrix(source, title="t"), Spectrum(values)
    source.add_(1)
    values[:] = 5
    assert isinstance(m.values, np.ndarray) and m.values.max() == 1.0 and s.values.max() == 0.0


@pytest.mark.skipif(os.name != "posix", reason="the drawing process: POSIX")
def test_the_drawing_process_draws_what_this_process_draws():
    process = background.shared()
    assert process is not None and process.pid != os.getpid()
    for figure in _kinds():
        pixels, png = process.draw(figure)
        np.testing.assert_array_equal(pixels, render.draw(figure))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RuntimeError, match="IndexError|ValueError"):
        process.draw(Matrix(np.arange(3.0), title="one axis"))  # what fails there is said here
    assert process.alive


def test_an_image_without_a_renderer_says_which_extra_to_install(monkeypatch):
    monkeypatch.setattr(probes.records, "default_renderer", lambda: None)
    image = Image("p/img", Matrix(np.eye(2)))
    with pytest.raises(ImportError, match=r"torch-probes\[plots\]"):
        _ = image.pixels
    assert Image("p/raw", np.zeros((2, 3, 3), np.uint8)).as_uint8().shape == (2, 3, 3)  # pixels need no renderer


def test_the_renderer_is_the_records_protocol_and_draws_each_kind():
    r = render.renderer()
    assert isinstance(r, probes.records.Renderer) and r is probes.records.default_renderer()
    for figure in _kinds():
        pixels = r.pixels(figure)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
