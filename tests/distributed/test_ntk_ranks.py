"""The NTK across ranks (``distributed=True``): 2 gloo ranks give the kernel of one process, in float64, to 1e-10.

One spawn of 2 CPU processes computes, on replicated models (as under DDP) and then on FSDP2-sharded ones (each
parameter layer its own unit, then the root), the dense kernel (trace and full modes), the matrix-free operator
(its dense form, exact trace and top eigenvalues by block Krylov) for an MLP, a CNN (convolutions: positions
within a sample) and a token model (Embedding, LayerNorm in the root unit), and a GPT-2 from a config sharded one
unit per block (transformers' Conv1D, tied embeddings, LayerNorms inside the units). P = 7 samples do not split evenly:
rank 1 pads its share. The reference is one process on the same models. Each rank runs its forwards on its own
4 samples only (the factor work is split), and holds only their factors in the operator.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import probes.autodiff.ntk as tangent
from probes.functional.spectra import top_eigenvalues
from probes.testing import join_group, leave_group, run_ranks

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = init_device_mesh = None

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 2
P = 7


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ln, self.head = nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.emb(t)).mean(1))


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    mlp = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 3))
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    )
    return {
        "mlp": (mlp.double().eval(), torch.randn(P, 10, generator=g, dtype=torch.float64)),
        "cnn": (cnn.double().eval(), torch.randn(P, 2, 8, 8, generator=g, dtype=torch.float64)),
        "tokens": (Tokens().double().eval(), torch.randint(0, 11, (P, 5), generator=g)),
    }


class LastLogits(nn.Module):
    """A causal LM's logits at the last position (the kernel the ntk probe measures by default)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits[:, -1]


def gpt2() -> tuple[nn.Module, torch.Tensor] | None:
    """A 2-block GPT-2 from a config (transformers' Conv1D layers, tied embeddings), float64, or None."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=16,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    lm = GPT2LMHeadModel(config).double().eval()
    return lm, torch.randint(0, 64, (P, 8), generator=torch.Generator().manual_seed(1))


def kernels(model: nn.Module, x: torch.Tensor, distributed: bool) -> dict[str, torch.Tensor]:
    op = tangent.ntk_operator(model, x, distributed=distributed)
    top = top_eigenvalues(op.matmat, op.shape[0], 3, device=x.device).values
    full = tangent.ntk_operator(model, x, mode="full", distributed=distributed)
    return {
        "trace": tangent.empirical_ntk(model, x, distributed=distributed),
        "full": tangent.empirical_ntk(model, x, mode="full", distributed=distributed),
        "operator": op.dense(block=3),
        "operator_trace": op.trace(),
        "operator_top3": top,
        "operator_full": full.dense(block=5),
        "rows": torch.tensor(op.rows),
    }


def _worker(rank: int, root: str) -> None:
    join_group(rank, WORLD, root, timeout_s=30)
    try:
        seen: list[int] = []
        out: dict[str, dict[str, torch.Tensor]] = {}
        for how in ("replicated", "fsdp") if fully_shard is not None else ("replicated",):
            mesh = init_device_mesh("cpu", (WORLD,)) if how == "fsdp" else None
            for name, (model, x) in models().items():
                if how == "fsdp":
                    for m in model.modules():
                        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                            fully_shard(m, mesh=mesh)
                    fully_shard(model, mesh=mesh)
                hook = model.register_forward_pre_hook(lambda _m, a: seen.append(int(a[0].shape[0])))
                out[f"{how}/{name}"] = kernels(model, x, True)
                hook.remove()
        one_sample = models()["mlp"]  # fewer samples than ranks: rank 1's share is all padding
        out["replicated/one_sample"] = {
            "trace": tangent.empirical_ntk(one_sample[0], one_sample[1][:1], distributed=True)
        }
        built = gpt2() if fully_shard is not None else None
        if built is not None:  # FSDP2 the way transformer training does it: one unit per block, then the root
            lm, ids = built
            mesh = init_device_mesh("cpu", (WORLD,))
            for block in lm.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(lm, mesh=mesh)
            out["fsdp/gpt2"] = {"trace": tangent.empirical_ntk(LastLogits(lm), ids, distributed=True)}
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
        errors = []  # rank 1 fails in its factor pass (out of memory, say): both ranks raise, neither waits
        import probes.autodiff.ntk.dense as dense

        real = dense._layer_terms
        if rank == 1:
            dense._layer_terms = lambda *a, **k: (_ for _ in ()).throw(MemoryError("no memory on rank 1"))
        try:
            tangent.empirical_ntk(*models()["mlp"], distributed=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            dense._layer_terms = real
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump({"batch_sizes": sorted(set(seen)), "errors": errors}, f)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ntk_ranks")
    run_ranks(_worker, (str(root),), world=WORLD, deadline_s=150)
    return root


def test_the_kernel_across_two_ranks_equals_one_process_replicated_and_fsdp(ranks_run):
    got = [torch.load(ranks_run / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert len(got[0]) == (4 if fully_shard is None else 7 if gpt2() is None else 8)
    for key, values in got[0].items():
        if key == "fsdp/gpt2":
            lm, ids = gpt2()
            ref = {"trace": tangent.empirical_ntk(LastLogits(lm), ids)}
        elif key == "replicated/one_sample":
            model, x = models()["mlp"]
            ref = {"trace": tangent.empirical_ntk(model, x[:1])}
        else:
            ref = kernels(*models()[key.split("/")[1]], False)
        for what, expected in ref.items():
            if what == "rows":
                continue
            for r in range(WORLD):  # every rank holds the same kernel
                torch.testing.assert_close(
                    got[r][key][what],
                    expected,
                    rtol=1e-10,
                    atol=1e-12 * float(expected.abs().max()),
                    msg=f"{key} {what} rank {r}",
                )
        if "rows" in values:
            assert int(values["rows"]) == 4  # each rank holds the factors of ceil(7 / 2) samples, not 7


def test_each_rank_runs_its_factor_passes_on_its_own_share(ranks_run):
    for r in range(WORLD):
        sizes = json.loads((ranks_run / f"rank{r}.json").read_text())["batch_sizes"]
        # the plan's passes see 1 and 2 samples; every factor pass sees at most this rank's 4 of the 7 samples
        assert max(sizes) <= 4 and 4 in sizes, sizes


def test_the_scaling_benchmark_smoke_run():
    """``benchmarks/ntk_distributed.py --smoke``: 1 and 2 gloo ranks, the kernels equal, every row printed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "ntk_distributed.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case in ("resnet", "transformer"):
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith(case))
        diff = float(line.split("max |diff| / max |K| = ")[1].split(",")[0])
        assert diff < 1e-12, line
    assert sum(1 for ln in done.stdout.splitlines() if ln.split()[:1] in (["1"], ["2"])) == 6


def test_a_rank_failing_in_its_factor_pass_fails_every_rank_without_a_hang(ranks_run):
    errors = [json.loads((ranks_run / f"rank{r}.json").read_text())["errors"] for r in range(WORLD)]
    assert errors[1] == ["MemoryError: no memory on rank 1"]
    assert len(errors[0]) == 1 and "another rank failed" in errors[0][0], errors[0]
