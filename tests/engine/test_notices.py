"""Each notice is said once, on one channel, pointing at the user's code (issue 31 §1): a warning whose location
is the line of the user's call (never a line inside probes), or, when a framework drives the session, only a log
line on ``logging.getLogger("probes")``."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import probes
from probes.engine.failures import framework_driven
from probes.sinks import Sink


def _said(caught, caplog, kind: type[Warning] = Warning) -> tuple[list[warnings.WarningMessage], list[str]]:
    """The warnings of ``kind`` and the messages of the log records of the ``probes`` loggers."""
    return (
        [w for w in caught if issubclass(w.category, kind)],
        [r.getMessage() for r in caplog.records if r.name.split(".")[0] == "probes"],
    )


def _each_once(caught, caplog) -> Counter:
    notices, logged = _said(caught, caplog, probes.ProbesNoticeWarning)
    counts = Counter([str(w.message) for w in notices] + logged)
    twice = {m: n for m, n in counts.items() if n > 1}
    assert not twice, f"said more than once: {twice}"
    for w in notices:
        assert w.filename == __file__, f"{w.filename}:{w.lineno} for {str(w.message)[:80]!r}"
    return counts


def _gelu_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_auto_on_a_gelu_model_says_each_notice_once_at_the_users_line(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    x, y = _gelu_data()
    with caplog.at_level(logging.WARNING, logger="probes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = probes.attach(model, "auto", probe_data=(x, y), sinks=["memory"])
        model(x).sum().backward()
        session.step()
        session.close()
    counts = _each_once(caught, caplog)
    assert counts, "auto on a GELU model leaves probes out and says so"
    about_relu_zeros = [m for m in counts if "relu_zeros" in m]  # one thing: it is left out, and why
    assert len(about_relu_zeros) == 1 and about_relu_zeros[0].startswith("attach('auto') leaves out probe"), (
        about_relu_zeros
    )
    assert not caplog.records  # the warnings said it: no second channel


def test_auto_on_a_small_gpt2_says_each_notice_once(caplog) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)  # built from the config: nothing is downloaded
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="probes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = probes.attach(
            model, "auto", probe_data={"input_ids": ids, "labels": ids}, label_key="labels", sinks=["memory"]
        )
        session.close()
    counts = _each_once(caught, caplog)
    left_out = [m for m in counts if m.startswith("attach('auto') leaves out probe")]
    assert left_out
    assert all(len(m) < 300 for m in left_out), max(left_out, key=len)
    particles = [m for m in left_out if "'particles'" in m]
    assert particles and "not a two-layer net" in particles[0] and "transformer.h.0" not in particles[0]


def test_filterwarnings_silences_the_notices(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    x, y = _gelu_data()
    with caplog.at_level(logging.WARNING, logger="probes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=probes.ProbesNoticeWarning)
        probes.attach(model, "auto", probe_data=(x, y), sinks=["memory"]).close()
    assert not [w for w in caught if issubclass(w.category, probes.ProbesNoticeWarning)]
    assert not caplog.records  # nothing on another channel either


class Raises(probes.Probe):
    name = "raises"
    description = "a passive probe whose observe raises"
    passive = True
    every = 1

    def observe(self, site, pre, post):
        raise RuntimeError("observe broke")

    def flush(self, step):
        return []


def test_a_probe_failure_is_one_warning_at_the_users_forward(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, _ = _gelu_data()
    with caplog.at_level(logging.WARNING, logger="probes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = probes.attach(model, [Raises()], sinks=["memory"])
        model(x)  # the hook that raises runs inside torch's module call: the warning points here
        model(x)
        session.step()
        session.close()
    failed, logged = _said(caught, caplog, probes.ProbeFailedWarning)
    assert len(failed) == 1 and "observe broke" in str(failed[0].message)
    assert failed[0].filename == __file__
    assert not logged


class Broken(Sink):
    where = "broken://nowhere"

    def write(self, records, step):
        raise RuntimeError("the writer failed")


def test_a_sink_failure_is_one_warning(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, _ = _gelu_data()
    with caplog.at_level(logging.WARNING, logger="probes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = probes.attach(model, {"relu_zeros": {"every": 1}}, sinks=[Broken(), "memory"])
        for _ in range(3):
            model(x)
            session.step()
        session.close()
    failed, logged = _said(caught, caplog, probes.SinkFailedWarning)
    assert len(failed) == 1 and "the writer failed" in str(failed[0].message)
    assert failed[0].filename == __file__
    assert not [m for m in logged if "the writer failed" in m]


def test_under_a_framework_notices_are_log_lines_only(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    x, y = _gelu_data()
    with caplog.at_level(logging.WARNING, logger="probes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with framework_driven():
            session = probes.attach(model, "auto", probe_data=(x, y), sinks=["memory"])
        session.close()
    notices, logged = _said(caught, caplog, probes.ProbesNoticeWarning)
    assert not notices
    assert logged and len(logged) == len(set(logged))
    assert any("leaves out probe 'relu_zeros'" in m for m in logged)
