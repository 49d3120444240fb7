"""The ``alignment`` probe: values against the P x P formula, site selection, errors, a session, the example."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script as _load
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes.builtin.alignment import Alignment
from probes.kernels import DegenerateKernelError
from probes.probe import Activation, ProbeBatch, Site

ROOT = Path(__file__).resolve().parents[2]


def ref_alignment(F: np.ndarray, Y: np.ndarray) -> float:
    """Centered alignment of F F^T and Y Y^T with C = I - 11^T/P (Cortes et al. 2012), explicitly P x P."""
    F = F.reshape(F.shape[0], -1).astype(np.float64)
    P = F.shape[0]
    C = np.eye(P) - np.ones((P, P)) / P
    Kc, Lc = C @ F @ F.T @ C, C @ Y @ Y.T @ C
    return float((Kc * Lc).sum() / (np.linalg.norm(Kc) * np.linalg.norm(Lc)))


def one_hot(y: torch.Tensor, c: int) -> np.ndarray:
    return np.eye(c)[y.numpy()]


def make_batch(
    acts: dict[str, tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor, output: torch.Tensor, step: int = 0
) -> ProbeBatch:
    activations = {name: Activation(Site(name, name, "relu"), pre, post) for name, (pre, post) in acts.items()}
    return ProbeBatch(nn.Identity(), None, y, output, activations, step)


def scalars(records) -> dict[str, float]:
    return {r.tag: r.item() for r in records}


def test_measure_matches_pxp_formula_on_post_features() -> None:
    g = torch.Generator().manual_seed(0)
    P = 40
    y = torch.arange(P) % 3
    pre1 = torch.randn(P, 16, generator=g) + y[:, None].float()
    post1 = torch.relu(pre1)
    pre2 = torch.randn(P, 4, 5, 5, generator=g)  # conv-like: 100 features > P, the P x P route
    post2 = torch.tanh(pre2)
    out = torch.randn(P, 3, generator=g) + 2 * torch.nn.functional.one_hot(y, 3)
    probe = Alignment()
    probe.check(ProbeBatch(nn.Identity(), None, y, None, {}, 0))
    got = scalars(probe.measure(make_batch({"fc.1": (pre1, post1), "conv:relu#2": (pre2, post2)}, y, out)))
    Y = one_hot(y, 3)
    assert set(got) == {"alignment/fc.1/cka", "alignment/conv:relu#2/cka", "alignment/output/cka"}
    assert got["alignment/fc.1/cka"] == pytest.approx(ref_alignment(post1.numpy(), Y), rel=1e-9)
    assert got["alignment/conv:relu#2/cka"] == pytest.approx(ref_alignment(post2.numpy(), Y), rel=1e-9)
    assert got["alignment/output/cka"] == pytest.approx(ref_alignment(out.numpy(), Y), rel=1e-9)
    # the probe reads post-activation features: the pre-activation value differs
    assert abs(got["alignment/fc.1/cka"] - ref_alignment(pre1.numpy(), Y)) > 1e-4


def test_measure_leaves_the_capture_unchanged() -> None:
    P = 20
    post = torch.rand(P, 6, dtype=torch.float64) + 1.0  # float64 captures are not copied by .to()
    out = torch.randn(P, 2, dtype=torch.float64)
    kept = (post.clone(), out.clone())
    Alignment().measure(make_batch({"h": (post, post)}, torch.arange(P) % 2, out))
    assert torch.equal(post, kept[0]) and torch.equal(out, kept[1])


def test_binary_and_regression_targets() -> None:
    g = torch.Generator().manual_seed(1)
    P = 30
    y = torch.tensor([8, 9] * 15)
    feats = torch.randn(P, 7, generator=g) + (y == 9).float()[:, None]
    out = torch.randn(P, 1, generator=g)
    got = scalars(Alignment(output=False).measure(make_batch({"h": (feats, feats)}, y, out)))
    pm = np.where(y.numpy() == 9, 1.0, -1.0)[:, None]
    assert got == {"alignment/h/cka": pytest.approx(ref_alignment(feats.numpy(), pm), rel=1e-9)}
    # +-1 in one column and one-hot in two columns give the same centered kernel up to scale
    assert got["alignment/h/cka"] == pytest.approx(ref_alignment(feats.numpy(), one_hot(y - 8, 2)), rel=1e-9)
    t = torch.randn(P, 2, generator=g, dtype=torch.float64)
    got = scalars(Alignment(output=False).measure(make_batch({"h": (feats, feats)}, t, out)))
    assert got["alignment/h/cka"] == pytest.approx(ref_alignment(feats.numpy(), t.numpy()), rel=1e-9)


def test_site_selection() -> None:
    P = 12
    y = torch.arange(P) % 2
    acts = {n: (torch.randn(P, 3), torch.randn(P, 3)) for n in ("encoder.0", "encoder.2", "head.1")}
    out = torch.randn(P, 2)
    got = scalars(Alignment(sites=["encoder.*"], output=False).measure(make_batch(acts, y, out)))
    assert set(got) == {"alignment/encoder.0/cka", "alignment/encoder.2/cka"}
    got = scalars(Alignment(sites="head.1").measure(make_batch(acts, y, out)))
    assert set(got) == {"alignment/head.1/cka", "alignment/output/cka"}
    with pytest.raises(ValueError, match=r"\['decoder\.\*'\] match no activation site"):
        Alignment(sites=["decoder.*"]).measure(make_batch(acts, y, out))
    with pytest.raises(ValueError, match="degenerate"):
        Alignment(degenerate="ignore")


def test_constant_labels_fail_at_setup_and_dead_layers() -> None:
    P = 10
    with pytest.raises(DegenerateKernelError, match="labels .* all the same"):
        Alignment().check(ProbeBatch(nn.Identity(), None, torch.full((P,), 3), None, {}, 0))
    with pytest.raises(ValueError, match="alignment: this probe needs labels"):  # Needs(labels=True), at attach
        probes.attach(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), ["alignment"], probe_data=torch.randn(P, 3))
    y = torch.arange(P) % 2
    dead = torch.zeros(P, 5)
    alive = torch.randn(P, 5)
    acts = {"a": (-torch.rand(P, 5), dead), "b": (alive, alive)}
    with pytest.raises(DegenerateKernelError, match="site 'a'.*dead layer"):
        Alignment(degenerate="raise").measure(make_batch(acts, y, torch.randn(P, 2)))
    probe = Alignment()  # default: skip the dead site, warn once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = scalars(probe.measure(make_batch(acts, y, torch.randn(P, 2), step=1)))
        second = scalars(probe.measure(make_batch(acts, y, torch.randn(P, 2), step=2)))
    assert set(first) == set(second) == {"alignment/b/cka", "alignment/output/cka"}
    assert sum("site 'a'" in str(w.message) for w in caught) == 1  # warned once


def test_nonfinite_features() -> None:
    P = 8
    f = torch.randn(P, 3)
    f[0, 0] = float("inf")
    with pytest.raises(ValueError, match="site 'h' has NaN or infinite features at step 5"):
        Alignment().measure(make_batch({"h": (f, f)}, torch.arange(P) % 2, torch.randn(P, 2), step=5))


def test_session_attach_logs_every_site_and_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 30), nn.ReLU(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 3))
    x, y = torch.randn(60, 6), torch.arange(60) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = probes.attach(model, {"alignment": {"every": 2}}, probe_data=(x, y), sinks=["memory"], strict=True)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()
    session.close()  # writes a last measurement at step 3, on the trained model
    series = session.memory.scalars()
    assert set(series) == {"alignment/1/cka", "alignment/3/cka", "alignment/output/cka"}
    assert [s for s, _ in series["alignment/1/cka"]] == [0, 2, 3]
    with torch.no_grad():
        h1 = torch.relu(model[0](x))
        h2 = torch.tanh(model[2](h1))
        out = model(x)
    Y = one_hot(y, 3)
    assert series["alignment/1/cka"][-1][1] == pytest.approx(ref_alignment(h1.numpy(), Y), rel=1e-7)
    assert series["alignment/3/cka"][-1][1] == pytest.approx(ref_alignment(h2.numpy(), Y), rel=1e-7)
    assert series["alignment/output/cka"][-1][1] == pytest.approx(ref_alignment(out.numpy(), Y), rel=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    P=st.integers(6, 40),
    classes=st.integers(2, 4),
    acts=st.lists(st.sampled_from(["relu", "tanh", "gelu"]), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_nets_match_pxp_reference(widths, P, classes, acts, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers, dims = [], [5, *widths]
    for i in range(len(widths)):
        layers += [nn.Linear(dims[i], dims[i + 1]), {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[acts[i]]()]
    model = nn.Sequential(*layers, nn.Linear(dims[-1], classes))
    x = torch.randn(P, 5, generator=g)
    y = torch.arange(P) % classes
    try:
        session = probes.attach(model, ["alignment"], probe_data=(x, y), sinks=["memory"], strict=True)
    except DegenerateKernelError:
        return  # a dead ReLU layer at initialisation (tiny widths): covered by the error tests
    got = {tag: v[-1][1] for tag, v in session.memory.scalars().items()}
    session.close()
    Y = one_hot(y, classes)
    expected, h = {}, x
    with torch.no_grad():
        for i, module in enumerate(model):
            h = module(h)
            if i % 2 == 1 and i < len(model) - 1:
                if torch.allclose(h, h.mean(0, keepdim=True), atol=0, rtol=0):
                    return  # a dead site: covered by the error tests
                expected[f"alignment/{i}/cka"] = ref_alignment(h.double().numpy(), Y)
        expected["alignment/output/cka"] = ref_alignment(h.double().numpy(), Y)
    assert set(got) == set(expected)
    for tag, value in expected.items():
        assert got[tag] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_example_smoke(tmp_path: Path) -> None:
    example = _load(ROOT / "examples" / "slow_vs_regular_alignment.py", "_example_slow_vs_regular")
    result = example.main(["--smoke", "--logdir", str(tmp_path)])
    assert (tmp_path / "slow").is_dir() and (tmp_path / "regular").is_dir()
    assert any((tmp_path / "slow").iterdir()) and any((tmp_path / "regular").iterdir())
    assert Path(result["png"]).is_file()
    for run in ("slow", "regular"):
        steps, values = zip(*result["series"][run])
        assert steps[0] == 0 and all(0.0 <= v <= 1.0 for v in values)


def test_benchmark_smoke(capsys) -> None:
    bench = _load(ROOT / "benchmarks" / "alignment.py", "_bench_alignment")
    rows = bench.main(["--smoke"])
    out = capsys.readouterr().out
    assert "feature space" in out and "ratio" in out
    measured = {(r["P"], r["route"]): r["value"] for r in rows if r["value"] is not None}
    assert {("200", "seed"), ("400", "features"), ("400", "efficient")} <= {(str(p), k) for p, k in measured}
    for (P, _), value in measured.items():
        assert value == pytest.approx(measured[(P, "features")], abs=1e-9)
    assert any(r["route"] == "seed" and r["P"] == 400 and "extrapolated" in r["note"] for r in rows)


def test_a_memory_budget_gives_the_values_of_the_shared_pass() -> None:
    """Sites in groups over the probe's own passes (budget of about one site) equal the shared pass."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 3)
    )
    x, y = torch.randn(300, 6), torch.arange(300) % 3
    shared = probes.attach(model, {"alignment": {"memory_budget": None}}, probe_data=(x, y))
    shared.close()
    grouped = probes.attach(model, {"alignment": {"memory_budget": 300 * 40 * 4}}, probe_data=(x, y), strict=True)
    grouped.close()
    a, b = shared.memory, grouped.memory
    assert a.tags() == b.tags() and len(a.tags()) == 4
    for tag in a.tags():
        assert b.last(tag) == pytest.approx(a.last(tag), rel=1e-9), tag
    with pytest.raises(TypeError, match="memory_budget"):
        probes.attach(model, {"alignment": {"memory_budget": 1.5}}, probe_data=(x, y))


