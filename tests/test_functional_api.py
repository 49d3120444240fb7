"""The public face of ``probes.functional``: what it exports, what importing it pulls in, and the old paths.

References: the submodules' own ``__all__`` lists, ``sys.modules`` of a fresh interpreter, and
``sys.stdlib_module_names``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import probes.functional as F
import probes.autodiff.ntk as ntk_package
from probes.functional import alignment, labels, local_affine, meanfield, path_gram, patterns, spectra
from probes.functional.ntk import settings

ROOT = Path(__file__).resolve().parent.parent
SUBMODULES = (alignment, labels, local_affine, meanfield, path_gram, patterns, spectra, ntk_package)


@pytest.mark.parametrize("name", F.__all__)
def test_every_exported_name_imports_and_is_callable(name):
    obj = getattr(F, name)
    assert callable(obj), f"probes.functional.{name} is {type(obj).__name__}"
    home = sys.modules[obj.__module__]
    assert home.__name__.startswith("probes.functional."), home.__name__
    assert getattr(home, name) is obj  # the object of its defining module, not a copy or a wrapper


def test_star_import_gives_exactly_all():
    space: dict = {}
    exec("from probes.functional import *", space)
    assert sorted(k for k in space if k != "__builtins__") == sorted(F.__all__)
    assert len(set(F.__all__)) == len(F.__all__)


def test_every_callable_of_the_submodules_all_is_exported_except_module_names():
    missing = []
    for mod in SUBMODULES:
        for name in getattr(mod, "__all__", ()):
            if callable(getattr(mod, name)) and name not in F.__all__:
                missing.append(f"{mod.__name__}.{name}")
    # alignment() and path_gram() share their module's name: exported, they would hide the module
    assert sorted(missing) == ["probes.functional.alignment.alignment"]
    assert "path_gram" not in F.__all__


def test_submodules_stay_reachable_as_modules():
    for name in ("alignment", "path_gram", "spectra", "ntk", "local_affine", "patterns", "labels", "meanfield"):
        assert isinstance(getattr(F, name), types.ModuleType), name
    import probes.functional.pathgram as fpg

    assert isinstance(fpg, types.ModuleType) and callable(fpg.path_gram)


def test_importing_functional_pulls_in_no_engine_and_nothing_beyond_torch_numpy_stdlib():
    """A fresh interpreter with an empty ``probes`` package (so that ``probes/__init__``, which starts the
    engine, does not run): after torch and numpy, importing ``probes.functional`` adds only its own modules
    and standard-library ones."""
    code = f"""
import json, sys, types
import numpy, torch
pkg = types.ModuleType("probes")
pkg.__path__ = [{str(ROOT / "probes")!r}]
sys.modules["probes"] = pkg
before = set(sys.modules)
import probes.functional
import probes.autodiff.ntk
new = sorted(set(sys.modules) - before)
print(json.dumps(new))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    new = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [m for m in new if m.startswith("probes.")]
    assert "probes.autodiff.ntk.plan" in ours and "probes.functional.spectra" in ours  # the check saw them
    assert not [m for m in ours if not m.startswith("probes.functional")], ours
    roots = {m.split(".")[0] for m in new} - {"probes", "torch", "numpy"}
    assert not sorted(roots - set(sys.stdlib_module_names)), sorted(roots - set(sys.stdlib_module_names))


def test_ntk_tunables_set_on_the_package_reach_the_code(monkeypatch):
    """``probes.autodiff.ntk.X = v`` (tests, benchmarks and users did this on the single module) sets
    ``settings.X``, which the code reads; ``monkeypatch`` restores it."""
    assert set(settings.TUNABLES) == {n for n in vars(settings) if n.isupper() and n != "TUNABLES"}
    default = settings.PAIRS_METHOD
    with monkeypatch.context() as m:
        m.setattr(ntk_package, "PAIRS_METHOD", "pairs")
        m.setattr(ntk_package, "FALLBACK_BUDGET", 123)
        assert settings.PAIRS_METHOD == "pairs" and settings.FALLBACK_BUDGET == 123
        assert ntk_package.FALLBACK_BUDGET == 123
        assert "PAIRS_METHOD" not in vars(ntk_package)  # no stale copy in the package namespace
    assert settings.PAIRS_METHOD == default and settings.FALLBACK_BUDGET == 1 << 30
    settings.STRIP_BYTES, saved = 77, settings.STRIP_BYTES
    try:
        assert ntk_package.STRIP_BYTES == 77  # and reads follow settings
    finally:
        settings.STRIP_BYTES = saved


def test_ntk_tunable_set_on_the_package_changes_the_route(monkeypatch):
    """A small Linear layer's term (one position per sample, 2 outputs) takes the pairwise route by default
    (``K^2 (C n + d) = 8`` against ``C n (d + 1) = 16`` operations per pair of samples), the outer-product one
    once ``PAIRS_METHOD`` is set to "outer" on the package."""
    import torch
    from torch import nn

    from probes.autodiff.ntk.layers import _kind_of
    from probes.functional.ntk.terms import _route

    layer = nn.Linear(3, 2).double()
    x, g = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, 2, dtype=torch.float64)  # g: (B, C, out)
    t = _kind_of(layer).term(layer, x, g)
    assert _route(t, 4, 8, "dense", 1) == "pairs"
    monkeypatch.setattr(ntk_package, "PAIRS_METHOD", "outer")
    assert _route(t, 4, 8, "dense", 1) == "outer"


def test_names_imported_from_the_ntk_package_elsewhere_are_there():
    for name in (
        "MODES",
        "REDUCTIONS",
        "NTKPlan",
        "NTKOperator",
        "SampleMixingError",
        "empirical_ntk",
        "ntk_operator",
        "ntk_plan",
        "trace_over_outputs",
        "_layer_terms",
        "_accumulate_term",
    ):
        assert hasattr(ntk_package, name), name


def test_the_legacy_kernels_module_re_exports_the_same_objects():
    import probes.kernels as legacy

    for name in legacy.__all__:
        obj = getattr(legacy, name)
        if name == "alignment":
            assert obj is alignment.alignment
        else:
            assert obj is getattr(F, name), name
