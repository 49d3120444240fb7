"""End to end: ``probes demo`` writes, a real TensorBoard server serves, its HTTP data API agrees with the files.

The demo runs briefly (``--smoke``) through the command line; TensorBoard starts on 127.0.0.1 with a
free port (loopback only, nothing leaves the machine) and is always stopped. The run and the probe
tags are read back through the same JSON endpoints TensorBoard's web page uses, and every probe
scalar must equal what TensorBoard's event reader finds in the files; the custom-scalars layout the
tensorboard sink writes is served by the custom-scalars dashboard, and the images are small PNGs.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")

TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str, **params) -> object:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
        return json.loads(r.read().decode("utf-8"))


def wait_for(what: str, fn, deadline: float, proc: subprocess.Popen):
    last_error = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"tensorboard exited with {proc.returncode} while waiting for {what}:\n{out[-3000:]}")
        try:
            value = fn()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
            last_error = exc
        time.sleep(0.5)
    pytest.fail(f"timed out after {TIMEOUT:.0f} s waiting for {what} (last error: {last_error!r})")


@pytest.fixture(scope="module")
def demo_logdir(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("e2e") / "runs"
    env = dict(os.environ, PROBES_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run(
        [sys.executable, "-m", "probes", "demo", "--smoke", "--no-progress", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"tensorboard --logdir {logdir.absolute()}" in out.stdout
    return logdir


@pytest.fixture(scope="module")
def server(demo_logdir):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(demo_logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        "false",
        "--reload_interval",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_tensorboard_serves_the_probe_scalars_from_the_event_files(demo_logdir, server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, proc = server
    deadline = time.monotonic() + TIMEOUT
    (run_dir,) = [p for p in demo_logdir.iterdir() if p.is_dir()]
    run = run_dir.name
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    file_tags = set(acc.Tags()["scalars"])
    probe_tags = {
        t
        for t in file_tags
        if t.split("/")[0]
        in {"relu_zeros", "alignment", "margin", "ntk", "pathgram", "patterns", "linear_region", "particles"}
    }
    assert {"relu_zeros/total/fraction", "alignment/1/cka", "margin/n_delta_fraction"} <= probe_tags

    site_runs = {f"{run}/site={site}" for site in ("1", "3", "output", "total")}
    runs = wait_for(
        "the runs",
        lambda: (lambda r: r if {run} | site_runs <= set(r) else None)(get_json(base, "/data/runs")),
        deadline,
        proc,
    )
    assert set(runs) == {run} | site_runs  # the run and one run per site (the per-site charts' colours)
    served = wait_for(
        "every scalar tag",
        lambda: (lambda t: t if file_tags <= set(t.get(run, {})) else None)(
            get_json(base, "/data/plugin/scalars/tags")
        ),
        deadline,
        proc,
    )
    assert set(served[run]) == file_tags
    for tag in sorted(probe_tags):
        points = get_json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)
        expected = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [int(step) for _, step, _ in points] == [step for step, _ in expected], tag
        for (_, _, value), (_, want) in zip(points, expected):
            assert value == want or (math.isnan(value) and math.isnan(want)), (tag, value, want)
    images = get_json(base, "/data/plugin/images/tags")
    assert "ntk/spectrum" in images.get(run, {}) and "pathgram/gram" in images.get(run, {})


def test_custom_scalars_layout_is_served(demo_logdir, server):
    base, proc = server
    deadline = time.monotonic() + TIMEOUT
    layout = wait_for(
        "the custom-scalars layout",
        lambda: (lambda lay: lay if lay.get("category") else None)(
            get_json(base, "/data/plugin/custom_scalars/layout")
        ),
        deadline,
        proc,
    )
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert {cat["title"] for cat in layout["category"]} >= {"relu_zeros", "alignment", "ntk", "linear_region"}
    (run,) = [p.name for p in demo_logdir.iterdir() if p.is_dir()]
    served = get_json(base, "/data/plugin/scalars/tags")[run]
    for site in ("1", "3", "output"):  # a per-site chart shows its sites' runs, each in a colour of its own
        (regexes,) = [tags for title, tags in charts.items() if "(alignment/<site>/cka)" in title]
        points = get_json(base, "/data/plugin/custom_scalars/scalars", run=f"{run}/site={site}", tag=regexes[0])
        assert set(points["tag_to_events"]) == {"alignment/per_site/cka"}, site
        assert get_json(base, "/data/plugin/scalars/scalars", run=run, tag=f"alignment/{site}/cka")  # kept
    eig = [tags for title, tags in charts.items() if "NTK top eigenvalues" in title]
    matched = [{t for t in served if any(re.match(r, t) for r in regexes)} for regexes in eig]
    assert set().union(*matched) == {f"ntk/eig_top/{k}" for k in range(1, 6)}, matched
    assert {"ntk/eig_top/1"} in matched  # far above the others: a chart of its own, or it runs off the chart
    for title_part, expected in [
        (
            "samples whose gates flip, per input",
            {
                "linear_region/flip_fraction_eps_0.001",
                "linear_region/flip_fraction_eps_0.01",
                "linear_region/flip_fraction_eps_0.1",
            },
        )
    ]:
        (regexes,) = [tags for title, tags in charts.items() if title_part in title]
        matched = {t for t in served if any(re.match(r, t) for r in regexes)}
        assert expected <= matched, (title_part, matched)
        # the dashboard's own data route answers for the chart's tags
        points = get_json(base, "/data/plugin/custom_scalars/scalars", run=run, tag=regexes[0])
        assert points["regex_valid"] and expected <= set(points["tag_to_events"]), title_part


def test_images_are_small_pngs(demo_logdir, server):
    base, proc = server
    (run,) = [p.name for p in demo_logdir.iterdir() if p.is_dir()]
    tags = get_json(base, "/data/plugin/images/tags")[run]
    for tag in tags:
        entries = get_json(base, "/data/plugin/images/images", run=run, tag=tag, sample=0)
        assert entries and entries[0]["step"] == 0, tag  # the initialization is kept
        url = f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}"
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
            body = r.read()
        assert body.startswith(b"\x89PNG") and len(body) < 48 * 1024, (tag, len(body))


#: where the first chart's plot (alignment's cka per site: the demo's first category) lies in a 1600 x 1400
#: screenshot of the custom-scalars dashboard
FIRST_PLOT = (420, 150, 730, 345)


def line_colours(png: Path, box: tuple[int, int, int, int] = FIRST_PLOT, min_pixels: int = 30) -> set[int]:
    """The hues (in 20-degree bins) of the saturated pixels in ``box``: one per colour of line drawn there."""
    import colorsys

    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB").crop(box)).reshape(-1, 3).tolist()
    bins: dict[int, int] = {}
    for r, g, b in pixels:
        h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        if s > 0.5 and v > 0.3:
            bins[int(h * 18)] = bins.get(int(h * 18), 0) + 1
    return {h for h, n in bins.items() if n >= min_pixels}


def test_the_custom_scalars_dashboard_gives_each_site_a_colour(demo_logdir, server, tmp_path):
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium to take the screenshot")
    pytest.importorskip("PIL")
    base, proc = server
    deadline = time.monotonic() + TIMEOUT
    wait_for(
        "the custom-scalars layout",
        lambda: get_json(base, "/data/plugin/custom_scalars/layout").get("category"),
        deadline,
        proc,
    )
    shot = tmp_path / "custom_scalars.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1600,1400",
            "--virtual-time-budget=15000",
            f"--screenshot={shot}",
            f"{base}/#custom_scalars",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists(), "chromium wrote no screenshot"
    # alignment's sites 1, 3 and output: three runs, three colours (one colour, the run's, before site runs)
    assert len(line_colours(shot)) >= 3, line_colours(shot)
