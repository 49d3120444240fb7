"""pathgram: the probe against the seed's numpy route, for the depth-6 width-100 bias-free net.

Anchor (seed 000): float64 numpy, ``H = X X^T * prod_l A_l A_l^T``, ``q = y^T inv(H / tr H) y`` with
``np.linalg.inv``, timed from numpy arrays already on the host (its gate matrices handed to it for free).
Ours: ``PathGramProbe.measure`` on the captured probe batch, everything included (chain check, float32
gate grams, float64 Hadamard products, Cholesky, both norms, the condition estimate, the image): "cold"
is the first measurement of a probe, which computes ``X X^T``; "warm" any later one, which reuses it
(the probe batch is fixed during training, so every measurement but the first is warm).
Floor: the products we cannot avoid, computed as the probe computes them (``probes.functional.pathgram.path_gram``:
``X X^T`` in float64 for the cold floor only, one float32 ``A_l A_l^T`` per layer, both only on and below
the diagonal on the CPU, their Hadamard product) plus one float64 Cholesky factorization of ``H``.

    python benchmarks/pathgram.py            # P = 500, 1000, 2000
    python benchmarks/pathgram.py --big      # also P = 10,000 (about a minute for the anchor)
    python benchmarks/pathgram.py --smoke    # seconds (a test runs it)
    python benchmarks/pathgram.py --memory 10000 --sizes   # peak memory only, P = 10,000

Memory: ``--memory P [P ...]`` (``--big`` adds P = 10,000; ``--smoke`` P = 300) runs, for each ``P``, a fresh Python
process that imports torch and probes, builds a depth-``--depth`` width-``--width`` bias-free ReLU MLP on 64-d inputs
(the embedded 8 x 8 digits, repeated with noise), attaches ``pathgram`` and so measures once (the at-attach
measurement, condition estimate and image included). The child reports its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its resident memory just before ``attach`` (torch, data and
model loaded); the table prints both beside the size of one P x P float64 matrix, and the extra memory of the
measurement in units of that matrix.

Inputs are the embedded digits resized to 28 x 28 (MNIST-sized, 784 features), repeated with a little
uniform noise to reach ``P``; labels +-1 by digit parity. Times are the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import rss_now, rss_peak  # noqa: E402

import probes  # noqa: E402
from probes.builtin.pathgram import PathGramProbe  # noqa: E402
from probes.data import load_digits  # noqa: E402
from probes.functional.pathgram import Workspace, gram, path_gram  # noqa: E402
from probes.probe import Probe  # noqa: E402


class _Grab(Probe):
    """Keeps the probe batch of the session's capture pass."""

    name = "grab"
    needs_sites = True

    def measure(self, batch):
        self.batch = batch
        return []


