"""Fuzz of every built-in probe's options: each option dict either works (attach, a few training steps, close, no
probe switched off) or makes ``attach`` raise a ``ValueError``/``TypeError`` that names the probe and the option;
never anything else, at attach or in training. Then regression tests of what the fuzz found."""

from __future__ import annotations

import inspect
import math
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes import plugins, schedules
from probes.engine.failures import ProbeFailedWarning, ProbesNoticeWarning

D, H, C, P = 4, 6, 3, 8  # inputs, hidden units, classes, probe samples
SNAPSHOTS = tempfile.mkdtemp(prefix="probes-fuzz-")


def two_layer(seed: int = 0) -> nn.Sequential:
    """A 2-layer ReLU MLP: every built-in applies to it (particles needs exactly two Linear layers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))


def probe_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(P, D, generator=g), torch.arange(P) % C


def train(model: nn.Module, session: Any, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(5, D, generator=g), torch.randint(0, C, (5,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the optimizer's step hook steps the session


# -- values -----------------------------------------------------------------------------------------------------
# zero-argument factories, so that no example shares a tensor or a module with another


def _const(v: Any) -> Callable[[], Any]:
    return lambda: v


def _raises(step: int) -> bool:
    raise RuntimeError("a broken schedule")


NASTY: list[Callable[[], Any]] = [
    *(
        _const(v)
        for v in (
            None,
            True,
            False,
            0,
            1,
            -1,
            2,
            3,
            7,
            10**20,
            -(10**20),
            0.0,
            0.5,
            -0.5,
            1.0,
            2.5,
            1e300,
            math.nan,
            math.inf,
            -math.inf,
            1j,
            "",
            "x",
            "auto",
            "all",
            "relu",
            "last",
            "sum",
            "float64",
            b"x",
            (),
            [],
            {},
            {"a": 1},
            frozenset(),
            (1, 2),
            [0.1, 0.2],
            ["0"],
            [""],
            [1],
            (None,),
            torch.float64,
            torch.int64,
            torch.bool,
            nn.ReLU,
            nn.Linear,
            int,
            len,
        )
    ),
    lambda: np.int64(3),
    lambda: np.float64(0.25),
    lambda: np.bool_(True),
    lambda: np.array([1.0, 2.0]),
    lambda: np.zeros((D, 2)),
    lambda: torch.tensor(1.0),
    lambda: torch.tensor(2),
    lambda: torch.tensor(True),
    lambda: torch.tensor([1.0, 2.0]),
    lambda: torch.zeros(0),
    lambda: torch.randn(D, 2),
    lambda: torch.randn(3, D),
    lambda: torch.full((2, 2), math.nan),
    lambda: (torch.randn(2), torch.randn(2, D)),
    lambda: (torch.tensor(1.0), torch.tensor(2.0)),
    lambda: (torch.randn(3), torch.randn(3, D), torch.randn(3)),
    lambda: nn.Linear(2, 2),
    lambda: object(),
    lambda: lambda step: True,
    lambda: lambda step: None,
    lambda: lambda step: step,
    lambda: _raises,
    lambda: lambda: True,
    lambda: schedules.every(2),
    lambda: lambda step: np.bool_(step % 2 == 0),
    lambda: lambda step: torch.tensor(step > 1),
]

# plausible values of each option (valid alone; some combinations are not)
FLAG = [_const(True), _const(False)]
IMAGE_EVERY = [_const(None), _const(1), _const(3)]
PLAUSIBLE: dict[str, dict[str, list[Callable[[], Any]]]] = {
    "relu_zeros": {
        "unit_dim": [_const(v) for v in (None, 0, 1, -1, 2, -3)],
        "sites": [_const("relu"), _const("all")],
        "bins": [_const(v) for v in (1, 5, 20)],
    },
    "patterns": {
        "sites": [_const(v) for v in (None, "*", "1", ["1"], "nothing")],
        "unit_dim": [_const(v) for v in (None, 0, 1, -1, 2, 5)],
        "image": FLAG,
        "save": FLAG,
        "directory": [_const(None), _const(SNAPSHOTS)],
        "image_every": IMAGE_EVERY,
    },
    "alignment": {
        "sites": [_const(v) for v in (None, "*", "1")],
        "output": FLAG,
        "degenerate": [_const("skip"), _const("raise")],
        "memory_budget": [_const(v) for v in (None, 1, 10**6)],
        "positions": [_const("all"), _const("last")],
    },
    "grad_noise": {
        "loss": [_const(None), _const(lambda f, y: nn.functional.cross_entropy(f, y))],
        "route": [_const(v) for v in ("auto", "vmap", "loop")],
        "chunk_size": [_const(v) for v in (None, 1, 3)],
        "bins": [_const(v) for v in (1, 64)],
        "per_module": FLAG,
        "memory_budget": [_const(v) for v in (1, 2**30)],
        "max_cost": [_const(v) for v in (None, "auto", 1e10)],
    },
    "hessian": {
        "top_k": [_const(v) for v in (1, 2, 5)],
        "trace_samples": [_const(v) for v in (0, 1, 4)],
        "tol": [_const(v) for v in (1e-8, 1e-3)],
        "max_steps": [_const(v) for v in (None, 2, 10)],
        "density": FLAG,
        "density_vectors": [_const(v) for v in (1, 2)],
        "density_steps": [_const(v) for v in (2, 8)],
        "bins": [_const(v) for v in (1, 64)],
        "loss": [_const(None), _const(lambda f, y: nn.functional.cross_entropy(f, y))],
        "seed": [_const(v) for v in (0, 1)],
        "image": FLAG,
        "image_every": IMAGE_EVERY,
        "max_memory": [_const(v) for v in ("auto", None, 1, 2**30)],
    },
    "margin": {
        "margin": [_const(v) for v in (0, 0.5, 2.0)],
        "bins": [_const(v) for v in (1, 64)],
        "n_weights": [_const(v) for v in (None, 1, 100)],
        "positions": [_const("all"), _const("last")],
    },
    "ntk": {
        "mode": [_const("trace"), _const("full")],
        "reduction": [_const("sum"), _const("mean")],
        "top_k": [_const(v) for v in (0, 1, 5, 100)],
        "bins": [_const(v) for v in (1, 64)],
        "chunk_size": [_const(v) for v in (None, 1, 3)],
        "image": FLAG,
        "image_every": IMAGE_EVERY,
        "spectrum": [_const(v) for v in ("full", "topk", "auto")],
        "memory_budget": [_const(v) for v in (1, 2**30)],
        "positions": [_const("last"), _const("all")],
        "outputs": [_const(v) for v in (None, 1, 2, 5)],
        "seed": [_const(v) for v in (0, 1)],
        "max_cost": [_const(v) for v in (None, 1e10)],
    },
    "pathgram": {
        "condition": [_const(v) for v in ("estimate", "exact", "off")],
        "image": [_const(v) for v in ("cosine", "raw", None)],
        "image_side": [_const(v) for v in (1, 8, 128)],
        "jitter_start": [_const(v) for v in (1e-12, 1e-3)],
        "jitter_max": [_const(v) for v in (1e-2, 1.0)],
        "check": FLAG,
        "image_every": IMAGE_EVERY,
        "rcond": [_const(v) for v in (None, 1e-6, 0.5)],
    },
    "linear_region": {
        "eps": [_const(v) for v in ("auto", 1e-3, [1e-3, 1e-2])],
        "delta": [_const(v) for v in ("auto", 1e-3, (1e-4,))],
        "seed": [_const(v) for v in (0, 5)],
        "dtype": [_const(v) for v in ("auto", None, torch.float64, "float32")],
        "max_samples": [_const(v) for v in (None, 1, 4)],
        "allow": [_const(v) for v in ((), nn.ReLU, (nn.Linear,), [nn.Tanh])],
    },
    "particles": {
        "layer": [_const(v) for v in (None, "0", "2", "1", "x")],
        "teacher": [
            _const(None),
            lambda: torch.randn(3, D),
            lambda: (torch.randn(3), torch.randn(3, D)),
            lambda: (torch.randn(3), torch.randn(3, D), torch.randn(3)),
        ],
        "trail": [_const(v) for v in (2, 5, 200)],
        "trail_mode": [_const("thin"), _const("ring")],
        "basis": [_const("init"), _const("teacher"), lambda: torch.randn(D, 2), lambda: np.eye(D, 2)],
        "signed": FLAG,
        "bias": FLAG,
        "output_index": [_const(v) for v in (None, 0, 2, 3)],
        "size": [_const(v) for v in (240, 300)],
        "limit": [_const(None), _const(1.0)],
        "image_every": IMAGE_EVERY,
    },
}
EVERY = [_const(v) for v in (1, 2, np.int64(2))] + [
    lambda: schedules.every(2),
    lambda: schedules.log(),
    lambda: lambda step: step % 2 == 0,
]
UNKNOWN = "no_such_option"


def option_names(name: str) -> list[str]:
    cls = plugins.probe_class(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


@st.composite
def option_dicts(draw: Any, name: str) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from([*option_names(name), "every", UNKNOWN]), max_size=3, unique=True))
    opts = {}
    for key in keys:
        plausible = EVERY if key == "every" else PLAUSIBLE[name].get(key, [])
        pool = plausible if plausible and draw(st.booleans()) else NASTY
        opts[key] = draw(st.sampled_from(pool))()
    return opts


# -- the contract -------------------------------------------------------------------------------------------------


def outcome(name: str, opts: dict[str, Any]) -> str | None:
    """None when ``opts`` either works or is refused at attach as the contract says; otherwise what went wrong."""
    model = two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    given_opts = dict(opts)
    if "every" not in given_opts:
        given_opts["every"] = 1  # measure (or flush) at every training step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbesNoticeWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            session = probes.attach(
                model, {name: given_opts}, probe_data=probe_data(), sinks=["memory"], optimizer=opt, overhead=None
            )
        except (ValueError, TypeError) as exc:
            text = str(exc)
            if name not in text:
                return f"attach raised {exc!r}, which does not name the probe"
            if not any(f"'{k}'" in text or f"{k}=" in text for k in opts):
                return f"attach raised {exc!r}, which names no option of {sorted(opts)}"
            return None
        except Exception as exc:  # noqa: BLE001 - the point of the fuzz
            return f"attach raised {type(exc).__name__}: {exc}"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ProbeFailedWarning)
                train(model, session, opt)
                session.close()
        except Exception as exc:  # noqa: BLE001
            return f"training raised {type(exc).__name__}: {exc}"
        if session.failures:
            return f"the probe was switched off in training: {next(iter(session.failures.values()))[-600:]}"
        failed = [w for w in caught if issubclass(w.category, ProbeFailedWarning)]
        if failed:
            return f"training warned {failed[0].message}"
    return None


FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", sorted(PLAUSIBLE))
def test_every_option_dict_works_or_is_refused_at_attach_naming_probe_and_option(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path among the values (patterns' directory="relu") lands here
    assert sorted(PLAUSIBLE) == sorted(i.name for i in probes.available()), "a built-in is missing from the fuzz"
    assert set(PLAUSIBLE[name]) <= set(option_names(name))

    @FUZZ
    @given(opts=option_dicts(name))
    def check(opts: dict[str, Any]) -> None:
        bad = outcome(name, opts)
        assert bad is None, f"{name} {opts!r}: {bad}"

    check()


# -- regression tests of what the fuzz found ----------------------------------------------------------------------


def attach(name: str, opts: dict[str, Any], model: nn.Module | None = None, **kw: Any) -> Any:
    return probes.attach(
        model if model is not None else two_layer(), {name: opts}, probe_data=probe_data(), sinks=["memory"], **kw
    )


@pytest.mark.parametrize("name", ["relu_zeros", "patterns"])
def test_unit_dim_beyond_the_axes_of_a_site_keeps_its_default_axis_and_says_so(name):
    model = two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(
        ProbesNoticeWarning,
        match=rf"{name}: option 'unit_dim'=2 is out of range for the 2-d .*site "
        r"'1'; that site counts its units on axis 1 \(the default\)",
    ):
        session = attach(name, {"unit_dim": 2, "every": 1}, model, optimizer=opt)
        train(model, session, opt)
        session.close()
    assert session.failures == {}
    if name == "relu_zeros":
        assert session.memory.histograms()["relu_zeros/1/unit_activity"][0].counts.sum() == H  # one per unit
    else:
        assert 0 <= session.memory.last("patterns/1/dead_on_probe_batch") <= H  # units, not the P samples (axis 0)


def test_unit_dim_within_the_axes_is_used():
    model = two_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbesNoticeWarning)
        session = probes.attach(model, {"relu_zeros": {"unit_dim": 0, "every": 1}}, sinks=["memory"])
        model(torch.randn(5, D))
        session.step()
        session.close()
    assert session.memory.histograms()["relu_zeros/1/unit_activity"][0].counts.sum() == 5  # axis 0: 5 "units"


@pytest.mark.parametrize("layer", [[], 5, torch.tensor(1.0), "", nn.Linear(2, 2)])
def test_particles_layer_of_the_wrong_type_is_refused_naming_the_option(layer):
    with pytest.raises(TypeError, match=r"particles: option 'layer' must be None or the module path"):
        attach("particles", {"layer": layer})


def test_particles_layer_that_is_not_a_module_of_the_model_names_the_option():
    with pytest.raises(ValueError, match=r"particles: option 'layer'='x': model Sequential has no such module"):
        attach("particles", {"layer": "x"})
    with pytest.raises(
        ValueError,
        match=r"particles: module '1' \(option 'layer'\) of model Sequential is not a "
        "two-layer net",
    ):
        attach("particles", {"layer": "1"})  # the ReLU


@pytest.mark.parametrize(
    "basis, error",
    [
        ((torch.randn(D), torch.randn(D)), TypeError),
        ((torch.tensor(1.0), torch.tensor(2.0)), TypeError),
        (torch.float64, TypeError),
        (None, TypeError),
        ("pca", ValueError),
        (["0"], TypeError),
        (10**20, ValueError),
        (torch.randn(D), ValueError),
        (torch.full((D, 2), math.nan), ValueError),
        (torch.zeros(D, 2, dtype=torch.bool), TypeError),
    ],
)
def test_particles_basis_is_checked_at_attach(basis, error):
    with pytest.raises(error, match=r"particles: option 'basis'"):
        attach("particles", {"basis": basis})


def test_particles_basis_of_the_wrong_shape_names_the_option():
    with pytest.raises(ValueError, match=r"option 'basis' must be a 4 x 2 matrix .* got shape \(3, 2\)"):
        attach("particles", {"basis": torch.randn(3, 2)})


@pytest.mark.parametrize(
    "teacher, error",
    [
        (torch.float64, TypeError),
        (b"x", TypeError),
        ("teacher", TypeError),
        (lambda: 0, TypeError),
        (nn.Linear(2, 2), TypeError),
        ((torch.randn(3),), ValueError),
        ((torch.randn(3), "W"), TypeError),
        ((torch.randn(3), torch.randn(3)), ValueError),
        (torch.zeros(0, D), ValueError),
        (torch.full((2, D), math.inf), ValueError),
        (torch.zeros(2, D, 1), ValueError),
    ],
)
def test_particles_teacher_is_checked_at_attach(teacher, error):
    with pytest.raises(error, match=r"particles: option 'teacher'"):
        attach("particles", {"teacher": teacher})


@pytest.mark.parametrize(
    "teacher",
    [
        torch.randn(3, D),
        np.ones((2, D), dtype=np.float32),
        [[1.0, 2, 3, 4]],
        [1.0, 2, 3, 4],
        (torch.randn(3), torch.randn(3, D)),
        ([1.0, -1.0], [[1.0, 0, 0, 0], [0, 1.0, 0, 0]]),
        (np.ones(2), np.ones((2, D)), np.zeros(2)),
    ],
)
def test_particles_teacher_accepts_arrays_tensors_and_lists(teacher):
    session = attach("particles", {"teacher": teacher, "bias": isinstance(teacher, tuple) and len(teacher) == 3})
    session.close()
    assert session.failures == {}
    assert session.probes["particles"].teacher.shape[1] == D + (isinstance(teacher, tuple) and len(teacher) == 3)


@pytest.mark.parametrize("every", [nn.Linear(2, 2), nn.Linear, schedules.every, int, lambda: True])
def test_every_that_is_not_a_schedule_is_refused_at_attach(every):
    with pytest.raises(TypeError, match=r"probe 'relu_zeros': option 'every' must be a positive int or a schedule"):
        attach("relu_zeros", {"every": every})


@pytest.mark.parametrize(
    "every, error, match",
    [
        (None, TypeError, "must be a positive int"),
        (2.0, TypeError, "whole number"),
        (np.float64(2), TypeError, "whole"),
        (0, ValueError, "positive number"),
        (np.int64(-1), ValueError, "positive number"),
        (lambda step: None, TypeError, "returned None at step 1"),
        (lambda step: step, TypeError, "returned 1 at step 1"),
        (lambda step: torch.tensor([True, False]), TypeError, "returned tensor"),
        (_raises, ValueError, "raised Runtime"),
    ],
)
def test_every_is_checked_at_attach_on_step_one(every, error, match):
    with pytest.raises(error, match=rf"probe 'margin': option 'every'.*{match}"):
        attach("margin", {"every": every})


@pytest.mark.parametrize("answer", [np.bool_, torch.tensor, lambda b: torch.tensor([b]), bool])
def test_every_may_answer_a_python_or_numpy_bool_or_a_one_element_bool_tensor(answer):
    asked: list[int] = []

    def schedule(step: int) -> Any:
        asked.append(step)
        return answer(step % 2 == 0)

    model = two_layer()
    session = attach("margin", {"every": np.int64(1)} if answer is bool else {"every": schedule}, model)
    session.step(4)
    session.close()
    steps = [s for s, _ in session.memory.scalars()["margin/loss"]]
    assert steps == ([0, 1, 2, 3, 4] if answer is bool else [0, 2, 4])  # 0: at attach, 4: the last, at close too
    if answer is not bool:
        assert asked == [1, 1, 2, 3, 4]  # step 1 once at attach (the check), then each step


def test_every_of_a_probe_instance_is_checked_at_attach():
    from probes.builtin.margin import Margin

    probe = Margin()
    probe.every = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="probe 'margin': option 'every'.*nn.Module is not a schedule"):
        probes.attach(two_layer(), [probe], probe_data=probe_data())


class BrokenAt:
    """A schedule that raises from step ``at`` on, and counts its calls."""

    def __init__(self, at: int, error: BaseException | None = None, answer: Any = None) -> None:
        self.at, self.error, self.answer, self.calls = at, error, answer, 0

    def __call__(self, step: int) -> Any:
        self.calls += 1
        if step >= self.at:
            if self.error is not None:
                raise self.error
            return self.answer
        return step % 2 == 0

    def __repr__(self) -> str:
        return f"BrokenAt({self.at})"


def run(spec: dict[str, Any] | None, steps: int = 6, **kw: Any) -> tuple[nn.Module, Any, list]:
    model = two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    session = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec is not None:
            session = probes.attach(model, spec, probe_data=probe_data(), sinks=["memory"], optimizer=opt, **kw)
        train(model, session, opt, steps)
        if session is not None:
            session.close()
    return model, session, [w for w in caught if issubclass(w.category, ProbeFailedWarning)]


@pytest.mark.parametrize("name", ["margin", "relu_zeros"])  # an active and a passive probe
@pytest.mark.parametrize("fault", [{"error": RuntimeError("schedule bug")}, {"answer": None}, {"answer": 7}])
def test_a_schedule_that_fails_in_training_is_a_probe_failure(name, fault):
    broken = BrokenAt(3, **fault)
    baseline, _, _ = run(None)
    model, session, failed = run({name: {"every": broken}, "patterns": {"every": 1}})
    assert len(failed) == 1  # reported once
    assert f"probe {name!r} raised at step 3 and is switched off; training goes on" in str(failed[0].message)
    assert "option 'every'" in str(failed[0].message) and "BrokenAt(3)" in str(failed[0].message)
    assert list(session.failures) == [name]
    assert broken.calls == 4  # step 1 at attach, then 1, 2, 3: no longer asked once it failed
    for p, q in zip(model.parameters(), baseline.parameters()):  # training went on, exactly as without probes
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [s for s, _ in session.memory.scalars()["patterns/distinct"]] == list(range(7))  # the others go on


def test_a_schedule_that_raises_in_training_raises_under_strict():
    with pytest.raises(
        RuntimeError,
        match=r"probe 'margin': option 'every': the schedule BrokenAt\(3\) raised "
        r"ValueError\('schedule bug'\) at step 3",
    ) as info:
        run({"margin": {"every": BrokenAt(3, error=ValueError("schedule bug"))}}, strict=True)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("name", ["relu_zeros", "margin", "ntk"])
def test_bins_beyond_the_limit_are_refused_at_attach(name):
    with pytest.raises(ValueError, match=rf"{name}: option 'bins' must be a positive int <= 10000"):
        attach(name, {"bins": 10**20})


def test_ntk_outputs_beyond_the_limit_are_refused_at_attach_whatever_the_budget():
    with pytest.raises(ValueError, match=r"ntk: option 'outputs' must be None or a positive int <= 1048576"):
        attach("ntk", {"outputs": 10**20, "max_cost": 1e20})


def test_a_huge_margin_gives_records_not_a_failure():
    session = attach("margin", {"margin": 1e300})
    session.close()
    assert session.failures == {}
    hist = session.memory.histograms()["margin/delta"][0]
    assert hist.counts.sum() == P and bool(torch.isfinite(hist.edges).all())


@pytest.mark.parametrize(
    "values",
    [
        torch.full((5,), 1e300, dtype=torch.float64),
        torch.tensor([-1e308, 1e308], dtype=torch.float64),
        torch.full((3,), 3.4e38),
        torch.tensor([-3e38, 3e38]),
    ],
)
def test_histograms_of_huge_values_bin_every_value(values):
    from probes.records import Histogram

    hist = Histogram.of("t", values, bins=4)
    assert hist.counts.sum() == values.numel() and bool(torch.isfinite(hist.edges).all())
    assert bool((hist.edges[1:] >= hist.edges[:-1]).all())


def test_patterns_directory_that_cannot_hold_snapshots_is_refused_at_attach(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"patterns: option 'directory'=.*file.*cannot be written there"):
        attach("patterns", {"save": True, "directory": str(tmp_path / "file" / "snapshots")})


@pytest.mark.parametrize("name", ["patterns", "alignment"])
def test_sites_that_match_nothing_name_the_option(name):
    with pytest.raises(ValueError, match=rf"{name}: option 'sites': \['nothing'\] match no activation site"):
        attach(name, {"sites": "nothing"})


def test_options_text_and_array():
    from probes import options

    assert options.text("p", "o", "a") == "a" and options.text("p", "o", None, optional=True) is None
    for bad in (None, "", 3, ["a"]):
        with pytest.raises(TypeError, match="p: option 'o' must be a non-empty string"):
            options.text("p", "o", bad)
    out = options.array("p", "o", [[1, 2], [3, 4]], ndim=(2,))
    assert out.dtype == torch.float64 and out.device.type == "cpu" and out.tolist() == [[1, 2], [3, 4]]
    t = torch.ones(2)
    assert options.array("p", "o", t) is not t  # a copy
    assert options.array("p", "o", np.float32(2)).ndim == 0
    for bad in (
        "1",
        b"1",
        [1, "a"],
        [True],
        torch.ones(2, dtype=torch.bool),
        torch.ones(2, dtype=torch.cfloat),
        np.array(["a"]),
        torch.float64,
        object(),
        {1: 2},
    ):
        with pytest.raises(TypeError, match="p: option 'o' must be"):
            options.array("p", "o", bad)
    for bad in ([], [[1, 2], [3]], [math.nan], torch.zeros(0), [10**400]):
        with pytest.raises(ValueError, match="p: option 'o' must be"):
            options.array("p", "o", bad)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        options.array("p", "o", [1.0, 2.0], ndim=(2,))
