"""Unit tests of ``probes.engine.cadence`` and ``probes.schedules``: int and schedule cadences, answers that are not
bools, a schedule that raises, the replaceable clock and the overhead budget, with a fake clock and stub probes."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from probes.engine import cadence
from probes.engine.cadence import Cadence, check_overhead, round_up_125
from probes.engine.failures import Failures, ProbeFailedWarning, ProbesNoticeWarning
from probes.probe import Probe
from probes.schedules import as_schedule, at, check_answer, every, is_due, log


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(cadence, "clock", fake)
    return fake


class Stub(Probe):
    """A probe with a default cadence of every 10 steps."""

    name = "stub"
    every = 10


def stub(every=None) -> Stub:
    """A stub probe; ``every`` given is stored on the instance, as the session stores a cadence the user gave."""
    probe = Stub()
    if every is not None:
        probe.every = every
    return probe


def steps_due(schedule, up_to: int) -> list[int]:
    return [s for s in range(up_to + 1) if schedule(s)]


# -- the schedules -------------------------------------------------------------------------------------------------


def test_every_k_is_due_at_multiples_of_k_but_not_at_step_0():
    assert steps_due(every(3), 10) == [3, 6, 9]
    assert steps_due(every(1), 3) == [1, 2, 3]


@pytest.mark.parametrize("k", [0, -2, 2.0, True, "3"])
def test_every_refuses_what_is_not_a_positive_int(k):
    with pytest.raises(ValueError, match=rf"every\(k\): k must be a positive int, got {k!r}"):
        every(k)


def test_at_is_due_exactly_at_the_listed_steps_in_any_order():
    assert steps_due(at([7, 0, 3, 3]), 10) == [0, 3, 7]
    with pytest.raises(ValueError, match="non-negative ints"):
        at([1, -1])


def test_log_is_dense_early_and_sparse_late():
    assert steps_due(log(), 160) == [1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, 158]
    assert steps_due(log(per_decade=1), 1000) == [1, 10, 100, 1000]
    assert steps_due(log(per_decade=1, start=5), 1000) == [5, 10, 100, 1000]
    with pytest.raises(ValueError, match=r"log\(per_decade\)"):
        log(per_decade=0)
    with pytest.raises(ValueError, match=r"log\(start\)"):
        log(start=0)


def test_at_and_every_take_numpy_ints():
    assert steps_due(at(np.arange(0, 30, 10)), 30) == [0, 10, 20]
    assert every(np.int64(5)) == every(5)
    assert type(every(np.int64(5)).k) is int
    with pytest.raises(ValueError, match="positive int"):
        every(np.bool_(True))


def test_as_schedule_makes_every_k_of_an_int_and_keeps_a_callable():
    assert as_schedule(5) == every(5)
    assert as_schedule(np.int64(4)) == every(4)
    assert isinstance(as_schedule(np.int64(4)).k, int)
    schedule = at([2])
    assert as_schedule(schedule) is schedule


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        (0, ValueError, "must be a positive number of steps, got 0"),
        (True, TypeError, "must be a positive int or a schedule"),
        (None, TypeError, "must be a positive int or a schedule"),
        (2.5, TypeError, "must be a whole number of steps, got 2.5"),
        (nn.ReLU(), TypeError, "an nn.Module is not a schedule, got ReLU"),
        (every, TypeError, "got the class every, not a schedule"),
        ("10", TypeError, "got '10'"),
    ],
)
def test_as_schedule_refuses_what_is_not_a_cadence_naming_the_probe_and_option(value, error, text):
    with pytest.raises(error, match="^probe 'p': option 'every'") as info:
        as_schedule(value, who="probe 'p'")
    assert text in str(info.value)


def test_as_schedule_check_calls_the_schedule_on_step_1():
    asked = []
    as_schedule(lambda s: asked.append(s) or True, check=True)
    assert asked == [1]
    with pytest.raises(TypeError, match=r"returned 1 at step 1; a schedule returns a bool"):
        as_schedule(lambda s: s % 10, who="probe 'p'", check=True)
    with pytest.raises(ValueError, match=r"^probe 'p': option 'every': the schedule .* raised ZeroDivisionError"):
        as_schedule(lambda s: 1 / 0 > 0, who="probe 'p'", check=True)
    with pytest.raises(TypeError, match=r"calling .* on step 1 raised TypeError"):
        as_schedule(lambda: True, who="probe 'p'", check=True)


def test_a_schedules_answer_may_be_a_python_or_numpy_bool_or_a_one_element_bool_tensor():
    assert check_answer(np.bool_(True), every(1), 1) is True
    assert check_answer(torch.tensor([False]), every(1), 1) is False
    assert is_due(lambda s: s == 2, 2) is True
    for answer in (None, 1, torch.tensor([True, False]), torch.tensor(1)):
        with pytest.raises(TypeError, match="^who: option 'every'"):
            check_answer(answer, every(1), 3, "who")


# -- which probes are due ------------------------------------------------------------------------------------------


def test_due_reads_an_int_cadence_and_a_schedule():
    c = Cadence({"a": stub(), "b": stub(every=at([4, 6])), "c": stub(every=2)}, None, Failures(strict=False))
    assert c.due(["a", "b", "c"], 4) == ["b", "c"]
    assert c.due(["a", "b", "c"], 10) == ["a", "c"]
    assert c.due(["a"], 7) == []
    assert c.given == {"b", "c"}  # a cadence on the instance counts as given


def test_a_schedule_that_raises_in_training_switches_its_probe_off_once_and_the_others_go_on():
    calls = []

    def broken(step):
        calls.append(step)
        raise RuntimeError("no")

    failures = Failures(strict=False)
    c = Cadence({"bad": stub(every=broken), "good": stub(every=1)}, None, failures)
    with pytest.warns(ProbeFailedWarning, match="probe 'bad' raised at step 3"):
        assert c.due(["bad", "good"], 3) == ["good"]
    assert c.due(["bad", "good"], 4) == ["good"]
    assert calls == [3]  # no longer asked
    assert "bad" in failures.failed and "good" not in failures.failed
    assert "option 'every': the schedule" in failures.failed["bad"]


def test_a_schedule_answering_an_int_is_a_failure_naming_the_probe_and_option():
    failures = Failures(strict=False)
    c = Cadence({"p": stub(every=lambda s: s % 2)}, None, failures)
    with pytest.warns(ProbeFailedWarning):
        assert c.due(["p"], 3) == []
    assert "TypeError: probe 'p': option 'every'" in failures.failed["p"]


def test_under_strict_a_schedule_that_raises_raises_from_due():
    c = Cadence({"p": stub(every=lambda s: 1 / 0 > 0)}, None, Failures(strict=True))
    with pytest.raises(RuntimeError, match=r"^probe 'p': option 'every': the schedule .* at step 2") as info:
        c.due(["p"], 2)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -- the clock and the overhead budget -----------------------------------------------------------------------------


def test_now_reads_the_replaceable_clock(clock):
    assert cadence.now() == 500.0
    clock.advance(2.5)
    assert cadence.now() == 502.5


@pytest.mark.parametrize(("k", "rounded"), [(1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (125, 200), (501, 1000)])
def test_round_up_125(k, rounded):
    assert round_up_125(k) == rounded


def test_check_overhead():
    assert check_overhead("auto") == cadence.AUTO_OVERHEAD
    assert check_overhead(None) is None
    assert check_overhead(0.25) == 0.25
    for bad in (0, 1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match=rf"attach\(overhead=\.\.\.\) must be .*got {bad!r}"):
            check_overhead(bad)


def train(c: Cadence, clock: FakeClock, steps: int, seconds: float, start: int = 0) -> None:
    """``steps`` training steps of ``seconds`` each, as the session reports them to the cadence."""
    for step in range(start, start + steps):
        c.rested()
        clock.advance(seconds)
        c.moved(step, step + 1)


def test_training_time_is_what_passes_between_rested_and_moved(clock):
    c = Cadence({"p": stub()}, 0.1, Failures(strict=False))
    train(c, clock, 4, 0.25)
    assert c.train_steps == 4
    assert c.train_seconds == pytest.approx(1.0)
    c.rested()
    clock.advance(7.0)
    c.moved(4, 4)  # the step did not move: not training time
    assert c.train_steps == 4


def test_space_out_widens_a_costly_every_k_to_a_round_number_and_says_so(clock):
    failures = Failures(strict=False)
    c = Cadence({"slow": stub(every=1), "cheap": stub(every=1)}, 0.1, failures)
    train(c, clock, 10, 0.004)  # 4 ms per step
    c.charge("slow", 0.05)  # 50 ms per measurement
    c.charge("cheap", 0.0001)
    with pytest.warns(ProbesNoticeWarning, match="probe 'slow' takes 50 ms per measurement") as rec:
        c.space_out(["slow", "cheap"], active=1)
    # 50 / (0.1 * 4) = 125 steps, rounded up to 200
    assert c.schedules["slow"] == every(200)
    assert c.schedules["cheap"] == every(1)
    assert "it now measures every 200 steps" in str(rec[0].message)


def test_space_out_shares_the_budget_among_the_active_probes(clock):
    c = Cadence({"p": stub(every=1)}, 0.1, Failures(strict=False))
    train(c, clock, 10, 0.004)
    c.charge("p", 0.0003)  # 7.5% of a step: within 10% alone, not within 5% each for two probes
    c.space_out(["p"], active=1)
    assert c.schedules["p"] == every(1)
    with pytest.warns(ProbesNoticeWarning):
        c.space_out(["p"], active=2)
    assert c.schedules["p"] == every(2)


def test_without_an_overhead_nothing_is_widened(clock):
    c = Cadence({"p": stub(every=1)}, None, Failures(strict=False))
    train(c, clock, 10, 0.004)
    c.charge("p", 10.0)
    c.space_out(["p"], active=1)
    assert c.schedules["p"] == every(1)
    assert c.train_steps == 0  # no time is kept either


def test_auto_overhead_widens_only_default_cadences_that_spent_the_grace(clock):
    c = Cadence({"default": stub(), "given": stub(every=10)}, "auto", Failures(strict=False))
    train(c, clock, 10, 0.001)
    for name in ("default", "given"):
        c.charge(name, cadence.AUTO_GRACE_SECONDS / 2)
    c.space_out(["default", "given"], active=2)
    assert c.schedules == {"default": every(10), "given": every(10)}  # within the grace
    for name in ("default", "given"):
        c.charge(name, cadence.AUTO_GRACE_SECONDS / 2)
    with pytest.warns(ProbesNoticeWarning, match="at its default cadence; give it every=") as rec:
        c.space_out(["default", "given"], active=2)
    assert c.schedules["given"] == every(10)
    assert c.schedules["default"].k > 10
    assert len(rec) == 1


def test_schedules_other_than_every_k_are_never_widened(clock):
    c = Cadence({"p": stub(every=at([1, 2, 3]))}, 0.1, Failures(strict=False))
    train(c, clock, 10, 0.004)
    c.charge("p", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.space_out(["p"], active=1)
    assert c.schedules["p"] == at([1, 2, 3])


def test_the_agreement_of_ranks_decides_the_widened_cadence(clock):
    asked = []

    def agree(proposals):
        asked.append(list(proposals))
        return [50, 0]  # another rank is slower at "a"; nobody proposes for "b"

    c = Cadence({"a": stub(every=1), "b": stub(every=1)}, 0.1, Failures(strict=False), agree=agree)
    train(c, clock, 10, 0.004)
    c.charge("a", 0.0018)
    with pytest.warns(ProbesNoticeWarning, match="probe 'a'"):
        c.space_out(["a", "b"], active=2)
    assert asked == [[10, 0]]  # this rank's proposal: 1.8 / (0.05 * 4) = 9, rounded up to 10
    assert c.schedules == {"a": every(50), "b": every(1)}


# -- the optimizer's step hook -------------------------------------------------------------------------------------


class Steps:
    """What the optimizer's step hook needs of a session."""

    def __init__(self) -> None:
        self.closed, self.steps = False, 0

    def step(self) -> None:
        self.steps += 1


def test_the_optimizer_step_hook_steps_the_session_until_it_is_closed():
    session = Steps()
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    optimizer.register_step_post_hook(cadence.OptimizerStep(session))
    optimizer.step()
    optimizer.step()
    session.closed = True
    optimizer.step()
    assert session.steps == 2


def test_a_copied_or_pickled_optimizer_step_hook_steps_nothing():
    session = Steps()
    hook = cadence.OptimizerStep(session)
    for clone in (copy.deepcopy(hook), pickle.loads(pickle.dumps(hook))):
        assert clone(None, (), {}) is None
        assert not isinstance(clone, cadence.OptimizerStep)
    assert session.steps == 0
