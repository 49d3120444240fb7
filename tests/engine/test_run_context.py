"""The engine wired by data: the run context, the probe set, what a measurement returns, the one resume rule, and
sinks made through one constructor protocol."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

import probes
from probes import plugins
from probes.engine.failures import Failures
from probes.engine.measured import Measured
from probes.engine.probeset import ProbeSet
from probes.engine.resume import check_state, measures_at_attach, state_at
from probes.engine.run import Run, StepClock
from probes.engine.spec import ProbeSpec
from probes.records import Scalar
from probes.sinks import MemorySink, Sink, plan_sinks
from probes.sinks.build import NamedSink


class Ticks(probes.Probe):
    name = "ticks"
    needs_probe_data = False
    every = 1

    def __init__(self) -> None:
        self.steps: list[int] = []

    def measure(self, batch):
        self.steps.append(batch.step)
        return [Scalar("ticks/step", float(batch.step))]


class Boom(probes.Probe):
    name = "boom"
    needs_probe_data = False
    every = 1

    def measure(self, batch):
        raise RuntimeError("boom")


class Quiet(probes.Probe):
    name = "quiet"
    passive = True

    def wants(self, site):
        return False


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


# -- the run context -------------------------------------------------------------------------------------------


def test_run_is_frozen_and_only_its_clock_moves():
    run = Run(rank=0, world_size=1, logdir="x", mask_key="attention_mask", label_shift=1, strict=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.rank = 1  # type: ignore[misc]
    assert run.step == 0 and run.writes
    run.clock.step = 7
    assert run.step == 7
    assert not Run(rank=1).writes


def test_one_run_is_shared_by_reference_by_the_session_and_its_parts():
    s = probes.attach(model(), [Ticks])
    try:
        assert s._active.run is s.run and s._passive.run is s.run and s._output.run is s.run
        assert s.run.logdir is None and s.run.world_size == 1 and s.run.clock.step == 0
        s.step(3)
        assert s.global_step == s.run.clock.step == 3
        s.set_step(10)
        assert s.run.step == 10
    finally:
        s.close()


def test_run_records_the_options_it_measures_by():
    s = probes.attach(model(), [Ticks], mask=None, label_shift=2, strict=True)
    try:
        assert s.run.mask_key is None and s.run.label_shift == 2 and s.run.strict
    finally:
        s.close()


# -- the probe set ---------------------------------------------------------------------------------------------


def test_probe_set_splits_passive_and_active_and_knows_which_are_on():
    failures = Failures(strict=False)
    ticks, quiet = Ticks(), Quiet()
    ps = ProbeSet([("ticks", ticks), ("quiet", quiet)], failures)
    assert list(ps) == ["ticks", "quiet"] and ps["ticks"] is ticks and len(ps) == 2
    assert list(ps.active) == ["ticks"] and list(ps.passive) == ["quiet"]
    assert ps.on("ticks") and not ps.on("missing")
    failures.switch_off("ticks", "off for a test")
    assert not ps.on("ticks") and ps.active_on() == [] and "ticks" in ps.off
    ps.leave_out("quiet")
    assert list(ps) == ["ticks"] and ps.passive == {}


def test_one_probe_set_is_shared_by_the_session_and_both_drivers():
    s = probes.attach(model(), [Ticks, Quiet])
    try:
        assert s._active.probes is s.probes and s._passive.set is s.probes
        s.probes.leave_out("quiet")  # what attach("auto") does: every part sees it at once
        assert s.passive == [] and s._passive.probes == {}
    finally:
        s.close()


# -- what a measurement returns --------------------------------------------------------------------------------


def test_a_measurement_returns_records_and_seconds_and_writes_nothing_itself():
    s = probes.attach(model(), [Ticks], measure_at_attach=False)
    try:
        before = list(s.memory.records)
        result = s._active.measure(["ticks"], 5)
        assert isinstance(result, Measured)
        assert [n for n, _ in result.records] == ["ticks"] and result.records[0][1][0].tag == "ticks/step"
        assert set(result.seconds) == {"ticks"} and result.seconds["ticks"] >= 0
        assert result.raised is None and s.memory.records == before  # the caller hands records on
    finally:
        s.close()


def test_strict_raises_after_the_records_measured_before_the_failure_are_written():
    s = probes.attach(model(), [Ticks, Boom], strict=True, measure_at_attach=False)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            s.step()
        assert s.memory.scalars()["ticks/step"] == [(1, 1.0)]
    finally:
        s.close(_during_error=True)


def test_a_close_on_the_users_error_only_reports_a_probe_error_even_under_strict():
    s = probes.attach(model(), [Boom], strict=True, measure_at_attach=False)
    with pytest.warns(probes.ProbeFailedWarning):
        s.close(_during_error=True)
    assert "boom" in s.failures and s._failures.raises  # strict again once the close is done


# -- the one resume rule ---------------------------------------------------------------------------------------


def test_the_rule_measures_the_initialization_only_for_a_fresh_run():
    assert measures_at_attach(True, None)
    assert not measures_at_attach(True, {"step": 4})
    assert not measures_at_attach(False, None)
    assert state_at(None, 0) is None
    assert state_at(None, 5) == {"step": 5}
    assert state_at({"step": 3, "probes": {"a": 1}}, 5) == {"step": 5, "probes": {"a": 1}}
    assert state_at({}, 0) == {"step": 0}
    with pytest.raises(ValueError, match="state_dict"):
        check_state({"probes": {}})


@pytest.mark.parametrize("how", ["at attach", "right after attach"])
def test_a_resumed_run_writes_no_second_step_zero_point(how):
    first = probes.attach(model(), [Ticks])
    first.step(2)
    state = first.state_dict()
    assert first.memory.scalars()["ticks/step"][0] == (0, 0.0)
    first.close()
    if how == "at attach":
        s = probes.attach(model(), [Ticks], state=state)
    else:
        s = probes.attach(model(), [Ticks])
        s.load_state_dict(state)
    ticks = s.probes["ticks"]
    s.step()
    s.close()
    assert [step for step, _ in s.memory.scalars()["ticks/step"]] == [3]  # no step 0, and close measures no 3 again
    assert ticks.steps == ([3] if how == "at attach" else [0, 3])  # with state= the pass is not even run


# -- sinks through one constructor protocol --------------------------------------------------------------------


class Recording(Sink):
    made: list[tuple[object, dict]] = []

    def __init__(self, tag_prefix: str = "") -> None:
        self.tag_prefix, self.records = tag_prefix, []

    @classmethod
    def from_run(cls, run, **options):
        cls.made.append((run, options))
        return super().from_run(run, **options)

    def write(self, records, step):
        self.records += [(self.tag_prefix + r.tag, step) for r in records]


def test_sinks_are_planned_by_name_with_options_and_made_through_from_run(tmp_path):
    table = {"memory": MemorySink, "recording": Recording, "tensorboard": probes.sinks.TensorBoardSink}
    plan = plan_sinks({"recording": {"tag_prefix": "p:"}, "memory": None}, None, None, table.__getitem__)
    assert plan.entries == (
        NamedSink("recording", Recording, {"tag_prefix": "p:"}),
        NamedSink("memory", MemorySink, {}),
    )
    run = Run(logdir=None)
    Recording.made.clear()
    made = plan.build(run)
    assert isinstance(made[0], Recording) and made[0].tag_prefix == "p:" and isinstance(made[1], MemorySink)
    assert Recording.made == [(run, {"tag_prefix": "p:"})]
    with_logdir = plan_sinks(["memory"], str(tmp_path), None, table.__getitem__)
    assert [e.name for e in with_logdir.entries] == ["memory", "tensorboard"]  # a logdir always gets TensorBoard
    with pytest.raises(TypeError, match="mapping"):
        plan_sinks({"memory": 3}, None, None, table.__getitem__)


def test_attach_takes_sink_options_by_name(tmp_path):
    s = probes.attach(model(), [Ticks], sinks={"memory": {}, "tensorboard": {"layout": False}}, logdir=str(tmp_path))
    try:
        kinds = [type(k).__name__ for k in s.sinks]
        assert kinds == ["MemorySink", "TensorBoardSink"] and s.sinks[1].layout is False
    finally:
        s.close()


def test_the_integrations_parse_the_spec_once_and_attach_what_they_parsed():
    from probes.integrations.core import CallbackCore

    core = CallbackCore("Test", [Ticks], {})
    parsed = core.spec.entries[0][1]
    session = core.start(model(), None, step=0)
    assert session.probes["ticks"] is parsed  # the first run attaches the probes of the one parse
    core.close()
    again = core.start(model(), None, step=4)
    assert again.probes["ticks"] is not parsed and again.global_step == 4  # a second run: fresh ones, no step 0
    core.close()
    assert "ticks/step" not in again.memory.scalars() or again.memory.scalars()["ticks/step"][0][0] != 0


def test_a_parsed_spec_is_taken_as_it_is():
    spec = ProbeSpec.parse([Ticks], plugins.registry)
    assert ProbeSpec.parse(spec, plugins.registry) is spec and spec.names == ["ticks"] and not spec.auto
    assert ProbeSpec.parse("auto", plugins.registry).auto


def test_the_step_clock_is_a_plain_shared_counter():
    clock = StepClock()
    run = Run(clock=clock)
    clock.step = 2
    assert run.step == 2
