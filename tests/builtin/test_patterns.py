"""patterns against naive loops over gate bits; packed snapshots round trip without pickle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SharedReluMLP
from helpers.pictures import gate_image
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes.builtin.patterns import Patterns
from probes.functional.patterns import distinct_rows
from probes.snapshots import list_snapshots, load_all, load_gates, save_gates


def naive_gates(model: nn.Sequential, x: torch.Tensor) -> dict[str, list[list[bool]]]:
    """Gate bits ``pre > 0`` of every activation module, sample by sample, element by element."""
    out: dict[str, list[list[bool]]] = {}
    for i in range(x.shape[0]):
        h = x[i : i + 1]
        for name, m in model.named_children():
            if isinstance(m, (nn.ReLU, nn.GELU, nn.Tanh)):
                out.setdefault(name, []).append([bool(v > 0) for v in h[0].tolist()])
            h = m(h)
    return out


def stats(bits: list[list[bool]]) -> tuple[float, int, int]:
    P, n = len(bits), len(bits[0])
    active = sum(b for row in bits for b in row) / (P * n)
    dead = sum(1 for j in range(n) if not any(bits[i][j] for i in range(P)))
    always = sum(1 for j in range(n) if all(bits[i][j] for i in range(P)))
    return active, dead, always


def flips(a: list[list[bool]], b: list[list[bool]]) -> float:
    return sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (len(a) * len(a[0]))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.GELU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)
    )


def test_against_naive_loops_and_churn():
    model = make_model()
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # two dead units
        model[2].bias[:2] = 5.0  # some always-on units
    x = torch.randn(30, 6)
    y = torch.randint(0, 3, (30,))
    s = probes.attach(model, {"patterns": {"every": 1}}, probe_data=(x, y), sinks=["memory"], strict=True)
    first = naive_gates(model, x)
    mem = s.memory
    for site, bits in first.items():  # every activation kind is a site: ReLU, GELU and Tanh
        active, dead, always = stats(bits)
        assert mem.last(f"patterns/{site}/active_fraction") == pytest.approx(active, abs=1e-12)
        assert mem.last(f"patterns/{site}/dead_on_probe_batch") == dead
        assert mem.last(f"patterns/{site}/always_on_units") == always
        assert mem.last(f"patterns/{site}/churn") == 0.0
        assert mem.last(f"patterns/{site}/churn_from_init") == 0.0
    assert mem.last("patterns/distinct") == len({tuple(sum((first[k][i] for k in first), [])) for i in range(30)})
    assert stats(first["1"])[1] >= 2 and stats(first["3"])[2] >= 2

    g = torch.Generator().manual_seed(1)
    history = [first]
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        s.step()
        history.append(naive_gates(model, x))
        for site in first:
            assert mem.last(f"patterns/{site}/churn") == pytest.approx(flips(history[-2][site], history[-1][site]))
            assert mem.last(f"patterns/{site}/churn_from_init") == pytest.approx(flips(first[site], history[-1][site]))
    assert mem.last("patterns/1/churn") > 0 and mem.last("patterns/1/churn_from_init") > 0
    assert set(mem.images()) == {"patterns/1", "patterns/3", "patterns/5"}
    s.close()


def test_churn_goes_through_state_dict():
    model = make_model()
    x, y = torch.randn(20, 6), torch.randint(0, 2, (20,))
    s = probes.attach(model, ["patterns"], probe_data=(x, y), sinks=["memory"], strict=True)
    state = copy.deepcopy(s.state_dict())
    first = naive_gates(model, x)
    with torch.no_grad():
        model[0].weight.mul_(-1)
    s.close()
    after = naive_gates(model, x)
    # a new session restored from the checkpoint compares with the first snapshot of the old one
    s2 = probes.attach(model, {"patterns": {"every": 1}}, probe_data=(x, y), sinks=["memory"], strict=True)
    s2.load_state_dict(state)
    s2.step()
    assert s2.memory.last("patterns/1/churn_from_init") == pytest.approx(flips(first["1"], after["1"]))
    assert s2.memory.last("patterns/1/churn") == pytest.approx(flips(first["1"], after["1"]))
    assert isinstance(state["probes"]["patterns"]["first"]["1"], torch.Tensor)


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 30), B=st.integers(0, 20), density=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_distinct_rows_matches_a_set(P, B, density, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(P, B, generator=g) < density
    if P > 2:
        bits[P // 2] = bits[0]  # a repeated row
    expected = len({tuple(r) for r in bits.tolist()})
    assert int(distinct_rows(bits)) == expected


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 13)), min_size=1, max_size=4),
    seed=st.integers(0, 10**6),
    with_labels=st.booleans(),
)
def test_snapshots_round_trip(tmp_path_factory, shapes, seed, with_labels):
    rng = np.random.default_rng(seed)
    gates = {f"layer.{i}#1" if i % 2 else f"f:{i}": rng.random(shape) < 0.4 for i, shape in enumerate(shapes)}
    gates["conv"] = rng.random((3, 2, 3, 5)) < 0.5  # 4-D, 90 bits: not a multiple of 8
    labels = rng.integers(0, 3, 3) if with_labels else None
    path = save_gates(tmp_path_factory.mktemp("snap") / "step_00000007.npz", gates, 7, labels=labels)
    snap = load_gates(path)
    assert snap.step == 7 and list(snap.gates) == list(gates)
    for k, v in gates.items():
        assert snap.gates[k].dtype == np.bool_ and snap.gates[k].shape == v.shape
        np.testing.assert_array_equal(snap.gates[k], v)
    if with_labels:
        np.testing.assert_array_equal(snap.labels, labels)
    else:
        assert snap.labels is None


def test_snapshots_refuse_pickles_and_foreign_files(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle|not a probes gate snapshot"):
        load_gates(tmp_path / "obj.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a probes gate snapshot"):
        load_gates(tmp_path / "other.npz")
    np.savez(
        tmp_path / "evil.npz",
        format=np.array("probes.gates.v1"),
        step=np.array(1),
        names=np.array([{"x": 1}], dtype=object),
    )
    with pytest.raises(ValueError, match="pickle"):
        load_gates(tmp_path / "evil.npz")
    path = save_gates(tmp_path / "ok.npz", {"a": np.ones((2, 9), dtype=bool)}, 1)
    data = dict(np.load(path, allow_pickle=False))
    data["bits_0"] = data["bits_0"][:1]
    np.savez(tmp_path / "cut.npz", **data)
    with pytest.raises(ValueError, match="damaged"):
        load_gates(tmp_path / "cut.npz")


def test_snapshots_saved_under_logdir(tmp_path):
    model = SharedReluMLP()
    x, y = torch.randn(16, 12), torch.randint(0, 2, (16,))
    s = probes.attach(
        model,
        {"patterns": {"every": 2, "save": True}},
        probe_data=(x, y),
        logdir=str(tmp_path),
        sinks=["memory"],
        strict=True,
    )
    for _ in range(4):
        s.step()
    s.close()
    files = list_snapshots(tmp_path / "patterns")
    assert [f.name for f in files] == ["step_00000000.npz", "step_00000002.npz", "step_00000004.npz"]
    snaps = load_all(tmp_path / "patterns")
    assert list(snaps[0].gates) == ["act#1", "act#2", "act#3"]
    with torch.no_grad():
        h, expected = x, {}
        for k, layer in enumerate(model.layers[:-1], start=1):
            pre = layer(h)
            expected[f"act#{k}"] = (pre > 0).numpy()
            h = torch.relu(pre)
    for k, v in expected.items():
        np.testing.assert_array_equal(snaps[-1].gates[k], v)
    np.testing.assert_array_equal(snaps[-1].labels, y.numpy())


def test_image_groups_samples_by_label():
    P, n = 10, 6
    y = torch.tensor([0, 1] * 5)
    gates = (y[:, None] == 0).expand(P, n)  # label 0: all open, label 1: all closed
    order = torch.argsort(y, stable=True)
    img = gate_image(gates, order, [5], ["0", "1"]).astype(float)
    assert img.ndim == 3 and img.shape[2] == 3
    # units (y) by samples (x): the open (bright) gates of label 0 lie left of the closed ones of label 1
    bright = np.argwhere(np.abs(img - np.array([0xF2, 0xD6, 0x4B])).max(axis=2) <= 16)
    dark = np.argwhere(np.abs(img - np.array([0x2B, 0x2B, 0x50])).max(axis=2) <= 16)
    assert len(bright) and len(dark)
    inside = lambda px, rows: px[(px[:, 0] > rows[0]) & (px[:, 0] < rows[1])]  # noqa: E731
    rows = (dark[:, 0].min(), dark[:, 0].max())  # the matrix's rows, without the legend's patch
    assert np.median(inside(bright, rows)[:, 1]) < np.median(dark[:, 1])
    # the probe does the grouping itself, labels included
    probe = Patterns()
    batch = probes.probe.ProbeBatch(nn.Identity(), torch.zeros(P, n), y, torch.zeros(P, 1), {}, 0)
    site = probes.probe.Site("s", "s", "relu")
    pre = torch.where(gates, 1.0, -1.0)
    batch.activations["s"] = probes.probe.Activation(site, pre, torch.relu(pre))
    records = probe.measure(batch)
    expected = gate_image(gates, order, [5], ["0", "1"], "patterns/s: gates on the probe batch, step 0")
    np.testing.assert_array_equal(next(r for r in records if r.tag == "patterns/s").pixels, expected)


def test_image_every_thins_images_and_is_checked():
    P, n = 8, 4
    probe = Patterns(image_every=5)
    site = probes.probe.Site("s", "s", "relu")
    drawn = []
    for step in (0, 2, 5, 7, 9, 10):
        batch = probes.probe.ProbeBatch(nn.Identity(), torch.zeros(P, n), None, torch.zeros(P, 1), {}, step)
        pre = torch.randn(P, n)
        batch.activations["s"] = probes.probe.Activation(site, pre, torch.relu(pre))
        tags = [r.tag for r in probe.measure(batch)]
        assert "patterns/s/churn" in tags  # the scalars at every measurement
        drawn.append("patterns/s" in tags)
    assert drawn == [True, False, True, False, False, True]
    with pytest.raises(ValueError, match="patterns: option 'image_every' must be a positive int"):
        Patterns(image_every=0)


def test_conv_units_are_channels():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with torch.no_grad():
        model[0].bias[0] = -100.0  # channel 0 dead
        model[0].bias[1] = 100.0  # channel 1 always on
    x = torch.randn(5, 1, 8, 8)
    s = probes.attach(model, ["patterns"], probe_data=(x, torch.randint(0, 2, (5,))), sinks=["memory"], strict=True)
    assert s.memory.last("patterns/1/dead_on_probe_batch") == 1
    assert s.memory.last("patterns/1/always_on_units") == 1


def test_errors():
    model = make_model()
    x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="save=True needs a log directory"):
        probes.attach(model, {"patterns": {"save": True}}, probe_data=(x, y), sinks=["memory"], strict=True)
    with pytest.raises(ValueError, match=r"'sites': \['nope\*'\] match no activation site"):
        probes.attach(model, {"patterns": {"sites": "nope*"}}, probe_data=(x, y), sinks=["memory"], strict=True)
    with pytest.raises(ValueError, match="no activation site"):
        probes.attach(nn.Linear(6, 2), ["patterns"], probe_data=(x, y), sinks=["memory"], strict=True)
    s = probes.attach(model, {"patterns": {"sites": ["1", "5"]}}, probe_data=(x, y), sinks=["memory"], strict=True)
    assert {t.split("/")[1] for t in s.memory.tags() if t.count("/") == 2} == {"1", "5"}
    # a different probe batch against the stored snapshots is an error, not a silent wrong churn
    s.probes["patterns"].shapes["1"] = (3, 9)
    with pytest.raises(ValueError, match="gate shape"):
        s.measure()


@pytest.mark.parametrize("move", ["double", "half"])
def test_the_snapshots_follow_the_model(move):
    """The first and previous gates are kept packed: after model.double() / .half() the gates are those of a fresh
    attach on the moved model (churn compares with the gates from before the move: finite)."""
    from probes import testing
    from probes.builtin.patterns import Patterns

    moves = {"double": lambda m: m.double(), "half": lambda m: m.half()}
    testing.check_follows_model(
        Patterns, {"image": False}, move=moves[move], references=("patterns/*/churn", "patterns/*/churn_from_init")
    )


def test_the_directory_option_is_a_path():
    with pytest.raises(TypeError, match="patterns: option 'directory' must be None or a path, got 3"):
        probes.attach(make_model(), {"patterns": {"directory": 3}}, probe_data=torch.randn(4, 6))


def _near(img: np.ndarray, colour: str, tol: int = 16) -> np.ndarray:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return np.abs(img.astype(float) - rgb).max(axis=2) <= tol


def test_image_draws_padding_in_its_own_colour():
    """Padded positions (attention mask 0) are neither open nor closed gates in the image: a colour of their own,
    with a legend entry, far from every shade between closed and open."""
    from probes.app.render.kinds import PADDING

    OPEN, CLOSED = "#f2d64b", "#2b2b50"
    rgb = lambda c: np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)  # noqa: E731
    shades = rgb(CLOSED) + (rgb(OPEN) - rgb(CLOSED)) * np.linspace(0, 1, 101)[:, None]
    assert np.abs(shades - rgb(PADDING)).max(axis=1).min() > 60
    P, T, n = 8, 6, 4
    mask = torch.ones(P, T, dtype=torch.bool)
    mask[:, T // 2 :] = False  # the second half of every sequence is padding
    gates = torch.ones(P, T, n, dtype=torch.bool) & mask[:, :, None]  # every real gate open, padding closed
    order = torch.arange(P)
    padded = gate_image(gates, order, [], [], real=mask[:, :, None], ndim=3)
    plain = gate_image(gates, order, [], [], ndim=3)  # without the mask, padding is drawn as closed gates
    legend = 40 * 40  # generous area of one legend patch
    assert _near(padded, PADDING).sum() > 20 * legend
    assert _near(padded, OPEN).sum() > 20 * legend
    assert _near(padded, CLOSED).sum() < legend  # the closed legend patch only: no gate is closed
    assert _near(plain, PADDING).sum() < 1000  # anti-aliased text only: no padding cell, no padding legend patch
    assert not (_near(plain, PADDING).sum(axis=1) > 100).any()
    # the legend's patches sit right of the axes (which end 150 pixels before the right edge)
    assert _near(padded[:, 495:528], PADDING).sum() > 100 and _near(plain[:, 495:528], PADDING).sum() < 20
    assert _near(plain, CLOSED).sum() > 20 * legend
    # the padding cells lie where the mask is 0: rows of the upper half of the gates (flattened t * n + unit)
    rows = np.nonzero(_near(padded, PADDING).sum(axis=1) > 100)[0]
    open_rows = np.nonzero(_near(padded, OPEN).sum(axis=1) > 100)[0]
    assert rows.max() < open_rows.min()  # origin lower: later positions on top
    # the probe passes the batch's mask to its image
    probe = Patterns()
    site = probes.probe.Site("s", "s", "relu")
    pre = torch.where(gates, 1.0, -1.0)
    batch = probes.probe.ProbeBatch(nn.Identity(), torch.zeros(P, T, n), None, torch.zeros(P, 1), {}, 0, mask=mask)
    batch.activations["s"] = probes.probe.Activation(site, pre, torch.relu(pre))
    image = next(r for r in probe.measure(batch) if r.tag == "patterns/s").pixels
    expected = gate_image(gates, order, [], [], "patterns/s: gates on the probe batch, step 0", 3, mask[:, :, None])
    np.testing.assert_array_equal(image, expected)


def test_image_padding_in_blocks_of_gates():
    """Beyond MAX_IMAGE_ROWS rows, a block of padded gates only is padding; the others shade by the open
    fraction of their real gates."""
    from probes.app.render.kinds import PADDING
    from probes.builtin.patterns import MAX_IMAGE_ROWS

    P, T, n = 4, 8, 2 * MAX_IMAGE_ROWS // 8 + 8  # more gates than rows
    mask = torch.zeros(P, T, dtype=torch.bool)
    mask[:, :2] = True
    gates = torch.ones(P, T, n, dtype=torch.bool) & mask[:, :, None]
    img = gate_image(gates, torch.arange(P), [], [], real=mask[:, :, None], ndim=3)
    assert _near(img, PADDING).sum() > 10000 and _near(img, "#f2d64b").sum() > 5000
