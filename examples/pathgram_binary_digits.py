"""Seed 000: the normalized path-gram norm of a deep ReLU net falls as its gates learn (4 vs 7).

Lakshminarayanan & Singh (2020, "Neural path features and neural path kernel") show that a ReLU net's
neural path kernel ``H = (X X^T) * prod_l A_l A_l^T`` depends on the gates only, and that during
training the gates adapt to the labels: ``nu_t = y^T (H_t / tr H_t)^{-1} y`` decreases. This script
repeats their binary experiment with the ``pathgram`` probe:

- data: digits 4 and 7 with labels -1 (4) and +1 (7); the embedded 8 x 8 digits by default (all 4s and
  7s, about 360 images), MNIST with ``--data mnist`` (IDX files in ``--root``, else torchvision where it
  works; nothing is downloaded otherwise);
- net: ``--depth 6`` Linear layers (5 gated hidden ReLU layers, as the paper's ``d`` counts weight
  layers) of ``--width 100``, bias-free, every weight ``+-sqrt(2 / width)`` with a random sign;
- training: RMSprop, lr 1e-4, mean squared error, batches of 32;
- probe batch: 100 images of each class (a fixed class-balanced batch of 200), ``pathgram`` every 2 epochs;
- 5 repeats (seeds ``--seed + r``; the probe batch is the same in every repeat).

TensorBoard logs go to ``<logdir>/repeat_<r>``; the PNG (``--out``, default ``<logdir>/pathgram_norm.png``)
shows the mean +- one standard deviation over repeats of ``pathgram/norm_normalized`` against the epoch,
with a control: the same norm for the same gates but randomly permuted labels, at the first and the last
epoch (if the gates learn the labels, the true-label norm falls more than the control);
``<logdir>/pathgram_norm.csv`` holds the numbers.

    python examples/pathgram_binary_digits.py            # seed: 100 epochs x 5 repeats
    python examples/pathgram_binary_digits.py --quick    # about a minute on 2 cores
    tensorboard --logdir runs/pathgram_binary_digits
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from torch import nn

import probes
from probes.data import balanced_subset, load

NAME = "pathgram_binary_digits"


def make_net(d_in: int, depth: int, width: int, bias: bool, generator: torch.Generator) -> nn.Sequential:
    """``depth`` Linear layers with ReLU between them; weights ``+-sqrt(2/width)`` (random signs), biases 0."""
    if depth < 1:
        raise ValueError(f"--depth must be at least 1 (the number of Linear layers), got {depth}")
    sizes = [d_in] + [width] * (depth - 1) + [1]
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            signs = torch.randint(0, 2, lin.weight.shape, generator=generator).float() * 2 - 1
            lin.weight.copy_(signs * math.sqrt(2.0 / width))
            if lin.bias is not None:
                lin.bias.zero_()
        layers.append(lin)
        if k < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 4 and 7 as (N, d) in [0, 1] and labels -1 (4) / +1 (7) as float."""
    x, y = load(args.data, root=args.root, classes=(4, 7))
    if args.train_size is not None and args.train_size < x.shape[0]:
        g = torch.Generator().manual_seed(args.seed)
        keep = balanced_subset(y, args.train_size // 2, generator=g)
        x, y = x[keep], y[keep]
    return x, torch.where(y == 7, 1.0, -1.0)


def shuffled_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
    """``pathgram/norm_normalized`` of the same gates with the labels permuted: the label-blind control."""
    y_perm = y[torch.randperm(y.shape[0], generator=generator)]
    session = probes.attach(
        model, {"pathgram": {"image": None, "condition": "off"}}, probe_data=(x, y_perm), sinks=["memory"], strict=True
    )
    session.close()
    return session.memory.last("pathgram/norm_normalized")


def run_repeat(r: int, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, probe_idx: torch.Tensor) -> dict:
    """Train one net; return the epochs, ``pathgram/norm_normalized`` measured at them, and the control
    (shuffled labels) at the first and the last epoch."""
    torch.manual_seed(args.seed + r)
    g = torch.Generator().manual_seed(args.seed + r)
    model = make_net(x.shape[1], args.depth, args.width, args.bias, g)
    opt = torch.optim.RMSprop(model.parameters(), lr=args.lr)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    xp, yp = x[probe_idx], y[probe_idx]
    control = [shuffled_norm(model, xp, yp, torch.Generator().manual_seed(1000 + r))]
    logdir = os.path.join(args.logdir, f"repeat_{r}")
    session = probes.attach(
        model,
        {"pathgram": {"every": steps_per_epoch * args.every}},
        probe_data=(xp, yp),
        logdir=logdir,
        sinks=["memory", "tensorboard"],
        optimizer=opt,
        strict=True,
    )
    loss_fn = nn.MSELoss()
    with session:
        for _ in range(args.epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, args.batch_size):
                idx = order[i : i + args.batch_size]
                loss = loss_fn(model(x[idx])[:, 0], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()  # the session steps (and measures when due) after every optimizer step
    control.append(shuffled_norm(model, xp, yp, torch.Generator().manual_seed(1000 + r)))
    series = session.memory.scalars()["pathgram/norm_normalized"]
    steps = np.array([s for s, _ in series], dtype=np.float64)
    return {
        "epochs": steps / steps_per_epoch,
        "values": np.array([v for _, v in series], dtype=np.float64),
        "control": np.array(control),
    }


def plot(
    epochs: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    control: np.ndarray,
    repeats: int,
    args: argparse.Namespace,
    out: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, mean, color="C0", marker="o", markersize=3, label=f"mean over {repeats} repeat(s)")
    ax.fill_between(epochs, mean - std, mean + std, color="C0", alpha=0.25, label="+- 1 std")
    ax.plot(
        [epochs[0], epochs[-1]],
        control.mean(axis=0),
        color="C1",
        linestyle="--",
        marker="s",
        markersize=4,
        label="same gates, shuffled labels (mean)",
    )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$y^\top (H / \mathrm{tr}\,H)^{-1} y$")
    hidden = args.depth - 1
    ax.set_title(
        f"path-gram norm, {args.data} 4 vs 7: {hidden} hidden ReLU layers x {args.width}, "
        f"P = {2 * args.probe_per_class}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument("--root", default="data", help="directory with the MNIST IDX files (--data mnist)")
    p.add_argument("--depth", type=int, default=6, help="number of Linear layers (hidden ReLU layers + 1)")
    p.add_argument("--width", type=int, default=100)
    p.add_argument("--bias", action="store_true", help="give every Linear a bias (initialised to 0)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--every", type=int, default=2, help="epochs between measurements")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--probe-per-class", type=int, default=100)
    p.add_argument("--train-size", type=int, default=None, help="class-balanced subset of the training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these nets are small, more threads only add synchronisation)",
    )
    p.add_argument("--logdir", default=os.path.join("runs", NAME))
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/pathgram_norm.png)")
    p.add_argument("--quick", action="store_true", help="fewer epochs and repeats (about a minute)")
    p.add_argument("--smoke", action="store_true", help="a tiny net for a few seconds (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = min(args.epochs, 40), min(args.repeats, 3)
    if args.smoke:
        args.depth, args.width, args.epochs, args.repeats = 3, 16, 2, 1
        args.probe_per_class, args.train_size = 20, 80
    if args.out is None:
        args.out = os.path.join(args.logdir, "pathgram_norm.png")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, t0)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, t0: float) -> dict:
    x, y = load_data(args)
    g = torch.Generator().manual_seed(args.seed)
    probe_idx = balanced_subset(y.long(), args.probe_per_class, generator=g)
    runs = [run_repeat(r, args, x, y, probe_idx) for r in range(args.repeats)]
    epochs = runs[0]["epochs"]
    values = np.stack([run["values"] for run in runs])
    control = np.stack([run["control"] for run in runs])
    mean, std = values.mean(axis=0), values.std(axis=0)
    os.makedirs(args.logdir, exist_ok=True)
    header = "epoch,mean,std," + ",".join(f"repeat_{r}" for r in range(args.repeats))
    np.savetxt(
        os.path.join(args.logdir, "pathgram_norm.csv"),
        np.column_stack([epochs, mean, std, values.T]),
        delimiter=",",
        header=header,
        comments="",
    )
    plot(epochs, mean, std, control, args.repeats, args, args.out)
    print(
        f"{args.data}: {x.shape[0]} training images, {args.depth - 1} hidden layers x {args.width}, "
        f"{args.repeats} repeat(s), {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"normalized norm at epoch {epochs[0]:g}: {mean[0]:.4g} +- {std[0]:.2g}; "
        f"at epoch {epochs[-1]:g}: {mean[-1]:.4g} +- {std[-1]:.2g} (ratio {mean[-1] / mean[0]:.3f})"
    )
    c0, c1 = control.mean(axis=0)
    print(
        f"shuffled labels (same gates): {c0:.4g} at epoch {epochs[0]:g}, {c1:.4g} at epoch {epochs[-1]:g} "
        f"(ratio {c1 / c0:.3f})"
    )
    print(f"wrote {args.out} and TensorBoard logs under {args.logdir}")
    return {"epochs": epochs, "mean": mean, "std": std, "values": values, "control": control, "out": args.out}


if __name__ == "__main__":
    main()
