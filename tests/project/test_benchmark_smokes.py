"""Smoke runs of the benchmarks that no other test runs (``overhead.py``, ``relu_zeros.py``), and a check that the
suite runs every benchmark's ``--smoke`` somewhere: each script in ``benchmarks/`` is named next to ``--smoke`` in
some test file."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: every row of the overhead table, in the order printed
OVERHEAD_ROWS = [
    "24-block MLP: plain step",
    "24-block MLP: relu_zeros",
    "24-block MLP: alignment, between measurements",
    "second MLP, not attached: plain step",
    "second MLP, not attached, first attached",
    "GPT-2: plain step",
    "GPT-2: relu_zeros sites=all",
    "ResNet-18: plain step",
    "ResNet-18: relu_zeros",
    "seed MLP: plain step",
    "seed MLP: relu_zeros",
    "seed MLP: active probes, not due",
    "seed MLP, Linear output: plain step",
    "seed MLP, Linear output: active probes, not due",
    "F.relu seed MLP: plain step",
    "F.relu seed MLP: relu_zeros",
]


def _smoke(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _line(stdout: str, row: str) -> str:
    lines = [ln for ln in stdout.splitlines() if re.match(re.escape(row) + r"\s{2}", ln)]
    assert len(lines) == 1, (row, stdout)
    return lines[0]


def test_the_overhead_benchmark_smoke_prints_every_row_with_a_ratio_and_its_goal() -> None:
    out = _smoke("overhead.py")
    assert out.returncode == 0, out.stdout + out.stderr
    have_transformers = importlib.util.find_spec("transformers") is not None
    for row in OVERHEAD_ROWS:
        line = _line(out.stdout, row)
        if row.startswith("GPT-2") and not have_transformers:
            assert "skipped: transformers is not installed" in line, line
            continue
        assert re.search(r"\d\.\d{3}x", line), line  # a ratio to the plain step of the same model
        if "plain step" not in row:
            assert re.search(r"(<= \d\.\d\dx  (yes|no))|(-  -)$", line), line  # the goal column and the verdict
    for goal in ("<= 1.15x", "<= 1.02x", "<= 1.01x"):
        assert goal in out.stdout
    assert "relu_zeros flush on the 24-block MLP" in out.stdout
    assert re.search(r"seed MLP with a Linear output layer, not due: .*\bpathgram\b", out.stdout), out.stdout


def test_the_relu_zeros_benchmark_smoke_counts_training_forwards_and_agrees_with_the_seed() -> None:
    out = _smoke("relu_zeros.py")
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("plain training forward", "relu_zeros probe", "seed loop (x125 of 4)"):
        assert re.search(r"\d+\.\d{2}x", _line(out.stdout, row)), out.stdout
    assert re.search(r"counts agree on the subset \(\d+ zeros\)", out.stdout), out.stdout


def test_every_benchmark_smoke_runs_in_the_suite() -> None:
    """Each ``benchmarks/<name>.py`` (helpers start with ``_``) appears in a test file that passes ``--smoke``."""
    tests = {p.name: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}
    for script in sorted((ROOT / "benchmarks").glob("[!_]*.py")):
        if "--smoke" not in script.read_text():
            continue
        runners = [
            name for name, text in tests.items() if script.name in text and re.search(r"[\"']--smoke[\"']", text)
        ]
        if script.name in ("overhead.py", "relu_zeros.py"):
            assert "test_benchmark_smokes.py" in runners
        assert runners, f"no test runs benchmarks/{script.name} --smoke"


def test_the_curvature_benchmark_smoke_runs_without_the_peers_and_agrees_with_the_dense_hessian(tmp_path) -> None:
    """``curvature.py --smoke`` as CI runs it, PyHessian and hessian-eigenthings hidden even where installed: their
    rows say they are not installed, and the probe's top eigenvalues match the dense float64 Hessian."""
    out_json = tmp_path / "rows.json"
    hide = (
        "import runpy, sys; sys.modules['pyhessian'] = None; sys.modules['hessian_eigenthings'] = None; "
        f"sys.argv = ['curvature.py', '--smoke', '--json', {str(out_json)!r}]; "
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'curvature.py')!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pyhessian: pyhessian is not installed" in out.stdout, out.stdout
    assert "cannot run: hessian_eigenthings is not installed" in out.stdout, out.stdout
    rows = json.loads(out_json.read_text())
    ours = [r for r in rows if r["method"] == "probes"]
    cases = {r["case"] for r in ours}
    assert "mlp" in cases, cases
    if importlib.util.find_spec("transformers") is not None:
        assert {"gpt2", "gpt2-sdpa"} <= cases, cases
    for r in ours:
        assert r["seconds"] is not None and r["seconds"] > 0, r
        if r["kind"] == "eigen":  # Lanczos to tol = 1e-3 against eigvalsh of torch.func's dense Hessian
            assert r["error"] is not None and r["error"] < 1e-2, r
        else:  # Hutchinson with 4 Rademacher vectors (a fixed seed): the exact trace within 4 standard errors
            assert abs(r["values"] - r["exact"]) <= 4 * r["stderr"], r
    peers = [r for r in rows if r["method"] != "probes"]
    assert peers and all(r["seconds"] is None and r["note"].startswith("cannot run: ") for r in peers), peers
