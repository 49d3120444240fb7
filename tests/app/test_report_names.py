"""The report and the figures draw every name literally (issue 27, part 6): a tag, site, run or label name with
``$``, ``_``, ``^`` or HTML in it never reaches matplotlib's mathtext parser, and a chart that fails to draw is
named in the report while the rest of it is still written."""

from __future__ import annotations

import base64
import html
import re

import numpy as np
import pytest

from probes.app import render, report
from probes.app.cli import main
from probes.app.render import canvas

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

#: names that mathtext cannot parse, or would typeset, or that HTML would read as markup
ODD = [r"$\frac{1}{$", "$x$", "a_b^c", "<b>html</b>"]
#: a quantity across two sites whose module paths hold ``$`` (one chart, with a legend), one starting with ``_``
SITES = ["relu_zeros/enc.$\\frac{1}{$.fc/fraction", "relu_zeros/_orig_mod.$x$.fc/fraction"]
TAGS = [f"custom/{name}" for name in ODD] + SITES
RUN = "run $x$ <i>a_b</i>"
HISTOGRAM = r"custom/$\frac{1}{$/weights"


@pytest.fixture(scope="module")
def odd_logdir(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path_factory.mktemp("names")
    writer = SummaryWriter(str(logdir / RUN))
    for step in range(4):
        for i, tag in enumerate(TAGS):
            writer.add_scalar(tag, 0.1 * (i + 1) * (step + 1), step)
    writer.add_histogram(HISTOGRAM, np.arange(10.0), 3)
    writer.close()
    return logdir


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_a_report_of_odd_names_is_written_and_shows_them_literally(odd_logdir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(odd_logdir), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out
    assert "not drawn" not in printed.out + printed.err  # every chart drew
    page = out.read_text(encoding="utf-8")
    assert "<b>html</b>" not in page and "<i>a_b</i>" not in page  # no user string is markup
    assert f"run: {html.escape(RUN)}</h2>" in page
    for tag in TAGS:
        assert f"<tr><td>{html.escape(tag)}</td>" in page, tag  # the table of last values
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    charts = [c for c in captions if "(step" not in c]
    assert sorted(t for c in charts for t in c.split(", ")) == sorted(html.escape(t) for t in TAGS)
    assert html.escape(", ".join(sorted(SITES))) in charts  # the two sites share one chart
    assert f"{html.escape(HISTOGRAM)} (step 3)" in captions
    pngs = _pngs(page)
    assert len(pngs) == len(captions) and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "not drawn" not in page


def test_a_chart_that_fails_to_draw_is_named_and_the_rest_is_written(odd_logdir, tmp_path, monkeypatch, capsys):
    draw = report._scalar_plot

    def failing(title, members, scalars):
        if members == ["custom/a_b^c"]:
            raise RuntimeError("boom\nsecond line")
        return draw(title, members, scalars)

    monkeypatch.setattr(report, "_scalar_plot", failing)
    out = tmp_path / "report.html"
    assert main(["report", str(odd_logdir), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    warning = [line for line in (printed.out + printed.err).splitlines() if "not drawn" in line]
    assert len(warning) == 1  # one line, naming the chart and why
    assert "custom/a_b^c" in warning[0] and "RuntimeError: boom" in warning[0]
    page = out.read_text(encoding="utf-8")
    note = re.findall(r"<p class='failed'>([^<]*)</p>", page)
    assert len(note) == 1 and "custom/a_b^c" in note[0] and "RuntimeError: boom" in note[0]
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    charts = [c for c in captions if "(step" not in c]
    assert sorted(t for c in charts for t in c.split(", ")) == sorted(html.escape(t) for t in TAGS)
    assert len(_pngs(page)) == len(captions) - 1  # every other chart and the histogram are drawn


def test_write_report_warns_once_per_chart_not_drawn(odd_logdir, tmp_path, monkeypatch):
    def failing(tag, *args):
        raise ValueError("no bars")

    monkeypatch.setattr(report, "_histogram_plot", failing)
    with pytest.warns(report.ReportWarning, match=r"frac\{1\}\{\$/weights.*ValueError: no bars"):
        path = report.write_report(odd_logdir, tmp_path / "r.html")
    assert "ValueError: no bars" in path.read_text(encoding="utf-8")


def _drawn_as(text) -> str:
    """The characters matplotlib draws for a Text (after its own mathtext and ``\\$`` handling)."""
    s, math = text._preprocess_math(text.get_text())
    assert math is False, text.get_text()  # neither mathtext nor TeX
    return s


def test_figures_draw_names_literally():
    import matplotlib

    site = r"enc.$\frac{1}{$.fc"
    with render.style():
        assert matplotlib.rcParams["text.usetex"] is False
        fig = render.new_figure()
        ax = render.frame(fig, f"relu_zeros/{site}", "$x$", "a_b^c")
        series = [(r"$\frac{1}{$", [0, 1], [1, 2]), ("_orig_mod.$x$", [0, 1], [2, 3]), ("nan $y$", [0], [np.nan])]
        render.line_axes(ax, series)
        render.pixels(fig)  # draws
    assert _drawn_as(ax.title) == f"relu_zeros/{site}"
    assert _drawn_as(ax.xaxis.label) == "$x$" and _drawn_as(ax.yaxis.label) == "a_b^c"
    assert [_drawn_as(t) for t in ax.get_legend().get_texts()] == [r"$\frac{1}{$", "_orig_mod.$x$"]
    assert [_drawn_as(t) for t in ax.texts] == ["only NaN / inf, not drawn: nan $y$"]

    names = [r"$\frac{1}{$", "$y$"]
    render.gates_figure(np.ones((6, 4)), [3], names, title=f"patterns/{site}: step 0", unit_label="$u$")
    render.matrix_figure(np.eye(6), [3], names, title=f"pathgram/{site}", colorbar_label="$c$")
    render.spectrum_figure(np.array([2.0, 1.0]), title=f"ntk/{site}", ylabel="$\\lambda$")
    kept = {key[0]: entry for key, entry in canvas._KEPT.items()}
    for kind in ("gates", "matrix", "spectrum"):
        ax = kept[kind]["ax"]
        assert site in _drawn_as(ax.title), kind
    gates, matrix = kept["gates"]["ax"], kept["matrix"]["ax"]
    assert [_drawn_as(t) for t in gates.get_xticklabels()] == names
    assert _drawn_as(gates.yaxis.label) == "$u$ (4)"
    assert [_drawn_as(t) for t in matrix.get_xticklabels()] == names
    assert [_drawn_as(t) for t in matrix.get_yticklabels()] == names
    assert _drawn_as(kept["matrix"]["cax"].yaxis.label) == "$c$"
    assert _drawn_as(kept["spectrum"]["ax"].yaxis.label) == "$\\lambda$"


def test_figures_draw_under_a_usetex_matplotlibrc():
    import matplotlib

    with matplotlib.rc_context({"text.usetex": True}):  # a user's matplotlibrc: no LaTeX is run on a name
        pixels = render.line_plot(
            [("$x$", [0, 1], [0, 1]), ("a_b", [0, 1], [1, 0])], title=r"$\frac{1}{$", xlabel="step", ylabel="y"
        )
    assert pixels.shape == (400, 560, 3)
