"""Token labels ``(P, T)`` in ``alignment`` and ``margin``: each kept position is a sample.

References built here without the probes' code: the kept ``(sample, position)`` pairs by a Python loop over the labels
(``-100`` left out, the label ``shift`` positions ahead, padded positions left out), the features at those positions
from forward hooks of the test's own, and the centered alignment as the explicit ``P x P`` formula (Cortes et al.
2012) in numpy; the margin forces by a loop over the kept positions. Models: a small GPT-2 (``labels = input_ids``,
``label_shift=1``) and a BERT token classifier with ``-100`` labels and padding; then the Trainer end to end.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_alignment import ref_alignment
from torch import nn

import probes
from probes.builtin.alignment import Alignment
from probes.builtin.margin import Margin
from probes.engine.failures import ProbesNoticeWarning
from probes.functional.labels import label_matrix

transformers = pytest.importorskip("transformers")


def kept_pairs(
    labels: torch.Tensor, shift: int, positions: str = "all", mask: torch.Tensor | None = None
) -> list[tuple[int, int, int]]:
    """``(sample, position, label)`` by a loop: the label ``shift`` ahead, not -100, the position and the label's
    position real tokens."""
    out = []
    P, T = labels.shape
    for i in range(P):
        row = []
        for t in range(T - shift):
            lab = int(labels[i, t + shift])
            if lab != -100 and (mask is None or (int(mask[i, t]) != 0 and int(mask[i, t + shift]) != 0)):
                row.append((i, t, lab))
        out += row[-1:] if positions == "last" else row
    return out


def hooked(model: nn.Module, suffix: str, inputs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The outputs of the modules whose names end with ``suffix``, and the logits, from hooks of this test's own."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n, m in model.named_modules()
        if n.endswith(suffix)
    ]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    assert seen
    return seen, logits


def ref_forces(logits: torch.Tensor, pairs, m: float) -> np.ndarray:
    out = []
    for i, t, lab in pairs:
        f = logits[i, t].double().tolist()
        others = max(v for c, v in enumerate(f) if c != lab)
        out.append(m - (f[lab] - others))
    return np.array(out)


def small_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function="relu"
    )
    return transformers.GPT2LMHeadModel(config)


def small_bert_tokens() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_act="relu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=4,
    )
    return transformers.BertForTokenClassification(config)


def measured(model, x, y, spec, **attach) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbesNoticeWarning)
        session = probes.attach(model, spec, probe_data=(x, y), sinks=["memory"], strict=True, **attach)
    session.close()
    return {tag: series[-1][1] for tag, series in session.memory.scalars().items()}


@pytest.mark.parametrize("positions", ["all", "last"])
def test_gpt2_causal_lm_against_features_at_the_kept_positions(positions) -> None:
    model = small_gpt2()
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    got = measured(
        model,
        {"input_ids": ids},
        ids,
        {"alignment": {"positions": positions}, "margin": {"positions": positions}},
        label_shift=1,
    )
    pairs = kept_pairs(ids, 1, positions)
    assert len(pairs) == (8 * 15 if positions == "all" else 8)
    acts, logits = hooked(model, "mlp.act", {"input_ids": ids})
    Y = np.eye(100)[[lab for _, _, lab in pairs]]
    rows = ([i for i, _, _ in pairs], [t for _, t, _ in pairs])
    for name, a in acts.items():
        assert got[f"alignment/{name}/cka"] == pytest.approx(ref_alignment(a[rows].numpy(), Y), rel=1e-9)
    assert got["alignment/output/cka"] == pytest.approx(ref_alignment(logits[rows].numpy(), Y), rel=1e-9)
    delta = ref_forces(logits, pairs, 0.5)
    assert got["margin/n_delta"] == (delta > 0).sum()
    assert got["margin/n_delta_fraction"] == pytest.approx((delta > 0).mean(), rel=1e-12)
    assert got["margin/loss"] == pytest.approx(0.5 * np.mean(np.maximum(delta, 0) ** 2), rel=1e-9)
    # the shift matters: pairing each position with its own token gives other values (the check can fail)
    unshifted = measured(model, {"input_ids": ids}, ids, {"alignment": {"positions": positions}}, label_shift=0)
    assert unshifted["alignment/output/cka"] != pytest.approx(got["alignment/output/cka"], rel=1e-3)


def test_bert_token_classification_with_ignored_labels_and_padding() -> None:
    model = small_bert_tokens()
    g = torch.Generator().manual_seed(3)
    P, T = 10, 12
    ids = torch.randint(1, 50, (P, T), generator=g)
    lengths = torch.randint(4, T + 1, (P,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 4, (P, T), generator=g)
    labels[:, 0] = -100  # [CLS]
    labels[torch.rand(P, T, generator=g) < 0.2] = -100  # word pieces without a label
    labels[mask == 0] = 0  # padded positions carry a label here: the mask alone must leave them out
    x = {"input_ids": ids * mask, "attention_mask": mask}
    got = measured(model, x, labels, {"alignment": {}, "margin": {}})
    pairs = kept_pairs(labels, 0, "all", mask)
    assert len(pairs) < int(mask.sum())
    acts, logits = hooked(model, "intermediate.intermediate_act_fn", x)
    Y = np.eye(4)[[lab for _, _, lab in pairs]]
    rows = ([i for i, _, _ in pairs], [t for _, t, _ in pairs])
    assert {t for t in got if t.startswith("alignment/")} == {f"alignment/{n}/cka" for n in acts} | {
        "alignment/output/cka"
    }
    for name, a in acts.items():
        assert got[f"alignment/{name}/cka"] == pytest.approx(ref_alignment(a[rows].numpy(), Y), rel=1e-9)
    assert got["alignment/output/cka"] == pytest.approx(ref_alignment(logits[rows].numpy(), Y), rel=1e-9)
    delta = ref_forces(logits, pairs, 0.5)
    assert got["margin/n_delta"] == (delta > 0).sum()
    assert got["margin/loss"] == pytest.approx(0.5 * np.mean(np.maximum(delta, 0) ** 2), rel=1e-9)
    # without the mask the padded positions (labelled 0 here) count, and the values change
    unmasked = measured(model, x, labels, {"alignment": {}}, mask=None)
    assert unmasked["alignment/output/cka"] != pytest.approx(got["alignment/output/cka"], rel=1e-4)


def test_what_cannot_work_names_the_option() -> None:
    model = small_bert_tokens()
    ids = torch.randint(1, 50, (6, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (6, 8), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids}
    # the output picked as one vector per sequence: no value per position
    with pytest.raises(ValueError, match="output=False"):
        probes.attach(model, ["alignment"], probe_data=(x, labels), output=lambda o: o.logits[:, 0])
    with pytest.raises(ValueError, match=r"attach\(output=\.\.\.\)"):
        probes.attach(model, ["margin"], probe_data=(x, labels), output=lambda o: o.logits[:, 0])
    # every label ignored after the shift
    only_first = torch.full_like(labels, -100)
    only_first[:, 0] = 1
    with pytest.raises(ValueError, match="label_shift"):
        probes.attach(model, ["margin"], probe_data=(x, only_first), label_shift=1)
    # a probe that needs one label per sample says which probes take token labels
    with pytest.raises(ValueError, match=r"ntk: integer labels must be one class index.*alignment and margin only"):
        label_matrix(labels, who="ntk")
    with pytest.raises(ValueError, match="positions"):
        Alignment(positions="first")
    with pytest.raises(TypeError, match="positions"):
        Margin(positions=1)


class TwoHeads(nn.Module):
    """Token features (P, T, d) and a pooled site (P, d): the pooled one has no value per position."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.tok = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.pool = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(self.emb(ids))
        return self.head(h) + self.pool(h.mean(1))[:, None, :5].mean() * 0


