"""Probes must not change training: same seeds, bit-identical parameters with and without probes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probes


def builtin_names() -> list[str]:
    return [i.name for i in probes.available() if i.source == "builtin"]


def train(model_fn, spec, steps: int = 50, seed: int = 0, probe_data=None, use_optimizer_hook=False):
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(200, 8, generator=g)
    y_all = torch.sign(x_all[:, :1] + 0.3 * x_all[:, 1:2])
    session = None
    if spec is not None:
        session = probes.attach(
            model, spec, probe_data=probe_data, sinks=["memory"], optimizer=opt if use_optimizer_hook else None
        )
    for _ in range(steps):
        idx = torch.randint(0, 200, (20,))  # global RNG: probes must leave it untouched
        loss = F.mse_loss(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if session is not None and not use_optimizer_hook:
            session.step()
    if session is not None:
        session.close()
    return model, session


def two_layer():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_all_builtin_probes_leave_training_bit_identical():
    names = builtin_names()
    assert "relu_zeros" in names
    g = torch.Generator().manual_seed(7)
    px = torch.randn(24, 8, generator=g)
    py = torch.sign(px[:, 0]).reshape(-1, 1)
    spec = {n: {"every": 5} for n in names}
    ref, _ = train(two_layer, None)
    got, session = train(two_layer, spec, probe_data=(px, py))
    assert session.failures == {}, session.failures
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), name
    written = {t.split("/")[0] for t in session.memory.tags()}
    assert set(names) <= written, set(names) - written


def test_optimizer_hook_stepping_is_bit_identical_too():
    names = [n for n in builtin_names() if n in ("relu_zeros", "patterns", "alignment", "ntk", "margin")]
    g = torch.Generator().manual_seed(7)
    px = torch.randn(24, 8, generator=g)
    py = torch.sign(px[:, 0]).reshape(-1, 1)
    ref, _ = train(two_layer, None)
    got, session = train(two_layer, {n: {"every": 3} for n in names}, probe_data=(px, py), use_optimizer_hook=True)
    assert session.global_step == 50
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("extra", [["relu_zeros"], ["relu_zeros", "patterns", "alignment"]])
def test_dropout_and_batchnorm_training_is_bit_identical(extra):
    names = [n for n in extra if n in builtin_names()]

    def net():
        return nn.Sequential(
            nn.Linear(8, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(16, 1),
        )

    px = torch.randn(30, 8, generator=torch.Generator().manual_seed(3))
    py = (px[:, 0] > 0).long()
    ref, _ = train(net, None)
    got, session = train(net, {n: {"every": 4} for n in names}, probe_data=(px, py))
    assert session.failures == {}, session.failures
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        assert torch.equal(a, b)


# -- issue 12: what a hostile user found ---------------------------------------------------------------
from torch.nn.modules import module as _hooks  # noqa: E402

from probes.engine.session import ProbesClosedError  # noqa: E402


def _global_hooks() -> int:
    return len(_hooks._global_forward_hooks) + len(_hooks._global_forward_pre_hooks)


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "swa"])
def test_an_attached_model_can_be_copied_and_saved_and_copies_carry_no_probes(tmp_path, how):
    import copy
    import io

    model = two_layer()
    session = probes.attach(model, {"relu_zeros": {"every": 1}}, logdir=str(tmp_path / "run"))
    x = torch.randn(6, 8)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    else:
        clone = torch.optim.swa_utils.AveragedModel(model).module
    # the copy's hooks are no-ops: nothing in it refers to the session
    from probes.engine.capture import _NoopHook

    assert all(
        isinstance(h, _NoopHook)
        for m in clone.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )
    assert any(m._forward_hooks for m in model.modules())  # while the original is hooked
    clone(x)  # a copy's forwards are not the original's
    clone(x)
    model(x)
    session.step()
    session.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    outputs = acc.Scalars("relu_zeros/1/zeros")[0].value + 0  # one forward of 6 x 16 outputs counted
    fraction = acc.Scalars("relu_zeros/1/fraction")[0].value
    assert outputs == pytest.approx(fraction * 6 * 16)


def test_failed_attach_leaves_no_hook_writer_or_file(tmp_path):
    model = two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _global_hooks(), len(opt._optimizer_step_post_hooks)
    bad_width = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))  # the model takes 8 features
    with pytest.raises(RuntimeError):
        probes.attach(
            model,
            ["relu_zeros", "alignment"],
            probe_data=bad_width,
            logdir=str(tmp_path / "a"),
            optimizer=opt,
            strict=True,
        )
    assert (_global_hooks(), len(opt._optimizer_step_post_hooks)) == before
    assert _files(tmp_path) == []
    with pytest.raises(TypeError, match="optimizer"):
        probes.attach(model, ["relu_zeros"], logdir=str(tmp_path / "b"), optimizer="sgd")
    assert _global_hooks() == before[0] and _files(tmp_path) == []
    model(torch.randn(2, 8)).sum().backward()  # training goes on with no dead session in the way
    opt.step()


class Augmenting(nn.Module):
    """A module whose train() override switches its own state (augmentation on in training)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = two_layer()
        self.augment = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.augment = mode
        return self

    def forward(self, x):
        if self.augment:
            x = x + 0.1 * torch.randn_like(x)
        return self.net(x)


