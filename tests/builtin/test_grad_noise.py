"""``grad_noise``: the noise scale, the GSNR and the gradient norm equal a naive loop over samples with
``torch.autograd.grad``, for every loss, both routes, chunked, on small nets and on models from configs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes
from probes.autodiff.grad_noise import sample_gradient_sums, share
from probes.builtin.grad_noise import GradNoise, module_parameters
from probes.functional.grad_noise import GradientSums, gsnr, noise_scale, variances
from probes.testing import check_training_unchanged, probe_batch


def naive(model: nn.Module, losses) -> dict[str, float]:
    """The reference: one ``torch.autograd.grad`` per sample, a dense ``n x parameters`` matrix, ``torch.var``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss(), [p for _, p in named], allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, (_, p) in zip(gs, named)])
        )
    G = torch.stack(rows).double()
    g, var = G.mean(0), G.var(0, unbiased=True)
    eps = torch.finfo(named[0][1].dtype).eps
    floor = (64 * eps) ** 2 * G.square().mean()  # rounding, not noise (the probe's documented floor)
    kept = var > floor
    out = {
        "grad_noise/noise_scale": float(var.sum() / g.square().sum()),
        "grad_noise/gsnr": float((g[kept].square() / var[kept]).mean()),
        "grad_noise/grad_norm": float(g.norm()),
        "norms": G.norm(dim=1),
    }
    at = 0
    for n, p in named:
        sl = slice(at, at + p.numel())
        at += p.numel()
        path = n.rsplit(".", 1)[0] if "." in n else "root"
        out.setdefault(("mod", path), []).append(sl)
    for key in [k for k in out if isinstance(k, tuple)]:
        idx = torch.cat([torch.arange(G.shape[1])[s] for s in out.pop(key)])
        v, m = var[idx], g[idx]
        out[f"grad_noise/{key[1]}/gsnr"] = float((m[v > floor].square() / v[v > floor]).mean())
    return out


def measured(model, x, y, probe_batch_size=None, **options) -> dict[str, object]:
    probe = GradNoise(**options)
    batch = probe_batch(model, x, y, probe_batch_size=probe_batch_size)
    probe.check(batch)
    out = {}
    for r in probe.measure(batch):
        out[r.tag] = r if r.tag.endswith("sample_grad_norm") else float(r.value)
    return out


def assert_match(got, ref, rel=1e-9):
    for tag, value in ref.items():
        if tag == "norms":
            hist = got["grad_noise/sample_grad_norm"]
            assert float(hist.num) == value.numel()
            assert float(hist.sum) == pytest.approx(float(value.sum()), rel=rel)
            continue
        assert got[tag] == pytest.approx(value, rel=rel), tag


def mlp(widths=(4, 7, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("route", ["vmap", "loop"])
@pytest.mark.parametrize("chunk, probe_batch_size", [(None, None), (3, None), (None, 4)])
def test_cross_entropy_equals_the_naive_loop(route, chunk, probe_batch_size):
    model = mlp()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    got = measured(model, x, y, route=route, chunk_size=chunk, probe_batch_size=probe_batch_size)
    ref = naive(model, [lambda i=i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(10)])
    assert_match(got, ref)
    assert {"grad_noise/0/gsnr", "grad_noise/2/gsnr"} <= set(got)


def test_mse_and_binary_and_a_callable_loss_equal_the_naive_loop():
    model = mlp((3, 6, 2))
    x = torch.randn(9, 3, dtype=torch.float64)
    t = torch.randn(9, 2, dtype=torch.float64)
    ref = naive(model, [lambda i=i: (model(x[i : i + 1]) - t[i : i + 1]).square().mean() for i in range(9)])
    assert_match(measured(model, x, t), ref)
    one = mlp((3, 5, 1), seed=1)
    yb = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    ref = naive(
        one,
        [
            lambda i=i: F.binary_cross_entropy_with_logits(one(x[i : i + 1])[:, 0], yb[i : i + 1].double())
            for i in range(9)
        ],
    )
    assert_match(measured(one, x, yb), ref)
    huber = lambda f, y: F.smooth_l1_loss(f, y)  # noqa: E731
    ref = naive(model, [lambda i=i: huber(model(x[i : i + 1]), t[i : i + 1]) for i in range(9)])
    assert_match(measured(model, x, t, loss=huber), ref)


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    n=st.integers(2, 9),
    seed=st.integers(0, 10_000),
    chunk=st.one_of(st.none(), st.integers(1, 4)),
)
def test_random_mlps_equal_the_naive_loop(widths, n, seed, chunk):
    widths = [3, *widths, 2]
    model = mlp(tuple(widths), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    ref = naive(model, [lambda i=i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(n)])
    got = measured(model, x, y, chunk_size=chunk, route="vmap")
    for tag in ("grad_noise/noise_scale", "grad_noise/grad_norm"):
        assert got[tag] == pytest.approx(ref[tag], rel=1e-8)
    if "grad_noise/gsnr" in got:
        assert got["grad_noise/gsnr"] == pytest.approx(ref["grad_noise/gsnr"], rel=1e-6)


def test_sums_hold_no_sample_by_parameter_matrix_and_merge_over_chunks():
    model = mlp()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))

    def loss(f, t, w):
        return F.cross_entropy(f, t, reduction="sum")

    whole = sample_gradient_sums(model, (x,), y, torch.zeros(8), loss, chunk=8)
    parts = sample_gradient_sums(model, (x,), y, torch.zeros(8), loss, chunk=3)
    assert whole.n == parts.n == 8
    for k in whole.total:
        assert whole.total[k].shape == dict(model.named_parameters())[k].shape  # sums, not per-sample rows
        torch.testing.assert_close(whole.squares[k], parts.squares[k], rtol=1e-12, atol=1e-15)
    assert float(noise_scale(whole)) == pytest.approx(float(noise_scale(parts)), rel=1e-12)


