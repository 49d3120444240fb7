"""The ``probes`` command speaks plainly (issue 31 §4): a problem is one line naming it and exit status 2, never a
traceback; ``--version``; ``probes tensorboard`` leaves no TensorBoard behind; help texts say what is done; the
demo's progress bar only on a terminal and without ``nan``; ``check_probe`` ends with one line of what passed."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import probes
from probes.app import cli, demo


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probes", *args], capture_output=True, text=True, timeout=timeout)


def one_line_problem(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], err


def test_version_and_a_missing_folder_as_a_user_runs_them(tmp_path) -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"probes {probes.__version__}", out
    missing = tmp_path / "nonexistent"
    out = run_cli("report", str(missing))
    one_line_problem(out.returncode, out.stderr, "probes report:", str(missing))
    assert out.stdout == ""


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_report_on_what_is_not_a_log_folder_is_one_line(tmp_path, capsys, what) -> None:
    path = tmp_path / what
    if what == "empty":
        path.mkdir()
    elif what == "file":
        path.write_text("not event files")
    assert cli.main(["report", str(path)]) == 2
    out = capsys.readouterr()
    one_line_problem(2, out.err, "probes report:", str(path))
    assert not (tmp_path / "report.html").exists()


def test_demo_on_an_unwritable_logdir_is_one_line_before_training(tmp_path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    t0 = time.perf_counter()
    assert cli.main(["demo", "--smoke", "--logdir", str(blocker / "runs")]) == 2
    assert time.perf_counter() - t0 < 30  # said before training, not after
    out = capsys.readouterr()
    one_line_problem(2, out.err, "probes demo:", str(blocker / "runs"))


def test_demo_on_an_unwritable_logdir_as_a_user_runs_it(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = run_cli("demo", "--smoke", "--logdir", str(blocker / "runs"))
    one_line_problem(out.returncode, out.stderr, "--logdir")


def test_help_texts(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    usage, _, rest = text.partition("positional arguments")
    assert "HTML" in usage and "event files" in usage  # a description, not only the usage line
    with pytest.raises(SystemExit):
        cli.main(["tensorboard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cmd = demo.tensorboard_command("runs")
    value = cmd[cmd.index("--samples_per_plugin") + 1]  # what it really passes
    kept = int(re.fullmatch(r"images=(\d+)", value).group(1))
    assert f"--samples_per_plugin {value}" in text and f"up to {kept} images per tag" in text
    assert "every image" not in text
    assert cli.main(["tensorboard", "runs", "--dry-run"]) == 0
    assert f"--samples_per_plugin {value}" in capsys.readouterr().out


FAKE_TENSORBOARD = """
import os, signal, sys, time
pidfile = sys.argv[1]

def stop(signum, frame):
    with open(pidfile + ".signal", "w") as f:
        f.write(str(signum))
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pidfile + ".tmp", pidfile)
time.sleep(120)
"""

LAUNCHER = """
import sys
from probes.app import cli, demo

fake, pidfile, logdir = sys.argv[1:]
demo.tensorboard_command = lambda logdir: [sys.executable, fake, pidfile]  # what the CLI launches
sys.exit(cli.main(["tensorboard", logdir]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_tensorboard_stops_with_the_command(tmp_path, sig) -> None:
    fake, launcher, pidfile = tmp_path / "tensorboard_fake.py", tmp_path / "launch.py", tmp_path / "tb.pid"
    fake.write_text(textwrap.dedent(FAKE_TENSORBOARD))
    launcher.write_text(textwrap.dedent(LAUNCHER))
    proc = subprocess.Popen(
        [sys.executable, str(launcher), str(fake), str(pidfile), str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the fake tensorboard did not start"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        time.sleep(0.3)  # the CLI is waiting on its child now
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err
        assert (tmp_path / "tb.pid.signal").read_text() == str(int(sig))  # TensorBoard was told
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "a TensorBoard was left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_demo_progress_bar_only_on_a_terminal(monkeypatch, capsys) -> None:
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--smoke"]) == 0  # under pytest stdout is not a terminal
    assert seen["progress"] is False
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.main(["demo", "--smoke"]) == 0
    assert seen["progress"] is True
    assert cli.main(["demo", "--smoke", "--no-progress"]) == 0
    assert seen["progress"] is False


def test_demo_progress_shows_no_nan_before_the_first_test(tmp_path, monkeypatch) -> None:
    only = [i for i in probes.available() if i.name == "relu_zeros"]  # one cheap probe: this is about the bar
    monkeypatch.setattr(probes, "available", lambda: only)
    buf = io.StringIO()
    assert demo.run_demo(str(tmp_path), smoke=True, epochs=1, progress=True, out=buf) == 0
    bars = [b for b in buf.getvalue().split("\r") if b.startswith("[")]
    assert bars
    assert not [b for b in bars if "nan" in b], bars[:3]
    assert "test acc" in bars[-1]  # after the epoch's test


def test_check_probe_ends_with_one_line_of_what_passed(capsys) -> None:
    from probes import testing
    from probes.builtin.relu_zeros import ReluZeros

    summary = testing.check_probe(ReluZeros)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == summary
    assert re.fullmatch(
        r"check_probe\(ReluZeros\): 4 checks passed \(training unchanged, records, state round trip, "
        r"failure isolation\)",
        summary,
    ), summary
