"""Counting ReLU zeros of 10,000 inputs through the seed-003 MLP, three ways side by side.

1. plain training forwards with no counting (the limit): train mode, gradients enabled, so autograd records the
   graph as in training (no backward: the graph is dropped);
2. the same forwards with the ``relu_zeros`` probe attached (on-device counts, one host sync at the flush):
   passive probes count training forwards only, never those under ``no_grad``; the session is attached before
   each of its timed blocks and closed after it, untimed (with one untimed forward after attaching, and before
   each plain block), so the plain blocks run with no session in the process;
3. the seed's routine: forward, then ``for e in torch.flatten(out): if e.item() == 0``
   over every ReLU output (run on a subset and scaled to 10,000 inputs).

The probe's count over one training forward of the subset must equal the seed routine's count (the MLP has no
dropout or normalization, so train and eval forwards agree); the script stops with an AssertionError otherwise.

    python benchmarks/relu_zeros.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import Case, rotated_rounds  # noqa: E402
from overhead import SeedMLP  # noqa: E402

import probes  # noqa: E402


def seed_count(model: SeedMLP, x: torch.Tensor) -> int:
    """The seed's per-element loop (one .item() per ReLU output)."""
    count = 0
    with torch.no_grad():
        h = x
        for layer in model.layers:
            h = model.act(layer(h))
            for e in torch.flatten(h):
                if e.item() == 0:
                    count += 1
    return count


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    n = 10_000 if not args.smoke else 500
    subset = 200 if not (args.quick or args.smoke) else (50 if args.quick else 4)
    batch = 1000 if not args.smoke else 250
    torch.manual_seed(0)
    model = SeedMLP()
    x = torch.rand(n, 784)
    chunks = x.split(batch)

    def plain() -> None:  # training forwards (train mode, grad enabled), graph dropped
        for c in chunks:
            model(c)

    model.train()
    sessions = []

    def warm() -> None:  # untimed, before each block: one forward (after attaching: the capture's first forward)
        model(chunks[0])

    def attach() -> None:  # untimed, before each probe block: the plain blocks run with no session at all
        sessions.append(probes.attach(model, {"relu_zeros": {"every": 10**9}}, sinks=["memory"]))
        warm()

    def probe() -> None:  # one full count: every training forward observed, then one flush (one host sync)
        for c in chunks:
            model(c)
        sessions[-1].flush()

    measured = rotated_rounds(
        {
            "plain training forward": Case(plain, enter=warm),
            "relu_zeros probe": Case(probe, enter=attach, leave=lambda: sessions.pop().close()),
        },
        rounds=5 if not args.smoke else 2,
    )
    times = {name: statistics.median(v) for name, v in measured.items()}
    t0 = time.perf_counter()
    zeros_subset = seed_count(model, x[:subset])
    seed_time = (time.perf_counter() - t0) * n / subset
    # agreement on the subset: the probe's count equals the seed's
    s = probes.attach(model, {"relu_zeros": {"every": 10**9}}, sinks=["memory"])
    model(x[:subset])  # one training forward
    s.close()
    probe_zeros = sum(v[-1][1] for t, v in s.memory.scalars().items() if t.endswith("/zeros"))
    assert probe_zeros == zeros_subset, (probe_zeros, zeros_subset)
    print(
        f"counting ReLU zeros of {n} inputs, 784-750-320-50-10 MLP, batches of {batch}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'case':<24} {'time (s)':>10} {'ratio vs plain':>16}")
    rows = {**times, f"seed loop (x{n // subset} of {subset})": seed_time}
    for name, t in rows.items():
        print(f"{name:<24} {t:>10.3f} {t / times['plain training forward']:>15.2f}x")
    print(
        f"probe vs seed loop: {seed_time / times['relu_zeros probe']:.0f}x faster; "
        f"counts agree on the subset ({zeros_subset} zeros)"
    )
    return rows


if __name__ == "__main__":
    main()
