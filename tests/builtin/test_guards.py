"""Guards on numbers that would mislead: ``alignment`` with fewer than two probe samples per class says so once, and
``linear_region``'s default perturbation sizes follow the number of gates, so a CNN gets an informative flip fraction.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import probes
from probes.builtin.linear_region import LinearRegion, auto_sizes
from probes.engine.failures import ProbesNoticeWarning
from probes.functional.alignment import cka
from probes.testing import probe_batch


def notices(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ProbesNoticeWarning)]


def test_alignment_with_fewer_than_two_samples_per_class_says_so_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 10))
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # P = 8 with 10 classes, as in issue 20
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        session = probes.attach(model, {"alignment": {"every": 1}}, probe_data=(x, y), sinks=["memory"], strict=True)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            session.step()
        session.close()
    said = [m for m in notices(record) if "per class" in m]
    assert len(said) == 1, said
    assert "8 samples in 8 classes" in said[0] and "at least 16 samples" in said[0]
    # what it warns about: with one sample per class the value does not depend on which sample has which label
    # (the centered label kernel is I - 11^T/P for any assignment), so it says nothing about the labels
    with torch.no_grad():
        h = torch.relu(model[0](x)).double()
    value = session.memory.last("alignment/1/cka")
    for seed in range(3):
        shuffled = y[torch.randperm(8, generator=torch.Generator().manual_seed(seed))]
        assert cka(h, nn.functional.one_hot(shuffled, 10).double()).item() == pytest.approx(value, rel=1e-10)
    assert cka(h, nn.functional.one_hot(torch.arange(8) % 2, 10).double()).item() != pytest.approx(value, rel=1e-3)
    # two per class: no notice
    x2, y2 = torch.randn(20, 6), torch.arange(20) % 10
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        probes.attach(model, ["alignment"], probe_data=(x2, y2), sinks=["memory"], strict=True).close()
    assert not [m for m in notices(record) if "per class" in m]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def test_auto_sizes_formula() -> None:
    assert auto_sizes(1) == auto_sizes(96) == auto_sizes(1000) == (1e-3, 1e-2, 1e-1)
    assert auto_sizes(1001) == auto_sizes(10_000) == (1e-4, 1e-3, 1e-2)
    assert auto_sizes(28_672) == (1e-5, 1e-4, 1e-3)
    for g in (1, 7, 999, 1000, 1001, 12_345, 10**6, 10**6 + 1):
        b = auto_sizes(g)[0]
        assert b <= 1e-3 and b <= 1 / g and (b == 1e-3 or 10 * b > 1 / g)  # the largest such power of ten
        assert math.log10(b) == round(math.log10(b))


def test_linear_region_defaults_on_a_cnn_with_batchnorm_are_informative() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.rand(32, 3, 32, 32) * 255  # image-scale inputs, not normalised
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):  # running statistics of its own
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    got = {
        r.tag: r.item() for r in LinearRegion().measure(probe_batch(model, x, site_types=LinearRegion.needs.site_types))
    }
    # gates per image: ReLU 16 x 32 x 32, max-pool indices 16 x 16 x 16, ReLU 32 x 16 x 16 = 28,672 -> 1e-5
    assert "linear_region/flip_fraction_eps_1e-05" in got and "linear_region/flip_fraction_delta_0.001" in got
    assert 0 < got["linear_region/flip_fraction"] < 1
    assert math.isfinite(got["linear_region/l_gen"]) and got["linear_region/l_gen"] > 0
    # L_gen is a second difference of size ~ eps delta |f| = 1e-10 |f| here: float64 gives it to about u / 1e-10
    assert got["linear_region/identity_error"] <= 1e-4 * got["linear_region/l_gen"]
    assert 0 < got["linear_region/flip_fraction_eps_1e-05"] < 1
    # the defaults are the documented sizes, and the sizes of earlier versions gave nothing to read (the check can
    # fail)
    explicit = LinearRegion(eps=(1e-5, 1e-4, 1e-3), delta=(1e-5, 1e-4, 1e-3))
    same = {r.tag: r.item() for r in explicit.measure(probe_batch(model, x, site_types=LinearRegion.needs.site_types))}
    assert same.keys() == got.keys()
    assert all(same[t] == got[t] or (math.isnan(same[t]) and math.isnan(got[t])) for t in got)
    old = LinearRegion(eps=(1e-3, 1e-2, 1e-1), delta=(1e-3, 1e-2, 1e-1))
    before = {r.tag: r.item() for r in old.measure(probe_batch(model, x, site_types=LinearRegion.needs.site_types))}
    assert before["linear_region/flip_fraction"] == 1 and math.isnan(before["linear_region/l_gen"])


def test_linear_region_defaults_on_an_mlp_are_the_earlier_sizes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(40, 8)
    got = {r.tag: r.item() for r in LinearRegion().measure(probe_batch(model, x))}
    earlier = LinearRegion(eps=(1e-3, 1e-2, 1e-1), delta=(1e-3, 1e-2, 1e-1))
    assert {r.tag: r.item() for r in earlier.measure(probe_batch(model, x))} == got
    assert "linear_region/flip_fraction_eps_0.001" in got


def test_auto_is_the_only_word_the_sizes_take() -> None:
    with pytest.raises(TypeError, match="option 'eps'"):
        LinearRegion(eps="automatic")
    with pytest.raises(TypeError, match="option 'delta'"):
        LinearRegion(delta=None)
    assert LinearRegion().eps == LinearRegion(eps="auto").eps == "auto"
