"""Edge of stability: full-batch gradient descent sharpens the loss until ``lambda_max`` reaches ``2 / lr``.

Cohen, Kaur, Li, Kolter & Talwalkar 2021, "Gradient descent on neural networks typically occurs at the edge of
stability", on the embedded digits (``probes.data.load_digits``, the first ``--P`` images): a tanh MLP
64 -> width -> width -> 10, the paper's squared loss on one-hot targets ``L = 1/(2P) sum_i |f(x_i) - y_i|^2``
(given to the probe as its ``loss``, so the probe's Hessian is that of the loss being trained), full-batch
gradient descent (``torch.optim.SGD`` on the whole training set, no momentum) at two learning rates. The
``hessian`` probe measures the sharpness ``lambda_max`` of the training loss every ``--every`` steps (its probe
batch is the whole training set) and ``hessian/edge_ratio = lambda_max / (2 / lr)`` from the attached optimizer.
Cohen et al. see progressive sharpening (``lambda_max`` grows) until it reaches ``2 / lr``, then hovers there
(``edge_ratio`` near 1) while the loss keeps falling, non-monotonically, with spikes.

The PNG shows ``lambda_max`` against the step for both learning rates with their ``2 / lr`` (dashed), the edge
ratio with the line at 1, and the training loss. ``--quick``: 300 digits, width 64, 1,500 steps. The full
defaults come closer to the paper's fully connected tanh network (two hidden layers of width 200; the paper
trains on 5,000 CIFAR-10 images until the loss is small): 1,000 digits, width 200, 5,000 steps, at lr 0.05 and
0.1 (this net starts at lambda_max ~ 11.6, above the 2 / lr = 10 of lr 0.2; about 9 minutes on 2 cores). ``--smoke``
(the tests): 32 digits, width 8, 20 steps and short Lanczos runs.

    python examples/edge_of_stability.py --smoke    # seconds (the tests)
    python examples/edge_of_stability.py --quick    # a few minutes at most on 2 cores
    python examples/edge_of_stability.py            # the full defaults
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
    mode.add_argument("--quick", action="store_true", help="a short run (a few minutes at most on 2 cores)")
    p.add_argument("--P", type=int, default=None, help="training samples (default 1000; --quick 300; --smoke 32)")
    p.add_argument("--width", type=int, default=None, help="hidden width (default 200; --quick 64; --smoke 8)")
    p.add_argument("--steps", type=int, default=None, help="steps per lr (default 5000; --quick 1500; --smoke 20)")
    p.add_argument(
        "--lrs",
        type=float,
        nargs=2,
        default=None,
        help="the two learning rates (default 0.05 0.1, 2/lr: 40, 20; --quick and --smoke 0.1 0.2, 2/lr: 20, 10)",
    )
    p.add_argument("--every", type=int, default=None, help="steps between measurements (default 25; --smoke 5)")
    p.add_argument("--lanczos-steps", type=int, default=None, help="Lanczos steps at most (default 100; smoke 40)")
    p.add_argument("--logdir", default="runs/edge_of_stability")
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/edge_of_stability.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a net this small: one is fastest)")
    args = p.parse_args(argv)
    pick = 0 if args.smoke else 1 if args.quick else 2
    args.P = args.P or (32, 300, 1000)[pick]
    args.width = args.width or (8, 64, 200)[pick]
    args.steps = args.steps or (20, 1500, 5000)[pick]
    args.every = args.every or (5, 25, 25)[pick]
    args.lanczos_steps = args.lanczos_steps or (40, 100, 100)[pick]
    # width 200 starts at lambda_max ~ 11.6, above 2 / 0.2 = 10: the full run takes lrs whose 2 / lr lie above it
    args.lrs = tuple(args.lrs) if args.lrs else ((0.1, 0.2), (0.1, 0.2), (0.05, 0.1))[pick]
    args.out = args.out or str(Path(args.logdir) / "edge_of_stability.png")
    return args


def half_squared_error(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cohen et al.'s squared loss: ``1/(2P) sum_i |f(x_i) - y_i|^2`` (summed over classes, averaged over samples)."""
    return 0.5 * (output - targets).pow(2).sum(dim=1).mean()


