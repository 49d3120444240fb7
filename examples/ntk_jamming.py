"""Seed 002: the jamming transition of a fully connected net, seen by the ``margin`` and ``ntk`` probes.

Setting (Geiger et al. 2019, "Jamming transition as a paradigm to understand the loss landscape of deep
neural networks"; Spigler et al. 2019): the embedded handwritten digits, label +1 for even and -1 for odd
digits, projected on their first 20 principal components and put on the sphere of radius sqrt(20);
P = 500 training samples. An MLP 20 -> h -> h -> 1 (L = 2 hidden layers, erf or tanh, with biases) is
trained by full-batch Adam on the hinge-squared loss ``mean 1/2 max(0, m - y f(x))^2`` until the loss is 0
(every sample fitted with margin m), stalls, or a step cap is reached. The widths h are swept so that the
number of weights without biases, ``N = 20 h + h^2 + h``, spans ``P / N`` from 0.1 to 25 (``--ratio-max``;
with margin 1/2 this data set jams only between P/N = 11 and 23).

Per width the session logs (TensorBoard run ``<logdir>/h<h>``) ``margin/*`` every ``--margin-every`` steps and
``ntk/*`` at initialisation and at the end. The PNG shows ``N_Delta / N`` at the end of training against
``P / N`` (the jamming transition: ``N_Delta = 0`` on the over-parameterised side) and the histogram of
log10 NTK eigenvalues at initialisation for every width.

    python examples/ntk_jamming.py            # seed settings (P = 500, 16 widths, up to 50,000 steps each)
    python examples/ntk_jamming.py --quick    # a few minutes on 2 cores
    tensorboard --logdir runs/ntk_jamming
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import probes
from probes.data import load


class Erf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: a tiny run for the tests")
    p.add_argument("--quick", action="store_true", help="a shorter run (minutes on 2 cores)")
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument("--root", default="data", help="directory of the MNIST IDX files (--data mnist)")
    p.add_argument("--P", type=int, default=500, help="training samples")
    p.add_argument("--dim", type=int, default=20, help="principal components kept")
    p.add_argument("--act", choices=("erf", "tanh"), default="erf")
    p.add_argument(
        "--widths",
        type=int,
        default=None,
        help="number of widths between P/N = ratio-max and 0.1 (default 16; --quick 10)",
    )
    p.add_argument(
        "--ratio-max",
        type=float,
        default=25.0,
        help="largest P/N of the sweep (25: past the jamming point of this data at margin 1/2)",
    )
    p.add_argument("--margin", type=float, default=0.5, help="margin m of Delta = m - y f (papers: 1)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=None, help="step cap per width (default 50,000; --quick 5,000)")
    p.add_argument("--margin-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny nets: one is fastest)")
    p.add_argument("--logdir", default="runs/ntk_jamming")
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/ntk_jamming.png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.P, args.margin_every = 60, 10
    widths, steps = (2, 40) if args.smoke else (10, 5000) if args.quick else (16, 50000)
    args.widths = args.widths or widths
    args.steps = args.steps or steps
    return args


def dataset(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Parity labels +-1, PCA to ``dim`` components, rows scaled to norm sqrt(dim); ``P`` random samples."""
    x, digit = load(args.data, args.root)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(x.shape[0], generator=g)[: args.P]
    x, digit = x[idx].double(), digit[idx]
    xc = x - x.mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(xc, full_matrices=False)
    z = xc @ vt[: args.dim].T
    z = z / z.norm(dim=1, keepdim=True) * math.sqrt(args.dim)
    y = torch.where(digit % 2 == 0, 1.0, -1.0)
    return z.float(), y


def widths_for(P: int, dim: int, count: int, ratio_max: float = 10.0) -> list[int]:
    """Hidden widths h whose weight count N = dim h + h^2 + h gives P/N log-spaced from ratio_max to 0.1."""
    out = []
    for ratio in np.geomspace(ratio_max, 0.1, count):
        N = P / ratio
        h = max(1, round((-(dim + 1) + math.sqrt((dim + 1) ** 2 + 4 * N)) / 2))
        if h not in out:
            out.append(h)
    return out


