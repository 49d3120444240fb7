"""probes.testing on every built-in probe and on a third-party passive probe written only with add_state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from probes import testing
from probes.builtin.ntk import NTK
from probes.records import Histogram, Scalar

BUILTIN_OPTIONS = {
    "relu_zeros": {},
    "patterns": {"image": False},
    "alignment": {},
    "margin": {},
    "ntk": {"image": False},
    "pathgram": {"image": None},
    "linear_region": {"eps": (0.01,), "delta": (0.01,)},
    "particles": {"image": False},
}


def two_layer() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def bias_free() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 3, bias=False))


MODELS = {"particles": two_layer, "pathgram": bias_free}


@pytest.mark.parametrize("name", sorted(BUILTIN_OPTIONS))
def test_builtin_probe_passes_the_harness(name):
    cls = probes.plugins.probe_class(name)
    options = {k: v for k, v in BUILTIN_OPTIONS[name].items() if k in _accepted(cls)}
    testing.check_probe(
        cls,
        options,
        model=MODELS.get(name, testing.small_mlp),
        allow_nan=("linear_region/l_gen", "linear_region/identity_error", "ntk/condition"),
        references=REFERENCES,
    )


#: tags compared with what a probe kept from before a move of the model (check_follows_model: finite, not equal)
REFERENCES = ("ntk/distance_from_init", "patterns/*/churn", "patterns/*/churn_from_init")


def _accepted(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


class SignCounter(probes.Probe):
    """A third-party passive probe written only with add_state: positive outputs and the largest output."""

    name = "sign_counter"
    description = "positive outputs per site (test plugin)"
    passive = True
    needs_probe_data = False
    every = 3

    def __init__(self) -> None:
        self.add_state("positive", {}, reduce="sum")
        self.add_state("seen", 0, reduce="sum")
        self.add_state("largest", torch.tensor(float("-inf")), reduce="max")

    def observe(self, site, pre, post):
        count = self.positive.get(site.name)
        self.positive[site.name] = (post > 0).sum() if count is None else count + (post > 0).sum()
        self.seen += post.numel()
        self.largest = torch.maximum(self.largest, post.detach().max())

    def flush(self, step):
        if not self.positive:
            return []
        out = [Scalar(f"sign_counter/{n}/positive", c) for n, c in self.positive.items()]
        out.append(Scalar("sign_counter/fraction", sum(self.positive.values()) / max(self.seen, 1)))
        out.append(Scalar("sign_counter/largest", self.largest))
        out.append(Histogram.of("sign_counter/counts", torch.stack(list(self.positive.values())).double()))
        return out


def test_a_third_party_passive_probe_with_only_add_state_gets_windows_checkpoints_and_ddp_sums():
    testing.check_probe(SignCounter, ddp=True)


def test_windows_reset_after_each_flush_by_hand_count():
    net = testing.small_mlp()
    s = probes.attach(net, [SignCounter()])
    xs = [torch.randn(4, 8) for _ in range(6)]
    for x in xs:
        net(x)
        s.step()
    s.close()
    hidden = [torch.relu(net[0](x)) for x in xs]
    with torch.no_grad():
        expected = [int(sum((h > 0).sum() for h in hidden[k : k + 3])) for k in (0, 3)]
    got = [v for _, v in s.memory.scalars()["sign_counter/1/positive"]]
    assert got == expected


def test_the_example_plugin_passes_the_harness(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples" / "plugin"))
    monkeypatch.delitem(sys.modules, "probes_weightnorm", raising=False)  # later tests import the installed copy
    from probes_weightnorm import WeightNorm

    try:
        testing.check_probe(WeightNorm)
    finally:
        sys.modules.pop("probes_weightnorm", None)


class _ForgetfulNTK(NTK):
    """An NTK that checkpoints nothing: its state round-trips trivially, but a resumed run measures the distance
    from the kernel at the resume instead of the first one."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        pass


class _StaleCache(probes.Probe):
    """Keeps the probe inputs of its first measurement and multiplies them with the model's weight later."""

    name = "stale_cache"
    every = 1

    def __init__(self) -> None:
        self._x = None

    def measure(self, batch):
        if self._x is None:
            self._x = batch.x.clone()
        return [Scalar("stale_cache/sum", (self._x @ batch.model[0].weight.T).sum())]