def make_net(d_in: int, depth: int, width: int, generator: torch.Generator) -> nn.Sequential:
    sizes = [d_in] + [width] * (depth - 1) + [1]
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, bias=False)
        with torch.no_grad():
            lin.weight.copy_(
                (torch.randint(0, 2, lin.weight.shape, generator=generator) * 2 - 1).float() * math.sqrt(2.0 / width)
            )
        layers.append(lin)
        if k < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(P: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(size=28)
    idx = torch.arange(P) % x.shape[0]
    xs = (x[idx] + 0.05 * torch.rand(P, x.shape[1], generator=generator)).clamp(0, 1)
    return xs, torch.where(y[idx] % 2 == 0, 1.0, -1.0)


def numpy_route(X: np.ndarray, gates: list[np.ndarray], y: np.ndarray) -> float:
    """The seed's computation: float64 gram products and ``np.linalg.inv``."""
    H = X @ X.T
    for A in gates:
        H *= A @ A.T
    Hn = H / np.trace(H)
    return float(y @ np.linalg.inv(Hn) @ y)


def floor_route(
    X: torch.Tensor,
    gates: list[torch.Tensor],
    xx: tuple[torch.Tensor, bool] | None = None,
    workspace: Workspace | None = None,
) -> None:
    """Only what cannot be avoided: the probe's own products (``path_gram``: ``X X^T`` unless ``xx`` is given,
    the gate grams and their Hadamard product, in the same workspace) and one Cholesky factorization."""
    pg = path_gram(X, gates, xx=xx, workspace=workspace)
    torch.linalg.cholesky_ex(pg.h)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(P: int, depth: int, width: int, repeat: int, anchor: bool = True) -> dict:
    g = torch.Generator().manual_seed(P)
    x, y = make_data(P, g)
    model = make_net(x.shape[1], depth, width, g)
    grab = _Grab()
    probes.attach(model, [grab], probe_data=(x, y), sinks=["memory"], strict=True).detach()
    batch = grab.batch

    def cold():  # a fresh probe: the first measurement computes X X^T
        return PathGramProbe().measure(batch)

    t_cold, records = best_of(cold, repeat)
    q_probe = next(r.item() for r in records if r.tag == "pathgram/norm_normalized")
    probe = PathGramProbe()
    probe.measure(batch)
    t_warm, _ = best_of(lambda: probe.measure(batch), repeat)  # later measurements reuse X X^T
    core = PathGramProbe(condition="off", image=None)
    core.measure(batch)
    t_core, _ = best_of(lambda: core.measure(batch), repeat)
    gates_t = [batch.activations[n].pre > 0 for n in probe.compute(batch)[1].gates]
    ws = Workspace()
    t_floor_cold, _ = best_of(lambda: floor_route(x, gates_t, None, ws), repeat)
    xx = gram(x, torch.float64)
    t_floor_warm, _ = best_of(lambda: floor_route(x, gates_t, xx, ws), repeat)
    row = {
        "P": P,
        "cold_s": t_cold,
        "warm_s": t_warm,
        "core_s": t_core,
        "floor_cold_s": t_floor_cold,
        "floor_warm_s": t_floor_warm,
        "q": q_probe,
    }
    if anchor:
        X = x.double().numpy()
        gates = [g_.double().numpy() for g_ in gates_t]
        yy = y.double().numpy()
        t_np, q_np = best_of(lambda: numpy_route(X, gates, yy), repeat)
        row.update(numpy_s=t_np, q_numpy=q_np, rel_diff=abs(q_probe - q_np) / abs(q_np))
    return row


def memory_child(P: int, depth: int, width: int) -> dict:
    """In a fresh process: attach ``pathgram`` (one measurement) at ``P`` on 64-d inputs; peak and base RSS."""
    g = torch.Generator().manual_seed(P)
    x, y = load_digits()  # 8 x 8: 64 features
    idx = torch.arange(P) % x.shape[0]
    xs = (x[idx] + 0.05 * torch.rand(P, x.shape[1], generator=g)).clamp(0, 1)
    ys = torch.where(y[idx] % 2 == 0, 1.0, -1.0)
    model = make_net(xs.shape[1], depth, width, g)
    base = rss_now()
    t = time.perf_counter()
    session = probes.attach(model, ["pathgram"], probe_data=(xs, ys), sinks=["memory"], strict=True)
    seconds = time.perf_counter() - t
    norm = session.memory.last("pathgram/norm")
    session.close()
    return {"P": P, "base_bytes": base, "peak_bytes": rss_peak(), "seconds": seconds, "norm": norm}


def memory_run(P: int, depth: int, width: int) -> dict:
    """``memory_child`` in a fresh interpreter (same torch thread count); its JSON line back."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-memory",
        str(P),
        "--depth",
        str(depth),
        "--width",
        str(width),
        "--threads",
        str(torch.get_num_threads()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for P = {P} failed:\n{out.stderr[-4000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    pp = 8.0 * P * P
    row.update(pp_bytes=pp, extra_pp=(row["peak_bytes"] - row["base_bytes"]) / pp)
    return row


def print_memory(rows: list[dict]) -> None:
    gib = 2.0**30
    print(
        f"{'P':>6} {'P x P f64 (GiB)':>16} {'peak RSS (GiB)':>15} {'before attach (GiB)':>20} "
        f"{'extra / (P x P)':>16} {'attach (s)':>11}"
    )
    for r in rows:
        print(
            f"{r['P']:>6} {r['pp_bytes'] / gib:>16.3f} {r['peak_bytes'] / gib:>15.3f} {r['base_bytes'] / gib:>20.3f} "
            f"{r['extra_pp']:>16.2f} {r['seconds']:>11.2f}",
            flush=True,
        )
    print(
        "peak RSS: ru_maxrss of a fresh process that imports torch, attaches pathgram and measures once; "
        "before attach: its RSS with torch, data and model loaded; extra / (P x P): (peak - before) in units "
        "of one P x P float64 matrix (target: at most 3)."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="pathgram probe vs the seed's numpy route")
    p.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 2000])
    p.add_argument("--big", action="store_true", help="add P = 10,000")
    p.add_argument("--depth", type=int, default=6, help="Linear layers (hidden ReLU layers + 1)")
    p.add_argument("--width", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="P = 500, 1000 once each")
    p.add_argument("--smoke", action="store_true", help="P = 100 and 200, a tiny net (seconds)")
    p.add_argument(
        "--memory",
        type=int,
        nargs="*",
        default=None,
        help="peak memory of a fresh process measuring once at these P (default with --big: 10,000)",
    )
    p.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory is not None:  # the fresh process of a memory case
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        row = memory_child(args.child_memory, args.depth, args.width)
        print(json.dumps(row))
        return [row]
    memory = list(args.memory or [])
    sizes = list(args.sizes)
    if args.quick:
        sizes, args.repeat = [500, 1000], 1
    if args.smoke:
        sizes, args.repeat, args.depth, args.width = [100, 200], 1, 4, 32
    if args.smoke:
        memory = [300]
    if args.big:
        sizes.append(10_000)
        memory = sorted(set(memory) | {10_000})
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; depth {args.depth} "
        f"({args.depth - 1} hidden ReLU layers) x width {args.width}, bias-free; best of {args.repeat}"
    )
    header = (
        f"{'P':>6} {'numpy (s)':>10} {'cold (s)':>9} {'warm (s)':>9} {'np/cold':>8} {'np/warm':>8} "
        f"{'floor c (s)':>11} {'floor w (s)':>11} {'cold/fl c':>10} {'warm/fl w':>10} {'core (s)':>9} "
        f"{'rel diff q':>11}"
    )
    rows = []
    if sizes:
        print(header)
    for P in sizes:
        r = run(P, args.depth, args.width, 1 if P >= 10_000 else args.repeat)
        rows.append(r)
        print(
            f"{P:>6} {r['numpy_s']:>10.4f} {r['cold_s']:>9.4f} {r['warm_s']:>9.4f} "
            f"{r['numpy_s'] / r['cold_s']:>8.2f} {r['numpy_s'] / r['warm_s']:>8.2f} {r['floor_cold_s']:>11.4f} "
            f"{r['floor_warm_s']:>11.4f} {r['cold_s'] / r['floor_cold_s']:>10.2f} "
            f"{r['warm_s'] / r['floor_warm_s']:>10.2f} {r['core_s']:>9.4f} {r['rel_diff']:>11.2e}",
            flush=True,
        )
    if sizes:
        print(
            "numpy: the seed's route (np.linalg.inv). cold: the probe's first measurement (computes X X^T); warm: "
            "any later one (X X^T of the fixed probe batch reused). np/cold, np/warm: speed-up ratios (higher is "
            "better). floor c / floor w: the same products + one Cholesky, with / without X X^T; cold/fl c and "
            "warm/fl w: the probe's time over its floor. core: warm probe without condition estimate and image."
        )
    if memory:
        mem_rows = [dict(memory_run(P, args.depth, args.width), kind="memory") for P in memory]
        print_memory(mem_rows)
        rows += mem_rows
    return rows


if __name__ == "__main__":
    main()
