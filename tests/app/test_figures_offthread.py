"""Pictures at the speed of scalars (issue 21): images drawn off the training thread from a bounded queue, all
written by ``close()``, a drawing error reported once without losing scalars, kept figures that draw what a
fresh one draws, labelled and unclipped, and the report's charts for many series, NaN-only and one-point data.
Speed itself is measured by ``benchmarks/figures.py`` (its smoke run is the last test)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes.app import render
from probes.app.render import canvas
from probes.records import Chart, Image, Matrix, Scalar
from probes.sinks.memory import MemorySink
from probes.sinks.tensorboard import TensorBoardSink, layout_for

ROOT = Path(__file__).resolve().parents[2]


def _events(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0}).Reload()
    return {
        "images": {t: acc.Images(t) for t in acc.Tags()["images"]},
        "scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]},
    }


class _Renderer:
    """A renderer of test pictures (``probes.records.Renderer``): ``fn(figure)`` draws, in the calling thread."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def pixels(self, figure) -> np.ndarray:
        return np.asarray(self.fn(figure))

    def png(self, figure, background: bool = True) -> tuple[np.ndarray, bytes]:
        pixels = self.pixels(figure)
        return pixels, render.encode_png(pixels)

    def encode(self, pixels: np.ndarray) -> bytes:
        return render.encode_png(pixels)


def _value(v: float) -> Matrix:
    """Picture data that stands for the number ``v``."""
    return Matrix(np.full((1, 1), v))


def _blocking(gate: threading.Event, seen: list[str]) -> _Renderer:
    def draw(figure: Matrix) -> np.ndarray:
        seen.append(threading.current_thread().name)
        assert gate.wait(timeout=60)
        return np.full((6, 7, 3), int(figure.values[0, 0]), dtype=np.uint8)

    return _Renderer(draw)


