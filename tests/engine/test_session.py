"""Session lifecycle: hooks, cadence, modes, RNG, failures, checkpoints, sites."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import SharedReluMLP
from torch import nn

import probes
import probes.engine.cadence
from probes import plugins
from probes.engine.session import ProbeFailedWarning
from probes.records import Scalar


class CountingProbe(probes.Probe):
    """Active probe that records how often and at which steps it measured."""

    name = "counting"
    description = "test probe"
    every = 3
    needs_sites = True

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.sites: list[str] = []

    def measure(self, batch):
        self.steps.append(batch.step)
        torch.rand(3)  # consumes the global RNG: the session must restore it
        self.sites = list(batch.activations)
        return [Scalar("counting/mean_output", batch.output.mean())]


class FailingProbe(probes.Probe):
    name = "failing"
    description = "raises on measure"
    every = 1

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, batch):
        self.calls += 1
        raise RuntimeError("boom")


class TestPlugin:
    @probes.hookimpl
    def probes_add_probes(self):
        return [CountingProbe, FailingProbe]


def global_hooks() -> int:
    from torch.nn.modules import module as m

    return len(m._global_forward_hooks) + len(m._global_forward_pre_hooks) + len(m._global_backward_hooks)


def all_hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_forward_hooks_always_called", {}))
    return n


def test_unknown_probe_names_closest_match():
    with pytest.raises(KeyError) as err:
        probes.attach(nn.Linear(2, 2), ["relu_zero"])
    msg = str(err.value)
    assert "relu_zeros" in msg and "Did you mean" in msg and "Available" in msg


def test_bad_option_names_the_probe():
    with pytest.raises(TypeError, match="relu_zeros"):
        probes.attach(nn.Linear(2, 2), {"relu_zeros": {"no_such_option": 1}})


def test_active_probe_without_probe_data_is_an_error():
    plugins.register(TestPlugin())
    with pytest.raises(ValueError, match="probe_data"):
        probes.attach(nn.Linear(2, 2), ["counting"])


def test_nan_probe_data_is_an_error():
    plugins.register(TestPlugin())
    x = torch.randn(4, 2)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        probes.attach(nn.Linear(2, 2), ["counting"], probe_data=(x, torch.zeros(4)))


def test_attach_detach_leaves_model_exactly_as_it_was(shared_relu_mlp):
    plugins.register(TestPlugin())
    model = shared_relu_mlp
    x = torch.randn(9, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = all_hooks(model)
    out_before = model(x)
    out_before.sum().backward()
    grads_before = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    globals_before = global_hooks()
    with probes.attach(model, {"relu_zeros": {"every": 1}, "counting": {"every": 1}}, probe_data=(x, None)) as s:
        # hooks on the model's own root and site modules only; nothing process-wide between probe passes
        assert all_hooks(model) > hooks_before
        assert global_hooks() == globals_before
        model(x).sum().backward()
        s.step()
        model.zero_grad()
    assert all_hooks(model) == hooks_before and global_hooks() == globals_before
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    out_after = model(x)
    assert torch.equal(out_before, out_after)
    out_after.sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, model.parameters()))


def test_cadence_measures_at_attach_and_every_n_and_at_close(shared_relu_mlp):
    plugins.register(TestPlugin())
    probe = CountingProbe()
    s = probes.attach(shared_relu_mlp, [probe], probe_data=torch.randn(5, 12))
    for _ in range(7):
        s.step()
    s.close()
    assert probe.steps == [0, 3, 6, 7]
    assert [st for st, _ in s.memory.scalars()["counting/mean_output"]] == [0, 3, 6, 7]
    assert probe.sites == ["act#1", "act#2", "act#3"]


def test_optimizer_steps_the_session(shared_relu_mlp):
    plugins.register(TestPlugin())
    model = shared_relu_mlp
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = probes.attach(model, {"counting": {"every": 2}}, probe_data=torch.randn(5, 12), optimizer=opt)
    for _ in range(4):
        model(torch.randn(3, 12)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert s.global_step == 4
    s.close()
    assert s.probes["counting"].steps == [0, 2, 4]
    opt.step()  # hook removed at close
    assert s.global_step == 4


def test_probe_pass_restores_modes_and_rng():
    plugins.register(TestPlugin())
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    model[3].eval()  # a mixed configuration must come back as it was
    bn_before = model[1].running_mean.clone()
    x = torch.randn(16, 4)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    s = probes.attach(model, {"counting": {"every": 1}}, probe_data=x)
    s.step()
    got = torch.rand(5)
    assert torch.equal(got, expected)
    assert model.training and model[0].training and not model[3].training
    assert torch.equal(model[1].running_mean, bn_before)  # the probe pass ran in eval mode
    s.close()


def test_failing_probe_is_reported_once_and_switched_off(shared_relu_mlp):
    plugins.register(TestPlugin())
    failing = FailingProbe()
    with pytest.warns(ProbeFailedWarning, match="failing") as rec:
        s = probes.attach(
            shared_relu_mlp, [failing, "relu_zeros"], probe_data=torch.randn(4, 12), measure_at_attach=False
        )
        for _ in range(5):
            shared_relu_mlp(torch.randn(4, 12))
            s.step()
        s.close()
    assert sum(issubclass(w.category, ProbeFailedWarning) for w in rec) == 1
    assert failing.calls == 1
    assert "failing" in s.failures and "boom" in s.failures["failing"]
    assert "relu_zeros/total/fraction" in s.memory.tags()


def test_a_probe_whose_first_measurement_raises_makes_attach_raise_and_leaves_nothing(shared_relu_mlp, tmp_path):
    from torch.nn.modules import module as hooks

    plugins.register(TestPlugin())
    before = (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks))
    with pytest.raises(RuntimeError, match="probe 'failing': boom"):
        probes.attach(
            shared_relu_mlp, ["failing", "relu_zeros"], probe_data=torch.randn(4, 12), logdir=str(tmp_path / "run")
        )
    assert (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks)) == before
    assert not (tmp_path / "run").exists()


def test_strict_reraises(shared_relu_mlp):
    plugins.register(TestPlugin())
    with pytest.raises(RuntimeError, match="boom"):
        probes.attach(shared_relu_mlp, ["failing"], probe_data=torch.randn(4, 12), strict=True)


def test_state_dict_resumes_step_counter(shared_relu_mlp):
    plugins.register(TestPlugin())
    s = probes.attach(shared_relu_mlp, {"counting": {"every": 3}}, probe_data=torch.randn(4, 12))
    s.step(4)
    state = s.state_dict()
    s.detach()
    s2 = probes.attach(shared_relu_mlp, {"counting": {"every": 3}}, probe_data=torch.randn(4, 12))
    s2.load_state_dict(state)
    s2.step(2)
    assert s2.global_step == 6
    assert s2.probes["counting"].steps == [0, 6]
    s2.close()


def test_probe_batch_captures_pre_and_post(shared_relu_mlp):
    plugins.register(TestPlugin())
    seen = {}

    class Grab(probes.Probe):
        name = "grab"
        needs_sites = True

        def measure(self, batch):
            seen.update(batch.activations)
            seen["calls"] = batch.calls
            return []

    model = shared_relu_mlp
    x = torch.randn(6, 12)
    s = probes.attach(model, [Grab()], probe_data=x)
    s.close()
    h = model.layers[0](x)
    assert torch.equal(seen["act#1"].pre, h)
    assert torch.equal(seen["act#1"].post, torch.relu(h))
    assert torch.equal(seen["act#1"].gate, h > 0)
    kinds = [(c.kind, c.site) for c in seen["calls"]]
    assert kinds == [
        ("linear", None),
        ("relu", "act#1"),
        ("linear", None),
        ("relu", "act#2"),
        ("linear", None),
        ("relu", "act#3"),
        ("linear", None),
    ]


def test_inplace_relu_pre_is_the_input():
    seen = {}

    class Grab(probes.Probe):
        name = "grab"
        needs_sites = True

        def measure(self, batch):
            seen.update(batch.activations)
            return []

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 1))
    x = torch.randn(7, 3)
    probes.attach(model, [Grab()], probe_data=x).close()
    assert torch.equal(seen["1"].pre, model[0](x))
    assert (seen["1"].pre < 0).any()


def test_ddp_wrapped_model_hooks_the_inner_module(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        inner = SharedReluMLP()
        ddp = nn.parallel.DistributedDataParallel(inner)
        s = probes.attach(ddp, {"relu_zeros": {"every": 1}})
        ddp(torch.randn(4, 12)).sum().backward()
        s.step()
        assert "relu_zeros/act#1/zeros" in s.memory.tags()
        s.close()
        assert all_hooks(inner) == 0
    finally:
        dist.destroy_process_group()


def test_records_must_be_tagged_with_the_probe_name(shared_relu_mlp):
    class BadTags(probes.Probe):
        name = "badtags"

        def measure(self, batch):
            return [Scalar("other/x", 1.0)]

    with pytest.raises(ValueError, match="probe 'badtags' returned tag 'other/x': tags must start with"):
        probes.attach(shared_relu_mlp, [BadTags()], probe_data=torch.randn(2, 12))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = probes.attach(shared_relu_mlp, [BadTags()], probe_data=torch.randn(2, 12), measure_at_attach=False)
        s.step(100)
    assert "badtags" in s.failures and "must start with" in s.failures["badtags"]
    assert any("badtags" in str(w.message) for w in rec)


def test_a_probe_can_ask_for_more_site_types():
    seen = {}

    class PoolSites(probes.Probe):
        name = "poolsites"
        needs_sites = True
        site_types = (nn.MaxPool1d,)

        def measure(self, batch):
            seen.update(batch.activations)
            return []

    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(12, 1))
    probes.attach(model, [PoolSites()], probe_data=torch.randn(3, 1, 14)).close()
    assert set(seen) == {"1"} and seen["1"].post.shape == (3, 2, 6)


def test_close_measures_every_probe_not_measured_at_the_last_step(shared_relu_mlp):
    class Other(CountingProbe):
        name = "other"

        def measure(self, batch):
            self.steps.append(batch.step)
            return []

    a, b = CountingProbe(), Other()
    a.every, b.every = 2, 3  # a cadence per instance
    session = probes.attach(shared_relu_mlp, [a, b], probe_data=torch.randn(3, 12))
    session.step(3)
    session.close()  # 'other' measured at step 3 already; 'counting' was not: measured now
    assert a.steps == [0, 2, 3]
    assert b.steps == [0, 3]


def test_measure_at_attach_can_be_skipped_for_a_resumed_run(shared_relu_mlp):
    probe = CountingProbe()
    s = probes.attach(shared_relu_mlp, [probe], probe_data=torch.randn(3, 12), measure_at_attach=False)
    s.load_state_dict({"step": 9})
    s.step(3)
    s.close()
    assert probe.steps == [12]


def test_a_probe_class_with_options_is_attached_like_a_name(shared_relu_mlp):
    s = probes.attach(shared_relu_mlp, {CountingProbe: {"every": 2}}, probe_data=torch.randn(3, 12))
    s.step(4)
    s.close()
    assert s.probes["counting"].steps == [0, 2, 4]


class FakeClock:
    """The engine's clock, advanced by hand: a training step or a measurement takes exactly what the test says."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(probes.engine.cadence, "clock", fake)
    return fake


