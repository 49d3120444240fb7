"""Token-level labels: which (sample, position) pairs are samples, against a naive loop over every position."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.functional.labels import IGNORE_INDEX, token_positions


def naive(labels, shift, positions, mask):
    P, T = labels.shape
    pairs = []
    for i in range(P):
        kept = [
            (i, t, int(labels[i, t + shift]))
            for t in range(T - shift)
            if int(labels[i, t + shift]) != IGNORE_INDEX
            and (mask is None or (mask[i, t] != 0 and mask[i, t + shift] != 0))
        ]
        pairs += kept[-1:] if positions == "last" else kept
    return pairs


@settings(max_examples=60, deadline=None)
@given(
    P=st.integers(1, 5),
    T=st.integers(2, 7),
    shift=st.integers(0, 1),
    seed=st.integers(0, 10**6),
    positions=st.sampled_from(["all", "last"]),
    masked=st.booleans(),
)
def test_token_positions_equal_a_naive_loop(P, T, shift, seed, positions, masked):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (P, T), generator=g)
    labels[torch.rand(P, T, generator=g) < 0.3] = IGNORE_INDEX
    mask = (torch.rand(P, T, generator=g) < 0.8).long() if masked else None
    expected = naive(labels, shift, positions, mask)
    if not expected:
        with pytest.raises(ValueError, match="no position"):
            token_positions(labels, shift, positions, mask)
        return
    index, y = token_positions(labels, shift, positions, mask)
    assert [(int(i), int(t), int(c)) for (i, t), c in zip(index, y)] == expected


def test_a_causal_lm_pairs_position_t_with_label_t_plus_1():
    ids = torch.tensor([[5, 6, 7, 8]])
    index, y = token_positions(ids, shift=1)
    assert index.tolist() == [[0, 0], [0, 1], [0, 2]] and y.tolist() == [6, 7, 8]
    index, y = token_positions(ids, shift=1, positions="last")
    assert index.tolist() == [[0, 2]] and y.tolist() == [8]


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        (torch.zeros(3, 4), {}, "integer"),
        (torch.zeros(3, dtype=torch.long), {}, r"\(P, T\)"),
        (torch.zeros(3, 4, dtype=torch.long), {"shift": 4}, "label_shift"),
        (torch.zeros(3, 4, dtype=torch.long), {"positions": "first"}, "positions"),
        (torch.full((3, 4), IGNORE_INDEX), {}, "no position"),
    ],
)
def test_bad_token_labels_say_what_is_wrong(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_positions(labels, **kwargs)


def test_ntk_with_token_labels_measures_the_kernel_and_leaves_its_label_alignment_out():
    transformers = pytest.importorskip("transformers")
    import warnings

    import probes
    from probes.engine.failures import ProbesNoticeWarning

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, activation_function="relu"
        )
    )
    ids = torch.randint(0, 50, (6, 8))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = probes.attach(
            model, {"ntk": {"every": 1, "image": False}}, probe_data=({"input_ids": ids}, ids), label_shift=1
        )
        s.step()
        s.close()
    assert s.failures == {}
    tags = s.memory.scalars()
    assert [st for st, _ in tags["ntk/trace"]] == [0, 1] and "ntk/alignment" not in tags
    said = [str(w.message) for w in rec if issubclass(w.category, ProbesNoticeWarning)]
    assert sum("token labels" in m for m in said) == 1
