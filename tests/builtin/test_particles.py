"""Tests of the ``particles`` probe and the mean-field module (seed 001; Chizat & Bach 2018)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes.builtin.particles import Particles, find_two_layer
from probes.functional.particles import MeanField, sphere_
from probes.probe import ProbeBatch

SETTINGS = settings(max_examples=25, deadline=None)


def _batch(model: nn.Module, step: int = 0) -> ProbeBatch:
    """What the session hands an active probe when there is no probe_data."""
    return ProbeBatch(model, None, None, None, {}, step)


def _attached(model: nn.Module, **opts) -> Particles:
    probe = Particles(**opts)
    probe.check(_batch(model))
    return probe


def _two_layer(d: int, m: int, c: int, bias: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, m, bias=bias), nn.ReLU(), nn.Linear(m, c))


# -- the mean-field module --------------------------------------------------------------
@SETTINGS
@given(d=st.integers(1, 4), m=st.integers(1, 7), c=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 99))
def test_meanfield_forward_is_the_particle_average(d, m, c, bias, seed):
    g = torch.Generator().manual_seed(seed)
    model = MeanField(d, m, c, bias=bias, radius=1.3, generator=g).double()
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    w, a = model.hidden.weight.detach(), model.output.weight.detach()
    b = model.hidden.bias.detach() if bias else None
    expected = torch.zeros(5, c, dtype=torch.float64)
    for i in range(5):
        for j in range(m):
            pre = sum(float(w[j, k]) * float(x[i, k]) for k in range(d)) + (float(b[j]) if bias else 0.0)
            for o in range(c):
                expected[i, o] += float(a[o, j]) * max(pre, 0.0) / m
    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_sphere_init_puts_every_particle_on_the_sphere(balanced, bias):
    model = MeanField(3, 50, 2, bias=bias, radius=0.05, balanced=balanced, generator=torch.Generator().manual_seed(1))
    inner = model.hidden.weight.double()
    if bias:
        inner = torch.cat([inner, model.hidden.bias.double()[:, None]], dim=1)
    outer = model.output.weight.double().T
    theta = torch.cat([inner, outer], dim=1)
    torch.testing.assert_close(theta.norm(dim=1), torch.full((50,), 0.05, dtype=torch.float64), rtol=1e-5, atol=0)
    if balanced:
        torch.testing.assert_close(inner.norm(dim=1), outer.norm(dim=1), rtol=1e-5, atol=0)
    else:
        assert (inner.norm(dim=1) - outer.norm(dim=1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="radius"):
        sphere_(model, -1.0)


def test_meanfield_lr_is_eta_times_width():
    assert MeanField(2, 20).mean_field_lr(0.5) == 10.0
    with pytest.raises(ValueError, match="init"):
        MeanField(2, 3, init="xavier")


# -- positions ---------------------------------------------------------------------------
@SETTINGS
@given(
    d=st.integers(1, 5),
    m=st.integers(1, 9),
    c=st.integers(1, 3),
    bias=st.booleans(),
    signed=st.booleans(),
    use_bias=st.booleans(),
    pick=st.booleans(),
    seed=st.integers(0, 999),
)
def test_positions_equal_a_times_w(d, m, c, bias, signed, use_bias, pick, seed):
    model = _two_layer(d, m, c, bias, seed)
    use_bias = use_bias and bias
    index = (seed % c) if pick else None
    probe = _attached(model, signed=signed, bias=use_bias, output_index=index)
    p, sign, norms = probe.positions()
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    b1 = model[0].bias.detach() if bias else None
    for j in range(m):
        w = [float(v) for v in w1[j]] + ([float(b1[j])] if use_bias else [])
        if c == 1 or index is not None:
            a = float(w2[0 if index is None else index, j])
            assert bool(sign[j]) == (a >= 0)
        else:
            a = math.sqrt(sum(float(w2[o, j]) ** 2 for o in range(c)))
            assert sign is None
        coef = a if signed else abs(a)
        for k, wk in enumerate(w):
            assert abs(float(p[j, k]) - coef * wk) <= 1e-12 * (1 + abs(coef * wk))
        assert abs(float(norms[j]) - abs(a) * math.sqrt(sum(v * v for v in w))) <= 1e-10
    # one measurement: the scalar is the mean of |a_j| ||w_j||, the histogram counts every unit
    records = {r.tag: r for r in probe.measure(_batch(model))}
    assert abs(records["particles/mean_norm"].item() - float(norms.mean())) <= 1e-10
    assert int(records["particles/norms"].counts.sum()) == m


def test_meanfield_positions_leave_out_the_one_over_m():
    g = torch.Generator().manual_seed(3)
    wrapped = nn.Sequential(nn.Identity(), MeanField(2, 6, radius=0.7, bias=False, generator=g))
    probe = _attached(wrapped)
    assert probe.paths == ("1.hidden", "1.output")
    p, _, _ = probe.positions()
    mf = wrapped[1]
    expected = mf.output.weight.detach().double()[0, :, None] * mf.hidden.weight.detach().double()
    torch.testing.assert_close(p, expected, rtol=0, atol=0)


def test_session_without_probe_data_measures_at_attach():
    model = MeanField(2, 8, bias=False, radius=0.3, generator=torch.Generator().manual_seed(0))
    teacher = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    with probes.attach(model, {"particles": {"teacher": teacher, "every": 2}}, sinks=["memory"], strict=True) as s:
        for _ in range(4):
            s.step()
        mem = s.memory
    assert mem.tags() == {"particles/mean_norm", "particles/norms", "particles/positions"}
    assert [step for step, _ in mem.scalars()["particles/mean_norm"]] == [0, 2, 4]


# -- projection basis --------------------------------------------------------------------
def test_basis_is_the_initial_principal_plane_and_stays_fixed():
    model = _two_layer(5, 40, 1, True, seed=4)
    probe = _attached(model)
    assert probe.basis is None  # D = 5: fixed at the first measurement
    p0, _, _ = probe.positions()
    probe.measure(_batch(model))
    basis = probe.basis.clone()
    # reference: top two eigenvectors of the covariance of the initial cloud (numpy, independent of the SVD path)
    cloud = p0.numpy()
    cov = np.cov(cloud, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, np.argsort(vals)[::-1][:2]]
    np.testing.assert_allclose(np.abs(top.T @ basis.numpy()), np.eye(2), atol=1e-8)
    np.testing.assert_allclose(basis.numpy().T @ basis.numpy(), np.eye(2), atol=1e-12)
    # change the weights completely: the basis does not move, the trail uses it
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn_like(prm) * 3)
    for step in range(1, 4):
        probe.measure(_batch(model, step))
        assert torch.equal(probe.basis, basis)
    p, _, _ = probe.positions()
    torch.testing.assert_close(probe.trails()[-1], p @ basis, rtol=0, atol=0)


def test_given_and_teacher_bases():
    model = _two_layer(4, 10, 1, False, seed=5)
    given_basis = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    probe = _attached(model, basis=given_basis)
    probe.measure(_batch(model))
    torch.testing.assert_close(probe.basis, given_basis.double())
    p, _, _ = probe.positions()
    torch.testing.assert_close(probe.trails()[0], p @ given_basis.double())
    teacher = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    probe = _attached(model, teacher=teacher, basis="teacher")
    np.testing.assert_allclose(np.abs(probe.basis.numpy()), np.array([[1, 0], [0, 0], [0, 1], [0, 0]]), atol=1e-12)


def test_two_dimensional_positions_are_drawn_as_they_are():
    model = _two_layer(2, 5, 1, True, seed=6)
    probe = _attached(model)
    probe.measure(_batch(model))
    p, _, _ = probe.positions()
    torch.testing.assert_close(probe.trails()[0], p, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_positions_on_the_gpu_match_the_cpu():
    model = _two_layer(3, 16, 1, True, seed=8)
    cpu = _attached(model, bias=True)
    cpu_records = cpu.measure(_batch(model))
    gpu_model = model.cuda()
    gpu = _attached(gpu_model, bias=True)
    gpu_records = gpu.measure(_batch(gpu_model))
    assert gpu.positions()[0].device.type == "cuda"
    torch.testing.assert_close(gpu.trails(), cpu.trails())
    assert abs(gpu_records[0].item() - cpu_records[0].item()) < 1e-9


# -- trails ---------------------------------------------------------------------------------
def _counter_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    return model


def _set_counter(model: nn.Sequential, k: int) -> None:
    with torch.no_grad():  # particle 0 sits at (k, 0), particle 1 at (0, -k)
        model[0].weight.copy_(torch.tensor([[float(k), 0.0], [0.0, -float(k)]]))


@pytest.mark.parametrize("mode", ["thin", "ring"])
def test_trail_memory_stays_bounded_over_10000_measurements(mode):
    model = _counter_model()
    n_keep, total = 50, 10_000
    probe = _attached(model, trail=n_keep, trail_mode=mode, size=240)
    buf = probe.state_dict()["trail"]
    ptr = probe.trail.data_ptr()
    for k in range(total):
        _set_counter(model, k)
        if k % 1000 == 0 or k == total - 1:
            probe.measure(_batch(model, k))  # the whole measurement, image included
        else:
            probe._store(probe.positions()[0] @ probe.basis)  # the trail update alone (fast)
        assert probe.filled <= n_keep
    assert probe.trail.data_ptr() == ptr and probe.trail.shape == buf.shape == (n_keep, 2, 2)
    kept = probe.trails()[:, 0, 0].numpy()
    assert len(kept) <= n_keep
    np.testing.assert_array_equal(probe.trails()[:, 1, 1].numpy(), -kept)
    if mode == "ring":  # exactly the last n_keep measurements
        np.testing.assert_array_equal(kept, np.arange(total - n_keep, total))
    else:  # the whole history since attach, thinned evenly: starts at the first measurement
        stride = probe.stride
        assert kept[0] == 0 and stride > 1
        np.testing.assert_array_equal(kept, np.arange(len(kept)) * stride)
        assert kept[-1] + stride > total - 1 - stride  # reaches the recent past
        assert len(kept) >= n_keep // 2
    assert probe.state_dict()["trail"].shape == (n_keep, 2, 2)


def test_state_dict_round_trip():
    model = _counter_model()
    probe = _attached(model, trail=8)
    for k in range(21):
        _set_counter(model, k)
        probe.measure(_batch(model, k))
    state = probe.state_dict()
    other = _attached(model, trail=8)
    other.load_state_dict(state)
    torch.testing.assert_close(other.trails(), probe.trails(), rtol=0, atol=0)
    assert (other.stride, other.seen, other.limit) == (probe.stride, probe.seen, probe.limit)
    with pytest.raises(ValueError, match="trail"):
        _attached(model, trail=9).load_state_dict(state)


# -- the image -------------------------------------------------------------------------------
def _colour_pixels(img: np.ndarray, hex_colour: str) -> np.ndarray:
    """(row, column) of the pixels of this colour (up to the figure's reduction to 256 colours)."""
    rgb = np.array([int(hex_colour[k : k + 2], 16) for k in (1, 3, 5)], dtype=np.float64)
    return np.argwhere(np.abs(img.astype(np.float64) - rgb).max(axis=2) <= 24)


def test_image_is_a_labelled_figure_with_colours_in_place_and_stable_axes():
    import dataclasses

    from probes.app import render

    model = _counter_model()
    _set_counter(model, 1)
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, -1.0]]))  # w_0 = (1, 0), a_0 = 1; w_1 = (0, -1), a_1 = -1
    teacher = torch.tensor([[0.0, -2.0]])
    probe = _attached(model, teacher=teacher, size=320)
    data = {r.tag: r for r in probe.measure(_batch(model, 7))}["particles/positions"].figure
    # the legend's markers share the particles' colours: leave it out to locate the particles by colour
    img = render.draw(dataclasses.replace(data, legend=False))
    assert img.shape == (320, 320, 3) and img.dtype == np.uint8
    lim = probe.limit
    assert lim == pytest.approx(1.08 * 2.0)  # the teacher row is the farthest point
    red = _colour_pixels(img, render.POSITIVE)  # a_0 > 0 at (1, 0): right of the centre
    blue = _colour_pixels(img, render.NEGATIVE)  # a_1 < 0 at a_1 w_1 = (0, 1): above it
    black = _colour_pixels(img, "#000000")  # the teacher line through (0, -2) is vertical
    assert len(red) and len(blue) and len(black)
    (rr, rc), (br, bc) = red.mean(axis=0), blue.mean(axis=0)
    assert rc > bc + 20 and br < rr - 20
    # the axes, their labels and the title are text on the figure (not checkable by pixels): the labels say
    # what the coordinates are
    assert probe._axis_labels() == ("a_j w_j, coordinate 1", "a_j w_j, coordinate 2")
    # shrink the particles: the axes never zoom back in
    with torch.no_grad():
        model[0].weight.mul_(0.01)
    img2 = probe.measure(_batch(model, 8))[2].pixels
    assert probe.limit == lim and img2.shape == img.shape


