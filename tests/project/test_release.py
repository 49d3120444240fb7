"""The release check: the sdist and the wheel build, `twine check` passes, and the wheel works on its own.

`python -m build --no-isolation` (offline: setuptools comes from this environment) writes both archives.
The wheel then goes into a fresh virtual environment with `pip install --no-deps`; its dependencies
(torch, numpy, ...) come from this environment through one `.pth` line, since a fresh venv cannot get
torch without the network. That line only appends this environment's site-packages to `sys.path`: its
`.pth` files, the editable install of the checkout among them, are not processed there, so `probes` is
imported from the wheel. `probes demo --smoke` then runs from the new venv's `bin/`, in a directory
outside the repository.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import probes

ROOT = Path(__file__).resolve().parents[2]
NAME = "torch-probes"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout + out.stderr


def _torch_version() -> str:
    return _run([sys.executable, "-c", "import torch; print(torch.__version__)"], ROOT).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="the release check needs `build` (the dev extra installs it)")
    out = tmp_path_factory.mktemp("dist")
    before = _torch_version()
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        cwd=out,
    )
    assert _torch_version() == before, "building the release changed torch"
    return out


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {[p.name for p in found]}"
    return found[0]


def test_the_archives_carry_the_name_the_version_and_the_package(dist: Path) -> None:
    version = probes.__version__
    wheel = _one(dist, f"torch_probes-{version}-py3-none-any.whl")
    sdist = _one(dist, f"torch_probes-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"torch_probes-{version}.dist-info"
        meta = email.message_from_string(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert meta["Name"] == NAME and meta["Version"] == version
    assert meta["Description-Content-Type"] == "text/markdown"
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "probes").rglob("*.py")}
    expected |= {"probes/py.typed", "probes/_data/digits.npz"}
    assert expected <= names, sorted(expected - names)
    assert "probes = probes.app.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "docs/", "examples/")) for n in names)
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    needed = {"pyproject.toml", "README.md", "probes/__init__.py", "probes/py.typed", "probes/_data/digits.npz"}
    assert needed <= members, sorted(needed - members)


def test_twine_check_passes(dist: Path) -> None:
    pytest.importorskip("twine", reason="the release check needs `twine` (the dev extra installs it)")
    archives = sorted(str(p) for p in dist.iterdir() if p.suffix in (".whl", ".gz"))
    assert len(archives) == 2
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *archives], cwd=dist)
    assert out.count("PASSED") == 2, out


def test_the_wheel_runs_the_demo_from_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    wheel = _one(dist, "torch_probes-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    )
    # dependencies only: this environment's site-packages appended to sys.path (its .pth files are not run)
    (purelib / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        "PATH": f"{bindir}{os.pathsep}/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONNOUSERSITE": "1",
        "MPLBACKEND": "Agg",
    }
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        cwd=tmp_path,
        env={**env, "PATH": os.environ["PATH"]},
    )
    where = _run(
        [
            str(python),
            "-c",
            "import probes, importlib.metadata as m, torch; "
            "print(probes.__file__); print(probes.__version__); print(m.version('torch-probes'))",
        ],
        cwd=tmp_path,
        env=env,
    ).split()
    assert Path(where[0]).is_relative_to(purelib), f"probes came from {where[0]}, not the wheel"
    assert where[1] == where[2] == probes.__version__
    assert (Path(where[0]).parent / "py.typed").is_file()
    logdir = tmp_path / "runs"
    out = _run(
        [str(bindir / "probes"), "demo", "--smoke", "--no-progress", "--logdir", str(logdir)], cwd=tmp_path, env=env
    )
    events = list(logdir.rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 1000, out