def test_write_hands_images_to_a_drawing_thread_and_close_writes_them_all(tmp_path):
    gate, seen = threading.Event(), []
    sink = TensorBoardSink(logdir=str(tmp_path), queue_size=4, renderer=_blocking(gate, seen))
    sink.write([Scalar("p/s", 1.0), Image("p/img", _value(10.0))], step=0)
    sink.write([Scalar("p/s", 2.0), Image("p/img", _value(20.0))], step=1)
    # both writes returned although no image could be drawn yet: the training thread did not wait
    assert all(name == "probes-tensorboard-images" for name in seen) and len(seen) <= 1
    closer = threading.Thread(target=sink.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive()  # close waits for the queued images
    gate.set()
    closer.join(timeout=60)
    assert not closer.is_alive()
    ev = _events(tmp_path)
    assert [(e.step, e.width, e.height) for e in ev["images"]["p/img"]] == [(0, 7, 6), (1, 7, 6)]
    assert ev["scalars"]["p/s"] == [(0, 1.0), (1, 2.0)]


def test_a_full_queue_makes_write_wait(tmp_path):
    gate, seen = threading.Event(), []
    sink = TensorBoardSink(logdir=str(tmp_path), queue_size=1, renderer=_blocking(gate, seen))
    sink.write([Image("p/a", _value(1.0))], step=0)  # taken by the thread, which blocks
    while not seen:
        threading.Event().wait(0.01)
    sink.write([Image("p/b", _value(2.0))], step=0)  # fills the queue
    writer = threading.Thread(target=sink.write, args=([Image("p/c", _value(3.0))], 0))
    writer.start()
    writer.join(timeout=0.2)
    assert writer.is_alive()  # no room: this write waits for the thread
    gate.set()
    writer.join(timeout=60)
    sink.close()
    assert set(_events(tmp_path)["images"]) == {"p/a", "p/b", "p/c"}


def test_a_drawing_error_is_one_warning_and_costs_only_that_image(tmp_path):
    def broken(_: Matrix) -> np.ndarray:
        raise ValueError("no such colour")

    sink = TensorBoardSink(logdir=str(tmp_path), renderer=_Renderer(broken))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            sink.write(
                [
                    Scalar("p/s", float(step)),
                    Image("p/bad", _value(0.0)),
                    Image("p/good", np.zeros((4, 5, 3), dtype=np.uint8)),
                ],
                step,
            )
        sink.flush()
        sink.write([Scalar("p/s", 3.0)], 3)
        sink.close()
    mine = [w for w in caught if "could not be drawn" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    assert "p/bad at step 0" in str(mine[0].message) and "no such colour" in str(mine[0].message)
    ev = _events(tmp_path)
    assert ev["scalars"]["p/s"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert "p/bad" not in ev["images"] and len(ev["images"]["p/good"]) == 3


def test_a_drawing_is_drawn_once_for_every_sink_and_copies_its_arrays(tmp_path):
    calls = []

    def draw(figure: Matrix) -> np.ndarray:
        calls.append(threading.current_thread().name)
        if figure.title == "sum":
            return np.zeros((1, 1, 3), np.uint8) + np.uint8(figure.values.sum())
        return np.repeat(figure.values[:, :, None], 3, axis=2).astype(np.uint8)

    source = np.arange(12, dtype=np.float64).reshape(3, 4)
    tensor = torch.ones(2, 2)
    drawing = Matrix(source)
    kept = Matrix(tensor, title="sum")
    source[:] = 0  # the probe changes its arrays after handing the image over
    tensor.add_(1)
    memory, tb = MemorySink(), TensorBoardSink(logdir=str(tmp_path), renderer=_Renderer(draw))
    records = [Image("p/img", drawing), Image("p/t", kept)]  # one list for every sink, as the session hands it
    for sink in (memory, tb):
        sink.write(records, step=4)
    tb.close()
    (image,) = memory.images()["p/img"]
    assert image.step == 4
    np.testing.assert_array_equal(image.pixels[:, :, 0], np.arange(12).reshape(3, 4))  # the values handed over
    assert int(memory.images()["p/t"][0].pixels.max()) == 4
    assert (
        calls == ["probes-tensorboard-images"] * 2
    )  # each drawn once, on the sink's thread, shared by the memory sink


_IN_PROCESS = """
import os, sys, warnings
import numpy as np
from probes.app.render import background
from probes.records import Image, Matrix, Scalar
from probes.sinks.memory import MemorySink
from probes.sinks.tensorboard import TensorBoardSink
memory, tb = MemorySink(), TensorBoardSink(logdir=sys.argv[1], draw_in="process")
records = [
    Scalar("p/s", 1.0),
    Image("p/img", Matrix(np.eye(4) * 7, title="seven", colorbar_label="c")),
    Image("p/bad", Matrix(np.arange(3.0), title="a matrix of one axis", colorbar_label="c")),
]
for sink in (memory, tb):
    sink.write(records, step=2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tb.close()
pixels = memory.images()["p/img"][0].pixels
print(background.shared().pid != os.getpid(), "matplotlib" in sys.modules, pixels.shape[1],
      sum("p/bad at step 2" in str(w.message) for w in caught))
"""


@pytest.mark.skipif(os.name != "posix", reason="the drawing process: POSIX")
def test_draw_in_process_draws_in_another_process_and_shares_the_pixels(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, str(tmp_path / "tb")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    other, imported, width, warned = out.stdout.split()
    # drawn in another process: this one never imported matplotlib, the memory sink read the pixels drawn there
    assert other == "True" and imported == "False"
    assert warned == "1"  # the error in the drawing process, reported once
    ev = _events(tmp_path / "tb")
    assert [(e.step, e.width) for e in ev["images"]["p/img"]] == [(2, int(width))] and "p/bad" not in ev["images"]
    with pytest.raises(ValueError, match="draw_in"):
        TensorBoardSink(logdir=str(tmp_path / "x"), draw_in="gpu")


@pytest.mark.skipif(os.name != "posix", reason="the drawing process: POSIX")
def test_the_drawing_process_ends_with_a_training_process_that_ends_with_os_exit(tmp_path):
    """A torchrun worker may end with os._exit: the drawing process must not outlive it (nor hold its pipes)."""
    import subprocess
    import time

    script = f"""
import os, sys
import numpy as np
from probes.app.render import background
from probes.records import Curves, Image
from probes.sinks.tensorboard import TensorBoardSink
sink = TensorBoardSink(logdir={str(tmp_path)!r}, draw_in="process")
sink.write([Image("p/img", Curves((("a", np.array([0, 1]), np.array([0, 1])),), title="t"))], 0)
sink.flush()
print(background.shared().pid, flush=True)
os._exit(0)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    drawer = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(drawer, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it is our child's orphan that init has not reaped yet
            os.waitpid(drawer, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    else:
        os.kill(drawer, 9)
        pytest.fail("the drawing process outlived its training process")
    assert list(tmp_path.glob("events.out.tfevents*"))


def test_memory_sink_draws_a_deferred_image_only_when_read():
    calls = []
    counting = _Renderer(lambda figure: calls.append(1) or np.zeros((2, 2, 3), np.uint8))
    sink = MemorySink()
    sink.write([Image("p/img", _value(1.0))], step=1)
    assert calls == [] and sink.images()["p/img"][0].pending
    assert sink.images()["p/img"][0].as_uint8(counting).shape == (2, 2, 3) and calls == [1]
    assert not sink.images()["p/img"][0].pending
    assert isinstance(sink.images()["p/img"][0].figure, Matrix)  # the data is kept


def test_a_session_writes_every_image_by_close_and_the_same_scalars_without_images(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    def run(images: bool, logdir: Path) -> probes.Session:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        spec = {
            "patterns": {"every": 2, "image": images, "image_every": 4},
            "pathgram": {"every": 2, "image": "cosine" if images else None, "image_every": 4},
            "ntk": {"every": 2, "image": images, "image_every": 4},
        }
        session = probes.attach(
            model, spec, probe_data=(x, y), logdir=str(logdir), sinks=["memory"], optimizer=opt, overhead=None
        )
        for _ in range(9):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        session.close()
        return session

    on, off = run(True, tmp_path / "on"), run(False, tmp_path / "off")
    assert on.memory.scalars() == off.memory.scalars()
    shots = {t: [i.step for i in v] for t, v in on.memory.images().items()}
    assert set(shots) == {"patterns/1", "patterns/3", "pathgram/gram", "ntk/spectrum"}
    assert shots["ntk/spectrum"] == [0, 4, 8]  # at attach, then every 4 steps
    written = _events(tmp_path / "on")["images"]  # read after close returned
    assert {t: [e.step for e in v] for t, v in written.items()} == shots
    assert _events(tmp_path / "off")["images"] == {}


def _texts_inside(fig) -> list[str]:
    """Every text ``fig`` draws (tick labels only where their tick is in the view): it must lie inside the
    figure, not clipped."""
    from matplotlib.axis import Axis
    from matplotlib.text import Text

    fig.canvas.draw()
    box = fig.bbox
    hidden = set()  # labels of ticks outside the view, which matplotlib keeps but does not draw
    for a in fig.findobj(Axis):
        ax, along = a.axes, 0 if a.axis_name == "x" else 1
        lo, hi = sorted((ax.bbox.x0, ax.bbox.x1) if along == 0 else (ax.bbox.y0, ax.bbox.y1))
        for tick in a.get_major_ticks() + a.get_minor_ticks():
            loc = tick.get_loc()
            at = (
                None
                if loc is None
                else ax.transData.transform((loc, ax.get_ylim()[0]) if along == 0 else (ax.get_xlim()[0], loc))[along]
            )
            if at is None or not lo - 0.5 <= at <= hi + 0.5:
                hidden.update({id(tick.label1), id(tick.label2)})
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]
    for t in texts:
        e = t.get_window_extent()
        assert e.x0 >= box.x0 - 0.5 and e.x1 <= box.x1 + 0.5 and e.y0 >= box.y0 - 0.5 and e.y1 <= box.y1 + 0.5, (
            t.get_text(),
            e,
            box,
        )
    return [t.get_text() for t in texts]


def _kinds():
    rng = np.random.default_rng(0)
    lam = np.sort(rng.lognormal(0, 3, 300))[::-1]
    long_title = "patterns/layers.3.0.conv_block.activation_function: gates on the probe batch, step 120000"
    return {
        "spectrum": [
            lambda: render.spectrum_figure(
                lam,
                lam / 3,
                step=100,
                init_step=0,
                title="ntk/spectrum: a\n(b)",
                ylabel="eigenvalue of the NTK (log scale)",
            ),
            lambda: render.spectrum_figure(np.array([2.0, 1.5]), None, step=5, title="other", ylabel="z"),
        ],
        "gates": [
            lambda: render.gates_figure(
                np.random.default_rng(1).random((300, 64)) > 0.5,
                list(range(30, 300, 30)),
                [str(k) for k in range(10)],
                title="t",
            ),
            lambda: render.gates_figure(
                np.ones((10, 512)) * 0.5,
                [],
                [],
                title=long_title,
                total=65536,
                unit_label="gate (unit x position, flattened), open fraction of blocks of 128",
            ),
        ],
        "matrix": [
            lambda: render.matrix_figure(np.eye(40) + 0.1, [20], ["a", "b"], title="t", colorbar_label="c", vmax=1.0),
            lambda: render.matrix_figure(
                -np.ones((5, 5)), [], [], title="t2", colorbar_label="a colour bar label long enough to need two lines"
            ),
        ],
        "particles": [
            lambda: render.particles_figure(
                np.ones((4, 2)),
                np.zeros((3, 4, 2)),
                np.array([1, 0, 1, 0], bool),
                np.ones((2, 2)),
                None,
                2.0,
                title="p",
            ),
            lambda: render.particles_figure(
                np.ones((7, 2)), np.zeros((0,)), None, np.zeros((0, 2)), None, 5.0, title="q", legend=False
            ),
        ],
    }


def _same_site():
    """Two drawings of each kind with the same layout (one kept figure) and other data, ranges and titles."""
    rng = np.random.default_rng(2)
    lam = np.sort(rng.lognormal(0, 3, 300))[::-1]
    gates = [rng.random((300, 64)) > q for q in (0.3, 0.7)]
    groups = (list(range(30, 300, 30)), [str(k) for k in range(10)])
    mats = [np.eye(40) + 0.1, rng.normal(size=(40, 40)) * 7]
    return {
        "spectrum": [
            lambda: render.spectrum_figure(
                lam, lam / 3, step=100, init_step=0, title="ntk/spectrum: a\n(b)", ylabel="eigenvalue"
            ),
            lambda: render.spectrum_figure(lam[:20] * 1e6, None, step=5, title="ntk/spectrum: c", ylabel="eigenvalue"),
        ],
        "gates": [
            lambda: render.gates_figure(gates[0], *groups, title="patterns/1: step 0"),
            lambda: render.gates_figure(gates[1], *groups, title="patterns/1: step 100"),
        ],
        "matrix": [
            lambda: render.matrix_figure(mats[0], [20], ["a", "b"], title="t", colorbar_label="c"),
            lambda: render.matrix_figure(mats[1], [20], ["a", "b"], title="t2", colorbar_label="c"),
        ],
        "particles": [
            lambda: render.particles_figure(
                np.ones((4, 2)),
                np.zeros((3, 4, 2)),
                np.array([1, 0, 1, 0], bool),
                np.ones((2, 2)),
                None,
                2.0,
                title="p",
            ),
            lambda: render.particles_figure(
                -np.ones((4, 2)) * 3,
                np.ones((5, 4, 2)),
                np.array([0, 0, 1, 1], bool),
                np.ones((2, 2)),
                None,
                4.0,
                title="p, later",
            ),
        ],
    }


@pytest.mark.parametrize("kind", ["spectrum", "gates", "matrix", "particles"])
@pytest.mark.parametrize("cases", [_same_site, lambda: _kinds()], ids=["same layout", "other layouts"])
def test_a_kept_figure_draws_what_a_fresh_one_draws(kind, cases):
    first, second = cases()[kind]
    canvas._KEPT.clear()
    a_fresh = first()
    b_after_a = second()
    a_after_b = first()
    a_again = first()  # the kept background, unchanged
    canvas._KEPT.clear()
    b_fresh = second()
    assert not np.array_equal(a_fresh, b_fresh)
    np.testing.assert_array_equal(a_after_b, a_fresh)
    np.testing.assert_array_equal(a_again, a_fresh)
    np.testing.assert_array_equal(b_after_a, b_fresh)


@pytest.mark.parametrize("kind", ["spectrum", "gates", "matrix", "particles"])
def test_figures_are_labelled_and_nothing_is_clipped(kind):
    for draw in _kinds()[kind]:
        canvas._KEPT.clear()
        draw()
        (entry,) = canvas._KEPT.values()  # one kept figure
        ax = entry["ax"]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        with render.style():
            _texts_inside(entry["fig"])


def _report_axes(title, members, scalars):
    from probes.app import report

    report._scalar_plot(title, members, scalars)
    entry = canvas._KEPT[("axes", "report chart", *report.PLOT_SIZE)]
    with render.style():
        texts = _texts_inside(entry["fig"])
    return entry["ax"], texts


def test_report_chart_of_many_series_shows_the_top_few_and_a_band():
    steps = np.arange(0, 100, 10)
    members = [f"patterns/layers.{i}.relu/churn" for i in range(17)]
    scalars = {t: (steps, np.full(10, float(i))) for i, t in enumerate(members)}
    ax, texts = _report_axes("churn per site", members, scalars)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == render.MAX_LINES + 1 and labels[-1].startswith("11 others")
    assert labels[0] == "layers.16.relu"  # the largest last value first
    assert (
        len(
            {
                tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                for line in ax.lines
            }
        )
        == render.MAX_LINES
    )  # no colour repeated
    band = ax.collections[-1].get_paths()[0].vertices[:, 1]
    assert band.min() == 0.0 and band.max() == 10.0  # min to max of the others


def test_report_chart_of_nan_only_values_says_so_and_one_point_gets_sensible_axes():
    ax, texts = _report_axes(
        "pathgram/condition",
        ["pathgram/condition"],
        {"pathgram/condition": (np.array([0, 20, 40]), np.full(3, np.nan))},
    )
    assert any("NaN" in t for t in texts)
    ax, _ = _report_axes("ntk/trace", ["ntk/trace"], {"ntk/trace": (np.array([40]), np.array([3.5]))})
    lo, hi = ax.get_xlim()
    assert lo == 0 and hi == 80  # not 38 to 42
    ylo, yhi = ax.get_ylim()
    assert ylo < 3.5 < yhi
    ax, texts = _report_axes("tiny", ["p/err"], {"p/err": (np.arange(5), np.array([1.0, 3, 2, 4, 2]) * 1e-14)})
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e-14" over the title: each tick says it
    assert "3e-14" in texts


def test_sink_layout_comes_from_the_declared_charts(tmp_path):
    tags = ["q/eig/1", "q/eig/2", "q/a/x", "q/b/x"]
    declared = [Chart("the eigenvalues", r"^q/eig/\d+$")]
    assert layout_for(tags) == {"q": {"x per site (q/<site>/x)": ["Multiline", ["^q/[^/]+/x$"]]}}
    layout = layout_for(tags, declared)
    assert layout["q"]["the eigenvalues"] == ["Multiline", [r"^q/eig/\d+$"]]
    assert not any("per site" in title and "eig" in title for title in layout["q"])  # claimed by the chart
    sink = TensorBoardSink(logdir=str(tmp_path))
    sink.declare(declared)
    assert sink.charts == tuple(declared)
    sink.write([Scalar(t, 1.0) for t in tags], step=0)
    assert "the eigenvalues" in sink._written_layout["q"]
    sink.close()


def test_no_sink_or_report_module_names_a_probe():
    names = {info.name for info in probes.available() if info.source == "builtin"}
    for path in [*sorted((ROOT / "probes" / "sinks").glob("*.py")), ROOT / "probes" / "app" / "report.py"]:
        text = path.read_text()
        for name in names:
            assert f"{name}/" not in text and f'"{name}"' not in text, (path.name, name)
        assert "_eps_" not in text


def test_the_benchmark_smoke_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "figures.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for section in ("1. cost per image", "2. probes demo training time", "3. ResNet-18", "4. acceptance"):
        assert section in out.stdout
    assert "same scalars with and without images: True" in out.stdout and "(all)" in out.stdout


@pytest.mark.parametrize("kind", ["spectrum", "gates", "matrix", "particles"])
def test_a_figure_is_written_losslessly_as_its_palette_image(kind):
    import io

    from PIL import Image as PILImage

    for draw in _kinds()[kind]:
        pixels = draw()
        back = PILImage.open(io.BytesIO(render.encode_png(pixels)))
        assert back.mode == "P"  # a palette PNG
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), pixels)
