"""Seed 004: how fast do hidden features align with the labels when the first layer learns slowly?

Two copies of one network (digits 8 vs 9, one hidden ReLU layer of width 2000, a scalar readout,
squared loss on +-1 labels, SGD with batch 200), started from the same initialisation:

- ``slow``: the first layer learns at lr 1e-3, the readout at 1e-2;
- ``regular``: both layers at lr 1e-2.

The ``alignment`` probe logs, on the whole training set as the probe batch, the centered alignment
of the hidden features' linear kernel with ``Y Y^T`` (``alignment/1/cka``; site ``1`` is the ReLU, so
the features are the post-activation values) and of the output (``alignment/output/cka``). Each model
gets its own TensorBoard run (``<logdir>/slow``, ``<logdir>/regular``) and a PNG compares them.

    python examples/slow_vs_regular_alignment.py            # seed settings
    python examples/slow_vs_regular_alignment.py --quick    # a few minutes on 2 cores
    tensorboard --logdir runs/slow_vs_regular_alignment

The seed computed its "alignment" by multiplying the two kernels as matrices and with every label set
to 1. Both are wrong. ``K @ L`` is a P x P matrix; the alignment needs the Frobenius inner product
``<Kc, Lc>_F`` of the *centered* kernels (only the trace of the product is an inner product, and any
other summary of it, such as its norm or its sum, mixes ``K_ik L_kj`` of unrelated pairs). With all
labels 1, ``L = Y Y^T = 11^T`` holds no information about the classes: centered it is the zero matrix
(alignment 0/0, which ``probes`` reports as an error), and uncentered ``<K, 11^T> = ||sum_i phi(x_i)||^2``
only measures the mean feature vector, the same number for any labelling of the data.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

import probes
from probes.data import load

RUNS = ("slow", "regular")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: a tiny run for the tests")
    p.add_argument("--quick", action="store_true", help="a shorter run (minutes on 2 cores)")
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument("--root", default="data", help="directory of the MNIST IDX files (--data mnist)")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20000, help="SGD steps per model")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of the regular model and of both readouts")
    p.add_argument("--slow-lr", type=float, default=1e-3, help="learning rate of the slow model's first layer")
    p.add_argument("--every", type=int, default=None, help="alignment cadence in steps (default steps/100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="runs/slow_vs_regular_alignment")
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/alignment.png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.steps = min(args.width, 64), 20
    elif args.quick:
        args.steps = min(args.steps, 4000)
    if args.every is None:
        args.every = max(1, args.steps // 100)
    return args


def make_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 8 and 9 with labels -1 (eight) and +1 (nine)."""
    x, digit = load(args.data, root=args.root, classes=(8, 9))
    if args.smoke:
        x, digit = x[:100], digit[:100]
    y = torch.where(digit == 9, 1.0, -1.0)
    return x, y


def train(
    model: nn.Module,
    first_lr: float,
    readout_lr: float,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    logdir: Path,
) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": first_lr}, {"params": model[2].parameters(), "lr": readout_lr}]
    )
    writer = SummaryWriter(log_dir=str(logdir))
    writer.add_text(
        "settings",
        f"first-layer lr {first_lr}, readout lr {readout_lr}, width {args.width}, "
        f"batch {args.batch}, {args.steps} steps, data {args.data} 8 vs 9, P = {len(y)}",
    )
    # the probe batch is the training set; the session steps itself after every optimizer.step()
    session = probes.attach(
        model,
        {"alignment": {"every": args.every}},
        probe_data=(x, y),
        writer=writer,
        sinks=["memory"],
        optimizer=opt,
        strict=True,
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    losses: list[tuple[int, float]] = []

    def log_loss(step: int) -> None:
        with torch.no_grad():
            full = 0.5 * (model(x).squeeze(1) - y).pow(2).mean().item()
        writer.add_scalar("train/loss", full, step)
        losses.append((step, full))

    log_loss(0)
    step, perm, pos = 0, torch.randperm(len(y), generator=g), 0
    while step < args.steps:
        if pos + args.batch > len(y):  # a new epoch: reshuffle, drop the ragged end
            perm, pos = torch.randperm(len(y), generator=g), 0
        idx = perm[pos : pos + min(args.batch, len(y))]
        pos += len(idx)
        loss = 0.5 * (model(x[idx]).squeeze(1) - y[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.every == 0:
            log_loss(step)
    session.close()
    series = session.memory.scalars()
    writer.close()
    return {"hidden": series["alignment/1/cka"], "output": series["alignment/output/cka"], "loss": losses}


def plot(results: dict, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = {"slow": f"slow (first layer lr {args.slow_lr:g})", "regular": f"regular (lr {args.lr:g})"}
    for run in RUNS:
        r = results[run]
        axes[0].plot(*zip(*r["hidden"]), label=labels[run])
        axes[1].plot(*zip(*r["output"]), label=labels[run])
        axes[2].plot(*zip(*r["loss"]), label=labels[run])
    axes[0].set_title("hidden features vs labels (alignment/1/cka)")
    axes[1].set_title("output vs labels (alignment/output/cka)")
    axes[2].set_title("training loss")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("SGD step")
        ax.legend()
    fig.suptitle(f"{args.data} 8 vs 9, width {args.width}, batch {args.batch}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    x, y = make_data(args)
    base = nn.Sequential(nn.Linear(x.shape[1], args.width), nn.ReLU(), nn.Linear(args.width, 1))
    logdir = Path(args.logdir)
    results, t0 = {}, time.perf_counter()
    for run, first_lr in (("slow", args.slow_lr), ("regular", args.lr)):
        model = copy.deepcopy(base)  # the same initialisation for both
        results[run] = train(model, first_lr, args.lr, x, y, args, logdir / run)
        h = results[run]["hidden"]
        print(
            f"{run:8s} hidden alignment {h[0][1]:.4f} (step 0) -> {h[-1][1]:.4f} (step {h[-1][0]}), "
            f"output {results[run]['output'][-1][1]:.4f}, loss {results[run]['loss'][-1][1]:.4g}"
        )
    out = Path(args.out) if args.out else logdir / "alignment.png"
    plot(results, out, args)
    print(f"{time.perf_counter() - t0:.1f} s; TensorBoard runs in {logdir}/slow and {logdir}/regular; figure {out}")
    finite = all(math.isfinite(v) for r in results.values() for _, v in r["hidden"])
    if not finite:
        raise RuntimeError("non-finite alignment values")
    return {"png": str(out), "series": {run: results[run]["hidden"] for run in RUNS}, "results": results}


if __name__ == "__main__":
    main()
