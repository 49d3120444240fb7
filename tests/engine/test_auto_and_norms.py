"""``attach(model, "auto")`` picks the probes that apply and says why it leaves the others out; batch-norm models
are measured with batch statistics on request, and a notice says when eval mode measures another model."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import probes
from probes.engine.failures import ProbesNoticeWarning


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def attach_quietly(*args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        session = probes.attach(*args, **kwargs)
    return session, [str(w.message) for w in rec if issubclass(w.category, ProbesNoticeWarning)]


def test_auto_on_a_cnn_leaves_out_what_cannot_apply_and_says_why_in_one_line_each():
    model = conv_net()
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 4
    explicit = {p.name for p in probes.available()}
    s, notices = attach_quietly(model, "auto", probe_data=(x, y))
    left_out = {
        re.match(r"attach\('auto'\) leaves out probe '(\w+)'", m).group(1)
        for m in notices
        if m.startswith("attach('auto') leaves out")
    }
    assert "particles" in left_out and "pathgram" in left_out  # two-layer and fully connected probes
    assert set(s.probes) == explicit - left_out
    assert {"relu_zeros", "patterns", "alignment", "margin"} <= set(s.probes)
    assert all("\n" not in m for m in notices)
    model.train()
    for _ in range(3):
        model(torch.randn(12, 3, 8, 8)).sum().backward()
        s.step()
    s.close()
    assert s.failures == {}
    with pytest.raises((ValueError, TypeError), match="particles"):  # an explicit name still raises
        probes.attach(conv_net(), ["particles"], probe_data=(x, y))


def test_auto_without_a_probe_batch_keeps_the_passive_probes_only():
    s, notices = attach_quietly(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "auto")
    assert set(s.probes) == {p.name for p in probes.available() if p.cls.passive or not p.cls.needs.probe_data}
    assert any("pass probe_data" in m for m in notices)
    s.close()


def test_auto_leaves_out_relu_zeros_on_a_model_without_relus():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    s, notices = attach_quietly(model, "auto", probe_data=(torch.randn(6, 4), torch.tensor([0, 1] * 3)))
    assert "relu_zeros" not in s.probes
    assert any("relu_zeros" in m and "tanh" in m for m in notices)
    s.close()


def bn_model(matched: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A model whose running statistics describe other data than the probe batch (far away: the predicted class of
    half the probe batch changes with batch statistics), or, ``matched``, the probe batch's own distribution."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    model.train()
    with torch.no_grad():
        for _ in range(200 if matched else 20):
            model(torch.randn(40, 6) * 5 + 20 if matched else torch.randn(32, 6) * 0.1)
    return model, torch.randn(40, 6) * 5 + 20


@pytest.mark.parametrize("matched", [False, True])
def test_eval_mode_far_from_batch_statistics_is_said_once(matched):
    model, x = bn_model(matched)
    s, notices = attach_quietly(model, {"patterns": {"every": 1}}, probe_data=x)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s.step(3)
    s.close()
    said = notices + [str(w.message) for w in rec]
    assert sum("norm_stats='batch'" in m for m in said) == (0 if matched else 1)


def test_norm_stats_batch_measures_with_batch_statistics_and_leaves_the_running_ones_untouched():
    model, x = bn_model()
    bn = model[1]
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    before = tuple(t.clone() for t in buffers)
    seen = {}

    class Output(probes.Probe):
        name = "seen"
        every = 1

        def measure(self, batch):
            seen["output"] = batch.output
            seen["training"] = model.training
            return []

    s, notices = attach_quietly(model, [Output()], probe_data=x, norm_stats="batch", probe_batch_size=None)
    s.close()
    assert not any("norm_stats" in m for m in notices)
    now = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    assert all(t is b for t, b in zip(now, buffers)), "the module's running buffers were not put back"
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    # the reference: a copy in train mode normalises by the batch (its own running statistics then move)
    import copy

    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = ref(x)
    assert torch.allclose(seen["output"], expected, rtol=1e-6, atol=1e-6)
    assert seen["training"] is False  # eval mode all the same: dropout and the like stay off
    with pytest.raises(ValueError, match="norm_stats"):
        probes.attach(model, ["patterns"], probe_data=x, norm_stats="train")


def test_a_fresh_batch_norm_model_gets_no_notice_before_its_statistics_are_estimated():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(40, 6) * 5 + 20  # far from the default running statistics (mean 0, variance 1)
    s, notices = attach_quietly(model, {"patterns": {"every": 1}}, probe_data=x)
    s.close()
    assert not any("norm_stats" in m for m in notices)
