"""The report reads like a dashboard (issue 31, part 3): a run whose event files sit in the logdir itself is named by
its folder, the site runs the TensorBoard sink writes fold into their run, the one-off summary values of a training
(tags with one point) are a table, a series that never changes is one line, and the charts fill the page's width."""

from __future__ import annotations

import re

import pytest

from probes.app import report
from probes.records import Scalar

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")


@pytest.fixture()
def run_dir(tmp_path):
    from probes.sinks.tensorboard import TensorBoardSink

    run = tmp_path / "my-experiment"
    sink = TensorBoardSink(logdir=str(run), draw_in="thread")
    for step in range(0, 50, 10):
        sink.write(
            [
                Scalar("q/1/x", 0.1 * step),
                Scalar("q/3/x", 0.2 * step),
                Scalar("q/flat", 4.0),
                Scalar("q/moving", float(step)),
            ],
            step,
        )
    sink.write([Scalar("train_runtime", 12.5), Scalar("total_flos", 3e12)], 40)
    sink.close()
    return run


def test_site_runs_are_written_and_fold_into_their_run(run_dir):
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {"site=1", "site=3"}
    runs = report.read_runs(run_dir)
    assert list(runs) == ["my-experiment"]  # named by the folder, not "."; no section per site
    runs = report.read_runs(run_dir.parent)
    assert list(runs) == ["my-experiment"]
    charts = report.group_scalars(sorted(runs["my-experiment"]["scalars"]), runs["my-experiment"]["layout"])
    assert ("x per site (q/<site>/x)", ["q/1/x", "q/3/x"]) in charts  # the site runs' chart, over the run's tags


def test_one_point_tags_are_a_table_and_constant_series_one_line(run_dir, tmp_path):
    page = report.write_report(run_dir, tmp_path / "r.html").read_text()
    assert "<h2 id='run-0'>run: my-experiment</h2>" in page
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert "q/1/x, q/3/x" in captions and "q/moving" in captions
    assert not {"q/flat", "train_runtime", "total_flos"} & set(captions)  # no one-dot or flat charts
    table = page[page.index("<table class='singles'>") :]
    table = table[: table.index("</table>")]
    assert "train_runtime</td><td class='num'>40</td><td class='num'>12.5</td>" in table
    assert "total_flos" in table and "q/moving" not in table
    assert "<li><code>q/flat</code>: 4 at every one of its 5 points (steps 0 to 40)</li>" in page
    assert "max-width: 1800px" not in page and "minmax(" in page  # the grid takes the page's width


def test_site_runs_can_be_left_out(tmp_path):
    from probes.sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(logdir=str(tmp_path), site_runs=False)
    sink.write([Scalar("q/1/x", 1.0), Scalar("q/3/x", 2.0)], 0)
    sink.close()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sink._written_layout["q"]["x per site (q/<site>/x)"] == ["Multiline", ["^q/[^/]+/x$"]]


def test_a_line_far_above_the_others_gets_a_chart_of_its_own():
    from probes.records import Chart
    from probes.sinks.tensorboard import layout_for

    tags = [f"q/eig/{k}" for k in range(1, 6)]
    charts = [Chart("eigenvalues", r"^q/eig/\d+$")]
    far = dict(zip(tags, [5000.0, 200.0, 110.0, 100.0, 80.0]))
    layout = layout_for(tags, charts, last=far)["q"]
    assert set(layout) == {"eigenvalues: 1", "eigenvalues: 2, 3, 4, 5"}
    assert layout["eigenvalues: 1"] == ["Multiline", [r"^(?:q/eig/1)$"]]
    near = dict(zip(tags[:3], [0.03, 0.003, 0.0003]))  # spread evenly (linear_region's eps): one chart
    assert layout_for(tags[:3], charts, last=near)["q"] == {"eigenvalues": ["Multiline", [r"^q/eig/\d+$"]]}
