"""Probes under torchrun: DDP or FSDP2 (``fully_shard``), one TensorBoard run written by rank 0.

A 64-128-64-10 ReLU MLP learns the embedded handwritten digits (``probes.data.load_digits``: 1,797 images of
8 x 8, a seeded split into 1,500 training and 297 test images). Every rank trains on its slice of each global
batch; the model is wrapped in ``DistributedDataParallel`` or, with ``--fsdp``, sharded with ``fully_shard``
(each Linear, then the root). Attached on every rank with the same call as in one process:

- ``relu_zeros`` (passive): zero counts of the training forwards, summed over the ranks at each flush, so the
  written counts are those of one process that saw every rank's data;
- ``patterns``, ``alignment``, ``pathgram``, ``linear_region`` and ``particles`` (of the second hidden layer)
  (active) on a fixed probe batch of 200 test images: under DDP on rank 0, under FSDP on every rank (every
  forward all-gathers the parameters), in the same order, pathgram and particles gathering one layer at a time;
- ``ntk`` on every rank: each rank computes the layer factors of its share of the probe batch, the ranks
  exchange them, and every rank holds the kernel one process computes;
- only rank 0 writes: ``train/loss``, ``test/accuracy`` and the probe tags go into one run, ``<logdir>/<ddp|fsdp>``.

    torchrun --nproc_per_node 2 examples/distributed.py --backend gloo            # DDP on CPU
    torchrun --nproc_per_node 2 examples/distributed.py --backend gloo --fsdp     # FSDP2 on CPU
    torchrun --nproc_per_node 2 examples/distributed.py --fsdp                    # NCCL on 2 GPUs
    torchrun --nproc_per_node 2 examples/distributed.py --backend gloo --smoke    # seconds
    tensorboard --logdir runs/distributed

``--quick`` trains 3 epochs, the default 20, ``--smoke`` 12 steps. Without torchrun the script runs as one
process (world size 1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import probes
from probes.data import load_digits


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default=None,
        help="process group backend (default: nccl with CUDA, else gloo)",
    )
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 fully_shard instead of DDP")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="12 steps, probes every 4 (seconds)")
    mode.add_argument("--quick", action="store_true", help="3 epochs")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 20; --quick 3)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size, split over the ranks")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--every", type=int, default=None, help="probe cadence in steps (default 20; --smoke 4)")
    p.add_argument("--logdir", default="runs/distributed")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def init(backend: str | None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (or a one-process group) and pick this rank's device."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("--backend nccl needs CUDA GPUs; use --backend gloo on CPU")
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    else:  # plain `python examples/distributed.py`: a group of one
        store = os.path.join(tempfile.mkdtemp(prefix="probes-dist-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def wrap(net: nn.Sequential, fsdp: bool, device: torch.device) -> nn.Module:
    net = net.to(device)
    if not fsdp:
        return nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    rank, world, device = init(args.backend)
    try:
        run(args, rank, world, device)
    finally:
        dist.barrier()  # leave together: a rank tearing the group down early can abort the others
        dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    epochs = args.epochs or (1 if args.smoke else 3 if args.quick else 20)
    every = args.every or (4 if args.smoke else 20)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
    per_rank = args.batch_size // world

    x, y = load_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    x_train, y_train = x[order[:1500]].to(device), y[order[:1500]].to(device)
    x_test, y_test = x[order[1500:]].to(device), y[order[1500:]].to(device)
    probe_data = (x_test[:200], y_test[:200])  # the same fixed batch on every rank

    model = wrap(make_model(args.seed), args.fsdp, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    kind = "fsdp" if args.fsdp else "ddp"
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(args.logdir) / kind))
    spec = {
        "relu_zeros": {"every": every},
        "patterns": {"every": every},
        "alignment": {"every": every},
        "ntk": {"every": every},
        "pathgram": {"every": every},
        "linear_region": {"every": every},
        "particles": {"every": every, "layer": "2"},
    }
    session = probes.attach(model, spec, probe_data=probe_data, writer=writer, optimizer=opt)

    steps_per_epoch = len(y_train) // args.batch_size
    max_steps = 12 if args.smoke else None
    step, start = 0, time.perf_counter()
    with session:
        for epoch in range(epochs):
            perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
            model.train()
            for b in range(steps_per_epoch):
                idx = perm[b * args.batch_size : (b + 1) * args.batch_size][rank * per_rank : (rank + 1) * per_rank]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()  # the optimizer's step hook steps the session: flushes and measures when due
                step += 1
                if step % 10 == 0:  # the loss of the global batch: the mean over the ranks (a collective)
                    mean = loss.detach().clone()
                    dist.all_reduce(mean)
                    if writer is not None:
                        writer.add_scalar("train/loss", mean.item() / world, step)
                if max_steps is not None and step >= max_steps:
                    break
            accuracy = evaluate(model, x_test, y_test, device)
            if writer is not None:
                writer.add_scalar("test/accuracy", accuracy, step)
                print(
                    f"[{kind} x{world}] epoch {epoch + 1}/{epochs} step {step}: loss {loss.item():.4f}, "
                    f"test accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
    if session.failures and rank == 0:
        print("switched-off probes:", ", ".join(sorted(session.failures)))
    if writer is not None:
        writer.close()
        print(f"TensorBoard run: {Path(args.logdir) / kind}  (tensorboard --logdir {args.logdir})")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Test accuracy. Every rank runs the forward (FSDP all-gathers inside it); the counts are the same."""
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum()
    model.train()
    return float(correct) / len(y)


if __name__ == "__main__":
    main()
