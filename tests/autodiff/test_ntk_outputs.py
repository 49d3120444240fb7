"""Which outputs the NTK covers: the last kept position of a sequence output, the Gaussian sketch ``outputs=k``,
the cost check at attach (``max_cost``) and the progress of a long measurement."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

import probes
import probes.builtin.ntk as ntk_module
from probes.autodiff.ntk import empirical_ntk, progress
from probes.autodiff.ntk.outputs import SelectedOutput, gaussian_sketch, last_positions
from probes.builtin.ntk import NTK
from probes.engine.failures import ProbesNoticeWarning
from probes.testing import probe_batch


class TinyLM(nn.Module):
    """Token embedding, a causal running mean over positions (each position sees the ones before it), a tanh
    layer and a head: logits ``(P, T, C)``."""

    def __init__(self, vocab: int = 11, d: int = 6, C: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h.cumsum(dim=1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(torch.tanh(self.mid(h)))


def kernel_at(model: nn.Module, call, where: list[int]) -> torch.Tensor:
    """The reference: the kernel summed over outputs of ``call(i)[0, where[i]]`` (``call(i)`` runs the model on sample
    ``i`` alone), from per-sample gradients by plain autograd, one output at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i, t in enumerate(where):
        out = call(i)[0, t]
        rows.append(
            torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                    for c in range(out.shape[0])
                ]
            )
        )
    J = torch.stack(rows)  # (P, C, n)
    return torch.einsum("icn,jcn->ij", J, J)


def lm_batch(P: int = 4, T: int = 6):
    model = TinyLM().double().eval()
    ids = torch.randint(0, 11, (P, T), generator=torch.Generator().manual_seed(1))
    return model, ids


def records(probe: NTK, batch) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbesNoticeWarning)
        return {r.tag: r for r in probe.measure(batch)}


def test_last_positions_from_the_mask() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert last_positions(mask, 5, 4, torch.device("cpu")).tolist() == [2, 0, 3, 3, 2]
    assert last_positions(None, 3, 7, torch.device("cpu")).tolist() == [6, 6, 6]
    assert last_positions(mask, 5, 6, torch.device("cpu")).tolist() == [5] * 5  # a mask of another length


def test_sequence_output_takes_the_last_kept_position_with_one_notice() -> None:
    model, ids = lm_batch()
    batch = probe_batch(model, ids)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    batch.mask = mask
    probe = NTK(spectrum="full")
    with pytest.warns(ProbesNoticeWarning, match=r"last kept \(attention mask\) position.*positions='all'"):
        probe.check(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbesNoticeWarning)  # said once: not again at the measurement
        got = {r.tag: r for r in probe.measure(batch)}
    ref = kernel_at(model, lambda i: model(ids[i : i + 1]), [5, 2, 0, 5])
    assert got["ntk/trace"].item() == pytest.approx(ref.trace().item(), rel=1e-10)
    assert got["ntk/eig_max"].item() == pytest.approx(torch.linalg.eigvalsh(ref)[-1].item(), rel=1e-10)
    # without a mask: the last position; positions="all": every position (the flattened output)
    batch.mask = None
    last = records(NTK(spectrum="full"), batch)["ntk/trace"].item()
    assert last == pytest.approx(kernel_at(model, lambda i: model(ids[i : i + 1]), [5] * 4).trace().item(), rel=1e-10)
    every = records(NTK(spectrum="full", positions="all"), batch)["ntk/trace"].item()
    assert every == pytest.approx(empirical_ntk(model, ids, fast_path=False).trace().item(), rel=1e-10)
    assert every > 2 * last  # the other positions add to the summed kernel


def test_gpt2_padded_batch_kernel_at_the_last_real_token() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(2))
    am = torch.ones(3, 6, dtype=torch.long)
    am[1, 4:] = 0
    batch = probe_batch(model, {"input_ids": ids, "attention_mask": am}, output=lambda o: o.logits)
    batch.mask = am.bool()
    got = records(NTK(spectrum="full"), batch)["ntk/trace"].item()

    ref = kernel_at(model, lambda i: model(input_ids=ids[i : i + 1], attention_mask=am[i : i + 1]).logits, [5, 3, 5])
    assert got == pytest.approx(ref.trace().item(), rel=1e-10)


def sketch_variance(full: torch.Tensor, P: int, C: int, k: int) -> torch.Tensor:
    """``Var[Theta_sketch_ij]`` for ``S`` with i.i.d. N(0, 1/k) entries: ``Theta_ij = (1/k) sum_l s_l^T A s_l``
    with ``A = Theta_(i,.),(j,.)`` and ``s_l ~ N(0, I)``, and ``Var[s^T A s] = ||A||_F^2 + tr(A A)``."""
    A = full.view(P, C, P, C).permute(0, 2, 1, 3)  # (P, P, C, C)
    return ((A * A).sum(dim=(2, 3)) + torch.einsum("ijab,ijba->ij", A, A)) / k