def test_image_every_thins_the_images_not_the_trail():
    model = _counter_model()
    _set_counter(model, 1)
    probe = _attached(model, image_every=10, size=240)
    tags = [[r.tag for r in probe.measure(_batch(model, step))] for step in (0, 4, 8, 10, 12, 20)]
    drawn = ["particles/positions" in t for t in tags]
    assert drawn == [True, False, False, True, False, True]
    assert probe.seen == 6  # every measurement still adds to the trail
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"particles: option 'image_every' must be a positive int"):
            Particles(image_every=bad)


def test_unsigned_positions_colour_by_sign():
    model = _counter_model()
    _set_counter(model, 1)
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    probe = _attached(model, signed=False, limit=2.0, size=240)
    p, sign, _ = probe.positions()
    # |a_1| w_1 = (0, -1): the same point as a_1 w_1 would be for w_1 = (0, 1), told apart by the colour
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64))
    assert sign.tolist() == [True, False]
    img = probe.measure(_batch(model))[2].pixels
    assert img.shape == (240, 240, 3) and probe.limit == 0.0  # fixed limit: no growth bookkeeping


# -- structure and errors ----------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_structure_errors_name_the_model():
    with pytest.raises(ValueError, match=r"MLP.*not a two-layer net"):
        _attached(MLP())
    with pytest.raises(ValueError, match="option 'layer'='zz': model MLP has no such module"):
        _attached(MLP(), layer="zz")
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"Sequential.*Conv1d"):
        _attached(conv)
    normed = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="LayerNorm"):
        _attached(normed, layer="0")
    with pytest.raises(ValueError, match="no Linear layer follows"):
        _attached(nn.Sequential(nn.Linear(2, 4), nn.ReLU()), layer="0")


