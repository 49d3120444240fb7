"""Training time of a CIFAR ResNet-18 with the default probes at their default cadences, against plain training.

One process, three runs of the same number of SGD steps on random 3 x 32 x 32 batches (the same seeds): no probes
(the anchor); ``relu_zeros``, ``patterns``, ``alignment`` and ``margin`` at their default cadences with a probe
batch of P images and ``overhead=None`` (every cadence exactly as the probes define it: margin every 10 steps,
the others every 100); and the same with ``overhead="auto"`` (the default of ``attach``: probes at their default
cadence keep within 10% of training time together, once they have spent 2 s measuring). Printed: wall time per
run, its ratio to plain training, and the cadences the automatic budget chose. The runs' order alternates over
``--rounds`` rounds; the ratios are medians over rounds.

    python benchmarks/default_cadence.py            # width 64 (11M parameters), batch 128, P = 256, 200 steps
    python benchmarks/default_cadence.py --quick    # width 16, 200 steps
    python benchmarks/default_cadence.py --smoke    # seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _resnet import ResNet18  # noqa: E402

import probes  # noqa: E402

PROBES = ("relu_zeros", "patterns", "alignment", "margin")


def run(width: int, batch: int, P: int, steps: int, overhead, with_probes: bool) -> tuple[float, dict[str, int]]:
    torch.manual_seed(0)
    model = ResNet18(width).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    px, py = torch.randn(P, 3, 32, 32, generator=g), torch.randint(0, 10, (P,), generator=g)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    t0 = time.perf_counter()
    session = None
    if with_probes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notices of a widened cadence: reported below instead
            session = probes.attach(model, list(PROBES), probe_data=(px, py), sinks=["memory"], overhead=overhead)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if session is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session.step()
    cadences: dict[str, int] = {}
    if session is not None:
        cadences = {n: getattr(s, "k", -1) for n, s in session.schedules.items()}
        session.close()
    return time.perf_counter() - t0, cadences


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width = 4 if args.smoke else 16 if args.quick else 64
    batch, P, steps = (8, 16, 12) if args.smoke else (128, 256, 200)
    rounds = args.rounds or (1 if args.smoke else 2)
    cases = {
        "plain training": (None, False),
        "default cadences, overhead=None": (None, True),
        "default cadences, overhead='auto'": ("auto", True),
    }
    times: dict[str, list[float]] = {c: [] for c in cases}
    chosen: dict[str, int] = {}
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for case in order:
            overhead, with_probes = cases[case]
            t, cad = run(width, batch, P, steps, overhead, with_probes)
            times[case].append(t)
            if overhead == "auto":
                chosen = cad
    plain = times["plain training"]
    print(
        f"ResNet-18 (width {width}), batch {batch}, probe batch P = {P}, {steps} SGD steps, "
        f"{torch.get_num_threads()} threads, {rounds} round(s); probes: {', '.join(PROBES)}"
    )
    ratios: dict[str, float] = {}
    for case, ts in times.items():
        ratios[case] = statistics.median(t / p for t, p in zip(ts, plain))
        print(f"  {case:>36}: {statistics.median(ts):8.1f} s   {ratios[case]:.2f}x plain training")
    print("  cadences chosen by overhead='auto': " + ", ".join(f"{n} every {k}" for n, k in chosen.items()))
    return ratios


if __name__ == "__main__":
    main()
