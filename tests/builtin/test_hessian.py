"""The ``hessian`` probe against dense references: ``torch.func.hessian`` of the loss as a function of the flattened
trainable parameters, ``eigvalsh`` in float64; Hutchinson over many seeds; the NTK link; the edge of stability.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import probes
from probes.autodiff.hessian import Chunk, HessianProducts, share, trainable
from probes.builtin.hessian import Hessian
from probes.functional.hessian import adam_threshold, edge_setting, hutchinson, sgd_threshold
from probes.functional.spectra import Quadrature, density_grid, extreme_eigenvalues, lanczos, slq_runs
from probes.testing import probe_batch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-8


def flat_loss(model: nn.Module, loss_of_output):
    """``w -> loss(model with trainable parameters w)``, and ``w`` now."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(w):
        parts = torch.split(w, [math.prod(s) for s in shapes])
        return loss_of_output(
            lambda *a: functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, a)
        )

    return f, w0


def dense_hessian(model: nn.Module, loss_of_output, columns: bool = False) -> torch.Tensor:
    """``torch.func.hessian`` of the flattened loss; ``columns``: column by column, ``H e_i`` by ``jvp(grad)``
    (``torch.func.hessian`` vmaps ``jacfwd`` over ``jacrev``, whose batching of multi-head attention is wrong here:
    its products differ from finite differences of the gradient by 1e-2, the column loop's by 1e-8)."""
    f, w0 = flat_loss(model, loss_of_output)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no forward-mode derivative
        if columns:
            g, eye = torch.func.grad(f), torch.eye(w0.numel(), dtype=w0.dtype)
            H = torch.stack([torch.func.jvp(g, (w0,), (e,))[1] for e in eye], dim=1)
        else:
            H = torch.func.hessian(f)(w0)
    return (H + H.T) / 2


def measured(model, x, y, optimizer=None, chunk=None, **options) -> dict[str, torch.Tensor]:
    probe = Hessian(**{"tol": 1e-12, "max_steps": 10_000, **options})
    batch = probe_batch(model, x, y, probe_batch_size=chunk, optimizer=optimizer)
    probe.check(batch)
    records = probe.measure(batch)
    return {r.tag: r.value for r in records if hasattr(r, "value")}


def assert_extremes(values: dict, H: torch.Tensor, k: int = 5) -> None:
    lam = torch.linalg.eigvalsh(H.double())
    scale = float(lam.abs().max())
    top = torch.stack([values[f"hessian/eig_top/{i + 1}"] for i in range(k)])
    assert float((top - lam.flip(0)[:k]).abs().max()) <= TOL * scale
    assert abs(float(values["hessian/eig_min"] - lam[0])) <= TOL * scale


def mlp(seed: int = 0, widths=(4, 8, 3), act=nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).double()


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class TinyTransformer(nn.Module):
    """Two encoder layers over an embedding: token inputs, one class per sequence."""

    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, t):
        return self.head(self.encoder(self.embed(t)).mean(1))


def ce(x, y):
    return lambda model: nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("chunk", [None, 7])
def test_mlp_eigenvalues_equal_the_dense_hessian_chunked_or_not(chunk) -> None:
    model = mlp()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    values = measured(model, x, y, chunk=chunk, trace_samples=0, density=False)
    assert_extremes(values, dense_hessian(model, ce(x, y)))


def test_cnn_and_two_layer_transformer_eigenvalues_equal_the_dense_hessian() -> None:
    torch.manual_seed(1)
    cnn = SmallCNN().double()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_extremes(measured(cnn, x, y, trace_samples=0, density=False), dense_hessian(cnn, ce(x, y)))
    torch.manual_seed(2)
    tf = TinyTransformer().double()
    t, c = torch.randint(0, 5, (5, 4)), torch.randint(0, 3, (5,))
    values = measured(tf, t, c, trace_samples=0, density=False)
    assert_extremes(values, dense_hessian(tf, ce(t, c), columns=True), k=3)