def test_the_default_budget_uses_the_shared_pass_once_the_sites_are_known_to_fit() -> None:
    """Default budget: the first measurement sizes the sites over its own passes; later ones read the shared pass."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
    x, y = torch.randn(50, 6), torch.arange(50) % 3
    forwards: list[int] = []
    model.register_forward_hook(lambda m, a, o: forwards.append(a[0].shape[0]))
    session = probes.attach(model, {"alignment": {"every": 1}}, probe_data=(x, y), strict=True)
    at_attach = list(forwards)
    forwards.clear()
    session.step()  # step 1: due
    later = list(forwards)
    session.close()
    assert at_attach == [50, 2, 50]  # the shared pass (nothing kept), 2 samples to size the sites, the own pass
    assert later == [50]  # the shared pass alone
    ref = probes.attach(model, {"alignment": {"memory_budget": None}}, probe_data=(x, y))
    ref.close()
    for tag in ref.memory.tags():
        assert [v for _, v in session.memory.scalars()[tag]][-1] == pytest.approx(ref.memory.last(tag), rel=1e-12)


@pytest.mark.parametrize("measure_at_attach", [True, False])
def test_labels_out_of_range_of_the_outputs_raise_at_attach(measure_at_attach) -> None:
    from torch.nn.modules import module as hooks

    before = (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    y = torch.tensor([0, 1, 5, 1, 0, 2])  # class 5 for a model with 3 outputs
    with pytest.raises(ValueError, match=r"alignment: class index 5 out of range.*3 outputs.*0\.\.2"):
        probes.attach(
            model,
            ["alignment"],
            probe_data=(torch.randn(6, 3), y),
            sinks=["memory"],
            measure_at_attach=measure_at_attach,
        )
    assert (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks)) == before


@pytest.mark.parametrize("memory_budget", [None, 64])
def test_alignment_follows_the_model(memory_budget) -> None:
    """After model.double() the shared pass or the probe's own passes (a budget of 64 bytes: one pass per site)
    give what a fresh attach on the moved model gives."""
    from probes import testing

    testing.check_follows_model(Alignment, {"memory_budget": memory_budget}, move=lambda m: m.double())
