"""Seed 001: particles of a mean-field two-layer ReLU net converging on a teacher (Chizat & Bach 2018).

A teacher ``f*(x) = (1/M) sum_i a*_i relu(w*_i . x)`` with ``M = 4`` random unit directions
``w*_i`` in ``d = 2`` (output weights ``a*_i = +1``, or alternating signs with
``--teacher-signs mixed``) labels fresh Gaussian inputs ``x ~ N(0, I_d)``. Students
``f(x) = (1/m) sum_j a_j relu(w_j . x)`` (``probes.functional.particles.MeanField``) of width 20 and
100 start with every particle ``(a_j, w_j)`` on the sphere of radius 0.05 (balanced:
``|a_j| = ||w_j|| = 0.05 / sqrt(2)``) and are trained by SGD on the square loss
``(f - f*)^2 / 2`` with batches of 20 fresh samples. The step is 0.5 in mean-field time, i.e.
the optimiser's learning rate is ``0.5 * m``; ``--plain-lr`` gives the optimiser 0.5 itself,
which advances mean-field time by only ``0.5 / m`` per step (width 100 then runs 5 times
slower than width 20).

The ``particles`` probe logs, for each width, the image ``particles/positions`` (each unit
``j`` at ``a_j w_j`` with its trail since initialisation, the teacher directions ``a*_i w*_i``
as lines through the origin), the histogram ``particles/norms`` and ``particles/mean_norm`` to
TensorBoard under ``<logdir>/width<m>``, measured every ``--every`` steps and at ``--early``
geometrically spaced steps (the escape from the small sphere takes a few dozen steps). The
script also logs the test loss and the norm-weighted mean angle between the particles and
the nearest teacher line, and writes ``particles.gif`` (the widths side by side, one frame per
measurement) and a summary PNG (``--out``).

    python examples/meanfield_particles.py            # full: 20,000 steps, widths 20 and 100
    python examples/meanfield_particles.py --quick    # 4,000 steps, well under 5 minutes on 2 cores
    tensorboard --logdir runs/meanfield_particles
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

import probes
from probes.functional.particles import MeanField


def make_teacher(
    units: int, dim: int, signs: str, generator: torch.Generator, min_angle: float = 25.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher ``(a*, W*)``: unit directions uniform on the sphere, redrawn until no two are within
    ``min_angle`` degrees of each other or of each other's opposite (so that their lines are told
    apart in a picture: ``w`` and ``-w`` lie on one line through the origin)."""
    for _ in range(1000):
        w = torch.randn(units, dim, generator=generator, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True)
        cos = (w @ w.T).abs().fill_diagonal_(0.0)
        if units < 2 or float(cos.max()) <= math.cos(math.radians(min_angle)):
            break
    if signs == "positive":
        a = torch.ones(units, dtype=torch.float64)
    else:
        a = torch.tensor([(-1.0) ** i for i in range(units)], dtype=torch.float64)
    return a, w


