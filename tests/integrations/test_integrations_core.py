"""The callback core both framework callbacks run on, driven without a framework."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from probes import plugins
from probes.integrations.core import CallbackCore, as_probe_data, first_batch, first_samples


def rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def same_states(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_drawing_the_probe_batch_moves_no_random_stream_and_no_training_order():
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20) % 3

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)

    torch.manual_seed(0)
    plain = [b[1].tolist() for b in loader()]
    torch.manual_seed(0)
    before = rng_states()
    drawn = first_batch(loader())
    samples = first_samples(TensorDataset(x, y), None, 6)
    assert same_states(before, rng_states())
    assert [b[1].tolist() for b in loader()] == plain  # the training order is what it would have been
    assert drawn[0].shape == (4, 2)
    assert torch.equal(samples[0], x[:6]) and torch.equal(samples[1], y[:6])  # index order, collated
    assert first_samples(TensorDataset(x, y), None, 100)[0].shape == (20, 2)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="iterable"):
        first_samples(Stream(), None, 4)
    assert first_batch(None) is None and first_batch([]) is None
    assert torch.equal(first_batch({"val": [(x, y)]})[0], x)


def test_batches_become_probe_data():
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    assert as_probe_data(x, "cb") == (x, None)
    data, key = as_probe_data((x, y, "extra"), "cb")
    assert data[0] is x and data[1] is y and key is None
    data, key = as_probe_data({"x": x, "y": y}, "cb")
    assert data == (x, y) and key is None
    data, key = as_probe_data({"input_ids": x, "labels": y}, "cb")
    assert set(data) == {"input_ids", "labels"} and key == "labels"
    data, key = as_probe_data({"input_ids": x}, "cb")
    assert set(data) == {"input_ids"} and key is None
    with pytest.raises(ValueError, match="probe_data"):
        as_probe_data("text", "cb")


def test_the_spec_is_checked_when_the_callback_is_made():
    with pytest.raises(TypeError, match="optimizer"):
        CallbackCore("cb", ["relu_zeros"], {"optimizer": object()})
    with pytest.raises(plugins.UnknownProbeError, match="relu_zeros"):
        CallbackCore("cb", ["relu_zero"], {})
    with pytest.raises(TypeError, match="alignment"):
        CallbackCore("cb", {"alignment": {"colour": "red"}}, {})
    core = CallbackCore("cb", {"relu_zeros": {"every": 2}, "alignment": {"every": 3}}, {})
    assert core.names == ["relu_zeros", "alignment"] and core.passive == {"relu_zeros"} and core.needs_probe_batch
    assert not CallbackCore("cb", ["relu_zeros"], {}).needs_probe_batch


def test_start_advance_close_and_resume_follow_the_trainers_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    xp, yp = torch.randn(12, 4), torch.arange(12) % 3
    spec = {"relu_zeros": {"every": 2}, "alignment": {"every": 2}}
    core = CallbackCore("cb", spec, {"sinks": ["memory"]})
    with pytest.raises(ValueError, match="probe_data"):
        core.start(model, None, step=0)
    assert core.session is None
    core.start(model, (xp, yp), step=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 4):
        F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
        opt.step()
        opt.zero_grad()
        core.advance(step)
        core.advance(step - 1)  # behind the session: nothing happens
    state = core.state_dict()
    assert state["step"] == 3
    core.close()
    core.close()  # harmless twice
    first = core.session
    assert first.closed and core.state_dict()["step"] == 3
    assert [s for s, _ in first.memory.scalars()["alignment/output/cka"]] == [0, 2, 3]

    # resumed: the state given before start is loaded; no second step-0 point
    again = CallbackCore("cb", spec, {"sinks": ["memory"]})
    again.load_state_dict(state)
    again.load_state_dict({})  # ignored
    assert again.pending_state["step"] == 3
    again.start(model, (xp, yp), step=3)
    assert again.session.global_step == 3 and again.pending_state is None
    again.advance(4)
    again.close()
    assert [s for s, _ in again.session.memory.scalars()["alignment/output/cka"]] == [4]

    # a trainer ahead of the saved state (or no state at all): the probe step continues from the trainer's
    late = CallbackCore("cb", ["relu_zeros"], {"sinks": ["memory"]})
    late.start(model, None, step=7)
    assert late.session.global_step == 7
    late.close()


def _mlp_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, (torch.randn(12, 4), torch.arange(12) % 3)


@pytest.mark.parametrize(
    "total, want", [(72, 8), (20, 2), (5, 1), (10_000, None), (None, None), (float("inf"), None), (0, None)]
)
def test_default_cadences_scale_to_the_length_of_the_run_and_given_ones_stay(total, want, caplog):
    import logging
    import warnings

    from probes.schedules import every

    model, data = _mlp_and_batch()
    core = CallbackCore("Cb", {"alignment": {}, "margin": {}, "relu_zeros": {}, "patterns": {"every": 50}}, {})
    caplog.set_level(logging.INFO, logger="probes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = core.start(model, data, step=0, sinks=["memory"], total_steps=total)
    defaults = {"alignment": 100, "margin": 10, "relu_zeros": 100}
    for name, k in defaults.items():  # a long run, or one of unknown length, keeps the defaults
        assert session.schedules[name] == every(min(k, want) if want else k), name
    assert session.schedules["patterns"] == every(50)  # given: kept
    # said once, in one line, on the channel of a framework-driven session (the "probes" log) or as a warning
    said = [
        m for m in [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] if "default cadence" in m
    ]
    assert len(said) == (1 if want else 0)
    if want:
        assert "\n" not in said[0] and (f"every {want} steps" if want > 1 else "every step") in said[0]
    core.close()


def test_a_72_step_run_gets_about_ten_points_per_probe_at_its_default_cadence():
    model, (x, y) = _mlp_and_batch()
    core = CallbackCore("Cb", ["alignment", "margin", "relu_zeros"], {"overhead": None})
    session = core.start(model, (x, y), step=0, sinks=["memory"], total_steps=72)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 73):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        core.advance(step)
    core.close()
    scalars = session.memory.scalars()
    for tag in ("alignment/output/cka", "margin/n_delta", "relu_zeros/total/fraction"):
        assert 9 <= len(scalars[tag]) <= 12, (tag, [s for s, _ in scalars[tag]])
