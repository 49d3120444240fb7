"""Pictures a person can read: labelled matplotlib figures, small images, the custom-scalars layout,
tag names, ``probes list`` and the demo's event files (issue 15)."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.app import cli, render
from probes.app.render import canvas
from probes.builtin._images import ImageCadence
from probes.sinks.tensorboard import TensorBoardSink, layout_for

#: "a few tens of KB" for one image in an event file
MAX_IMAGE_BYTES = 48 * 1024


def _png_size(pixels: np.ndarray) -> int:
    return len(render.encode_png(pixels))


def _check(pixels: np.ndarray, shape: tuple[int, int]) -> None:
    assert pixels.dtype == np.uint8 and pixels.shape == (*shape, 3)
    assert _png_size(pixels) < MAX_IMAGE_BYTES
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) <= 256  # reduced: written as a palette PNG


def test_figures_are_small_rgb_arrays():
    rng = np.random.default_rng(0)
    lam = np.sort(rng.exponential(size=300) ** 4)[::-1]
    _check(render.spectrum_figure(lam, lam / 10, step=5, init_step=0, title="t"), (400, 560))
    _check(render.spectrum_figure(-lam, None, title="no positive eigenvalue"), (400, 560))
    _check(
        render.line_plot([("a", [0, 1, 2], [1, 2, 3]), ("b", [0, 1, 2], [3, 2, 1])], title="t", xlabel="x", ylabel="y"),
        (400, 560),
    )
    gates = rng.random((300, 64)) < 0.5
    _check(render.gates_figure(gates, list(range(30, 300, 30)), [str(k) for k in range(10)], title="t"), (360, 640))
    a = rng.normal(size=(128, 5))
    _check(render.matrix_figure(a @ a.T, [64], ["-1", "1"], title="t", colorbar_label="c"), (420, 500))
    cur = rng.normal(size=(50, 2))
    trails = np.cumsum(rng.normal(size=(30, 50, 2)) * 0.05, axis=0)
    _check(
        render.particles_figure(cur, trails, cur[:, 0] > 0, rng.normal(size=(3, 2)), None, 3.0, title="t"), (480, 480)
    )


def test_encode_png_is_lossless():
    from PIL import Image

    rng = np.random.default_rng(1)
    for pixels in (
        rng.integers(0, 4, (9, 13, 3), dtype=np.uint8) * 60,  # few colours: palette
        rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
    ):  # many: RGB
        back = np.asarray(Image.open(io.BytesIO(render.encode_png(pixels))).convert("RGB"))
        np.testing.assert_array_equal(back, pixels)


def test_image_cadence():
    c = ImageCadence("p", 100)
    assert [c.due(s) for s in (0, 20, 80, 100, 120, 180, 210, 300)] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
        True,
    ]
    assert all(ImageCadence("p", None).due(s) for s in (0, 1, 2))


@pytest.mark.parametrize("name", ["ntk", "pathgram", "patterns", "particles"])
def test_every_image_probe_checks_image_every_at_construction(name):
    from probes import plugins

    cls = plugins.probe_class(name)
    for bad in (0, -1, 1.5, "10", True):
        with pytest.raises(ValueError, match=rf"^{name}: option 'image_every' must be a positive int"):
            cls(image_every=bad)
    cls(image_every=5)
    cls(image_every=None)


def test_layout_groups_one_quantity_across_sites():
    tags = [
        "relu_zeros/1/fraction",
        "relu_zeros/3/fraction",
        "relu_zeros/total/fraction",
        "relu_zeros/1/zeros",
        "ntk/eig_top/1",
        "ntk/eig_top/2",
        "ntk/trace",
        "alignment/1/cka",
        "alignment/output/cka",
        "linear_region/flip_fraction_eps_0.001",
        "linear_region/flip_fraction_eps_0.1",
        "linear_region/flip_fraction_delta_0.01",
        "linear_region/flip_fraction",
        "patterns/distinct",
        "margin/delta/nonfinite",
        "particles/norms/nonfinite",
    ]
    from probes import plugins

    declared = plugins.probe_class("ntk").charts + plugins.probe_class("linear_region").charts
    assert set(layout_for(tags)) == {"relu_zeros", "alignment"}  # the sink knows no probe's own charts
    layout = layout_for(tags, declared)
    assert set(layout) == {"relu_zeros", "ntk", "alignment", "linear_region"}
    charts = {title: regexes for category in layout.values() for title, (kind, regexes) in category.items()}
    assert all(kind == "Multiline" for category in layout.values() for kind, _ in category.values())

    def members(title_part):
        (regexes,) = [r for t, r in charts.items() if title_part in t]
        return sorted(t for t in tags if any(re.match(r, t) for r in regexes))

    assert members("fraction per site") == [
        "relu_zeros/1/fraction",
        "relu_zeros/3/fraction",
        "relu_zeros/total/fraction",
    ]
    assert members("top eigenvalues") == ["ntk/eig_top/1", "ntk/eig_top/2"]
    assert members("cka per site") == ["alignment/1/cka", "alignment/output/cka"]
    assert members("input perturbation size eps") == [
        "linear_region/flip_fraction_eps_0.001",
        "linear_region/flip_fraction_eps_0.1",
    ]
    assert len(charts) == 4  # one site of relu_zeros/*/zeros, one delta: no chart of one line
    assert layout_for(["a/b", "c/d"]) == {}


def test_sink_writes_the_layout_once_per_change_and_images_as_small_pngs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from probes.records import Image, Scalar

    sink = TensorBoardSink(logdir=str(tmp_path))
    calls = []
    original = sink.writer.add_custom_scalars
    sink.writer.add_custom_scalars = lambda layout: (calls.append(layout), original(layout))
    sink.write([Scalar("alignment/1/cka", 0.5)], 0)
    assert calls == []  # one site: nothing to group yet
    sink.write([Scalar("alignment/1/cka", 0.5), Scalar("alignment/3/cka", 0.4)], 1)
    sink.write([Scalar("alignment/1/cka", 0.6), Scalar("alignment/3/cka", 0.5)], 2)  # nothing new
    sink.write([Scalar("relu_zeros/1/fraction", 0.5), Scalar("relu_zeros/3/fraction", 0.4)], 3)
    assert [sorted(c) for c in calls] == [["alignment"], ["alignment", "relu_zeros"]]
    pixels = render.line_plot([("a", [0, 1], [0, 1])], title="t", xlabel="x", ylabel="y")
    sink.write([Image("probe/picture", pixels)], 3)
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    (event,) = acc.Images("probe/picture")
    assert len(event.encoded_image_string) < MAX_IMAGE_BYTES and (event.height, event.width) == pixels.shape[:2]
    layouts = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[-1].tensor_proto.string_val[0])
    assert sorted(c.title for c in layout.category) == ["alignment", "relu_zeros"]


def test_probes_list_fits_100_columns_and_shows_the_cadence(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["probe", "every", "from"]
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    rows = {line.split()[0]: line.split() for line in lines[1:] if line[:1].strip() and len(line.split()) > 2}
    assert rows["ntk"][1] == "1000" and rows["relu_zeros"][1] == "100" and rows["margin"][1] == "10"
    text = " ".join(lines)
    for internal in ("seed 0", "Y Y^T", "N_Delta", "#{"):
        assert internal not in text
    assert all(len(line) <= 100 for line in cli.list_lines(width=100))


def test_probes_tensorboard_runs_the_venv_tensorboard_keeping_the_images(tmp_path, capsys):
    assert cli.main(["tensorboard", str(tmp_path), "--dry-run", "--port", "6123"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert Path(cmd[0]).is_file() and os.access(cmd[0], os.X_OK)
    assert cmd[cmd.index("--logdir") + 1] == str(tmp_path.absolute())
    assert cmd[cmd.index("--samples_per_plugin") + 1] == "images=100"
    assert cmd[-2:] == ["--port", "6123"]


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """The demo as a user runs it (default length), through the command line."""
    logdir = tmp_path_factory.mktemp("full-demo")
    env = dict(os.environ, PROBES_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run(
        [sys.executable, "-m", "probes", "demo", "--no-progress", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return logdir, out.stdout


def test_demo_events_are_under_2_mb_with_small_images(full_demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, _ = full_demo
    events = list(logdir.rglob("events.out.tfevents.*"))
    total = sum(p.stat().st_size for p in events)
    assert 0 < total < 2 * 1024 * 1024, total
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert {"ntk/spectrum", "pathgram/gram", "particles/positions", "patterns/1"} <= set(tags)
    for tag in tags:
        shots = acc.Images(tag)
        assert all(len(e.encoded_image_string) < MAX_IMAGE_BYTES for e in shots), tag
        # TensorBoard keeps 10 images per tag by default: the demo writes at most 10, step 0 first
        assert shots[0].step == 0 and len(shots) <= 10, (tag, [e.step for e in shots])


def test_demo_prints_commands_that_work_as_printed(full_demo):
    logdir, text = full_demo
    lines = text.strip().splitlines()
    opener = next(line for line in lines if line.startswith("open TensorBoard:"))
    cmd = shlex.split(opener.split(":", 1)[1])
    assert os.access(cmd[0], os.X_OK) and cmd[1:] == ["tensorboard", str(logdir.absolute())]
    out = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tb = shlex.split(out.stdout.strip().splitlines()[-1])
    assert os.access(tb[0], os.X_OK) and "--samples_per_plugin" in tb
    assert any(line.startswith("or one HTML file:") for line in lines[-3:])


def test_spectrum_image_of_the_probe():
    from helpers.pictures import spectrum_image

    lam = torch.tensor([3.0, 2.0, 1.0, 0.0, -1e-9], dtype=torch.float64)
    pixels = spectrum_image(lam, lam * 0.5, step=10, reference_step=0)
    assert pixels.shape == (400, 560, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize("limit", [3e-5, 0.0123, 1.0, 12345.0, 2.5e7])
@pytest.mark.parametrize(
    "labels",
    [
        ("x", "y"),
        ("a_j w_j on PC 1 (at init)", "a_j w_j on PC 2 (at init)"),
        ("|a_j| (w_j, b_j) on PC 1 of the teacher", "|a_j| (w_j, b_j) on PC 2 of the teacher"),
    ],
)
def test_particles_labels_lie_inside_the_figure(limit, labels):
    """The step-0 particles image had its y label left of the figure's edge (long tick labels of a small first
    limit): every label and tick label lies inside the figure, and the axes stay square."""
    canvas._KEPT.clear()
    rng = np.random.default_rng(0)
    cur = rng.normal(size=(40, 2)) * limit / 3
    for size in (240, 480):
        pixels = render.particles_figure(
            cur,
            np.zeros((0, 40, 2)),
            cur[:, 0] > 0,
            np.zeros((0, 2)),
            None,
            limit,
            title="particles/positions: step 0",
            axis_labels=labels,
            size=size,
        )
        assert pixels.shape == (size, size, 3)
        entry = next(v for k, v in canvas._KEPT.items() if k[0] == "particles" and k[1] == size)
        fig, ax = entry["fig"], entry["ax"]
        renderer = fig.canvas.get_renderer()
        inside = fig.bbox
        # tick labels past the axes' limits exist but are not drawn
        shown = [t for t in ax.get_xticklabels() if abs(t.get_position()[0]) <= ax.get_xlim()[1] * (1 + 1e-9)]
        shown += [t for t in ax.get_yticklabels() if abs(t.get_position()[1]) <= ax.get_ylim()[1] * (1 + 1e-9)]
        for text in [ax.title, ax.yaxis.label, ax.xaxis.label, *shown]:
            if not text.get_visible() or not text.get_text():
                continue
            box = text.get_window_extent(renderer)
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (
                text.get_text(),
                box,
                inside,
            )
        if "\n" not in ax.yaxis.label.get_text():  # a y label wrapped to more lines takes width from the axes
            axes = ax.get_window_extent(renderer)
            assert abs(axes.width - axes.height) <= 1.0, axes
    canvas._KEPT.clear()