def test_the_resume_check_compares_with_the_unbroken_run():
    with pytest.raises(AssertionError, match=r"ntk/distance_from_init = .* after resuming, .* unbroken"):
        testing.check_state_round_trip(_ForgetfulNTK, {"image": False})


def test_the_follows_model_check_fails_on_a_cache_kept_across_a_move():
    with pytest.raises(RuntimeError, match="dtype"):
        testing.check_follows_model(_StaleCache)


class _References(probes.Probe):
    """Every kind of value add_state keeps: None until set, nested dicts of tensors, numpy arrays, numbers."""

    name = "references"
    every = 1

    def __init__(self) -> None:
        self.add_state("first", None, reduce=None, window=False)
        self.add_state("nested", {}, reduce=None, window=False)
        self.add_state("table", np.zeros(3), reduce=None, window=False)
        self.add_state("count", 0, reduce="sum")

    def measure(self, batch):
        if self.first is None:
            self.first = batch.output.detach().clone()
        self.nested.setdefault("a", {})["b"] = batch.output.sum().reshape(1)
        self.table = self.table + 1
        self.count += 1
        return [Scalar("references/drift", (batch.output - self.first).abs().sum())]


def test_add_state_keeps_none_nested_dicts_and_arrays_through_a_checkpoint():
    probe = _References()
    state = probe.state_dict()
    assert state["first"] is None and state["nested"] == {} and state["count"] == 0
    s = probes.attach(
        testing.small_mlp(), {_References: {}}, probe_data=torch.randn(5, 8), sinks=["memory"], strict=True
    )
    s.step()
    saved = s.state_dict()["probes"]["references"]
    assert saved["first"].shape == (5, 3) and set(saved["nested"]["a"]) == {"b"} and saved["count"] == 2
    np.testing.assert_array_equal(saved["table"], np.full(3, 2.0))
    saved["nested"]["a"]["b"] += 1  # a copy: the probe's own state is untouched
    assert not torch.equal(s.probes["references"].nested["a"]["b"], saved["nested"]["a"]["b"])
    fresh = _References()
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.first, saved["first"], rtol=0, atol=0)
    assert fresh.nested["a"]["b"] is not saved["nested"]["a"]["b"] and fresh.count == 2
    s.close()
    with pytest.raises(ValueError, match="references: state 'first'.*reduce=None"):
        fresh.add_state("first", None, reduce="sum")
    with pytest.raises(ValueError, match="reduce=None"):
        fresh.add_state("table", np.zeros(2), reduce="max")


def test_load_state_dict_puts_tensors_on_the_device_they_replace_and_checks_shapes():
    probe = _References()
    probe.first = torch.zeros(2, 3, device="meta")  # a reference held on another device (meta: no GPU needed)
    probe.load_state_dict({"first": torch.ones(2, 3)})
    assert probe.first.device.type == "meta"
    with pytest.raises(ValueError, match=r"references: saved state 'first' has shape \(4, 3\).*\(2, 3\)"):
        probe.load_state_dict({"first": torch.ones(4, 3)})


def test_every_builtin_state_survives_torch_save_and_a_weights_only_load():
    """A checkpoint of the session holds only tensors, numbers, None, strings and containers: torch.load with
    weights_only=True (no pickle of arbitrary objects) reads it back, and a resumed session holds the same state."""
    import io

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(12, 8), torch.arange(12) % 3
    spec = {
        name: {**{k: v for k, v in options.items() if k in _accepted(probes.plugins.probe_class(name))}, "every": 2}
        for name, options in BUILTIN_OPTIONS.items()
    }
    s = probes.attach(model, spec, probe_data=(x, y), sinks=["memory"], strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        s.step()
    state = s.state_dict()
    s.close()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    again = probes.attach(model, spec, probe_data=(x, y), sinks=["memory"], strict=True, state=loaded)
    for name in BUILTIN_OPTIONS:
        assert testing._equal(again.probes[name].state_dict(), state["probes"][name]), name
    assert {n for n in BUILTIN_OPTIONS if state["probes"][n]} >= {"ntk", "patterns", "particles", "relu_zeros"}
    again.close()
