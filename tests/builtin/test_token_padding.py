"""Token labels with the pads left in (``labels = input_ids`` literally): the attention mask leaves them out.

A causal LM's probe batch padded on the right, with ``labels = input_ids`` (the pads keep the pad token, not -100),
must give ``alignment`` and ``margin`` what the same batch with -100 at the pads gives: with ``label_shift=1`` the
last real token of a padded sequence pairs with a pad, which is no sample. The reference here is computed by hand:
the kept ``(sequence, position)`` pairs by a loop over the attention mask, the features at those positions from this
test's own forward hooks, CKA as the explicit centered formula (``test_alignment.ref_alignment``) and the margin
forces by a loop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_alignment import ref_alignment

import probes
from probes.engine.failures import ProbesNoticeWarning

transformers = pytest.importorskip("transformers")

P, T, VOCAB, PAD = 12, 10, 40, 0


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        activation_function="relu",
        bos_token_id=PAD,
        eos_token_id=PAD,
        pad_token_id=PAD,
    )
    return transformers.GPT2LMHeadModel(config)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(4, T + 1, (P,), generator=g)
    lengths[0] = T  # one sequence without padding
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (P, T), generator=g) * mask + PAD * (1 - mask)
    return ids, mask


def measure(model, x, y, notices: list | None = None) -> dict[str, float]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = probes.attach(
            model, ["alignment", "margin"], probe_data=(x, y), sinks=["memory"], strict=True, label_shift=1
        )
        session.close()
    if notices is not None:
        notices += [str(w.message) for w in caught if issubclass(w.category, ProbesNoticeWarning)]
    return {tag: series[-1][1] for tag, series in session.memory.scalars().items()}


def hand_pairs(labels: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(sequence, position, label)``: position t pairs with the label at t + 1, both real tokens."""
    return [
        (i, t, int(labels[i, t + 1]))
        for i in range(P)
        for t in range(T - 1)
        if int(mask[i, t]) == 1 and int(mask[i, t + 1]) == 1
    ]


def features(model, x) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n, m in model.named_modules()
        if n.endswith("mlp.act")
    ]
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**x).logits
    finally:
        model.train()
        for h in handles:
            h.remove()
    return seen, logits


def test_literal_labels_equal_input_ids_leave_the_padded_pairs_out() -> None:
    model = tiny_gpt2()
    ids, mask = padded_batch()
    x = {"input_ids": ids, "attention_mask": mask}
    padded = int((mask.sum(1) < T).sum())
    assert padded >= 6
    literal = ids.clone()  # the pads keep the pad token: nothing set to -100
    ignored = ids.masked_fill(mask == 0, -100)
    notices: list[str] = []
    want = measure(model, x, ignored, notices)
    assert not [n for n in notices if "pair with padding" in n]  # -100 at the pads: nothing to say
    got = measure(model, x, literal, notices)
    assert set(got) == set(want)
    for tag in got:
        assert got[tag] == pytest.approx(want[tag], rel=1e-12, abs=1e-12), tag
    # said once per probe, naming the padding
    assert sum("pair with padding" in n and n.startswith("alignment:") for n in notices) == 1
    assert sum("pair with padding" in n and n.startswith("margin:") for n in notices) == 1

    # the reference, by hand: the kept pairs, their features, CKA and the forces
    pairs = hand_pairs(ids, mask)
    assert len(pairs) == int(mask.sum()) - P  # one position less per sequence: the last real one has no next token
    acts, logits = features(model, x)
    rows = ([i for i, _, _ in pairs], [t for _, t, _ in pairs])
    Y = np.eye(VOCAB)[[lab for _, _, lab in pairs]]
    assert len(acts) == 2
    for name, a in acts.items():
        assert got[f"alignment/{name}/cka"] == pytest.approx(ref_alignment(a[rows].double().numpy(), Y), rel=1e-9)
    assert got["alignment/output/cka"] == pytest.approx(ref_alignment(logits[rows].double().numpy(), Y), rel=1e-9)
    delta = []
    for i, t, lab in pairs:
        f = logits[i, t].double().tolist()
        delta.append(0.5 - (f[lab] - max(v for c, v in enumerate(f) if c != lab)))
    delta = np.array(delta)
    assert got["margin/n_delta"] == (delta > 0).sum()
    assert got["margin/n_delta_fraction"] == pytest.approx((delta > 0).mean(), rel=1e-12)
    assert got["margin/loss"] == pytest.approx(0.5 * np.mean(np.maximum(delta, 0) ** 2), rel=1e-9)