def test_variances_are_unbiased_and_zero_variance_coordinates_are_left_out():
    g = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    sums = GradientSums()
    sums.add({"w": g})
    torch.testing.assert_close(variances(sums.total["w"], sums.squares["w"], 3), g.var(0, unbiased=True))
    assert float(gsnr(sums)) == pytest.approx(2.0**2 / 1.0)  # only the first coordinate varies
    empty = GradientSums()
    empty.add({"w": torch.ones(4, 2, dtype=torch.float64)})
    assert gsnr(empty) is None
    with pytest.raises(ValueError, match="at least 2"):
        variances(sums.total["w"], sums.squares["w"], 1)


def test_shares_cover_the_batch_once():
    for P in (1, 5, 8, 9):
        for world in (1, 2, 3):
            covered = [i for r in range(world) for i in range(P)[share(P, r, world)]]
            assert covered == list(range(P))


def test_module_paths_name_the_owners_of_parameters():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    model[0].bias.requires_grad_(False)
    got = module_parameters(model, [n for n, p in model.named_parameters() if p.requires_grad])
    assert got == {"0": ["0.weight"], "1.1": ["1.1.weight", "1.1.bias"]}


def test_session_logs_every_tag_and_training_is_unchanged():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    session = probes.attach(
        mlp().float(), {"grad_noise": {"every": 2}}, probe_data=(x, y), sinks=["memory"], strict=True
    )
    session.close()
    tags = session.memory.tags()
    assert {
        "grad_noise/noise_scale",
        "grad_noise/gsnr",
        "grad_noise/grad_norm",
        "grad_noise/0/gsnr",
        "grad_noise/2/gsnr",
        "grad_noise/sample_grad_norm",
    } <= tags
    check_training_unchanged(GradNoise, {"every": 2})


def test_bad_labels_and_batch_statistics_raise_at_attach():
    model = mlp().float()
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="needs labels"):
        probes.attach(model, ["grad_noise"], probe_data=x, sinks=["memory"])
    with pytest.raises(ValueError, match=r"0\.\.2 for 3 outputs"):
        probes.attach(model, ["grad_noise"], probe_data=(x, torch.tensor([0, 1, 5, 1, 0, 2])), sinks=["memory"])
    with pytest.raises(ValueError, match="MSE needs one target per output"):
        probes.attach(model, ["grad_noise"], probe_data=(x, torch.randn(6, 5)), sinks=["memory"])
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="per-sample gradients are not defined"):
        probes.attach(
            bn, ["grad_noise"], probe_data=(x, torch.randint(0, 3, (6,))), norm_stats="batch", sinks=["memory"]
        )
    with pytest.raises(ValueError, match="max_cost"):
        probes.attach(model, {"grad_noise": {"max_cost": 10}}, probe_data=(x, torch.randint(0, 3, (6,))))