def make_model(dim: int, h: int, act: str) -> nn.Sequential:
    Act = Erf if act == "erf" else nn.Tanh
    return nn.Sequential(nn.Linear(dim, h), Act(), nn.Linear(h, h), Act(), nn.Linear(h, 1))


def train_one(args, x, y, h: int, logdir: Path) -> dict:
    torch.manual_seed(args.seed + h)
    model = make_model(args.dim, h, args.act)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    session = probes.attach(
        model,
        {"margin": {"every": args.margin_every, "margin": args.margin}, "ntk": {"every": 10**9}},
        probe_data=(x, y),
        logdir=str(logdir / f"h{h}"),
        sinks=["memory"],
        optimizer=opt,
        strict=True,
    )
    ntk_probe = session.probes["ntk"]
    init_eigs = ntk_probe.init_eigenvalues.cpu().numpy()
    best, since, steps = math.inf, 0, 0
    for steps in range(1, args.steps + 1):
        delta = args.margin - y * model(x)[:, 0]
        loss = 0.5 * delta.clamp(min=0).square().mean()
        if loss.item() == 0.0:  # every sample fitted with margin m: no force left
            steps -= 1
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
        since += 1
        if loss.item() < best * (1 - 1e-3):
            best, since = loss.item(), 0
        elif since >= max(500, args.steps // 10):  # stalled: a jammed (under-parameterised) net
            break
    session.measure()  # every active probe at the final step (close() skips it when one was just measured)
    session.close()
    mem = session.memory
    N = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("bias"))
    n_delta = mem.last("margin/n_delta")
    return {
        "h": h,
        "N": N,
        "P_over_N": args.P / N,
        "n_delta": n_delta,
        "n_delta_per_weight": n_delta / N,
        "loss": mem.last("margin/loss"),
        "steps": steps,
        "init_eigs": init_eigs,
        "ntk_distance": mem.last("ntk/distance_from_init"),
        "cond_init": mem.scalars()["ntk/condition"][0][1],
        "cond_end": mem.last("ntk/condition"),
    }


def figure(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    r = np.array([row["P_over_N"] for row in rows])
    v = np.array([row["n_delta_per_weight"] for row in rows])
    a.plot(r, v, "o-")
    a.axvline(1.0, color="grey", lw=0.8, ls="--")
    a.set_xscale("log")
    a.set_xlabel("P / N")
    a.set_ylabel(r"$N_\Delta$ / N at the end of training")
    a.set_title(f"jamming: P = {args.P}, L = 2, {args.act}, margin {args.margin}")
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(rows):
        lam = row["init_eigs"]
        lam = lam[lam > 0]
        b.hist(
            np.log10(lam),
            bins=40,
            histtype="step",
            color=cmap(i / max(1, len(rows) - 1)),
            label=f"h={row['h']} (P/N={row['P_over_N']:.2g})",
        )
    b.set_xlabel("log10 eigenvalue of the NTK at initialisation")
    b.set_ylabel("count")
    b.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    logdir = Path(args.logdir)
    x, y = dataset(args)
    widths = widths_for(args.P, args.dim, args.widths, args.ratio_max)
    rows = []
    t0 = time.perf_counter()
    print(f"P = {args.P}, widths {widths}")
    print(
        f"{'h':>4} {'N':>6} {'P/N':>7} {'steps':>6} {'N_Delta':>8} {'N_Delta/N':>10} {'loss':>10} "
        f"{'cond(init)':>11} {'cond(end)':>11} {'ntk moved':>9}"
    )
    for h in widths:
        row = train_one(args, x, y, h, logdir)
        rows.append(row)
        print(
            f"{row['h']:>4} {row['N']:>6} {row['P_over_N']:>7.3f} {row['steps']:>6} {row['n_delta']:>8.0f} "
            f"{row['n_delta_per_weight']:>10.4f} {row['loss']:>10.3g} {row['cond_init']:>11.3g} "
            f"{row['cond_end']:>11.3g} {row['ntk_distance']:>9.3f}",
            flush=True,
        )
    out = Path(args.out) if args.out else logdir / "ntk_jamming.png"
    figure(rows, out, args)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return {"png": str(out), "rows": rows}


if __name__ == "__main__":
    main()