def test_a_site_without_positions_is_left_out_with_a_notice_or_an_error_when_chosen() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    ids = torch.randint(0, 20, (12, 6))
    labels = torch.randint(0, 5, (12, 6))
    with pytest.warns(ProbesNoticeWarning, match=r"site 'pool\.1'.*sites=\[\.\.\.\]"):
        session = probes.attach(model, ["alignment"], probe_data=(ids, labels), sinks=["memory"], strict=True)
    session.close()
    assert set(session.memory.scalars()) == {"alignment/tok.1/cka", "alignment/output/cka"}
    with pytest.raises(ValueError, match=r"site 'pool\.1'.*sites=\[\.\.\.\]"):
        probes.attach(model, {"alignment": {"sites": ["pool.1", "tok.1"]}}, probe_data=(ids, labels))


def test_trainer_runs_a_causal_lm_with_every_probe_that_applies(tmp_path) -> None:
    from probes.integrations.transformers import ProbesCallback

    class Texts(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int) -> None:
            self.ids = torch.randint(0, 100, (n, 16), generator=torch.Generator().manual_seed(seed))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        save_strategy="no",
    )
    spec = {n: {"every": 2} for n in ("relu_zeros", "patterns", "alignment", "margin")}
    callback = ProbesCallback(spec, probe_data=Texts(8, 1), sinks=["memory"])
    trainer = transformers.Trainer(model=small_gpt2(), args=args, train_dataset=Texts(32, 0), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbesNoticeWarning)
        trainer.train()
    session = callback.session
    assert session.failures == {}
    tags = set(session.memory.scalars())
    assert {"alignment/output/cka", "margin/n_delta_fraction", "patterns/distinct"} <= tags
    assert any(t.startswith("relu_zeros/") for t in tags)
    steps = [s for s, _ in session.memory.scalars()["alignment/output/cka"]]
    assert steps[0] == 0 and steps[-1] == 4