def test_named_hidden_layer_in_a_deeper_model():
    model = MLP()
    hp, hidden, op, out = find_two_layer(model, "b")
    assert (hp, op) == ("b", "c") and hidden is model.b and out is model.c
    probe = _attached(model, layer="b")
    p, _, _ = probe.positions()
    torch.testing.assert_close(p, model.c.weight.detach().double()[0, :, None] * model.b.weight.detach().double())


def test_bad_options_are_reported():
    model = _two_layer(3, 4, 2, False, seed=0)
    with pytest.raises(ValueError, match="bias=True"):
        _attached(model, bias=True)
    with pytest.raises(ValueError, match="output_index"):
        _attached(model, output_index=2)
    with pytest.raises(ValueError, match=r"option 'teacher' must be an M x 3"):
        _attached(model, teacher=torch.ones(2, 2))
    with pytest.raises(ValueError, match="finite"):
        _attached(model, teacher=torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match=r"option 'basis' must be a 3 x 2"):
        _attached(model, basis=torch.ones(2, 2))
    with pytest.raises(ValueError, match="trail"):
        Particles(trail=1)
    with pytest.raises(ValueError, match="option .size. must be an int from 240 to 4096"):
        Particles(size=100)
    with pytest.raises(ValueError, match="teacher"):
        Particles(basis="teacher")
    # a teacher given as (a, W) becomes positions the student's way
    probe = _attached(model, teacher=(torch.tensor([2.0, -1.0]), torch.eye(3)[:2]), signed=False)
    torch.testing.assert_close(probe.teacher, torch.tensor([[2.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64))
    assert probe.teacher_sign.tolist() == [True, False]


def test_session_reports_a_model_that_is_not_two_layer():
    with pytest.raises(ValueError, match="MLP"):
        probes.attach(MLP(), ["particles"], sinks=["memory"], strict=True)


# -- the example ------------------------------------------------------------------------------
def _example_main():
    from conftest import load_script

    path = Path(__file__).resolve().parents[2] / "examples" / "meanfield_particles.py"
    return load_script(path, "meanfield_particles_example").main


def test_example_smoke(tmp_path):
    from PIL import Image as PILImage

    main = _example_main()
    result = main(["--smoke", "--logdir", str(tmp_path)])
    assert os.path.exists(result["out"])
    with PILImage.open(result["gif"]) as gif:
        assert gif.n_frames > 2
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "width20"))


