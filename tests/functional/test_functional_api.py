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

import probes.autodiff as A
import probes.autodiff.ntk as ntk_package
import probes.functional as F
from probes.functional import (
    alignment,
    labels,
    linear_region,
    margin,
    particles,
    pathgram,
    patterns,
    relu_zeros,
    spectra,
)
from probes.functional.ntk import kernel, settings

ROOT = Path(__file__).resolve().parents[2]
SUBMODULES = (alignment, labels, linear_region, margin, particles, pathgram, patterns, relu_zeros, spectra, kernel)


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
    for name in ("alignment", "pathgram", "spectra", "ntk", "linear_region", "patterns", "labels", "particles"):
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
new = sorted(set(sys.modules) - before)
print(json.dumps(new))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    new = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [m for m in new if m.startswith("probes.")]
    assert "probes.functional.ntk.settings" in ours and "probes.functional.spectra" in ours  # the check saw them
    assert not [m for m in ours if not m.startswith("probes.functional")], ours
    roots = {m.split(".")[0] for m in new} - {"probes", "torch", "numpy"}
    assert not sorted(roots - set(sys.stdlib_module_names)), sorted(roots - set(sys.stdlib_module_names))


def test_ntk_settings_are_a_frozen_object_with_the_documented_defaults():
    """The NTK tunables are one frozen ``NTKSettings`` passed as an argument: no module state to set, a typo in a
    field name fails, a route name is checked, and the package has no tunable of its own any more."""
    import dataclasses

    s = settings.NTKSettings()
    assert s == settings.DEFAULT and s.pairs_method == "auto" and s.fallback_budget == 1 << 30
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.pairs_method = "outer"  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.NTKSettings(PAIRS_METHOD="outer")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="pairs_method"):
        settings.NTKSettings(pairs_method="fast")
    assert dataclasses.replace(s, strip_bytes=77).strip_bytes == 77 and s.strip_bytes == 1 << 28
    assert not [n for n in vars(ntk_package) if n.isupper() and n not in ("MODES", "REDUCTIONS", "DEFAULT")]
    assert ntk_package.NTKSettings is settings.NTKSettings


def test_ntk_settings_passed_as_an_argument_change_the_route():
    """A small Linear layer's term (one position per sample, 2 outputs) takes the pairwise route by default
    (``K^2 (C n + d) = 8`` against ``C n (d + 1) = 16`` operations per pair of samples), the outer-product one
    when the settings passed say ``pairs_method="outer"``."""
    import torch
    from torch import nn

    from probes.autodiff.ntk.layers import _kind_of
    from probes.functional.ntk.terms import _route

    layer = nn.Linear(3, 2).double()
    x, g = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, 2, dtype=torch.float64)  # g: (B, C, out)
    t = _kind_of(layer).term(layer, x, g)
    assert _route(t, 4, 8, "dense", 1) == "pairs"
    assert _route(t, 4, 8, "dense", 1, settings.NTKSettings(pairs_method="outer")) == "outer"
    assert _route(t, 4, 8, "dense", 1, settings.NTKSettings(pairs_method="outer", fallback_budget=1)) == "pairs"


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
            assert obj is (getattr(F, name) if name in F.__all__ else getattr(A, name)), name