@settings(max_examples=8, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    P=st.integers(2, 9),
    mse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_random_mlps(widths, P, mse, seed) -> None:
    model = mlp(seed, (3, *widths, 2))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, 3, generator=g, dtype=torch.float64)
    if mse:
        y = torch.randn(P, 2, generator=g, dtype=torch.float64)
        ref = dense_hessian(model, lambda m: nn.functional.mse_loss(m(x), y))
    else:
        y = torch.randint(0, 2, (P,), generator=g)
        ref = dense_hessian(model, ce(x, y))
    values = measured(model, x, y, top_k=1, trace_samples=0, density=False, chunk=max(1, P // 2))
    assert_extremes(values, ref, k=1)


def test_token_labels_weight_chunks_by_kept_positions_with_label_shift_and_mask() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    t = torch.randint(0, 6, (4, 5))
    y = torch.randint(0, 5, (4, 5))
    y[0, 1:] = -100  # unequal kept positions per sequence: the chunks' weights differ
    y[2, 3] = -100
    shift = 1
    paired = y[:, shift:]

    def loss(m):
        return nn.functional.cross_entropy(m(t)[:, :-shift].reshape(-1, 5), paired.reshape(-1), ignore_index=-100)

    ref = dense_hessian(model, loss)
    hv = HessianProducts(
        lambda x: model(x),
        [Chunk(t[0:1], y[0:1]), Chunk(t[1:4], y[1:4])],
        trainable(model),
        label_shift=shift,
    )
    ext = extreme_eigenvalues(hv, hv.n, 3, tol=1e-12, max_steps=hv.n)
    lam = torch.linalg.eigvalsh(ref)
    assert float((ext.top - lam.flip(0)[:3]).abs().max()) <= TOL * float(lam.abs().max())
    v = torch.randn(hv.n, dtype=torch.float64)
    assert torch.allclose(hv(v), ref @ v, rtol=1e-10, atol=1e-12)


def test_a_callable_loss_and_frozen_parameters() -> None:
    model = mlp(4)
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)

    def huber(out, target):
        return nn.functional.huber_loss(out, target)

    values = measured(model, x, y, loss=huber, trace_samples=0, density=False, chunk=4)
    assert_extremes(values, dense_hessian(model, lambda m: huber(m(x), y)))


def test_hutchinson_is_unbiased_and_its_stderr_matches_the_spread() -> None:
    model = mlp(5)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    exact = float(torch.trace(dense_hessian(model, ce(x, y))))
    estimates, stderrs = [], []
    for seed in range(60):
        v = measured(model, x, y, seed=seed, top_k=1, trace_samples=16, density=False, max_steps=3)
        estimates.append(float(v["hessian/trace"]))
        stderrs.append(float(v["hessian/trace_stderr"]))
    est = torch.tensor(estimates, dtype=torch.float64)
    spread = float(est.std())
    mean_stderr = sum(stderrs) / len(stderrs)
    assert abs(float(est.mean()) - exact) <= 4 * spread / math.sqrt(len(estimates))
    assert 0.6 * spread <= mean_stderr <= 1.5 * spread
    mean, stderr = hutchinson(torch.tensor([1.0, 3.0]))
    assert float(mean) == 2.0 and float(stderr) == pytest.approx(1.0)


def test_lanczos_finds_repeated_eigenvalues_through_restarts_and_slq_integrates_to_one() -> None:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    d = torch.tensor([4.0, 4.0, -2.0] + [0.5] * 27, dtype=torch.float64)
    A = U @ torch.diag(d) @ U.T
    run = lanczos(lambda v: A @ v, torch.randn(30, generator=g, dtype=torch.float64), 30)
    theta, _ = run.ritz()
    assert torch.allclose(theta, d.sort().values, atol=1e-10)
    quad = Quadrature.of_runs(slq_runs(lambda v: A @ v, 30, 10, 3))
    grid, phi = density_grid(quad)
    assert float(phi.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-3)
    assert all(float(w.sum()) == pytest.approx(1.0) for w in quad.weights)


def test_the_ntk_link_gauss_newton_is_ntk_over_p() -> None:
    """MSE on a linear read-out of frozen features: ``H = 2 J^T J / (P C)`` exactly (the model is linear in its
    trainable parameters), so the Hessian's nonzero eigenvalues are the NTK's times ``2 / P`` (one output)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    P = 8
    x, y = torch.randn(P, 5, dtype=torch.float64), torch.randn(P, 1, dtype=torch.float64)
    spec = {"hessian": {"tol": 1e-12, "top_k": 3, "density": False, "trace_samples": 0}, "ntk": {"top_k": 3}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = probes.attach(model, spec, probe_data=(x, y), sinks=["memory"], strict=True)
    s = session.memory.scalars()
    session.close()
    for k in (1, 2, 3):
        assert s[f"hessian/eig_top/{k}"][0][1] == pytest.approx(2 / P * s[f"ntk/eig_top/{k}"][0][1], rel=1e-8)


def _adam_reference(model, x, y, optimizer) -> torch.Tensor:
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    d = []
    for p in trainable(model):
        st_ = optimizer.state[p]
        d.append((st_["exp_avg_sq"].reshape(-1) / (1 - beta2 ** float(st_["step"]))).sqrt() + eps)
    s = torch.cat(d).rsqrt()
    H = dense_hessian(model, ce(x, y))
    return s[:, None] * H * s[None, :]


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_preconditioned_sharpness_equals_the_dense_preconditioned_hessian(kind) -> None:
    model = mlp(7)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    opt = kind(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    values = measured(model, x, y, optimizer=opt, trace_samples=0, density=False)
    top = float(torch.linalg.eigvalsh(_adam_reference(model, x, y, opt))[-1])
    assert float(values["hessian/preconditioned_eig_top/1"]) == pytest.approx(top, rel=TOL)
    assert float(values["hessian/edge_ratio"]) == pytest.approx(top / (3.8 / 0.1 / 0.01), rel=TOL)
    assert adam_threshold(0.01, 0.9) == pytest.approx(38 / 0.01)


def test_sgd_thresholds_and_optimizers_without_one() -> None:
    model = mlp(8)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    lam = float(torch.linalg.eigvalsh(dense_hessian(model, ce(x, y)))[-1])
    for momentum, threshold in ((0.0, 2 / 0.1), (0.9, 3.8 / 0.1)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
        values = measured(model, x, y, optimizer=opt, trace_samples=0, density=False)
        assert float(values["hessian/edge_ratio"]) == pytest.approx(lam / threshold, rel=TOL)
    assert sgd_threshold(0.1, 0.5, dampening=0.5) == pytest.approx(3.0 / 0.05)
    assert "Nesterov" in edge_setting(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    assert "no optimizer" in edge_setting(None)
    rms = torch.optim.RMSprop(model.parameters(), lr=0.1)
    with pytest.warns(probes.ProbesNoticeWarning, match="edge_ratio is left out: the optimizer is a RMSprop"):
        values = measured(model, x, y, optimizer=rms, trace_samples=0, density=False)
    assert "hessian/edge_ratio" not in values


def test_an_adam_before_its_first_step_leaves_the_ratio_out_once() -> None:
    model = mlp(9)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.warns(probes.ProbesNoticeWarning, match="before its first step"):
        values = measured(model, x, y, optimizer=opt, trace_samples=0, density=False)
    assert "hessian/edge_ratio" not in values and "hessian/eig_top/1" in values


def test_training_is_bit_identical_with_and_without_the_probe_and_images_come() -> None:
    def train(attach: bool):
        model = mlp(10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        session = None
        if attach:
            spec = {"hessian": {"every": 2, "trace_samples": 4, "density_steps": 8}}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = probes.attach(model, spec, probe_data=(x[:8], y[:8]), optimizer=opt, sinks=["memory"])
        torch.manual_seed(0)
        model.train()
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(nn.functional.dropout(model(x), 0.1), y).backward()
            opt.step()
        rng = torch.rand(3)
        if session is not None:
            mem = session.memory
            session.close()
            assert len(mem.scalars()["hessian/edge_ratio"]) >= 3
            assert mem.images()["hessian/density"] and mem.histograms()["hessian/ritz_values"]
            assert mem.images()["hessian/density"][0].as_uint8().ndim == 3
        return [p.detach().clone() for p in model.parameters()], rng, model.training

    a, b = train(False), train(True)
    assert all(torch.equal(p, q) for p, q in zip(a[0], b[0]))
    assert torch.equal(a[1], b[1]) and a[2] == b[2]


def test_a_memory_limit_refuses_at_attach_and_labels_are_needed() -> None:
    model = mlp(11)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="hessian: the Lanczos basis of 67 parameters"):
        probes.attach(model, {"hessian": {"max_memory": 1000}}, probe_data=(x, y), sinks=["memory"])
    with pytest.raises(ValueError, match="hessian: this probe needs labels"):
        probes.attach(model, ["hessian"], probe_data=(x, None), sinks=["memory"])


def test_shares_cover_the_batch() -> None:
    for P in (1, 5, 8):
        for world in (1, 2, 3):
            rows = [i for r in range(world) for i in range(P)[share(P, r, world)]]
            assert rows == list(range(P))


def _models():
    spec = importlib.util.spec_from_file_location("_ntk_models", ROOT / "benchmarks" / "ntk_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "resnet"])
def test_real_architectures_give_products_equal_to_torch_func(name) -> None:
    if name in ("gpt2", "bert"):
        pytest.importorskip("transformers")
    models = _models()
    model = models.MODELS[name]()
    x = models.inputs(name, 3)
    out = model(x)
    y = torch.randint(0, out.shape[-1], (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = measured(model, x, y, top_k=2, max_steps=6, tol=1e-6, trace_samples=2, density_steps=6)
    top = [float(values[f"hessian/eig_top/{k}"]) for k in (1, 2)]
    assert all(math.isfinite(v) for v in top) and top[0] >= top[1] >= float(values["hessian/eig_min"])
    # one product against torch.func's jvp of the gradient
    f, w0 = flat_loss(model, ce(x, y))
    v = torch.randn(w0.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.func.jvp(torch.func.grad(f), (w0,), (v,))[1]
    hv = HessianProducts(model, [Chunk(x, y)], trainable(model))
    assert torch.allclose(hv(v), ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
