"""The Lightning callback: a 2-epoch CPU fit with probes writing to the trainer's TensorBoard logger."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from probes.integrations.lightning import ProbesCallback  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    xv, yv = torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(xv, yv), batch_size=24), (xv, yv)


def trainer(tmp_path, callbacks, logger=True, log_every_n_steps=1, max_epochs=2, **kw):
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(str(tmp_path), name="lt") if logger else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every_n_steps,
        **kw,
    )


def read_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_two_epoch_fit_writes_probes_to_the_trainers_logger(tmp_path):
    torch.manual_seed(0)
    train, val, (xv, yv) = loaders()
    cb = ProbesCallback({"relu_zeros": {"every": 2}, "alignment": {"every": 3}})
    t = trainer(tmp_path, [cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), train, val)
    assert t.global_step == 12  # 6 batches x 2 epochs
    s = cb.session
    assert s.closed and s.global_step == 12
    # the probe batch is the first validation batch
    assert torch.equal(s.x, xv) and torch.equal(s.y, yv)
    scalars = read_scalars(t.logger.log_dir)
    assert "train_loss" in scalars  # the module's own curves and the probes share one event file
    # a passive window of batches 1-2 lands at Lightning's logger step of batch 2 (1), where self.log writes it
    zeros_steps = [st for st, _ in scalars["relu_zeros/net.1/fraction"]]
    assert zeros_steps == [1, 3, 5, 7, 9, 11]
    cka_steps = [st for st, _ in scalars["alignment/net.1/cka"]]
    assert cka_steps == [0, 3, 6, 9, 12]
    assert all(0.0 <= v <= 1.0 for _, v in scalars["relu_zeros/total/fraction"])
    # no hook is left on the module after fit
    model = t.lightning_module
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_relu_zeros_totals_match_a_manual_count(tmp_path):
    """Every training forward is observed: the zero count over the fit equals a recount of the same forwards."""
    torch.manual_seed(1)
    train, val, _ = loaders()
    seen = []

    class Recount(Net):
        def training_step(self, batch, batch_idx):
            x, _ = batch
            with torch.no_grad():
                seen.append(int((torch.relu(self.net[0](x)) == 0).sum()))  # not a site call
            return super().training_step(batch, batch_idx)

    cb = ProbesCallback({"relu_zeros": {"every": 6}}, sinks=["memory"])
    t = trainer(tmp_path, [cb], logger=False)
    t.fit(Recount(), train, val)
    zeros = cb.session.memory.scalars()["relu_zeros/net.1/zeros"]
    assert [st for st, _ in zeros] == [5, 11]  # the logger steps of batches 6 and 12
    assert zeros[0][1] == sum(seen[:6]) and zeros[1][1] == sum(seen[6:])


def test_explicit_probe_data_logdir_and_checkpoint_state(tmp_path):
    torch.manual_seed(2)
    train, val, _ = loaders()
    xp, yp = torch.randn(10, 8), torch.arange(10) % 3
    cb = ProbesCallback(["alignment"], probe_data=(xp, yp), logdir=str(tmp_path / "probes"))
    t = trainer(tmp_path, [cb], logger=False, max_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), train)  # no validation loader: the explicit probe batch is used
    assert torch.equal(cb.session.x, xp)
    assert "alignment/output/cka" in read_scalars(tmp_path / "probes")
    state = cb.state_dict()
    assert state["step"] == 5
    fresh = ProbesCallback(["alignment"], probe_data=(xp, yp), sinks=["memory"])
    fresh.load_state_dict(state)  # before fit: kept until the session exists
    assert fresh.state_dict()["step"] == 5


def test_active_probes_without_any_probe_batch_is_a_clear_error(tmp_path):
    train, _, _ = loaders()

    cb = ProbesCallback(["alignment"], sinks=["memory"])
    t = trainer(tmp_path, [cb], logger=False)
    with pytest.raises(ValueError, match="probe_data"):
        t.fit(Net(), train)


def test_resume_from_a_lightning_checkpoint_continues_the_probe_step(tmp_path):
    torch.manual_seed(3)
    train, val, _ = loaders()
    cb = ProbesCallback({"relu_zeros": {"every": 2}}, sinks=["memory"])
    t = trainer(tmp_path, [cb], logger=False, max_steps=4)
    t.fit(Net(), train, val)
    ckpt = tmp_path / "four.ckpt"
    t.save_checkpoint(str(ckpt))
    saved = torch.load(str(ckpt), weights_only=False)["callbacks"]
    assert any(v.get("step") == 4 for v in saved.values() if isinstance(v, dict))  # Lightning stored our state

    cb2 = ProbesCallback({"relu_zeros": {"every": 2}, "alignment": {"every": 2}}, sinks=["memory"])
    t2 = trainer(tmp_path, [cb2], logger=False, max_steps=8)
    t2.fit(Net(), train, val, ckpt_path=str(ckpt))
    end = t2.global_step
    assert end > 4 and cb2.session.global_step == end  # the probe step continues from 4, not from 0
    assert [st for st, _ in cb2.session.memory.scalars()["relu_zeros/total/fraction"]] == list(range(5, end, 2))
    # the resumed run writes no stray measurement of the initialization at step 0
    assert [st for st, _ in cb2.session.memory.scalars()["alignment/output/cka"]] == list(range(6, end + 1, 2))


def test_resume_without_probe_state_continues_from_the_trainers_step(tmp_path):
    torch.manual_seed(4)
    train, val, _ = loaders()
    t = trainer(tmp_path, [], logger=False, max_steps=4)
    t.fit(Net(), train, val)
    ckpt = tmp_path / "plain.ckpt"
    t.save_checkpoint(str(ckpt))  # written without the callback: no probe state in it
    cb = ProbesCallback({"relu_zeros": {"every": 2}}, sinks=["memory"])
    t2 = trainer(tmp_path, [cb], logger=False, max_steps=8)
    t2.fit(Net(), train, val, ckpt_path=str(ckpt))
    end = t2.global_step
    assert end > 4 and cb.session.global_step == end
    assert [st for st, _ in cb.session.memory.scalars()["relu_zeros/total/fraction"]] == list(range(5, end, 2))


def centered_alignment(logits, labels):
    """rho(K, L) with P x P kernels: K = F F^T of the logits, L = Y Y^T of the one-hot labels, Kc = C K C."""
    f, y = logits.double(), F.one_hot(labels, 3).double()
    c = torch.eye(len(f), dtype=torch.float64) - 1.0 / len(f)
    kc, lc = c @ f @ f.T @ c, c @ y @ y.T @ c
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


class WeightsSeen(pl.Callback):
    """The weights each training batch's forward uses, by the batch's global step when it starts."""

    def __init__(self) -> None:
        self.weights = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_probe_points_sit_on_the_steps_of_self_log(tmp_path):
    torch.manual_seed(5)
    train, val, (xv, yv) = loaders()
    cb = ProbesCallback({"relu_zeros": {"every": 2}, "alignment": {"every": 2}})
    seen = WeightsSeen()
    t = trainer(tmp_path, [cb, seen], log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), train, val)
    scalars = read_scalars(t.logger.log_dir)
    loss_steps = [st for st, _ in scalars["train_loss"]]
    assert loss_steps == [1, 3, 5, 7, 9, 11]  # Lightning's logger: every 2nd batch, at the steps done before it
    assert [st for st, _ in scalars["relu_zeros/net.1/fraction"]] == loss_steps
    assert [st for st, _ in scalars["relu_zeros/total/fraction"]] == loss_steps
    # an active probe at step k measures the weights that the forward logged at step k uses (k = 0: the init)
    cka = dict(scalars["alignment/output/cka"])
    assert sorted(cka) == [0, 2, 4, 6, 8, 10, 12]
    model = Net().eval()
    for step in (0, 4, 10):
        model.load_state_dict(seen.weights[step])
        with torch.no_grad():
            assert cka[step] == pytest.approx(centered_alignment(model(xv), yv), abs=1e-5)


def test_two_callbacks_checkpoint_and_resume_without_collision(tmp_path):
    """Each callback keeps its state under its own key; resumed, each window continues as if never stopped."""
    train, val, (xv, yv) = loaders()

    def callbacks():
        return [
            ProbesCallback({"relu_zeros": {"every": 4}}, sinks=["memory"]),
            ProbesCallback({"patterns": {"every": 2}}, probe_data=(xv, yv), sinks=["memory"]),
        ]

    def fit(cbs, epochs, ckpt=None):
        torch.manual_seed(6)
        t = trainer(tmp_path, cbs, logger=False, max_epochs=epochs)
        t.fit(Net(), train, val, ckpt_path=ckpt)
        assert t.global_step == 6 * epochs
        return t

    full = callbacks()
    fit(full, 2)
    first = callbacks()
    t = fit(first, 1)  # the end of the first epoch (6 batches): the loader restarts cleanly on resume
    ckpt = str(tmp_path / "six.ckpt")
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    keys = [cb.state_key for cb in first]
    assert keys[0] != keys[1] and "relu_zeros" in keys[0] and "patterns" in keys[1]
    assert {k: sorted(saved[k]["probes"]) for k in keys} == {keys[0]: ["relu_zeros"], keys[1]: ["patterns"]}
    assert saved[keys[0]]["step"] == saved[keys[1]]["step"] == 6

    resumed = callbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(resumed, 2, ckpt)
    for before, after in zip(full, resumed):
        whole, rest = before.session.memory.scalars(), after.session.memory.scalars()
        tags = sorted(whole)
        assert tags == sorted(rest)
        for tag in tags:
            # relu_zeros' window 5..8 straddles the checkpoint; patterns' churn_from_init compares with the
            # snapshot of step 0, which only the checkpoint holds
            assert rest[tag] == [pt for pt in whole[tag] if pt[0] > 6], tag
    assert any(
        tag.startswith("relu_zeros") and [st for st, _ in pts] == [3, 7, 11]
        for tag, pts in full[0].session.memory.scalars().items()
    )


def test_default_cadences_scale_to_the_estimated_stepping_batches_and_given_ones_stay(tmp_path, caplog):
    # 2 epochs x 6 batches = 12 optimizer steps: a default cadence (alignment 100, relu_zeros 100) becomes every
    # ceil(12 / 10) = 2 steps, about 10 points; margin's given every=3 is kept; said once, in one line
    import logging

    from probes.schedules import every

    caplog.set_level(logging.INFO, logger="probes")

    torch.manual_seed(4)
    train, val, _ = loaders()
    cb = ProbesCallback(
        {"alignment": {}, "relu_zeros": {}, "margin": {"every": 3}}, sinks=["memory"], overhead=None
    )  # no widening by the overhead budget on a loaded machine
    t = trainer(tmp_path, [cb], logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Net(), train, val)
    assert t.estimated_stepping_batches == 12 and t.global_step == 12
    s = cb.session
    assert s.schedules["alignment"] == every(2) and s.schedules["relu_zeros"] == every(2)
    assert s.schedules["margin"] == every(3)
    scalars = s.memory.scalars()
    assert [k for k, _ in scalars["alignment/output/cka"]] == list(range(0, 13, 2))
    assert [k for k, _ in scalars["margin/n_delta"]] == [0, 3, 6, 9, 12]
    assert len(scalars["relu_zeros/total/fraction"]) == 6  # windows of 2 steps, at the logger step of their last
    said = [
        m for m in [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] if "default cadence" in m
    ]  # the "probes" log of a framework-driven session, or a warning
    assert len(said) == 1 and "\n" not in said[0] and "12 steps" in said[0] and "every 2 steps" in said[0]