def teacher_fn(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``f*(x) = (1/M) sum_i a*_i relu(w*_i . x)``, shape (N, 1)."""
    return (torch.relu(x @ w.T.to(x.dtype)) @ a.to(x.dtype) / a.numel())[:, None]


def line_angle(model: MeanField, teacher: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean angle (degrees) between each particle ``a_j w_j`` and the nearest teacher line
    ``R a*_i w*_i``, weighted by the particle's norm ``|a_j| ||w_j||``: 0 when all the mass lies on
    the teacher's lines (the global minimisers, up to splitting mass between ``w*`` and ``-w*``)."""
    a_t, w_t = teacher
    with torch.no_grad():
        p = model.output.weight[0].double()[:, None] * model.hidden.weight.double()
        t = a_t[:, None] * w_t
        n = p.norm(dim=1)
        cos = (p / n.clamp_min(1e-300)[:, None]) @ (t / t.norm(dim=1, keepdim=True)).T
        angle = torch.rad2deg(torch.arccos(cos.abs().max(dim=1).values.clamp(0.0, 1.0)))
        return float((angle * n).sum() / n.sum())


def train_width(width: int, args: argparse.Namespace, teacher: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Train one student; returns the probe, its frames and the loss curve."""
    from torch.utils.tensorboard import SummaryWriter

    g = torch.Generator().manual_seed(args.seed + 1000 * width)
    model = MeanField(args.dim, width, bias=False, radius=args.radius, generator=g)
    a_t, w_t = teacher
    lr = args.lr if args.plain_lr else model.mean_field_lr(args.lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x_test = torch.randn(4096, args.dim, generator=g)
    y_test = teacher_fn(x_test, a_t, w_t)
    writer = SummaryWriter(os.path.join(args.logdir, f"width{width}"))
    options = {
        "teacher": (a_t, w_t),
        "every": args.every,
        "trail": args.trail,
        "basis": "teacher" if args.dim > 2 else "init",
    }
    session = probes.attach(model, {"particles": options}, writer=writer, sinks=["memory"], strict=True)
    with torch.no_grad():
        losses = [(0, 0.5 * (model(x_test) - y_test).pow(2).mean().item())]
    angles = [(0, line_angle(model, teacher))]
    # the escape from the small sphere is fast: measure also at geometrically spaced steps early on
    early = set(np.geomspace(1, args.steps, args.early).round().astype(int).tolist()) if args.early else set()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, args.dim, generator=g)
        loss = 0.5 * (model(x) - teacher_fn(x, a_t, w_t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        session.step()
        due = step % args.every == 0
        if not due and step in early:
            session.measure()
        if due or step in early or step == args.steps:
            with torch.no_grad():
                test = 0.5 * (model(x_test) - y_test).pow(2).mean().item()
            losses.append((step, test))
            angles.append((step, line_angle(model, teacher)))
            writer.add_scalar("loss/test", test, step)
            writer.add_scalar("teacher/line_angle", angles[-1][1], step)
    session.close()
    writer.close()
    frames = [im.as_uint8() for im in session.memory.images()["particles/positions"]]
    return {
        "width": width,
        "model": model,
        "probe": session.probes["particles"],
        "frames": frames,
        "losses": losses,
        "angles": angles,
        "lr": lr,
    }


def write_gif(path: str, runs: list[dict], max_frames: int = 150, ms: int = 80) -> int:
    """Widths side by side, one frame per measurement (at most ``max_frames``); returns the frame count."""
    from PIL import Image

    n = min(len(r["frames"]) for r in runs)
    keep = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))
    gap = np.full((runs[0]["frames"][0].shape[0], 8, 3), 255, dtype=np.uint8)
    images = []
    for i in keep:
        parts = []
        for r in runs:
            parts += [r["frames"][i], gap]
        images.append(Image.fromarray(np.concatenate(parts[:-1], axis=1)))
    durations = [ms] * (len(images) - 1) + [ms * 25]  # hold the last frame
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)
    return len(images)


def write_summary(
    path: str, runs: list[dict], teacher: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace
) -> None:
    """matplotlib figure: the trails of each width with the teacher rays, and the test losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a_t, w_t = teacher
    tpos = (a_t[:, None] * w_t).numpy()
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.6 * (len(runs) + 1), 4.4))
    for ax, r in zip(axes, runs):
        probe = r["probe"]
        trails = probe.trails().numpy()
        p, sign, _ = probe.positions()
        cur = (p @ probe.basis).cpu().numpy()
        sign = sign.cpu().numpy()
        lim = 1.1 * max(np.abs(trails[np.isfinite(trails)]).max(initial=0), np.abs(cur).max(), np.abs(tpos).max())
        for j in range(cur.shape[0]):
            col = "tab:red" if sign[j] else "tab:blue"
            line = np.concatenate([trails[:, j], cur[None, j]])
            ax.plot(line[:, 0], line[:, 1], color=col, alpha=0.3, lw=0.8)
        ax.scatter(cur[:, 0], cur[:, 1], c=np.where(sign, "tab:red", "tab:blue"), s=12, zorder=3)
        for t in tpos:
            u = t / np.linalg.norm(t)
            ax.plot([-2 * lim * u[0], 2 * lim * u[0]], [-2 * lim * u[1], 2 * lim * u[1]], color="k", lw=0.8)
        ax.scatter(tpos[:, 0], tpos[:, 1], facecolors="white", edgecolors="k", s=40, zorder=4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(
            f"m = {r['width']}, radius {args.radius}, {args.steps} steps, angle {r['angles'][-1][1]:.1f}\N{DEGREE SIGN}"
        )
        ax.set_xlabel("$(a_j w_j)_1$")
        ax.set_ylabel("$(a_j w_j)_2$")
    ax = axes[-1]
    twin = ax.twinx()
    for i, r in enumerate(runs):
        steps, loss = zip(*r["losses"][1:])
        ax.loglog(steps, loss, color=f"C{i}", label=f"m = {r['width']} (lr {r['lr']:g}): test loss")
        steps, angle = zip(*r["angles"][1:])
        twin.semilogx(steps, angle, color=f"C{i}", ls="--", label=f"m = {r['width']}: angle")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test loss $\\frac{1}{2}(f - f^*)^2$ (solid)")
    twin.set_ylabel("angle to the nearest teacher line, degrees (dashed)")
    twin.set_ylim(bottom=0)
    ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(
        "particles $a_j w_j$ (red $a_j > 0$, blue $a_j < 0$) with their trails; teacher lines "
        "$\\mathbb{R}\\,a^*_i w^*_i$ in black, rings at $a^*_i w^*_i$; angle: norm-weighted mean angle "
        "to the nearest teacher line",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="seconds: a test runs this")
    mode.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    ap.add_argument("--widths", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--radius", type=float, default=0.05, help="initial sphere radius of each particle (a_j, w_j)")
    ap.add_argument("--teacher-units", type=int, default=4)
    ap.add_argument("--teacher-signs", choices=["positive", "mixed"], default="positive")
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.5, help="SGD step in mean-field time (lr * m on the parameters)")
    ap.add_argument("--plain-lr", action="store_true", help="use --lr on the parameters, without the factor m")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="default 20000 (--quick 4000, --smoke 60)")
    ap.add_argument("--every", type=int, default=None, help="probe cadence (default steps / 200)")
    ap.add_argument(
        "--early",
        type=int,
        default=60,
        help="extra measurements at geometrically spaced steps (the fast escape from the sphere)",
    )
    ap.add_argument("--trail", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logdir", default=os.path.join("runs", "meanfield_particles"))
    ap.add_argument("--out", default=None, help="summary PNG (default <logdir>/particles.png)")
    ap.add_argument("--gif", default=None, help="animation (default <logdir>/particles.gif)")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 60 if args.smoke else 4000 if args.quick else 20000
    if args.smoke:
        args.early = min(args.early, 5)
    if args.smoke and args.widths == [20, 100]:
        args.widths = [20]
    if args.every is None:
        args.every = 10 if args.smoke else max(1, args.steps // 200)
    if args.radius <= 0 or args.steps < 1 or args.batch < 1 or args.lr <= 0:
        ap.error("--radius, --steps, --batch and --lr must be positive")
    args.out = args.out or os.path.join(args.logdir, "particles.png")
    args.gif = args.gif or os.path.join(args.logdir, "particles.gif")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    os.makedirs(args.logdir, exist_ok=True)
    for p in (args.out, args.gif):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    torch.manual_seed(args.seed)
    teacher = make_teacher(args.teacher_units, args.dim, args.teacher_signs, torch.Generator().manual_seed(args.seed))
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small runs fastest on one thread (and does not fight other processes)
    try:
        for width in args.widths:
            t0 = time.perf_counter()
            run = train_width(width, args, teacher)
            run["seconds"] = time.perf_counter() - t0
            runs.append(run)
            first, last = run["losses"][0][1], run["losses"][-1][1]
            print(
                f"width {width:4d}: lr {run['lr']:g}, test loss {first:.2e} -> {last:.2e}, angle to the teacher "
                f"lines {run['angles'][0][1]:.1f} -> {run['angles'][-1][1]:.1f} deg, {len(run['frames'])} frames, "
                f"{run['seconds']:.1f} s"
            )
    finally:
        torch.set_num_threads(threads)
    n = write_gif(args.gif, runs)
    write_summary(args.out, runs, teacher, args)
    print(f"wrote {args.gif} ({n} frames), {args.out}; tensorboard --logdir {args.logdir}")
    return {"runs": runs, "gif": args.gif, "out": args.out, "teacher": teacher}


if __name__ == "__main__":
    main()
