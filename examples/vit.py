"""A small vision transformer on the embedded digits, with the probes that apply to it.

The model is a compact ViT in plain torch: the 8 x 8 digit images cut into 2 x 2 patches by a ``Conv2d`` patch
embedding (16 patches), a learnt ``cls_token`` prepended and a learnt ``pos_embed`` added, pre-norm blocks
(LayerNorm, multi-head self-attention, LayerNorm, an MLP with ReLU, residual connections) and a linear head on
the final ``cls`` token. It trains with Adam on cross-entropy over the ten digits (1,500 training images; the other
297 are the test set).

``probes.attach`` logs, on a fixed class-balanced probe batch of training images: ``alignment`` (the centered
alignment of each block's MLP features, and of the logits, with the labels), ``margin``, ``patterns`` (the ReLU
gates), ``relu_zeros`` and ``ntk`` (the empirical NTK of the logits: trace, top eigenvalues and the distance of the
kernel from the one at initialisation). One TensorBoard run; a PNG of the accuracy, the alignment per block and the
NTK's distance from init.

    python examples/vit.py --smoke    # seconds (the tests)
    python examples/vit.py --quick    # a few minutes on 2 cores
    python examples/vit.py            # 2,000 steps: about seven times --quick
    tensorboard --logdir runs/vit
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import probes
from probes.data import balanced_subset, load_digits


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: a tiny run for the tests")
    p.add_argument("--quick", action="store_true", help="a shorter run (a few minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=32, help="token width")
    p.add_argument("--depth", type=int, default=3, help="transformer blocks")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--patch", type=int, default=2, help="patch side (8 x 8 images)")
    p.add_argument("--per-class", type=int, default=8, help="probe batch: images of each digit")
    p.add_argument("--every", type=int, default=None, help="probe cadence in steps (default steps/20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="runs/vit")
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/vit.png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.depth, args.dim, args.per_class, args.every = 4, 2, 16, 3, 2
    elif args.quick:
        args.steps = min(args.steps, 300)
    if args.every is None:
        args.every = max(1, args.steps // 20)
    return args


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection, softmax(q k^T / sqrt(d)) v, an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)) with a ReLU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.ReLU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A compact ViT for ``side x side`` single-channel images given flat, as ``probes.data`` loads them."""

    def __init__(
        self, side: int = 8, patch: int = 2, dim: int = 32, depth: int = 3, heads: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        self.side = side
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        n = (side // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.reshape(-1, 1, self.side, self.side)).flatten(2).transpose(1, 2)  # (B, n, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(args: argparse.Namespace, logdir: Path) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    x, y = load_digits()
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(y), generator=g)
    train_idx, test_idx = perm[:1500], perm[1500:]
    xtr, ytr, xte, yte = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    n_eval = 200 if args.smoke else len(ytr)  # the accuracy on the training set: all of it, or a part
    probe_idx = balanced_subset(ytr, args.per_class, generator=g)
    torch.manual_seed(args.seed)
    model = ViT(patch=args.patch, dim=args.dim, depth=args.depth, heads=args.heads)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    writer = SummaryWriter(log_dir=str(logdir))
    writer.add_text(
        "settings",
        f"ViT patch {args.patch}, dim {args.dim}, depth {args.depth}, heads {args.heads}, "
        f"Adam lr {args.lr}, batch {args.batch}, {args.steps} steps, "
        f"probe batch {len(probe_idx)} digits",
    )
    every = {"every": args.every}
    # the NTK (P x P kernel of 10 logits, from per-sample gradients) costs most: half as often as the rest
    ntk_every = {"every": args.every if args.smoke else 2 * args.every}
    spec = {"alignment": every, "margin": every, "patterns": every, "relu_zeros": every, "ntk": ntk_every}
    session = probes.attach(
        model, spec, probe_data=(xtr[probe_idx], ytr[probe_idx]), writer=writer, sinks=["memory"], optimizer=opt
    )
    acc: dict[str, list[tuple[int, float]]] = {"train": [], "test": []}
    losses: list[tuple[int, float]] = []

    def log(step: int) -> None:
        model.eval()
        for name, (xs, ys) in (("train", (xtr[:n_eval], ytr[:n_eval])), ("test", (xte, yte))):
            a = accuracy(model, xs, ys)
            writer.add_scalar(f"accuracy/{name}", a, step)
            acc[name].append((step, a))
        model.train()

    log(0)
    step, order, pos = 0, torch.randperm(len(ytr), generator=g), 0
    while step < args.steps:
        if pos + args.batch > len(ytr):
            order, pos = torch.randperm(len(ytr), generator=g), 0
        idx = order[pos : pos + args.batch]
        pos += len(idx)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # the session steps itself here
        step += 1
        if step % args.every == 0 or step == args.steps:
            writer.add_scalar("train/loss", loss.item(), step)
            losses.append((step, loss.item()))
            log(step)
    session.close()
    writer.close()
    return {"session": session, "accuracy": acc, "loss": losses, "scalars": session.memory.scalars()}


def plot(result: dict, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["scalars"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, points in result["accuracy"].items():
        axes[0].plot(*zip(*points), label=name)
    axes[0].set_title("accuracy")
    for tag in sorted(t for t in s if t.startswith("alignment/") and t.endswith("/cka")):
        site = tag[len("alignment/") : -len("/cka")]
        axes[1].plot(*zip(*s[tag]), marker=".", label=site if site == "output" else f"{site} (MLP ReLU)")
    axes[1].set_title("alignment with the labels (cka)")
    if "ntk/distance_from_init" in s:
        axes[2].plot(*zip(*s["ntk/distance_from_init"]), marker=".", label="ntk/distance_from_init")
    axes[2].set_title("NTK distance from its initial kernel")
    for ax in axes:
        ax.set_xlabel("Adam step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"ViT on the digits: patch {args.patch}, dim {args.dim}, depth {args.depth}, heads {args.heads}, "
        f"{args.steps} steps"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse(argv)
    logdir = Path(args.logdir)
    t0 = time.perf_counter()
    result = train(args, logdir)
    out = Path(args.out) if args.out else logdir / "vit.png"
    plot(result, out, args)
    seconds = time.perf_counter() - t0
    s, acc = result["scalars"], result["accuracy"]
    dist = s.get("ntk/distance_from_init", [(0, float("nan"))])
    print(
        f"test accuracy {acc['test'][0][1]:.3f} -> {acc['test'][-1][1]:.3f}; output alignment "
        f"{s['alignment/output/cka'][0][1]:.3f} -> {s['alignment/output/cka'][-1][1]:.3f}; "
        f"ntk distance from init {dist[-1][1]:.3f}"
    )
    print(f"{seconds:.1f} s; TensorBoard run {logdir}; figure {out}")
    return {
        "png": str(out),
        "logdir": str(logdir),
        "accuracy": acc,
        "loss": result["loss"],
        "scalars": s,
        "failures": dict(result["session"].failures),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