def test_train_overrides_run_both_ways_and_frozen_modules_stay_in_eval():
    px = torch.randn(12, 8)
    ref, _ = train(Augmenting, None, steps=12)
    got, session = train(
        Augmenting, {"alignment": {"every": 2}, "margin": {"every": 3}}, probe_data=(px, torch.sign(px[:, 0])), steps=12
    )
    assert session.failures == {}
    assert got.augment is True
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
    # a frozen BatchNorm inside a training model stays in eval mode after a probe pass
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    net.train()
    net[1].eval()
    s = probes.attach(net, ["alignment"], probe_data=(px, torch.sign(px[:, 0])))
    s.measure()
    assert net.training and not net[1].training and net[0].training
    s.close()


def test_resume_by_the_readme_writes_no_second_step0_point(tmp_path):
    px = torch.randn(10, 8)
    model = two_layer()
    s = probes.attach(model, {"alignment": {"every": 2}}, probe_data=(px, torch.sign(px[:, 0])), logdir=str(tmp_path))
    s.step(4)
    state = s.state_dict()
    s.close()
    resumed = probes.attach(
        model, {"alignment": {"every": 2}}, probe_data=(px, torch.sign(px[:, 0])), logdir=str(tmp_path)
    )
    resumed.load_state_dict(state)
    resumed.step(2)
    resumed.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: list[int] = []
    # the session's runs (the per-site copies, runs named site=<site>, hold other tags)
    events = [p for p in tmp_path.rglob("events.out.tfevents.*") if not p.parent.name.startswith("site=")]
    for run in sorted({p.parent for p in events}):
        acc = EventAccumulator(str(run))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("alignment/output/cka")]
    assert sorted(steps) == [0, 2, 4, 6]  # no second step-0 point
    # the same through attach(state=...)
    again = probes.attach(model, {"alignment": {"every": 2}}, probe_data=(px, torch.sign(px[:, 0])), state=state)
    again.step(2)
    again.close()
    assert [st for st, _ in again.memory.scalars()["alignment/output/cka"]] == [6]


