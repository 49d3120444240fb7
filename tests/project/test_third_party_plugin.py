"""The real third-party plugin in ``examples/plugin``: installed like any package, found by its entry point.

The package is copied to a temporary directory (so the build leaves nothing in the repository) and
installed there with ``pip install --no-deps --no-index --no-build-isolation --target`` (offline:
setuptools comes from the test environment). Without pip, its dist-info is written from its own
``pyproject.toml``. The target directory then goes on ``sys.path``, exactly what an installed
distribution looks like to ``importlib.metadata``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probes
from probes import plugins

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugin"


def _install(target: Path, work: Path) -> str:
    src = work / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    try:
        import pip  # noqa: F401
    except ImportError:
        return _write_dist_info(src, target)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
        str(target),
        str(src),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"pip could not build the example plugin:\n{out.stdout}\n{out.stderr}"
    return "pip"


def _write_dist_info(src: Path, target: Path) -> str:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    for pkg in tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]:
        shutil.copytree(src / pkg, target / pkg)
    info = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in meta["entry-points"]["probes"].items())
    (info / "entry_points.txt").write_text(f"[probes]\n{eps}")
    return "dist-info"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("plugin")
    target = work / "site"
    target.mkdir()
    _install(target, work)
    assert any(target.glob("probes_weightnorm-0.1.0.dist-info"))
    return target


@pytest.fixture
def on_path(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    plugins.reset()
    yield installed
    sys.modules.pop("probes_weightnorm", None)


def test_pyproject_declares_the_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["probes"] == {"weightnorm": "probes_weightnorm"}
    assert "torch-probes" in meta["dependencies"]  # the distribution name of probes on the index


def test_plugin_probe_attaches_by_name_next_to_builtins(on_path):
    info = {i.name: i for i in probes.available()}
    assert info["weightnorm"].source == "probes-weightnorm 0.1.0"
    assert info["relu_zeros"].source == "builtin"
    import probes_weightnorm

    assert Path(probes_weightnorm.__file__).is_relative_to(on_path)  # the installed copy, not the source tree

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    s = probes.attach(model, {"weightnorm": {"every": 1}, "relu_zeros": {"every": 1}}, optimizer=opt, strict=True)
    assert "weightnorm/0/grad" not in s.memory.tags()  # step 0: no gradient yet
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()  # the session steps in the optimizer's post-hook: p.grad is this step's gradient
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    s.close()
    mem = s.memory
    for layer in ("0", "2"):
        w = torch.sqrt(weights[f"{layer}.weight"].double().norm() ** 2 + weights[f"{layer}.bias"].double().norm() ** 2)
        g = torch.sqrt(grads[f"{layer}.weight"].double().norm() ** 2 + grads[f"{layer}.bias"].double().norm() ** 2)
        assert mem.scalars()[f"weightnorm/{layer}/weight"][-1] == (1, pytest.approx(w.item(), rel=1e-12))
        assert mem.scalars()[f"weightnorm/{layer}/grad"] == [(1, pytest.approx(g.item(), rel=1e-12))]
        assert mem.last(f"weightnorm/{layer}/grad_to_weight") == pytest.approx((g / w).item(), rel=1e-12)
    total = torch.sqrt(sum(v.double().norm() ** 2 for v in weights.values()))
    assert mem.last("weightnorm/total/weight") == pytest.approx(total.item(), rel=1e-12)
    assert "relu_zeros/1/fraction" in mem.tags()


def test_plugin_options_are_checked(on_path):
    with pytest.raises(ValueError, match="weightnorm"):
        probes.attach(nn.Linear(2, 2), {"weightnorm": {"modules": ["nothing*"]}})
    with pytest.raises(TypeError, match="weightnorm"):
        probes.attach(nn.Linear(2, 2), {"weightnorm": {"colour": "red"}})


def test_probes_list_shows_where_each_probe_comes_from(installed):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))
    env.pop("PROBES_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run(
        [sys.executable, "-m", "probes", "list"], capture_output=True, text=True, env=env, timeout=120, check=True
    ).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "probes-weightnorm 0.1.0" in rows["weightnorm"]
    assert rows["relu_zeros"].split()[2] == "builtin"  # probe, every, from, description
    env["PROBES_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "probes", "list"], capture_output=True, text=True, env=env, timeout=120, check=True
    ).stdout
    assert "weightnorm" not in out and "relu_zeros" in out
