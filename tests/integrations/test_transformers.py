"""Hugging Face: a tiny BERT trained by ``transformers.Trainer`` with ``ProbesCallback``; a GPT-2 probed directly.

Models come from configs only; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import probes  # noqa: E402
from probes.integrations.transformers import STATE_FILE, ProbesCallback  # noqa: E402

SEQ, VOCAB, CLASSES = 12, 100, 3
ACTS = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
ZEROS_EVERY, CKA_EVERY, PATTERNS_EVERY, STEPS = 4, 10, 7, 20


def bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_act="relu",
            num_labels=CLASSES,
        )
    )


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}  # no padding: BERT's default mask


TRAIN, EVAL = TokenData(48, 1), TokenData(24, 2)


def trainer(model, out, callbacks=(), report_to=("tensorboard",), eval_dataset=EVAL, save_steps=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=len(EVAL),
        learning_rate=1e-3,
        seed=0,
        use_cpu=True,
        report_to=list(report_to),
        logging_steps=5,
        disable_tqdm=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=eval_dataset, callbacks=list(callbacks))


def read_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class HandCount:
    """Zeros of the intermediate ReLUs per training forward, from plain forward hooks."""

    def __init__(self, model) -> None:
        self.per_forward: list[dict[str, int]] = []
        self.handles = []
        for name in ACTS:
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            if module.training:
                if name == ACTS[0]:
                    self.per_forward.append({})
                self.per_forward[-1][name] = int((output == 0).sum())

        return hook

    def windows(self, every: int) -> dict[str, list[tuple[int, int]]]:
        """Sum per window of ``every`` steps (one forward per step here), as ``relu_zeros`` writes them."""
        out = {}
        for name in ACTS:
            counts = [f[name] for f in self.per_forward]
            out[name] = [(s, sum(counts[s - every : s])) for s in range(every, len(counts) + 1, every)]
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def centered_alignment(features: torch.Tensor, labels: torch.Tensor) -> float:
    """rho(K, L) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F) with P x P kernels, Kc = C K C."""
    f = features.double().reshape(len(features), -1)
    y = torch.nn.functional.one_hot(labels, CLASSES).double()
    p = len(f)
    c = torch.eye(p, dtype=torch.float64) - torch.full((p, p), 1.0 / p, dtype=torch.float64)
    kc, lc = c @ f @ f.T @ c, c @ y @ y.T @ c
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


PROBES = {
    "relu_zeros": {"every": ZEROS_EVERY},
    "alignment": {"every": CKA_EVERY},
    "patterns": {"every": PATTERNS_EVERY},
    "ntk": {"every": CKA_EVERY, "image": False},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One plain training run and one with the callback (hand-count hooks on, checkpoints every 10 steps)."""
    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = bert()
        trainer(plain, root / "plain", report_to=()).train()

        model = bert()
        init = copy.deepcopy(model)
        hand = HandCount(model)
        mp.setenv("TENSORBOARD_LOGGING_DIR", str(root / "tb"))
        cb = ProbesCallback(PROBES, probe_data=EVAL)  # the eval set's first per_device_eval_batch_size samples
        t = trainer(model, root / "out", callbacks=[cb], save_steps=10)
        t.train()
        hand.remove()
    return {
        "root": root,
        "plain": plain,
        "model": model,
        "init": init,
        "hand": hand,
        "cb": cb,
        "trainer": t,
        "tb": root / "tb",
        "scalars": read_scalars(root / "tb"),
    }


