"""Edge of stability: full-batch gradient descent sharpens the loss until ``lambda_max`` reaches ``2 / lr``.

Setting (Cohen, Kaur, Li, Kolter & Talwalkar 2021, "Gradient descent on neural networks typically occurs at the
edge of stability"): the embedded digits (``probes.data.load_digits``, the first ``--P`` images), an MLP
64 -> 64 -> 64 -> 10 with tanh, the MSE loss on one-hot targets, trained by full-batch gradient descent (SGD on
the whole training set, no momentum) at two learning rates. The ``hessian`` probe measures the sharpness
``lambda_max`` of the training loss (the probe batch is the whole training set) every ``--every`` steps, and
``hessian/edge_ratio = lambda_max / (2 / lr)`` from the attached optimizer. Cohen et al. see progressive
sharpening (``lambda_max`` grows) until it reaches ``2 / lr``, then hovers there (``edge_ratio`` near 1) while the
loss keeps falling, non-monotonically.

The PNG shows ``lambda_max`` against the step for both learning rates with their ``2 / lr`` (dashed), the edge
ratio with the line at 1, and the training loss.

    python examples/edge_of_stability.py            # 4,000 steps per learning rate
    python examples/edge_of_stability.py --quick    # under a minute on 2 cores
    tensorboard --logdir runs/edge_of_stability
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

import probes
from probes.data import load_digits


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="seconds: a tiny run for the tests")
    mode.add_argument("--quick", action="store_true", help="under a minute")
    p.add_argument("--P", type=int, default=None, help="training samples (default 500; --quick 300; --smoke 64)")
    p.add_argument("--steps", type=int, default=None, help="steps per learning rate (default 4000; --quick 1500)")
    p.add_argument("--lrs", type=float, nargs=2, default=(0.5, 1.0), help="the two learning rates")
    p.add_argument("--every", type=int, default=None, help="steps between measurements (default 25; --smoke 5)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--logdir", default="runs/edge_of_stability")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_model(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def train(args: argparse.Namespace, lr: float, x: torch.Tensor, targets: torch.Tensor, steps: int, every: int):
    """Full-batch GD at ``lr`` with the ``hessian`` probe attached; returns its scalars and the losses."""
    model = make_model(args.width, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    spec = {"hessian": {"every": every, "top_k": 1, "trace_samples": 0, "density": False, "tol": 1e-6}}
    logdir = Path(args.logdir) / f"lr{lr:g}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probes' one-line notices
        session = probes.attach(
            model, spec, probe_data=(x, targets), optimizer=opt, logdir=str(logdir), sinks=["memory", "tensorboard"]
        )
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), targets)
        loss.backward()
        opt.step()  # the session steps after every optimizer step
        losses.append(float(loss))
    session_scalars = session.memory.scalars()
    session.close()
    scalars = session_scalars
    return scalars, losses


def plot(results: dict[float, tuple[dict, list[float]]], path: Path, P: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = ["tab:blue", "tab:orange"]
    for colour, (lr, (s, losses)) in zip(colours, results.items()):
        steps, lam = zip(*s["hessian/eig_top/1"])
        axes[0].plot(steps, lam, color=colour, label=f"lambda_max, lr = {lr:g}")
        axes[0].axhline(2 / lr, color=colour, ls="--", lw=1, label=f"2 / lr = {2 / lr:g}")
        steps, ratio = zip(*s["hessian/edge_ratio"])
        axes[1].plot(steps, ratio, color=colour, label=f"lr = {lr:g}")
        axes[2].plot(range(1, len(losses) + 1), losses, color=colour, label=f"lr = {lr:g}")
    axes[1].axhline(1.0, color="black", ls=":", lw=1, label="edge of stability (1)")
    axes[0].set(title="sharpness (top Hessian eigenvalue)", xlabel="step", ylabel="lambda_max of the training loss")
    axes[1].set(title="hessian/edge_ratio = lambda_max / (2 / lr)", xlabel="step", ylabel="edge ratio (1 = the edge)")
    axes[2].set(title="training loss (full batch)", xlabel="step", ylabel="MSE (log scale)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Full-batch gradient descent on {P} digits (MLP, tanh, MSE): progressive sharpening to 2 / lr")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    P = args.P or (64 if args.smoke else 300 if args.quick else 500)
    steps = args.steps or (20 if args.smoke else 1500 if args.quick else 4000)
    every = args.every or (5 if args.smoke else 25)
    x, y = load_digits()
    x, y = x[:P], y[:P]
    targets = nn.functional.one_hot(y, 10).float()
    results = {}
    for lr in args.lrs:
        results[lr] = train(args, lr, x, targets, steps, every)
    Path(args.logdir).mkdir(parents=True, exist_ok=True)
    png = Path(args.logdir) / "edge_of_stability.png"
    plot(results, png, P)
    summary = {}
    for lr, (s, losses) in results.items():
        ratios = [v for _, v in s["hessian/edge_ratio"]]
        tail = ratios[len(ratios) // 2 :]
        summary[lr] = {
            "sharpness_first": s["hessian/eig_top/1"][0][1],
            "sharpness_max": max(v for _, v in s["hessian/eig_top/1"]),
            "edge_ratio_last_half_mean": sum(tail) / len(tail),
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
        print(
            f"lr = {lr:g}: lambda_max {summary[lr]['sharpness_first']:.3g} -> max {summary[lr]['sharpness_max']:.3g} "
            f"(2 / lr = {2 / lr:g}); edge ratio over the second half {summary[lr]['edge_ratio_last_half_mean']:.3f}; "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    print(f"wrote {png}")
    return {"png": str(png), "summary": summary, "scalars": {lr: r[0] for lr, r in results.items()}}


if __name__ == "__main__":
    main()
