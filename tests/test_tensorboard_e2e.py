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
    out = subprocess.run([sys.executable, "-m", "probes", "demo", "--smoke", "--no-progress", "--logdir", str(logdir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"tensorboard --logdir {logdir.absolute()}" in out.stdout
    return logdir


@pytest.fixture(scope="module")
def server(demo_logdir):
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(demo_logdir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
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
    probe_tags = {t for t in file_tags if t.split("/")[0] in {"relu_zeros", "alignment", "margin", "ntk", "pathgram",
                                                             "patterns", "linear_region", "particles"}}
    assert {"relu_zeros/total/fraction", "alignment/1/cka", "margin/n_delta_fraction"} <= probe_tags

    runs = wait_for("the run", lambda: run in get_json(base, "/data/runs") and get_json(base, "/data/runs"),
                    deadline, proc)
    assert runs == [run]
    served = wait_for("every scalar tag",
                      lambda: (lambda t: t if file_tags <= set(t.get(run, {})) else None)(
                          get_json(base, "/data/plugin/scalars/tags")), deadline, proc)
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
    layout = wait_for("the custom-scalars layout",
                      lambda: (lambda lay: lay if lay.get("category") else None)(
                          get_json(base, "/data/plugin/custom_scalars/layout")), deadline, proc)
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert {cat["title"] for cat in layout["category"]} >= {"relu_zeros", "alignment", "ntk", "linear_region"}
    (run,) = [p.name for p in demo_logdir.iterdir() if p.is_dir()]
    served = get_json(base, "/data/plugin/scalars/tags")[run]
    for title_part, expected in [("(relu_zeros/<site>/fraction)", {"relu_zeros/1/fraction", "relu_zeros/3/fraction"}),
                                 ("(alignment/<site>/cka)", {"alignment/1/cka", "alignment/3/cka",
                                                             "alignment/output/cka"}),
                                 ("NTK top eigenvalues", {f"ntk/eig_top/{k}" for k in range(1, 6)}),
                                 ("samples whose gates flip, per input", {"linear_region/flip_fraction_eps_0.001",
                                                                          "linear_region/flip_fraction_eps_0.01",
                                                                          "linear_region/flip_fraction_eps_0.1"})]:
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