def test_batchnorm_with_running_statistics_is_said_once_and_equals_the_eval_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    model.train()
    model(torch.randn(32, 4, dtype=torch.float64))  # running statistics that are not the defaults
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        session = probes.attach(model, ["grad_noise"], probe_data=(x, y), sinks=["memory"], strict=True)
        session.step()
        session.close()
    assert sum("grad_noise: the model has BatchNorm" in str(w.message) for w in said) == 1
    assert model.training  # the mode is restored
    model.eval()
    ref = naive(model, [lambda i=i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(8)])
    got = session.memory.scalars()["grad_noise/noise_scale"][0][1]
    assert got == pytest.approx(ref["grad_noise/noise_scale"], rel=1e-9)


def _models():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ntk_models.py"
    spec = importlib.util.spec_from_file_location("_ntk_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAID: list[str] = []  # the notices of the last session_values


def session_values(model, x, y, **attach) -> dict[str, float]:
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        session = probes.attach(model, ["grad_noise"], probe_data=(x, y), sinks=["memory"], strict=True, **attach)
        session.close()
    SAID[:] = [str(w.message) for w in said]
    return {tag: series[-1][1] for tag, series in session.memory.scalars().items()}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_gpt2_token_labels_with_padding_and_the_shift_equal_its_own_loss_per_sequence():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(1)
    P, T = 6, 8
    ids = torch.randint(0, 40, (P, T), generator=g)
    lengths = torch.tensor([8, 5, 7, 3, 8, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, -100)
    x = {"input_ids": ids, "attention_mask": mask}
    got = session_values(model, x, labels, label_shift=1)
    # transformers' mask code branches on the mask's values, which vmap cannot trace: one backward per sample, said
    assert sum("route='loop'" in m for m in SAID) == 1

    def hf_loss(i):
        return lambda: model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i : i + 1]).loss

    ref = naive(model, [hf_loss(i) for i in range(P)])
    for tag in ("grad_noise/noise_scale", "grad_noise/grad_norm", "grad_noise/gsnr"):
        assert got[tag] == pytest.approx(ref[tag], rel=1e-7), tag
    assert "grad_noise/transformer.h.0.attn.c_attn/gsnr" in got
    unshifted = session_values(model, x, labels, label_shift=0)  # the shift matters (the check can fail)
    assert unshifted["grad_noise/noise_scale"] != pytest.approx(got["grad_noise/noise_scale"], rel=1e-3)


def test_padded_bert_classifier_equals_its_own_loss_per_sample():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).double()
    g = torch.Generator().manual_seed(2)
    P, T = 6, 7
    ids = torch.randint(1, 30, (P, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([7, 4, 6, 2, 7, 5])[:, None]).long()
    y = torch.randint(0, 3, (P,), generator=g)
    got = session_values(model, {"input_ids": ids * mask, "attention_mask": mask}, y)
    model.eval()

    def hf_loss(i):
        return lambda: (
            model(input_ids=(ids * mask)[i : i + 1], attention_mask=mask[i : i + 1], labels=y[i : i + 1]).loss
        )

    ref = naive(model, [hf_loss(i) for i in range(P)])
    for tag in ("grad_noise/noise_scale", "grad_noise/grad_norm"):
        assert got[tag] == pytest.approx(ref[tag], rel=1e-7), tag
    assert model.training is False


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_vit_and_resnet18_with_batchnorm_equal_the_naive_loop(name):
    models = _models()
    model = models.MODELS[name]()
    x = models.inputs(name, 5)
    y = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(4))
    got = session_values(model, x, y)
    ref = naive(model, [lambda i=i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(5)])
    for tag in ("grad_noise/noise_scale", "grad_noise/grad_norm", "grad_noise/gsnr"):
        assert got[tag] == pytest.approx(ref[tag], rel=1e-7), tag


def test_auto_leaves_the_probe_out_above_max_cost_saying_the_cost(monkeypatch):
    import probes.builtin.grad_noise as module

    model = mlp().float()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(module, "MAX_COST", 8 * n - 1)  # as if the model were large
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        session = probes.attach(model, "auto", probe_data=(x, y), sinks=["memory"])
    session.close()
    assert "grad_noise" not in session.probes
    assert any(
        "leaves out probe 'grad_noise'" in str(w.message) and f"{n:,} parameters" in str(w.message) for w in said
    )
    monkeypatch.setattr(module, "MAX_COST", 8 * n)
    session = probes.attach(model, ["grad_noise"], probe_data=(x, y), sinks=["memory"], strict=True)
    session.close()
    assert "grad_noise/noise_scale" in session.memory.tags()