def test_sketch_is_the_kernel_of_the_projected_outputs_and_unbiased() -> None:
    torch.manual_seed(3)
    P, C = 3, 6
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, C)).double()
    x = torch.randn(P, 4, dtype=torch.float64)
    full = empirical_ntk(model, x, mode="full")  # (P C) x (P C), row i * C + a
    exact = empirical_ntk(model, x)  # the kernel summed over the C outputs
    A = full.view(P, C, P, C)
    batch = probe_batch(model, x)
    # the probe's option: the kernel of f(x) S, with S from its own seeded generator (fixed for the run)
    probe = NTK(spectrum="full", outputs=4, seed=7)
    S = gaussian_sketch(C, 4, 7)
    want = torch.einsum("iajb,ak,bk->ij", A, S, S)
    assert records(probe, batch)["ntk/trace"].item() == pytest.approx(want.trace().item(), rel=1e-10)
    assert records(probe, batch)["ntk/trace"].item() == pytest.approx(want.trace().item(), rel=1e-10)  # fixed S
    assert not torch.allclose(want, exact)  # one sketch is not the exact kernel
    # E[Theta_sketch] = Theta: the mean over N seeds lies within 6 standard deviations of the mean (the variance
    # from the formula above) of the exact summed kernel, entry by entry
    N = 300
    for k in (2, 16):
        kernels = torch.stack(
            [empirical_ntk(SelectedOutput(model, position=False, sketch=gaussian_sketch(C, k, s)), x) for s in range(N)]
        )
        var = sketch_variance(full, P, C, k)
        assert ((kernels.mean(0) - exact).abs() <= 6 * (var / N).sqrt()).all(), k
        # the variance is the formula's (within the sampling error of a variance from N draws) and shrinks as 1/k
        ratio = kernels.var(0) / var
        assert ((ratio > 0.6) & (ratio < 1.6)).all(), (k, ratio)
        if k == 2:
            var2 = kernels.var(0)
        else:
            assert (kernels.var(0) < var2 / 4).all()


def test_max_cost_refuses_at_attach_naming_the_options() -> None:
    model, ids = lm_batch(P=4)
    n = sum(p.numel() for p in model.parameters())
    batch = probe_batch(model, ids)
    probe = NTK(max_cost=4 * 5 * n - 1)  # P x (last position's 5 outputs) x parameters, one below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbesNoticeWarning)
        with pytest.raises(
            ValueError,
            match=r"ntk: one measurement costs .*P=4 samples x 5 outputs.*outputs=k.*"
            r"k=4 fits.*smaller probe batch.*output=.*max_cost",
        ):
            probe.check(batch)
        assert NTK(max_cost=4 * 5 * n).check_cost(4, 5, model) == 4 * 5 * n
        NTK(max_cost=4 * 5 * n).check(batch)
        NTK(max_cost=4 * 4 * n, outputs=4).check(batch)  # the sketch fits where the 5 outputs do not
        NTK(max_cost=None, positions="all").check(batch)
        with pytest.raises(ValueError, match="max_cost"):
            NTK(max_cost=4 * 5 * n, positions="all").check(batch)  # 6 positions x 5 outputs
        with pytest.raises(ValueError, match="outputs=k"):
            probes.attach(model, [NTK(max_cost=100)], probe_data=ids)


@pytest.mark.parametrize("bad", [{"max_cost": 0}, {"outputs": 0}, {"positions": "first"}, {"seed": -1}])
def test_new_options_are_checked(bad) -> None:
    with pytest.raises(ValueError, match=f"ntk: .*{next(iter(bad))}"):
        NTK(**bad)


def test_progress_lines_and_a_notice_for_a_slow_measurement(monkeypatch, caplog) -> None:
    model, ids = lm_batch()
    batch = probe_batch(model, ids)
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    monkeypatch.setattr(ntk_module, "SLOW_SECONDS", 0.0)
    probe = NTK(positions="all")
    with caplog.at_level(logging.INFO, logger="probes"):
        with pytest.warns(ProbesNoticeWarning, match=r"ntk: one measurement took .* outputs=k"):
            probe.measure(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ProbesNoticeWarning)  # once
            probe.measure(batch)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(line.startswith("ntk_operator: ") or line.startswith("empirical_ntk: ") for line in lines)
    assert any("per-sample factors, samples 4/4 (100%)" in line for line in lines)
    assert any("kernel products, layers 3/3 (100%)" in line for line in lines), lines
    # timed from the measurement's start (the plan's own checks, outside a measurement, log nothing)
    assert all(float(line.rsplit(", ", 1)[1].split(" s so far")[0]) < 600 for line in lines if "so far" in line)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="probes"):
        progress.report("outside", 1, 1)
        tangent_plan = NTK(positions="all")
        tangent_plan.check(batch)
    assert not [r for r in caplog.records if "so far" in r.getMessage()]


def test_sketch_dimension_is_what_the_plan_sees() -> None:
    model, ids = lm_batch()
    batch = probe_batch(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbesNoticeWarning)
        wrapped, args = NTK(outputs=3).kernel_model(batch)
    out = wrapped(*args)
    assert out.shape == (4, 3)
    S = gaussian_sketch(5, 3, 0)
    assert torch.allclose(out, model(ids)[:, -1] @ S)
    assert math.isclose(float(S.pow(2).sum()) / 5, 1.0, rel_tol=0.6)  # E[S S^T] = I: trace 5 on average