def test_example_particles_move_towards_the_teacher_lines(tmp_path):
    main = _example_main()
    result = main(["--steps", "800", "--widths", "20", "--every", "200", "--logdir", str(tmp_path)])
    run = result["runs"][0]
    assert run["angles"][0][0] == run["losses"][0][0] == 0
    assert run["angles"][-1][1] < 0.6 * run["angles"][0][1]
    assert run["losses"][-1][1] < 0.01 * run["losses"][0][1]


def test_the_basis_follows_the_model():
    """The projection basis is fixed at the first measurement; after model.double() the positions and norms are
    those of a fresh attach on the moved model."""
    from probes import testing

    def two_layer() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    testing.check_follows_model(Particles, {"image_every": 10**6}, model=two_layer)


def test_a_resumed_run_draws_its_images_where_the_unbroken_run_does():
    """The step of the last image is declared state: resumed at step 4 with image_every=10, the next image comes
    at step 12 as in the unbroken run (not at the first measurement after the resume, step 6)."""
    from probes import testing

    def two_layer() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    testing.check_state_round_trip(Particles, {"image_every": 10}, model=two_layer)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"trail_mode": "all"}, ValueError, "particles: option 'trail_mode' must be one of 'thin', 'ring', got 'all'"),
        ({"basis": "pca"}, ValueError, "particles: option 'basis' must be one of 'init', 'teacher', got 'pca'"),
        ({"limit": 0.0}, ValueError, "particles: option 'limit' must be None or a positive finite number, got 0.0"),
        ({"signed": 1}, TypeError, "particles: option 'signed' must be True or False, got 1"),
    ],
)
def test_options_are_checked_through_the_schema(options, error, match):
    with pytest.raises(error, match=match):
        Particles(**options)