class Slow(probes.Probe):
    """An active probe at its default cadence (every step) whose measurements take ``seconds`` of the fake clock."""

    name = "slow"
    every = 1
    needs_probe_data = False

    def __init__(self, clock: FakeClock, seconds: float = 0.03) -> None:
        self.clock, self.seconds = clock, seconds
        self.steps: list[int] = []

    def measure(self, batch):
        self.steps.append(batch.step)
        self.clock.advance(self.seconds)
        return []


def test_an_overhead_budget_spaces_out_a_costly_probe_and_says_so_once(shared_relu_mlp, clock):
    probe = Slow(clock, 0.05)
    s = probes.attach(shared_relu_mlp, [probe], overhead=0.1)
    with pytest.warns(probes.engine.session.ProbesNoticeWarning, match="now measures every") as rec:
        for _ in range(40):
            clock.advance(0.004)  # a 4 ms training step
            s.step()
    s.close()
    # 50 ms per measurement against 4 ms per step at 10%: k = 50 / (0.1 * 4) = 125, rounded up to 200, decided at
    # the second step (the first has no training time yet), so measurements at 0 (attach), 1, 2 and 40 (close)
    assert s.schedules["slow"].k == 200
    assert probe.steps == [0, 1, 2, 40]
    assert sum("now measures every" in str(w.message) for w in rec) == 1
    with pytest.raises(ValueError, match="overhead"):
        probes.attach(shared_relu_mlp, ["relu_zeros"], overhead=5)


