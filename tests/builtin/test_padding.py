"""Padded positions are left out: a forward's attention mask (a keyword argument) reaches the capture, and
``relu_zeros`` counts only real tokens, equal to a hand count; the model itself carries no hook."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import probes

transformers = pytest.importorskip("transformers")


def small_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_act="relu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def padded_batch(seed: int, n: int = 6, t: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def hand_count(model: nn.Module, batches: list[dict[str, torch.Tensor]], padding: bool = False) -> tuple[int, int]:
    """Zeros and outputs of the feed-forward ReLU over real tokens (and padded ones with ``padding``), from hooks of
    this test's own."""
    zeros = outputs = 0
    current: dict[str, torch.Tensor] = {}

    def hook(module, args, out):
        nonlocal zeros, outputs
        real = out.flatten(0, 1) if padding else out[current["mask"].bool()]  # (tokens, units)
        zeros += int((real == 0).sum())
        outputs += real.numel()

    acts = [m for n, m in model.named_modules() if n.endswith("intermediate.intermediate_act_fn")]
    assert len(acts) == 2 and all(isinstance(a, nn.ReLU) for a in acts)
    handles = [a.register_forward_hook(hook) for a in acts]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"]
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return zeros, outputs


def feed_forward_zeros(session) -> float:
    mem = session.memory.scalars()
    return sum(
        pts[-1][1] for tag, pts in mem.items() if tag.startswith("relu_zeros/bert.encoder") and tag.endswith("/zeros")
    )


def test_relu_zeros_counts_only_real_tokens_of_a_padded_bert_batch():
    model = small_bert()
    model.train()
    batches = [padded_batch(s) for s in range(3)]
    assert 0.2 < 1 - float(torch.cat([b["attention_mask"] for b in batches]).float().mean()) < 0.6  # real padding
    s = probes.attach(model, {"relu_zeros": {"every": 3}})
    for b in batches:
        model(**b)  # keyword arguments, as the Trainer calls it
        s.step()
    s.close()
    zeros, outputs = hand_count(model, batches)
    got = feed_forward_zeros(s)
    assert got == zeros
    # the fraction is over real tokens too (the pooler's Tanh is not ReLU-family: only the feed-forward ReLUs count)
    total = s.memory.scalars()["relu_zeros/total/fraction"][-1][1]
    assert total == pytest.approx(zeros / outputs, rel=1e-12)


def test_mask_none_counts_padding_too_and_a_bad_mask_option_is_refused():
    model = small_bert()
    model.train()
    b = padded_batch(7)
    s = probes.attach(model, {"relu_zeros": {"every": 1}}, mask=None)
    model(**b)
    s.step()
    s.close()
    got = feed_forward_zeros(s)
    assert got == hand_count(model, [b], padding=True)[0] > hand_count(model, [b])[0]  # padded positions too
    with pytest.raises(TypeError, match="attach\\(mask=...\\)"):
        probes.attach(model, ["relu_zeros"], mask=3)


def test_the_probe_batch_mask_reaches_active_probes():
    model = small_bert()
    b = padded_batch(3)
    seen = {}

    class Mask(probes.Probe):
        name = "maskseen"
        every = 1

        def measure(self, batch):
            seen["mask"] = batch.mask
            return []

    s = probes.attach(model, [Mask()], probe_data=b)
    s.close()
    assert torch.equal(seen["mask"], b["attention_mask"].bool())


def test_a_copied_or_pickled_model_carries_no_working_hook():
    model = small_bert()
    model.train()
    s = probes.attach(model, {"relu_zeros": {"every": 1}})
    clone = copy.deepcopy(model)  # EMA / SWA copies while attached
    buffer = io.BytesIO()
    pickle.dump(model, buffer)
    b = padded_batch(1)
    clone(**b)  # not observed
    s.step()
    assert not s.memory.scalars()
    model(**b)
    s.step()
    s.close()
    assert s.memory.scalars()["relu_zeros/total/fraction"]
    assert not model._forward_pre_hooks and not model._forward_hooks  # the model itself carries no hook
