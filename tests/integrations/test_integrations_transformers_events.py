"""The Transformers callback driven by its events alone: no ``Trainer`` exists, so nothing can be found on the
call stack; the model, the loaders, the step and the checkpoint folder come from the events' arguments. Then a
real Trainer that gets the callback through ``add_callback`` inside a helper and resumes from a checkpoint
copied out of its ``output_dir``."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from probes.integrations.transformers import STATE_FILE, ProbesCallback  # noqa: E402

EVERY, SAVE_AT, STEPS = 3, 4, 6


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * STEPS, 5, generator=g), torch.randint(0, 3, (8 * STEPS,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


class Zeros:
    """Zeros of the ReLU per training forward, from a plain forward hook."""

    def __init__(self, model) -> None:
        self.counts: list[int] = []
        self.handle = model[1].register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():  # the probe passes run in eval mode without grad
            self.counts.append(int((output == 0).sum()))


def event(model, loader):
    return {
        "model": model,
        "train_dataloader": loader,
        "eval_dataloader": None,
        "optimizer": None,
        "lr_scheduler": None,
        "processing_class": None,
    }


def train(cb, model, loader, args, state, steps, save_at=None, start=0):
    """What the Trainer does around its callbacks, by hand: begin, step ends, a save, the end."""
    control = TrainerControl()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_train_begin(args, state, control, **event(model, loader))
    for i, (x, y) in enumerate(loader):
        if i < start:
            continue
        if i >= steps:
            break
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        state.global_step = i + 1
        state.log_history.append({"loss": 0.5, "step": state.global_step})
        cb.on_step_end(args, state, control, **event(model, loader))
        if state.global_step == save_at:
            folder = args.output_dir + f"/checkpoint-{save_at}"
            import os

            os.makedirs(folder)
            state.save_to_json(folder + "/trainer_state.json")  # the Trainer writes its state, then calls on_save
            cb.on_save(args, state, control, **event(model, loader))
            saved = copy.deepcopy(model)
    cb.on_train_end(args, state, control, **event(model, loader))
    return saved if save_at else None


def args_for(out, resume=None):
    return TrainingArguments(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        per_device_eval_batch_size=10,
        resume_from_checkpoint=None if resume is None else str(resume),
    )


def test_the_callback_needs_nothing_but_its_events(tmp_path):
    loader, model = data(), net()
    hand = Zeros(model)
    cb = ProbesCallback({"relu_zeros": {"every": EVERY}, "alignment": {"every": EVERY}}, sinks=["memory"])
    saved = train(cb, model, loader, args_for(tmp_path / "out"), TrainerState(), STEPS, save_at=SAVE_AT)
    hand.handle.remove()
    # the probe batch: the first per_device_eval_batch_size training samples, in index order
    x, y = loader.dataset.tensors
    assert torch.equal(cb.session.x, x[:10]) and torch.equal(cb.session.y, y[:10])
    zeros = cb.session.memory.scalars()["relu_zeros/1/zeros"]
    assert zeros == [(3, sum(hand.counts[0:3])), (6, sum(hand.counts[3:6]))]
    assert [s for s, _ in cb.session.memory.scalars()["alignment/output/cka"]] == [0, 3, 6]
    folder = tmp_path / "out" / f"checkpoint-{SAVE_AT}"
    assert torch.load(folder / STATE_FILE, weights_only=True)["session"]["step"] == SAVE_AT

    # a decoy: another run's checkpoint at the same step, in the output_dir the resumed run is given
    decoy = tmp_path / "other" / f"checkpoint-{SAVE_AT}"
    shutil.copytree(folder, decoy)
    other = TrainerState.load_from_json(str(decoy / "trainer_state.json"))
    other.log_history[0]["loss"] = 9.0
    other.save_to_json(str(decoy / "trainer_state.json"))

    # resumed from the state saved at step 4, with the checkpoint named in the arguments
    for resume, expect in ((folder, str(folder)), (None, None)):
        cb2 = ProbesCallback({"relu_zeros": {"every": EVERY}, "alignment": {"every": EVERY}}, sinks=["memory"])
        model2 = copy.deepcopy(saved)
        hand2 = Zeros(model2)
        state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cb2, model2, loader, args_for(tmp_path / "other", resume=resume), state, STEPS, start=SAVE_AT)
        hand2.handle.remove()
        assert cb2.resumed_from == expect
        assert any("no probes_state.pt of this run" in str(w.message) for w in caught) == (expect is None)
        points = cb2.session.memory.scalars()
        assert [s for s, _ in points["alignment/output/cka"]] == [6]  # no second step-0 point
        if expect is not None:  # the window 4..6 straddles the checkpoint: its first forward came back with the state
            assert points["relu_zeros/1/zeros"] == [zeros[1]]
            assert points["relu_zeros/1/zeros"][0][1] == hand.counts[3] + sum(hand2.counts)
        else:  # the decoy is not loaded: the window holds only the forwards after the resume
            assert points["relu_zeros/1/zeros"] == [(6, sum(hand2.counts))]


SEQ, VOCAB = 8, 50


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_act="relu",
            num_labels=2,
        )
    )


def build_and_train(out, callback, resume=None):
    """A helper that builds the Trainer, adds the callback afterwards and trains: the user's code, not ours."""
    from transformers import Trainer

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=6,
        learning_rate=1e-3,
        seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=3,
        disable_tqdm=True,
        dataloader_num_workers=0,
        resume_from_checkpoint=None if resume is None else str(resume),
    )
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(24, 1))
    trainer.add_callback(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def test_a_trainer_given_the_callback_by_add_callback_resumes_from_a_moved_checkpoint(tmp_path):
    probes_spec = {"relu_zeros": {"every": 2}, "patterns": {"every": 2}}
    eval_set = Tokens(6, 2)
    first = ProbesCallback(probes_spec, probe_data=eval_set, sinks=["memory"])
    build_and_train(tmp_path / "a", first)
    assert first.session.closed and torch.equal(first.session.y, eval_set.labels)
    full = first.session.memory.scalars()
    moved = tmp_path / "elsewhere" / "checkpoint-3"
    shutil.copytree(tmp_path / "a" / "checkpoint-3", moved)  # out of any output_dir
    second = ProbesCallback(probes_spec, probe_data=eval_set, sinks=["memory"])
    build_and_train(tmp_path / "b", second, resume=moved)
    assert second.resumed_from == str(moved)
    resumed = second.session.memory.scalars()
    tags = [t for t in full if t.startswith(("relu_zeros/", "patterns/"))]
    assert tags and set(tags) <= set(resumed)
    for tag in tags:  # the window 3..4 straddles the checkpoint; churn compares with the saved snapshot
        assert resumed[tag] == [pt for pt in full[tag] if pt[0] > 3], tag
