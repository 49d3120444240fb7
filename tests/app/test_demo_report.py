"""``probes demo`` (smoke mode) and ``probes report``: the table, the event files and the HTML page agree."""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
import torch

import probes
from probes.app import demo, report


def event_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 1})
    acc.Reload()
    return (
        {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]},
        acc.Tags()["images"],
        acc.Tags()["histograms"],
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    from probes import plugins

    plugins.reset()
    assert demo.run_demo(str(logdir), smoke=True, progress=True, out=buf) == 0
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return logdir, run, buf.getvalue()


def test_demo_attaches_every_builtin_probe_but_the_curvature_ones_and_prints_the_table(demo_run):
    logdir, run, text = demo_run
    from probes.app.demo import NOT_IN_DEMO

    assert NOT_IN_DEMO == {"hessian", "grad_noise"}  # the seeds' probes only: the curvature ones have their example
    builtins = sorted(i.name for i in probes.available() if i.source == "builtin" and i.name not in NOT_IN_DEMO)
    listed = re.search(r"probes: (.*)", text).group(1)
    assert sorted(re.findall(r"(\w+) \(every \d+\)", listed)) == builtins
    assert "left out" not in text and "failed" not in text
    assert "\r[" in text  # the progress bar
    assert f"tensorboard --logdir {logdir.absolute()}" in text
    scalars, images, _ = event_scalars(run)
    rows = re.findall(r"^  (\S+/\S+)\s+(\d+)\s+(\S+)$", text, flags=re.M)
    shown = {tag: (int(step), float(value)) for tag, step, value in rows}
    for key in (
        "relu_zeros/total/fraction",
        "alignment/1/cka",
        "ntk/condition",
        "margin/n_delta_fraction",
        "test/accuracy",
    ):
        if key.split("/")[0] in builtins + ["test"]:
            assert key in shown, key
    for tag, (step, value) in shown.items():
        last_step, last_value = scalars[tag][-1]  # the table shows what the event file holds last
        assert step == last_step, tag
        assert value == pytest.approx(last_value, rel=1e-3, abs=1e-6), tag
    # every built-in probe wrote something
    written = {t.split("/")[0] for t in scalars} | {t.split("/")[0] for t in images}
    assert set(builtins) <= written


def test_a_probe_that_cannot_apply_is_left_out_with_the_reason(monkeypatch):
    monkeypatch.setitem(demo.OPTIONS, "relu_zeros", {"every": 1, "sites": "nonsense"})
    out = io.StringIO()
    model = demo.build_model()
    chosen = demo.choose_probes(model, (torch.randn(4, 64), torch.arange(4)), smoke=True, out=out)
    assert "relu_zeros" not in chosen and "alignment" in chosen
    assert "left out relu_zeros: relu_zeros: option 'sites' must be" in out.getvalue()


def test_demo_rejects_zero_epochs(tmp_path):
    assert demo.run_demo(str(tmp_path), epochs=0, progress=False, out=io.StringIO()) == 2


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_is_one_self_contained_page(demo_run, tmp_path):
    logdir, run, _ = demo_run
    path = report.write_report(logdir, tmp_path / "out" / "report.html")
    page = path.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert f"<h2 id='run-0'>run: {run.name}</h2>" in page  # a section per run
    scalars, image_tags, histogram_tags = event_scalars(run)
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    charts = [c for c in captions if "(step" not in c]
    plotted = [t for c in charts for t in c.split(", ")]
    constant = [html.unescape(t) for t in re.findall(r"<li><code>([^<]*)</code>: ", page)]
    assert constant and not set(constant) & set(plotted)  # a series that never changes: one line, no chart
    assert sorted(plotted + constant) == sorted(scalars)  # every scalar tag in exactly one chart or line
    assert len(charts) < len(scalars)  # the sites of one quantity share a chart
    assert "relu_zeros/1/fraction, relu_zeros/3/fraction, relu_zeros/total/fraction" in charts
    shots = [c for c in captions if "(step" in c]
    for tag in histogram_tags:  # the final shape of each histogram
        assert sum(c.startswith(f"{tag} (step") for c in shots) == 1, tag
    for tag in image_tags:  # the first (step 0) and the latest image of each tag
        assert f"{tag} (step 0)" in shots, tag
        assert sum(c.startswith(f"{tag} (step") for c in shots) == 2, tag
    pngs = _images(page)
    assert len(pngs) == len(captions)
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # the table holds the last value of every scalar
    for tag, series in scalars.items():
        step, value = series[-1]
        m = re.search(
            rf"<tr><td>{re.escape(tag)}</td><td class='num'>(\d+)</td>"
            rf"<td class='num'>([^<]+)</td>",
            page,
        )
        assert m, tag
        assert int(m.group(1)) == step
        if np.isnan(value):  # the table says so, in the words Python prints it
            assert m.group(2) == "nan", tag
        else:
            assert float(m.group(2)) == pytest.approx(value, rel=1e-5, abs=1e-12), tag


def test_report_plots_are_large_and_labelled(demo_run):
    from PIL import Image

    logdir, run, _ = demo_run
    scalars, _, _ = event_scalars(run)
    members = ["alignment/1/cka", "alignment/3/cka", "alignment/output/cka"]
    png = report._scalar_plot(
        "cka per site",
        members,
        {t: (np.array([s for s, _ in scalars[t]]), np.array([v for _, v in scalars[t]])) for t in members},
    )
    assert Image.open(io.BytesIO(png)).size == report.PLOT_SIZE
    assert report._ylabel(members) == "cka" and report._series_label("alignment/3/cka", members) == "3"
    assert (
        report._ylabel(["linear_region/flip_fraction_eps_0.1", "linear_region/flip_fraction_eps_0.01"])
        == "flip_fraction_eps"
    )


def test_report_cli_default_output_and_plot_limit(demo_run, tmp_path, monkeypatch, capsys):
    from probes.app.cli import main

    logdir, _, _ = demo_run
    monkeypatch.setattr(report, "MAX_PLOTS", 3)
    out = tmp_path / "r.html"
    assert main(["report", str(logdir), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    assert "more charts are in the tables only" in page
    assert len(re.findall(r"<figcaption>[^<(]*</figcaption>", page)) == 3


def test_png_encoder_round_trips():
    plt = pytest.importorskip("matplotlib.pyplot")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    decoded = plt.imread(io.BytesIO(report.png_bytes(pixels)), format="png")
    assert np.array_equal((decoded[..., :3] * 255).round().astype(np.uint8), pixels)


def test_report_of_an_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no TensorBoard scalars"):
        report.write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        report.write_report(tmp_path / "missing")