def make_data(P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``P`` embedded digits (pixels in [0, 1]) and their one-hot targets."""
    x, y = load_digits()
    return x[:P], nn.functional.one_hot(y[:P], 10).float()


def make_model(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def train(args: argparse.Namespace, lr: float, x: torch.Tensor, targets: torch.Tensor) -> dict:
    """Full-batch GD at ``lr`` with the ``hessian`` probe attached: its scalars, the losses and the trained model."""
    model = make_model(args.width, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    options = {"every": args.every, "top_k": 1, "trace_samples": 0, "density": False, "tol": 1e-6}
    options.update(max_steps=args.lanczos_steps, loss=half_squared_error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probes' one-line notices
        session = probes.attach(
            model,
            {"hessian": options},
            probe_data=(x, targets),
            optimizer=opt,
            logdir=str(Path(args.logdir) / f"lr{lr:g}"),
            sinks=["memory", "tensorboard"],
            overhead=None,  # every measurement at the cadence asked for
            probe_batch_size=len(x),  # one chunk: the gradient's graph is kept between the Lanczos products
        )
        memory = session.memory
        losses = []  # losses[k]: the loss at step k (after k updates), as the probe measures it
        for _ in range(args.steps):
            opt.zero_grad()
            loss = half_squared_error(model(x), targets)
            loss.backward()
            opt.step()  # the session steps after every optimizer step
            losses.append(loss.item())
        session.close()  # a last measurement, at the trained parameters
    return {"scalars": memory.scalars(), "losses": losses, "model": model}


def first_crossing(sharpness: list[tuple[int, float]], threshold: float) -> int | None:
    """The first measured step whose ``lambda_max`` is at least ``threshold`` (None: never)."""
    return next((step for step, value in sharpness if value >= threshold), None)


def plot(results: dict[float, dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for colour, (lr, run) in zip(["tab:blue", "tab:orange"], results.items()):
        s, label = run["scalars"], f"lr = {lr:g}"
        steps, lam = zip(*s["hessian/eig_top/1"])
        axes[0].plot(steps, lam, color=colour, label=f"lambda_max, {label}")
        axes[0].axhline(2 / lr, color=colour, ls="--", lw=1.2, label=f"2 / lr = {2 / lr:g}")
        cross = first_crossing(s["hessian/eig_top/1"], 2 / lr)
        if cross is not None:
            axes[0].axvline(cross, color=colour, ls=":", lw=1, label=f"first at 2 / lr: step {cross}")
        steps, ratio = zip(*s["hessian/edge_ratio"])
        axes[1].plot(steps, ratio, color=colour, label=label)
        axes[2].plot(range(len(run["losses"])), run["losses"], color=colour, lw=1, label=label)
    axes[1].axhline(1.0, color="black", ls="--", lw=1.2, label="edge of stability: lambda_max = 2 / lr")
    axes[0].set(title="sharpness: top eigenvalue of the loss Hessian", xlabel="step (full-batch GD updates)")
    axes[0].set_ylabel("lambda_max (1 / lr units: GD is stable below 2 / lr)")
    axes[1].set(title="hessian/edge_ratio = lambda_max / (2 / lr)", xlabel="step (full-batch GD updates)")
    axes[1].set_ylabel("edge ratio (dimensionless; 1 = the edge)")
    axes[2].set(title="training loss (full batch)", xlabel="step (full-batch GD updates)", yscale="log")
    axes[2].set_ylabel("1/(2P) sum |f(x) - y|^2 (log scale)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Full-batch GD on {args.P} digits (tanh MLP, width {args.width}, squared loss): "
        "progressive sharpening to 2 / lr, then the edge of stability"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarise(lr: float, run: dict) -> dict:
    s, losses = run["scalars"], run["losses"]
    ratios = [v for _, v in s["hessian/edge_ratio"]]
    tail = ratios[len(ratios) // 2 :]
    return {
        "sharpness_first": s["hessian/eig_top/1"][0][1],
        "sharpness_max": max(v for _, v in s["hessian/eig_top/1"]),
        "first_crossing_step": first_crossing(s["hessian/eig_top/1"], 2 / lr),
        "edge_ratio_max": max(ratios),
        "edge_ratio_last_half_mean": sum(tail) / len(tail),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    x, targets = make_data(args.P)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))  # several threads on a tiny net stall when the cores are shared
    try:
        results = {lr: train(args, lr, x, targets) for lr in args.lrs}
    finally:
        torch.set_num_threads(threads)
    png = Path(args.out)
    plot(results, png, args)
    summary = {lr: summarise(lr, run) for lr, run in results.items()}
    for lr, m in summary.items():
        print(
            f"lr = {lr:g} (2 / lr = {2 / lr:g}): lambda_max {m['sharpness_first']:.3g} "
            f"-> max {m['sharpness_max']:.3g}, "
            f"first at 2 / lr at step {m['first_crossing_step']}; edge ratio max {m['edge_ratio_max']:.3f}, "
            f"mean over the second half {m['edge_ratio_last_half_mean']:.3f}; "
            f"loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}"
        )
    print(f"wrote {png}")
    return {
        "png": str(png),
        "args": args,
        "summary": summary,
        "scalars": {lr: run["scalars"] for lr, run in results.items()},
        "models": {lr: run["model"] for lr, run in results.items()},
    }


if __name__ == "__main__":
    main()
