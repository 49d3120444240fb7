"""Screenshots of TensorBoard's dashboards and of the HTML report, for maintainers (not run by CI or the tests).

    .venv/bin/python scripts/screenshots.py [--logdir DIR] [--out runs/screenshots] [--chromium /usr/bin/chromium]

Without ``--logdir`` it first runs ``probes demo`` into a temporary directory. Then it starts this
environment's TensorBoard on 127.0.0.1 (a free port; nothing leaves the machine), waits until the run's
scalars, images and custom-scalars layout are served, and takes full-window screenshots with headless
Chromium (Debian's ``chromium`` package: ``apt-get update && apt-get install -y chromium``) of

- ``tb_timeseries.png``: the first screen of the time-series dashboard;
- ``tb_scalars.png``, ``tb_custom_scalars.png``, ``tb_images.png``, ``tb_histograms.png``: the classic dashboards,
  the custom-scalars one showing the multi-line charts the tensorboard sink lays out;
- ``tb_image_<tag>_step<N>.png``: the first and the last image of every image tag at actual size, as
  TensorBoard serves them (its image cards shrink them to the card's width unless "Show actual image
  size" is ticked, which a command-line screenshot cannot do);
- ``report.png``: the page ``probes report`` writes for the same log directory (``report.html`` is kept too).

TensorBoard is always stopped at the end. Look at the PNGs: every figure should have a title and
labelled axes. Chromium runs with ``--headless --no-sandbox --disable-gpu`` and without any network
service of its own (no background networking, component updates or sync).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
    "--mute-audio",
]
#: (file name, TensorBoard URL fragment, window height in pixels)
DASHBOARDS = [
    ("tb_timeseries.png", "#timeseries", 2600),
    ("tb_scalars.png", "#scalars", 2600),
    ("tb_custom_scalars.png", "#custom_scalars", 2600),
    ("tb_images.png", "#images", 3200),
    ("tb_histograms.png", "#histograms", 2000),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
        return json.loads(r.read().decode("utf-8"))


def wait_until_served(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the run's scalars, images and custom-scalars layout are served (or TensorBoard exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tensorboard exited with {proc.returncode}")
        try:
            scalars = get_json(f"{base}/data/plugin/scalars/tags")
            images = get_json(f"{base}/data/plugin/images/tags")
            layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
            if scalars and images and layout.get("category"):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(1.0)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for TensorBoard to serve the run")


def save_served_images(base: str, out: Path) -> None:
    """The first and the last image of every image tag, fetched from TensorBoard's images API."""
    for run, tags in get_json(f"{base}/data/plugin/images/tags").items():
        for tag in sorted(tags):
            query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
            entries = get_json(f"{base}/data/plugin/images/images?{query}")
            for entry in {id(e): e for e in (entries[0], entries[-1])}.values():
                url = f"{base}/data/plugin/images/individualImage?{entry['query']}"
                with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
                    body = r.read()
                path = out / f"tb_image_{tag.replace('/', '_')}_step{entry['step']}.png"
                path.write_bytes(body)
                print(f"  {path} ({len(body) // 1024} KB, as served)")


def screenshot(chromium: str, url: str, path: Path, width: int, height: int, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={path}",
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if not path.exists():
        raise SystemExit(f"chromium wrote no screenshot for {url} (exit {out.returncode}):\n{out.stderr[-2000:]}")
    print(f"  {path} ({path.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", default=None, help="a log directory (default: run probes demo into a temporary one)")
    p.add_argument("--out", default="runs/screenshots", help="where the PNGs go (default: runs/screenshots/)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--wait-ms", type=int, default=20000, help="virtual time chromium gives each page to render")
    args = p.parse_args(argv)
    if not Path(args.chromium).exists():
        raise SystemExit(f"no chromium at {args.chromium}: apt-get update && apt-get install -y chromium")
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PROBES_DISABLE_PLUGIN_AUTOLOAD="1", TF_CPP_MIN_LOG_LEVEL="3")
    tmp = None
    if args.logdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="probes-screenshots-")
        logdir = Path(tmp.name) / "runs"
        print(f"running probes demo into {logdir} ...")
        subprocess.run(
            [sys.executable, "-m", "probes", "demo", "--no-progress", "--logdir", str(logdir)], check=True, env=env
        )
    else:
        logdir = Path(args.logdir).absolute()
    try:
        report = out / "report.html"
        subprocess.run([sys.executable, "-m", "probes", "report", str(logdir), "-o", str(report)], check=True, env=env)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--samples_per_plugin",
            "images=100",
        ]
        print(f"starting tensorboard on {base} ...")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_until_served(base, proc)
            print("screenshots:")
            for name, fragment, height in DASHBOARDS:
                screenshot(args.chromium, f"{base}/{fragment}", out / name, args.width, height, args.wait_ms)
            save_served_images(base, out)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        screenshot(args.chromium, report.as_uri(), out / "report.png", args.width, 16000, 3000)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