def test_callback_writes_into_the_trainers_tensorboard_run(runs):
    scalars, cb = runs["scalars"], runs["cb"]
    assert "train/loss" in scalars  # the Trainer's own curves and the probe tags share the run
    for site in ACTS:
        assert [s for s, _ in scalars[f"relu_zeros/{site}/zeros"]] == [4, 8, 12, 16, 20]
        assert [s for s, _ in scalars[f"alignment/{site}/cka"]] == [0, 10, 20]
    assert [s for s, _ in scalars["alignment/output/cka"]] == [0, 10, 20]
    assert all(0.0 <= v <= 1.0 for _, v in scalars["relu_zeros/total/fraction"])
    # step 20 of patterns is the last measurement at on_train_end: it lands in the run, and the writer is closed
    assert [s for s, _ in scalars["patterns/distinct"]] == [0, 7, 14, 20]
    assert [s for s, _ in scalars["ntk/trace"]] == [0, 10, 20] and cb.session.failures == {}
    writer = cb.session.sinks[0].writer
    assert os.path.samefile(writer.get_logdir(), runs["tb"]) and writer.all_writers is None
    # the probe batch is the first eval batch, labels inside; the session followed and closed
    assert cb.session.global_step == STEPS and cb.session.closed
    assert torch.equal(cb.session.y, EVAL.labels)
    model = runs["model"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_zero_counts_equal_a_hand_count(runs):
    scalars, hand = runs["scalars"], runs["hand"]
    assert len(hand.per_forward) == STEPS  # the probe passes (eval mode) are not training forwards
    for site, expected in hand.windows(ZEROS_EVERY).items():
        assert [(s, int(v)) for s, v in scalars[f"relu_zeros/{site}/zeros"]] == expected


def test_output_alignment_at_step_0_is_the_centered_alignment_of_logits_and_labels(runs):
    init = runs["init"].eval()
    with torch.no_grad():
        logits = init(input_ids=EVAL.ids, attention_mask=torch.ones_like(EVAL.ids)).logits
    expected = centered_alignment(logits, EVAL.labels)
    step, value = runs["scalars"]["alignment/output/cka"][0]
    assert step == 0 and value == pytest.approx(expected, abs=1e-5)


def test_training_is_bit_identical_with_and_without_the_callback(runs):
    plain, probed = dict(runs["plain"].named_parameters()), dict(runs["model"].named_parameters())
    assert plain.keys() == probed.keys()
    for name, p in plain.items():
        assert torch.equal(p, probed[name]), name


def test_gradient_checkpointing_counts_each_forward_once(runs, tmp_path, monkeypatch):
    model = bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in v5
        model.gradient_checkpointing_enable()
    naive = HandCount(model)  # plain hooks see the recomputation during backward too
    probe_batch = ({"input_ids": EVAL.ids, "attention_mask": torch.ones_like(EVAL.ids)}, EVAL.labels)
    cb = ProbesCallback({"relu_zeros": {"every": ZEROS_EVERY}}, probe_data=probe_batch)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(model, tmp_path / "out", callbacks=[cb], report_to=()).train()
    naive.remove()
    assert len(naive.per_forward) > STEPS  # checkpointing did recompute
    # no TensorBoardCallback here: the probes write where the Trainer's TensorBoard run would be
    scalars = read_scalars(tmp_path / "tb")
    for site, expected in runs["hand"].windows(ZEROS_EVERY).items():
        assert [(s, int(v)) for s, v in scalars[f"relu_zeros/{site}/zeros"]] == expected


def test_resume_from_checkpoint_continues_the_probe_steps(runs, monkeypatch):
    root = runs["root"]
    ckpt = root / "out" / "checkpoint-10"
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)  # tensors and plain data only
    assert saved["global_step"] == 10 and saved["session"]["step"] == 10

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(root / "tb_resumed"))
    cb = ProbesCallback(PROBES, probe_data=EVAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(bert(), root / "out", callbacks=[cb]).train(resume_from_checkpoint=str(ckpt))
    assert cb.resumed_from == str(ckpt)
    scalars = read_scalars(root / "tb_resumed")
    assert [s for s, _ in scalars["alignment/output/cka"]] == [20]  # no second step-0 point
    assert [s for s, _ in scalars["relu_zeros/total/fraction"]] == [12, 16, 20]
    full = runs["scalars"]
    probe_tags = [t for t in full if t.split("/")[0] in PROBES]
    assert probe_tags and set(probe_tags) <= set(scalars)
    for tag in probe_tags:
        # the same values as the uninterrupted run: the relu_zeros window 9..12 straddles the checkpoint (its
        # first half came back from probes_state.pt), patterns' churn compares with the saved snapshots and
        # ntk/distance_from_init with the saved initial kernel
        assert scalars[tag] == [pt for pt in full[tag] if pt[0] > 10], tag


def test_logdir_given_wins_and_the_probe_batch_can_be_given(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    batch = {"input_ids": EVAL.ids[:9], "attention_mask": torch.ones_like(EVAL.ids[:9]), "labels": EVAL.labels[:9]}
    cb = ProbesCallback(["alignment"], probe_data=batch, logdir=str(tmp_path / "own"), overhead=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(bert(), tmp_path / "out", callbacks=[cb], eval_dataset=None).train()
    assert torch.equal(cb.session.y, EVAL.labels[:9]) and "labels" not in cb.session.x
    # a 20-step run: the default cadence (100) becomes every 2 steps, about 10 points (overhead=None: no widening
    # on a loaded machine)
    assert [s for s, _ in read_scalars(tmp_path / "own")["alignment/output/cka"]] == list(range(0, 21, 2))
    assert not any(t.startswith("alignment/") for t in read_scalars(tmp_path / "tb"))
    assert "train/loss" in read_scalars(tmp_path / "tb")


def test_without_probe_data_the_probe_batch_is_the_first_training_samples_and_training_is_unchanged(runs, tmp_path):
    # no eval set, and the Trainer has not evaluated: the first per_device_eval_batch_size training samples in
    # index order, collated as the Trainer collates; the sampler and the random streams are left alone
    cb = ProbesCallback(["alignment"], sinks=["memory"])
    model = bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(model, tmp_path, callbacks=[cb], report_to=(), eval_dataset=None).train()
    assert torch.equal(cb.session.y, TRAIN.labels[: len(EVAL)]) and torch.equal(
        cb.session.x["input_ids"], TRAIN.ids[: len(EVAL)]
    )
    for (name, p), q in zip(runs["plain"].named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def _notices(caught, caplog, needle: str) -> list[str]:
    """What was said containing ``needle``: on the "probes" log (a framework-driven session) or as a warning."""
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    caplog.clear()
    return [m for m in messages if needle in m]


def test_without_probe_data_one_line_says_the_probe_batch_is_training_samples(tmp_path, caplog):
    # the Trainer has an eval set, but a callback is not handed it at train begin: the probe batch is the first
    # per_device_eval_batch_size training samples, and one line says so and how to pass the eval set
    import logging

    caplog.set_level(logging.INFO, logger="probes")
    cb = ProbesCallback(["alignment"], sinks=["memory"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(bert(), tmp_path / "a", callbacks=[cb], report_to=()).train()
    assert torch.equal(cb.session.x["input_ids"], TRAIN.ids[: len(EVAL)])
    said = _notices(caught, caplog, "probe batch is")
    assert len(said) == 1 and "\n" not in said[0]
    assert f"first {len(EVAL)} samples of the training set" in said[0] and "probe_data=eval_dataset" in said[0]
    given = ProbesCallback(["alignment"], probe_data=EVAL, sinks=["memory"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(bert(), tmp_path / "b", callbacks=[given], report_to=()).train()
    assert torch.equal(given.session.x["input_ids"], EVAL.ids) and not _notices(caught, caplog, "probe batch is")


def test_the_docs_say_what_the_default_probe_batch_is():
    root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
    with open(os.path.join(root, "docs", "integrations.md"), encoding="utf-8") as f:
        doc = f.read()
    hf = doc[doc.index("## Hugging Face Trainer") : doc.index("## DDP")]
    assert "first eval batch" not in hf
    assert "probe_data=eval_dataset" in hf and "training set" in hf
    import probes.integrations.transformers as module

    for text in (module.__doc__, ProbesCallback.__doc__):
        assert "probe_data=eval_dataset" in text and "training set" in text


def test_default_cadences_scale_to_max_steps_and_given_ones_stay(tmp_path, caplog):
    # max_steps = 20: alignment (default every 100) measures every ceil(20 / 10) = 2 steps; margin keeps every=5
    import logging

    from probes.schedules import every

    caplog.set_level(logging.INFO, logger="probes")
    # overhead=None: the overhead budget would widen a default cadence on a loaded machine, which is not tested here
    cb = ProbesCallback({"alignment": {}, "margin": {"every": 5}}, probe_data=EVAL, sinks=["memory"], overhead=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(bert(), tmp_path, callbacks=[cb], report_to=()).train()
    s = cb.session
    assert s.schedules["alignment"] == every(2) and s.schedules["margin"] == every(5)
    scalars = s.memory.scalars()
    assert [k for k, _ in scalars["alignment/output/cka"]] == list(range(0, STEPS + 1, 2))
    assert [k for k, _ in scalars["margin/n_delta"]] == list(range(0, STEPS + 1, 5))
    said = _notices(caught, caplog, "default cadence")
    assert len(said) == 1 and "\n" not in said[0] and f"{STEPS} steps" in said[0] and "every 2 steps" in said[0]


def test_an_iterable_training_set_without_probe_data_is_a_clear_error(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (TRAIN[i] for i in range(len(TRAIN)))

    cb = ProbesCallback(["alignment"], sinks=["memory"])
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
    )
    with warnings.catch_warnings(), pytest.raises(ValueError, match="probe_data"):
        warnings.simplefilter("ignore")
        Trainer(model=bert(), args=args, train_dataset=Stream(), callbacks=[cb]).train()


def test_default_tensorboard_dir(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from probes.integrations.transformers import _default_tensorboard_dir

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "env"))
    assert _default_tensorboard_dir(SimpleNamespace(output_dir=str(tmp_path))) == str(tmp_path / "env")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    got = _default_tensorboard_dir(SimpleNamespace(output_dir=str(tmp_path)))
    assert os.path.dirname(got) == str(tmp_path / "runs")  # output_dir/runs/<date>_<host>
    assert _default_tensorboard_dir(SimpleNamespace(output_dir="x", logging_dir="logs4")) == "logs4"  # 4.x


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def test_gpt2_mlp_activations_get_patterns_and_training_is_unchanged():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (6, SEQ), generator=g)
    y = torch.arange(6) % 2

    def train(attach: bool):
        model = gpt2().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        session = (
            probes.attach(
                model,
                {"patterns": {"every": 1}},
                probe_data=({"input_ids": ids}, y),
                sinks=["memory"],
                optimizer=opt,
                strict=True,
            )
            if attach
            else None
        )
        torch.manual_seed(7)  # dropout
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        if session is not None:
            session.close()
        return model, session

    plain, _ = train(False)
    probed, session = train(True)
    assert session.failures == {}
    scalars = session.memory.scalars()
    for i in range(2):
        points = scalars[f"patterns/transformer.h.{i}.mlp.act/active_fraction"]
        assert [s for s, _ in points] == [0, 1, 2, 3]
        assert all(0.0 < v < 1.0 for _, v in points)
    assert "patterns/distinct" in scalars
    for (name, p), q in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(p, q), name


def test_ntk_on_bert_with_an_attention_mask():
    """Tokenizers hand out an attention_mask; with all ones it changes nothing, so neither may the kernel."""
    ids, y = EVAL.ids[:8], EVAL.labels[:8]
    traces = []
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.func: no batching rule for CPU attention kernels
            session = probes.attach(bert(), {"ntk": {"image": False}}, probe_data=(inputs, y), sinks=["memory"])
            session.close()
        assert session.failures == {}, list(session.failures.values())[0][-800:]
        traces.append(session.memory.scalars()["ntk/trace"][0][1])
    assert traces[1] == pytest.approx(traces[0], rel=1e-6)  # a float32 model; vmap vs one sample at a time


def test_importing_probes_does_not_import_transformers():
    code = (
        "import sys, probes, probes.integrations; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
