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
    plugins.reset()  # later tests load the plugins of the real environment again
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
    make_distribution(
        site_dir, "probes_broken", "probes_broken", "raise ImportError('missing dep xyz')", "broken = probes_broken"
    )
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


BROKEN_DEP = "import probes_missing_dependency_xyz  # noqa\n"

MISSPELLED = """
import probes
from probes.records import Scalar

class Count(probes.Probe):
    name = "counted"
    every = 1
    needs_probe_data = False

    def measure(self, batch):
        return [Scalar("counted/one", 1.0)]

@probes.hookimpl
def probes_add_probe():  # misspelled: the hook is probes_add_probes
    return [Count]
"""


def test_asking_for_a_probe_of_a_plugin_that_failed_to_import_names_the_plugin_and_its_error(site_dir):
    make_distribution(site_dir, "probes_broken", "probes_broken", BROKEN_DEP, "brokenplugin = probes_broken")
    make_distribution(site_dir, "probes_fake_norm", "probes_fake_norm", PLUGIN, "fakenorm = probes_fake_norm")
    plugins.reset()
    with pytest.warns(ProbesPluginWarning, match="brokenplugin"):
        plugins.registry.manager  # noqa: B018 - loads the entry points
    for ask in (
        lambda: probes.attach(nn.Linear(2, 2), ["broken_probe"]),
        lambda: probes.attach(nn.Linear(2, 2), ["relu_zeros"], sinks=["broken_sink"]),
    ):
        with pytest.raises(plugins.UnknownProbeError) as info:
            ask()
        text = str(info.value)
        # the entry point, its distribution and module, and the import error
        assert "'brokenplugin'" in text and "probes_broken 1.0" in text and "probes_broken" in text
        assert "ModuleNotFoundError" in text and "probes_missing_dependency_xyz" in text
        assert "probes_fake_norm" not in text  # a plugin that loaded is not blamed
    s = probes.attach(nn.Linear(3, 2), ["weight_norm"])  # the plugin that loaded keeps working
    s.close()
    assert "weight_norm/total" in s.memory.tags()


def test_unknown_probe_without_failed_plugins_says_only_what_is_available(site_dir, monkeypatch):
    make_distribution(site_dir, "probes_broken", "probes_broken", BROKEN_DEP, "brokenplugin = probes_broken")
    monkeypatch.setenv("PROBES_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reset()
    with pytest.raises(plugins.UnknownProbeError) as info:
        probes.attach(nn.Linear(2, 2), ["relu_zero"])
    text = str(info.value)
    assert "Did you mean 'relu_zeros'?" in text and "Available:" in text
    assert "brokenplugin" not in text and "failed" not in text  # autoload off: nothing was imported
    assert plugins.registry.failed == {} and "probes_broken" not in sys.modules


def test_a_misspelled_hook_implementation_is_an_error_naming_it(site_dir):
    make_distribution(site_dir, "probes_typo", "probes_typo", MISSPELLED, "typo = probes_typo")
    plugins.reset()
    with pytest.warns(ProbesPluginWarning, match="probes_add_probe"):
        names = [i.name for i in probes.available()]
    assert "relu_zeros" in names and "counted" not in names
    assert "typo" in plugins.registry.failed and "probes_add_probe" in plugins.registry.failed["typo"]
    with pytest.raises(plugins.UnknownProbeError, match="(?s)'typo'.*probes_add_probe"):
        probes.attach(nn.Linear(2, 2), ["counted"])
    sys.modules.pop("probes_typo", None)


def test_registering_a_misspelled_plugin_by_hand_raises_and_leaves_the_registry_clean(site_dir):
    import pluggy

    (site_dir / "probes_typo_hand.py").write_text(textwrap.dedent(MISSPELLED))
    import probes_typo_hand

    plugins.reset()
    before = set(plugins.probe_table())
    with pytest.raises(pluggy.PluginValidationError, match="probes_add_probe"):
        plugins.register(probes_typo_hand, name="typo_by_hand")
    assert not plugins.registry.manager.has_plugin("typo_by_hand")
    assert set(plugins.probe_table()) == before
    # the correctly spelled hook registers
    probes_typo_hand.probes_add_probes = probes_typo_hand.probes_add_probe
    del probes_typo_hand.probes_add_probe
    plugins.register(probes_typo_hand, name="typo_fixed")
    assert plugins.probe_table()["counted"].source == "registered"
    plugins.reset()
    sys.modules.pop("probes_typo_hand", None)