def test_auto_overhead_widens_only_default_cadences_after_the_grace_and_to_a_round_number(
    shared_relu_mlp, clock, monkeypatch
):
    monkeypatch.setattr(probes.engine.cadence, "AUTO_GRACE_SECONDS", 0.05)

    class Given(Slow):
        name = "given"

    given = Given(clock)
    given.every = 1  # a cadence the user gave: kept
    slow = Slow(clock)
    s = probes.attach(shared_relu_mlp, [slow, given])  # overhead="auto" by default
    with pytest.warns(probes.engine.session.ProbesNoticeWarning, match="'slow'.*default cadence.*now measures every"):
        for _ in range(12):
            clock.advance(0.002)
            s.step()
    s.close()
    # 30 ms against 2 ms per step, each probe's share 5%: k = 0.03 / (0.05 * 0.002) = 300, rounded up to 500, at
    # step 2: slow has spent the grace (0.05 s) by step 1, and step 2 is the first with a training time
    assert s.schedules["slow"].k == 500
    assert slow.steps == [0, 1, 2, 12]
    assert s.schedules["given"].k == 1 and given.steps == list(range(13))
    off = probes.attach(shared_relu_mlp, [Slow(clock)], overhead=None)
    for _ in range(12):
        clock.advance(0.002)
        off.step()
    off.close()
    assert off.schedules["slow"].k == 1


def test_round_up_125():
    from probes.engine.cadence import round_up_125 as _round_up_125

    assert [_round_up_125(k) for k in (1, 2, 3, 5, 6, 10, 11, 21, 51, 999, 1000, 1001)] == [
        1,
        2,
        5,
        5,
        10,
        10,
        20,
        50,
        100,
        1000,
        1000,
        2000,
    ]


def test_the_overhead_budget_also_follows_a_trainer_that_advances_the_step(shared_relu_mlp, clock):
    """Integrations call advance_to(global_step); the training time between calls is timed the same way."""
    s = probes.attach(shared_relu_mlp, [Slow(clock)], overhead=0.1)
    with pytest.warns(probes.engine.session.ProbesNoticeWarning, match="now measures every"):
        for step in range(1, 13):
            clock.advance(0.002)
            s.advance_to(step)
    s.close()
    assert s.schedules["slow"].k == 200  # 30 ms against 2 ms per step at 10%: 0.03 / (0.1 * 0.002) = 150
