"""The NTK across ranks: 1 and 2 gloo ranks on the CPU (one thread each), ResNet and transformer cases.

Each case of ``benchmarks/ntk.py`` (a small ResNet with eval-mode BatchNorm on 3x16x16 images; a 2-layer
transformer encoder on 16 tokens; float64) is measured in a fresh group of ``world`` spawned processes, each
with ``torch.set_num_threads(1)``:

- world 1: ``empirical_ntk(model, x)`` in one process (the anchor);
- world 2: ``empirical_ntk(model, x, distributed=True)`` on every rank: each rank the layer factors of its half
  of the probe batch, every factor all-gathered, its row strips of the kernel, one all-reduce;
- both: the matrix-free route, ``ntk_operator`` plus the top 5 eigenvalues by block Krylov
  (``top_eigenvalues``), where the ranks exchange only the partial products.

Printed per case and world: seconds per measurement (median of the rounds; the plan is made once, outside the
timing, as the ntk probe caches it), split into the factor passes (``_layer_terms``: forwards, backwards,
per-sample factors), the exchange (the all-gathers and all-reduces, timed on the ranks' side: waiting for the
slower rank included, an all-gather that overlapped the products not) and the rest (the kernel's products);
the speed-up of world 2 over world 1; the bytes each rank received in the exchange; peak resident memory per
rank (``ru_maxrss``, torch itself included); and the kernel's largest difference from one process, relative to
its largest entry, with the trace's and the top eigenvalue's relative differences.
Times are medians and never asserted; the machine may be shared.

    python benchmarks/ntk_distributed.py            # ResNet P = 256, transformer P = 256, 3 rounds
    python benchmarks/ntk_distributed.py --quick    # P = 128 and 64
    python benchmarks/ntk_distributed.py --smoke    # seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import probes.autodiff.ntk as tangent  # noqa: E402
import probes.autodiff.ntk.dense as dense  # noqa: E402
from probes.autodiff.ntk.ranks import Share  # noqa: E402
from probes.functional.spectra import top_eigenvalues  # noqa: E402
from probes.testing import join_group, leave_group, run_ranks  # noqa: E402


def build(case: str, P: int, small: bool):
    from ntk import resnet_case, transformer_case

    if case == "resnet":
        return resnet_case(P, width=4, side=8) if small else resnet_case(P)
    return transformer_case(P, T=4, d=8) if small else transformer_case(P)


class Clock:
    """Seconds spent in the factor passes and in the exchange during one measurement, and the bytes this rank
    received in the exchange (patched in)."""

    def __init__(self) -> None:
        self.factors = self.exchange = self.received = 0.0
        layer_terms, gather_rows, all_reduce = dense._layer_terms, Share.gather_rows, Share.all_reduce
        started = Share.gather_rows_async

        def timed(fn, field):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - t0)

            return wrapper

        def count(share, t):  # bytes received: an all-gather brings world - 1 blocks like t (an all-reduce, about
            self.received += (share.world - 1) * t.numel() * t.element_size()  # as many in a ring)

        def gather_async(share, local, *args, **kwargs):  # waiting for an exchange started earlier: what it did
            count(share, local)  # not overlap
            return timed(started(share, local, *args, **kwargs), "exchange")

        def gather(share, local, *args, **kwargs):
            count(share, local)
            return timed(gather_rows, "exchange")(share, local, *args, **kwargs)

        def reduce(share, t):
            count(share, t)
            return timed(all_reduce, "exchange")(share, t)

        dense._layer_terms = timed(layer_terms, "factors")
        Share.gather_rows_async = gather_async
        Share.gather_rows = gather
        Share.all_reduce = reduce

    def reset(self) -> None:
        self.factors = self.exchange = self.received = 0.0


def measure(rank: int, world: int, root: str, case: str, P: int, rounds: int, small: bool) -> None:
    torch.set_num_threads(1)
    if world > 1:
        join_group(rank, world, root, timeout_s=600)
    try:
        model, x = build(case, P, small)
        distributed = world > 1
        plan = tangent.ntk_plan(model, x)
        clock = Clock()
        rows: dict[str, list[float]] = {
            "dense": [],
            "factors": [],
            "exchange": [],
            "received": [],
            "topk": [],
            "topk_received": [],
        }
        kernel = top = None
        for _ in range(rounds + 1):  # the first round warms up
            if distributed:
                torch.distributed.barrier()
            clock.reset()
            t0 = time.perf_counter()
            kernel = tangent.empirical_ntk(model, x, plan=plan, distributed=distributed)
            rows["dense"].append(time.perf_counter() - t0)
            rows["factors"].append(clock.factors)
            rows["exchange"].append(clock.exchange)
            rows["received"].append(clock.received)
            clock.reset()
            t0 = time.perf_counter()
            op = tangent.ntk_operator(model, x, plan=plan, distributed=distributed)
            top = top_eigenvalues(op.matmat, op.shape[0], 5).values
            rows["topk"].append(time.perf_counter() - t0)
            rows["topk_received"].append(clock.received)
        result = {k: statistics.median(v[1:]) for k, v in rows.items()}
        result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(os.path.join(root, f"{case}_{world}_{rank}.json"), "w") as f:
            json.dump(result, f)
        if rank == 0:
            torch.save({"kernel": kernel, "top": top}, os.path.join(root, f"{case}_{world}.pt"))
    finally:
        if world > 1:
            leave_group()


def run(case: str, P: int, world: int, rounds: int, small: bool, root: str) -> list[dict]:
    """One fresh group of ``world`` processes (world 1: one fresh process, so that every row starts alike)."""
    where = tempfile.mkdtemp(dir=root)  # a rendezvous file of its own
    run_ranks(measure, (world, where, case, P, rounds, small), world=world, deadline_s=3600)
    return [json.loads(Path(where, f"{case}_{world}_{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="ResNet P = 128, transformer P = 64")
    mode.add_argument("--smoke", action="store_true", help="tiny models, P = 9, one round (seconds)")
    ap.add_argument("--cases", default="resnet,transformer")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --smoke 1)")
    args = ap.parse_args(argv)
    sizes = (
        {"resnet": 9, "transformer": 9}
        if args.smoke
        else {"resnet": 128, "transformer": 64}
        if args.quick
        else {"resnet": 256, "transformer": 256}
    )
    rounds = args.rounds or (1 if args.smoke else 3)
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ntk-dist-") as root:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            P = sizes[case]
            one = run(case, P, 1, rounds, args.smoke, root)[0]
            two = run(case, P, 2, rounds, args.smoke, root)
            ref, got = (torch.load(next(Path(root).glob(f"*/{case}_{w}.pt")), weights_only=True) for w in (1, 2))
            scale = float(ref["kernel"].abs().max())
            diff = {
                "kernel": float((got["kernel"] - ref["kernel"]).abs().max()) / scale,
                "trace": abs(float(got["kernel"].trace() / ref["kernel"].trace()) - 1),
                "eig_top": abs(float(got["top"][0] / ref["top"][0]) - 1),
            }
            print(
                f"\n{case}, P = {P}, float64, one thread per rank; the kernel of 2 ranks against one process: "
                f"max |diff| / max |K| = {diff['kernel']:.1e}, trace {diff['trace']:.1e}, top eigenvalue "
                f"{diff['eig_top']:.1e}"
            )
            print(
                f"{'world':>5} {'rank':>4} {'dense s':>8} {'factors':>8} {'exchange':>9} {'products':>9} "
                f"{'speed-up':>9} {'recv MiB':>9} {'top-5 s':>8} {'speed-up':>9} {'recv MiB':>9} {'peak MiB':>9}"
            )
            for world, rows in ((1, [one]), (2, two)):
                for r, row in enumerate(rows):
                    products = row["dense"] - row["factors"] - row["exchange"]
                    print(
                        f"{world:>5} {r:>4} {row['dense']:>8.3f} {row['factors']:>8.3f} {row['exchange']:>9.3f} "
                        f"{products:>9.3f} {one['dense'] / row['dense']:>8.2f}x {row['received'] / 2**20:>9.1f} "
                        f"{row['topk']:>8.3f} {one['topk'] / row['topk']:>8.2f}x "
                        f"{row['topk_received'] / 2**20:>9.1f} {row['rss_mib']:>9.0f}"
                    )
                    out.append({"case": case, "P": P, "world": world, "rank": r, **row, **diff})
    return out


if __name__ == "__main__":
    main()
