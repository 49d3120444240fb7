"""Seed 003: do initialisations with fewer ReLU zeros train better?

Setting (the seed's): a 784-750-320-50-10 MLP whose one shared ``nn.ReLU`` is called four times, after every
Linear including the last (sites ``act#1`` ... ``act#4``; ``--no-relu-logits`` leaves the logits linear).
Data: the embedded handwritten digits (1,797 images of 8 x 8) upsampled bilinearly to 28 x 28 with
``probes.data.load_digits(size=28)``, so the inputs are 784-dimensional as in the seed's MNIST
(``--data mnist --root DIR`` reads MNIST IDX files you already have; nothing is downloaded). A seeded 80/20
split gives the training and test sets.

For each of several initialisation schemes (PyTorch's default, He/Kaiming normal and uniform, Glorot/Xavier
normal, orthogonal, and He normal with biases shifted by +-0.1 to move the zero count) and several seeds:

1. count the exactly-zero ReLU outputs at initialisation with the ``relu_zeros`` probe (training-mode forwards
   over the whole training set, no backward: ``relu_zeros/total/fraction`` over the four sites);
2. train for a few epochs (SGD with momentum, cross-entropy, batches of 64) with ``relu_zeros`` (per epoch) and
   ``linear_region`` (on 100 test images, per epoch) attached, writing TensorBoard runs
   ``<logdir>/<scheme>_s<seed>`` (plus ``train/loss`` and ``test/accuracy``);
3. measure the test accuracy.

The PNG scatters the final test accuracy against the zero fraction at initialisation, one colour per scheme,
with Spearman's rank correlation (ties averaged) and a permutation p-value in the title. Since the seed's ReLU
also acts on the logits, a logit unit that is zero on every training input at initialisation
(``relu_zeros/act#4/dead_in_window``) never receives a gradient and its class is never predicted; the rank
correlation of the test accuracy with that count is printed and shown as well.

    python examples/relu_zeros_at_init.py            # 7 schemes x 5 seeds = 35 inits, 5 epochs
    python examples/relu_zeros_at_init.py --quick    # 7 schemes x 3 seeds = 21 inits, 3 epochs (minutes on 2 cores)
    tensorboard --logdir runs/relu_zeros_at_init
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import probes
from probes.data import load

SCHEMES = (
    "default",
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "orthogonal",
    "kaiming_bias+0.1",
    "kaiming_bias-0.1",
)


class SeedMLP(nn.Module):
    """784-750-320-50-10 with one ``nn.ReLU`` module applied after every Linear (the seed's shared ReLU)."""

    def __init__(self, sizes=(784, 750, 320, 50, 10), relu_logits: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()
        self.relu_logits = relu_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        x = self.layers[-1](x)
        return self.act(x) if self.relu_logits else x


def initialise(model: SeedMLP, scheme: str) -> None:
    """Re-initialise every Linear with ``scheme`` (``default`` keeps PyTorch's own initialisation)."""
    if scheme == "default":
        return
    with torch.no_grad():
        for layer in model.layers:
            w, b = layer.weight, layer.bias
            if scheme.startswith("kaiming_bias") or scheme == "kaiming_normal":
                nn.init.kaiming_normal_(w, nonlinearity="relu")
            elif scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(w, nonlinearity="relu")
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(w)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(w, gain=math.sqrt(2.0))
            else:
                raise ValueError(f"unknown initialisation scheme {scheme!r}; choose from {SCHEMES}")
            b.fill_(float(scheme.split("bias")[1]) if "bias" in scheme else 0.0)


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson correlation of the ranks, tied values getting their mean rank."""
    ra, rb = rankdata(np.asarray(a, dtype=np.float64)), rankdata(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def rankdata(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def permutation_pvalue(a, b, rho: float, n: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of ``rho`` under random pairings (``n`` permutations)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    hits = sum(abs(spearman(a, rng.permutation(b))) >= abs(rho) - 1e-12 for _ in range(n))
    return (hits + 1) / (n + 1)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: a tiny run for the tests")
    p.add_argument("--quick", action="store_true", help="a shorter run (a few minutes on 2 cores)")
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument("--root", default="data", help="directory of the MNIST IDX files (--data mnist)")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--seeds", type=int, default=None, help="seeds per scheme (default 5; --quick 3)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 5; --quick 3)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--no-relu-logits",
        dest="relu_logits",
        action="store_false",
        help="leave the logits linear (the seed applies its shared ReLU to them too)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--logdir", default="runs/relu_zeros_at_init")
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/relu_zeros_at_init.png)")
    args = p.parse_args(argv)
    seeds, epochs = (1, 1) if args.smoke else (3, 3) if args.quick else (5, 5)
    args.seeds = args.seeds or seeds
    args.epochs = args.epochs or epochs
    if args.smoke:
        args.schemes = args.schemes[:3]
    return args


def dataset(args: argparse.Namespace):
    if args.data == "mnist":
        x, y = load("mnist", args.root)
        xt, yt = load("mnist", args.root, train=False)
    else:
        x, y = load("digits", size=28)  # 8 x 8 upsampled bilinearly to 28 x 28: 784 inputs
        g = torch.Generator().manual_seed(1234)
        perm = torch.randperm(x.shape[0], generator=g)
        cut = int(0.8 * x.shape[0])
        x, y, xt, yt = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    if args.smoke:
        x, y, xt, yt = x[:192], y[:192], xt[:100], yt[:100]
    return x, y, xt, yt


def zeros_at_init(model: nn.Module, x: torch.Tensor, batch: int) -> tuple[float, float]:
    """``relu_zeros/total/fraction`` of training forwards over ``x`` (no backward, no update), and the
    number of units of the last ReLU call (``act#4``: the logits, when they go through the ReLU) that are zero
    for every training input (``dead_units``; NaN without that site)."""
    session = probes.attach(model, {"relu_zeros": {"every": 10**9}}, sinks=["memory"], strict=True)
    model.train()
    for i in range(0, x.shape[0], batch):  # training forwards (grad enabled: no_grad forwards are not counted)
        model(x[i : i + batch])
    session.close()
    mem = session.memory
    dead = mem.last("relu_zeros/act#4/dead_in_window") if "relu_zeros/act#4/dead_in_window" in mem.tags() else math.nan
    return mem.last("relu_zeros/total/fraction"), dead


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return acc


def train_one(args, data, scheme: str, seed: int, logdir: Path) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = SeedMLP(relu_logits=args.relu_logits)
    initialise(model, scheme)
    zero_frac, dead_logits = zeros_at_init(model, x, 256)
    acc0 = accuracy(model, xt, yt)
    steps_per_epoch = math.ceil(x.shape[0] / args.batch)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    writer = SummaryWriter(str(logdir / f"{scheme}_s{seed}"))
    session = probes.attach(
        model,
        {
            "relu_zeros": {"every": steps_per_epoch},
            "linear_region": {"every": steps_per_epoch, "eps": (1e-3, 1e-2, 1e-1), "delta": (1e-3, 1e-2)},
        },
        probe_data=(xt[:100], yt[:100]),
        writer=writer,
        optimizer=opt,
        strict=True,
    )
    g = torch.Generator().manual_seed(seed)
    step, loss_t = 0, torch.tensor(float("nan"))
    for _ in range(args.epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], args.batch):
            idx = perm[i : i + args.batch]
            out = model(x[idx])
            loss_t = F.cross_entropy(out, y[idx])
            loss_t.backward()
            opt.step()  # the session steps with the optimizer
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                writer.add_scalar("train/loss", loss_t.item(), step)
        writer.add_scalar("test/accuracy", accuracy(model, xt, yt), step)
    loss = loss_t.item()
    acc = accuracy(model, xt, yt)
    session.close()
    writer.close()
    return {
        "scheme": scheme,
        "seed": seed,
        "zero_fraction": zero_frac,
        "dead_logits": dead_logits,
        "acc_init": acc0,
        "acc": acc,
        "loss": loss,
    }


def figure(rows: list[dict], rho: float, pvalue: float, rho_dead: float, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, scheme in enumerate(dict.fromkeys(r["scheme"] for r in rows)):
        pts = [(r["zero_fraction"], r["acc"]) for r in rows if r["scheme"] == scheme]
        ax.scatter(*zip(*pts), label=scheme, color=plt.get_cmap("tab10")(i), s=28)
    ax.set_xlabel("fraction of ReLU outputs exactly zero at initialisation (training set, 4 calls)")
    ax.set_ylabel(f"test accuracy after {args.epochs} epoch(s)")
    data = "digits upsampled to 28x28" if args.data == "digits" else "MNIST"
    logits = "ReLU on the logits too" if args.relu_logits else "linear logits"
    ax.set_title(
        f"784-750-320-50-10 ReLU MLP ({logits}), {data}, {len(rows)} inits\n"
        f"Spearman rho = {rho:+.3f} (permutation p = {pvalue:.3g})"
        + ("" if math.isnan(rho_dead) else f"; rho(acc, dead logits at init) = {rho_dead:+.3f}"),
        fontsize=9,
    )
    ax.legend(fontsize=7)
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
    data = dataset(args)
    t0 = time.perf_counter()
    print(
        f"{data[0].shape[0]} training / {data[2].shape[0]} test images of {data[0].shape[1]} pixels; "
        f"{len(args.schemes)} schemes x {args.seeds} seeds, {args.epochs} epoch(s) each"
    )
    print(f"{'scheme':>18} {'seed':>4} {'zeros@init':>10} {'dead logits':>11} {'acc@init':>8} {'acc':>6} {'loss':>7}")
    rows = []
    for seed in range(args.seeds):
        for scheme in args.schemes:
            row = train_one(args, data, scheme, seed, logdir)
            rows.append(row)
            print(
                f"{scheme:>18} {seed:>4} {row['zero_fraction']:>10.4f} {row['dead_logits']:>11.0f} "
                f"{row['acc_init']:>8.3f} {row['acc']:>6.3f} {row['loss']:>7.3f}",
                flush=True,
            )
    z = [r["zero_fraction"] for r in rows]
    a = [r["acc"] for r in rows]
    rho = spearman(z, a)
    pvalue = permutation_pvalue(z, a, rho, n=2000 if args.smoke else 10000)
    rho_dead = spearman([r["dead_logits"] for r in rows], a) if args.relu_logits else math.nan
    out = Path(args.out) if args.out else logdir / "relu_zeros_at_init.png"
    figure(rows, rho, pvalue, rho_dead, out, args)
    print(f"Spearman rho(zero fraction at init, test accuracy) = {rho:+.3f}, permutation p = {pvalue:.3g}")
    if args.relu_logits:
        print(f"Spearman rho(dead logit units at init, test accuracy) = {rho_dead:+.3f}")
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return {"png": str(out), "rows": rows, "spearman": rho, "pvalue": pvalue, "spearman_dead_logits": rho_dead}


if __name__ == "__main__":
    main()