def test_methods_after_close_raise_and_a_second_close_is_harmless(tmp_path):
    px = torch.randn(10, 8)
    s = probes.attach(
        two_layer(), ["alignment", "relu_zeros"], probe_data=(px, torch.sign(px[:, 0])), logdir=str(tmp_path)
    )
    s.close()
    events = _files(tmp_path)
    for call in (
        s.measure,
        s.step,
        s.flush,
        lambda: s.set_step(3),
        lambda: s.load_state_dict({"step": 1}),
        s.state_dict,
    ):
        with pytest.raises(ProbesClosedError, match="closed"):
            call()
    s.close()
    assert s.closed and _files(tmp_path) == events


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"relu_zeros": {"every": 2.7}}, "every"),
        ({"relu_zeros": {"every": True}}, "every"),
        ({"relu_zeros": {"every": 0}}, "every"),
        ({"relu_zeros": {"bins": "20"}}, "bins"),
        ({"relu_zeros": {"unit_dim": "1"}}, "unit_dim"),
        ({"alignment": {"sites": 3}}, "sites"),
        ({"margin": {"margin": "half"}}, "option 'margin'"),
        ({"margin": {"bins": 2.5}}, "option 'bins'"),
        ({"patterns": {"unit_dim": 1.0}}, "option 'unit_dim'"),
        ({"patterns": {"image": "no"}}, "option 'image'"),
        ({"alignment": {"degenerate": "ignore"}}, "option 'degenerate'"),
        ({"ntk": {"top_k": -1}}, "top_k"),
    ],
)
def test_options_are_validated_at_attach_naming_probe_and_option(spec, match):
    px = torch.randn(6, 8)
    with pytest.raises((TypeError, ValueError), match=match) as info:
        probes.attach(two_layer(), spec, probe_data=(px, torch.sign(px[:, 0])))
    assert next(iter(spec)) in str(info.value)


def test_unit_dim_out_of_range_keeps_the_default_axis_and_says_so_naming_the_site():
    from probes.engine.failures import ProbesNoticeWarning

    model = two_layer()
    s = probes.attach(model, {"relu_zeros": {"unit_dim": 2, "every": 1}}, strict=True)
    with pytest.warns(ProbesNoticeWarning, match="unit_dim'=2 is out of range.*site '1'.*axis 1"):
        model(torch.randn(3, 8))
    s.step()
    s.close()
    assert s.failures == {}
    assert s.memory.histograms()["relu_zeros/1/unit_activity"][0].counts.sum() == 16  # 16 units: the last axis


def test_float64_and_integer_probe_inputs_are_cast_to_the_model_dtype():
    px = torch.randn(10, 8, dtype=torch.float64)
    s = probes.attach(two_layer(), ["alignment", "margin", "ntk"], probe_data=(px, torch.sign(px[:, 0])))
    s.close()
    assert s.failures == {}
    with pytest.raises(RuntimeError, match="probe 'margin'.*mat1 and mat2"):  # integer inputs are ids: never cast
        probes.attach(two_layer(), ["margin"], probe_data=(torch.randint(0, 3, (10, 8)), torch.ones(10)))


def test_logdir_and_writer_together_are_refused(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "w"))
    with pytest.raises(ValueError, match="logdir= or writer="):
        probes.attach(two_layer(), ["relu_zeros"], logdir=str(tmp_path / "l"), writer=w)
    w.close()
    assert not (tmp_path / "l").exists()


@pytest.mark.parametrize(
    "x, y, match",
    [
        (torch.randn(0, 8), torch.ones(0), "empty"),
        (torch.full((4, 8), float("inf")), torch.ones(4), "infinite"),
        (torch.randn(4, 8), torch.ones(5), "4 samples"),
        ((torch.randn(4, 8), torch.randn(5, 8)), torch.ones(4), r"x\[1\]"),
    ],
)
def test_bad_probe_batches_get_one_message_from_the_session(x, y, match):
    with pytest.raises(ValueError, match=match) as info:
        probes.attach(two_layer(), ["pathgram", "alignment"], probe_data=(x, y))
    assert str(info.value).startswith("probe_data")


def test_setup_errors_name_the_probe():
    class Picky(probes.Probe):
        name = "picky"
        needs_probe_data = False

        def setup(self, context):
            raise ValueError("no Conv layer to watch")

    with pytest.raises(ValueError, match="picky.*no Conv layer"):
        probes.attach(two_layer(), [Picky()])


def test_strict_lets_the_users_exception_propagate_from_a_with_block():
    class Broken(probes.Probe):
        name = "broken"
        needs_probe_data = False
        every = 100
        armed = False

        def measure(self, batch):
            if Broken.armed:
                raise RuntimeError("probe bug")
            return []

    with pytest.warns(Warning, match="probe bug"), pytest.raises(KeyError, match="user error"):
        with probes.attach(two_layer(), [Broken()], strict=True) as s:
            s.set_step(1)  # close() will measure once more, and that measurement fails
            Broken.armed = True
            raise KeyError("user error")
