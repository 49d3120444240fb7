"""Padding in the probe pass: ``patterns`` and ``alignment`` leave padded positions out when the probe inputs carry an
attention mask.

The references are hand counts from forward hooks of this test's own on a BERT sequence classifier with ReLU
feed-forward layers and padded probe batches: gate statistics over the real tokens only, and the centered alignment
(the explicit ``P x P`` formula in numpy) of features whose padded positions are set to zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probes

transformers = pytest.importorskip("transformers")

ACT = "intermediate.intermediate_act_fn"

from test_alignment import ref_alignment  # noqa: E402 - the explicit P x P reference
from test_padding import small_bert  # noqa: E402 - one BERT for the padding tests


def padded_batch(seed: int, n: int = 12, t: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    lengths[0] = 3  # at least one sequence with much padding
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def feed_forward_outputs(model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feed-forward ReLU outputs (P, T, units) and the pooler's tanh (P, d), from hooks of this test's own."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n, m in model.named_modules()
        if n.endswith(ACT) or n == "bert.pooler.activation"
    ]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    assert len(seen) == 3
    return seen


def hand_stats(out: torch.Tensor, mask: torch.Tensor | None) -> dict[str, float]:
    gates = out > 0
    real = gates[mask.bool()] if mask is not None and gates.ndim == 3 else gates.reshape(-1, gates.shape[-1])
    return {
        "active_fraction": float(real.double().mean()),
        "dead_on_probe_batch": int((~real.any(0)).sum()),
        "always_on_units": int(real.all(0).sum()),
    }


def test_patterns_count_only_real_tokens_equal_to_a_hand_count() -> None:
    model = small_bert()
    x = padded_batch(0)
    mask = x["attention_mask"]
    y = torch.arange(12) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    session = probes.attach(
        model, {"patterns": {"every": 1, "image": False}}, probe_data=(x, y), sinks=["memory"], strict=True
    )
    before = feed_forward_outputs(model, x)
    train = padded_batch(5)
    for _ in range(2):
        loss = model(**train, labels=torch.arange(12) % 3).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()
    after = feed_forward_outputs(model, x)
    session.close()
    got = {tag: series[-1][1] for tag, series in session.memory.scalars().items()}
    padded = 1 - float(mask.double().mean())
    assert padded > 0.2  # the check can fail: a padded gate counted would move the fractions
    for name, out in after.items():
        m = mask if out.ndim == 3 else None
        for key, value in hand_stats(out, m).items():
            assert got[f"patterns/{name}/{key}"] == pytest.approx(value, abs=1e-12), (name, key)
        g0, g1 = before[name] > 0, out > 0
        flipped = (g0 != g1)[mask.bool()] if m is not None else g0 != g1
        assert got[f"patterns/{name}/churn_from_init"] == pytest.approx(float(flipped.double().mean()), abs=1e-12)
    # counted over padded positions too, the active fraction would differ
    name = next(n for n in after if n.endswith(ACT))
    with_padding = float((after[name] > 0).double().mean())
    assert abs(with_padding - got[f"patterns/{name}/active_fraction"]) > 1e-3
    # distinct whole-network patterns over real tokens: a set of tuples built from the hooks
    keys = set()
    for i in range(12):
        real = mask[i].bool()
        parts = [
            tuple((after[n][i][real] > 0).reshape(-1).tolist())
            if after[n].ndim == 3
            else tuple((after[n][i] > 0).tolist())
            for n in sorted(after)
        ]
        keys.add(tuple(parts))
    assert got["patterns/distinct"] == len(keys)


def test_alignment_of_padded_sequences_leaves_the_padded_positions_out() -> None:
    model = small_bert()
    x = padded_batch(1)
    mask = x["attention_mask"]
    y = torch.arange(12) % 3
    session = probes.attach(model, ["alignment"], probe_data=(x, y), sinks=["memory"], strict=True)
    session.close()
    got = {tag: series[-1][1] for tag, series in session.memory.scalars().items()}
    Y = np.eye(3)[y.numpy()]
    outs = feed_forward_outputs(model, x)
    for name, out in outs.items():
        f = out * mask[..., None] if out.ndim == 3 else out
        assert got[f"alignment/{name}/cka"] == pytest.approx(ref_alignment(f.numpy(), Y), rel=1e-9), name
    # with mask=None the padded positions count, and the values differ (the check can fail)
    unmasked = probes.attach(model, ["alignment"], probe_data=(x, y), sinks=["memory"], strict=True, mask=None)
    unmasked.close()
    name = next(n for n in outs if n.endswith(ACT))
    other = unmasked.memory.scalars()[f"alignment/{name}/cka"][-1][1]
    assert other == pytest.approx(ref_alignment(outs[name].numpy(), Y), rel=1e-9)
    assert abs(other - got[f"alignment/{name}/cka"]) > 1e-4
