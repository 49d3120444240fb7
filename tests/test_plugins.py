"""Plugins through the ``probes`` entry-point group, as a third-party package would add them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import probes
from probes import plugins
from probes.plugins import ProbesPluginWarning


def make_distribution(root, dist: str, module: str, code: str, entry: str) -> None:
    """A minimal installed distribution on ``root``: a module plus a dist-info with entry points."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[probes]\n{entry}\n")


PLUGIN = """
import probes
from probes.records import Scalar

class WeightNorm(probes.Probe):
    name = "weight_norm"
    description = "total weight norm (test plugin)"
    every = 1
    needs_probe_data = False

    def measure(self, batch):
        total = sum((p.detach() ** 2).sum() for p in batch.model.parameters()) ** 0.5
        return [Scalar("weight_norm/total", total)]

@probes.hookimpl
def probes_add_probes():
    return [WeightNorm]
"""


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("probes_fake_norm", "probes_broken"):  # later tests must not import these copies
        sys.modules.pop(name, None)


def test_entry_point_plugin_is_attached_by_name(site_dir):
    make_distribution(site_dir, "probes_fake_norm", "probes_fake_norm", PLUGIN, "fakenorm = probes_fake_norm")
    plugins.reset()
    info = {i.name: i for i in probes.available()}
    assert info["weight_norm"].source == "probes_fake_norm 1.0"
    assert info["relu_zeros"].source == "builtin"
    model = nn.Linear(3, 2)
    s = probes.attach(model, ["weight_norm", "relu_zeros"])
    s.close()
    expected = torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())).item()
    assert abs(s.memory.last("weight_norm/total") - expected) < 1e-6


def test_broken_plugin_is_reported_by_name_and_others_work(site_dir):
    make_distribution(site_dir, "probes_broken", "probes_broken", "raise ImportError('missing dep xyz')",
                      "broken = probes_broken")
    make_distribution(site_dir, "probes_fake_norm", "probes_fake_norm", PLUGIN, "fakenorm = probes_fake_norm")
    plugins.reset()
    with pytest.warns(ProbesPluginWarning, match="broken"):
        names = [i.name for i in probes.available()]
    assert "weight_norm" in names and "relu_zeros" in names
    assert "missing dep xyz" in plugins.registry.failed["broken"]


def test_autoload_can_be_disabled(site_dir, monkeypatch):
    make_distribution(site_dir, "probes_fake_norm", "probes_fake_norm", PLUGIN, "fakenorm = probes_fake_norm")
    monkeypatch.setenv("PROBES_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reset()
    names = [i.name for i in probes.available()]
    assert "weight_norm" not in names and "relu_zeros" in names


def test_probes_list_command_shows_relu_zeros():
    out = subprocess.run([sys.executable, "-m", "probes", "list"], capture_output=True, text=True, check=True)
    assert "relu_zeros" in out.stdout and "builtin" in out.stdout
