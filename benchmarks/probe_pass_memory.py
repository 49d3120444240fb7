"""Peak resident memory of one probe measurement on a CIFAR ResNet-18, one pass vs chunked passes.

Each case runs in a fresh process (``ru_maxrss`` of the child): build a ResNet-18 for 3 x 32 x 32 inputs
(BasicBlocks, BatchNorm, one in-place ReLU module reused twice per block, as torchvision writes it), attach
``margin``, ``patterns``, ``alignment`` (and the three together, also with ``alignment``'s ``memory_budget=None``:
every chosen site's features held at once, instead of the default 512 MiB budget) with a probe batch of P images,
measure once at attach. The anchor is the model's plain forward of the same P images without probes (the floor
a probe pass cannot go under when run in one piece), printed beside ``probe_batch_size=None`` (one pass) and
chunked passes; the values of the chunked run are compared with the one-pass run.

    .venv/bin/python benchmarks/probe_pass_memory.py [--quick | --smoke] [--P 1024] [--sets margin patterns]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
import torch
from torch import nn
torch.set_num_threads(2)
P, chunk, width, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
chunk = None if chunk == "none" else int(chunk)

sys.path.insert(0, sys.argv[6])
from _resnet import ResNet18

torch.manual_seed(0)
model = ResNet18(width).eval()
x = torch.randn(P, 3, 32, 32)
y = torch.arange(P) % 10
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
values = {}
if mode == "forward":
    with torch.no_grad():
        model(x)
else:
    import probes
    spec = {}
    for item in sys.argv[5].split(","):  # "alignment:512": memory_budget=512 MiB; "alignment:none": no budget
        name, _, mib = item.partition(":")
        spec[name] = {"memory_budget": None if mib == "none" else int(mib) << 20} if mib else {}
    s = probes.attach(model, spec, probe_data=(x, y), probe_batch_size=chunk,
                      strict=True)
    s.close()
    values = {t: s.memory.last(t) for t in sorted(s.memory.tags()) if s.memory.scalars().get(t)}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak, "base_kib": base, "seconds": time.perf_counter() - t0, "values": values}))
"""


def run(P: int, chunk: str, width: int, mode: str, names: str = "margin") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(P), chunk, str(width), mode, names, str(HERE)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--P", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--sets",
        nargs="+",
        default=["margin", "patterns", "alignment", "patterns,alignment,margin", "patterns,alignment:none,margin"],
        help="probe sets to measure, comma-separated names (alignment:512: memory_budget=512 MiB, "
        "alignment:none: no budget, every site's features held at once)",
    )
    args = ap.parse_args(argv)
    P = args.P or (16 if args.smoke else 256 if args.quick else 1024)
    width = 8 if args.smoke else 64
    chunks = ["none", "4"] if args.smoke else ["none", "256"]
    gib = 1 / (1024 * 1024)
    t0 = time.perf_counter()
    floor = run(P, "none", width, "forward")
    print(
        f"ResNet-18 (width {width}), P = {P}: plain forward peak {floor['peak_kib'] * gib:.2f} GiB "
        f"(torch imported: {floor['base_kib'] * gib:.2f} GiB)"
    )
    for names in args.sets:
        ref = None
        for chunk in chunks:
            r = run(P, chunk, width, "probes", names)
            label = "one pass" if chunk == "none" else f"chunks of {chunk}"
            worst = ""
            if ref is None:
                ref = r["values"]
            else:
                diffs = [abs(r["values"][t] - v) / max(abs(v), 1e-12) for t, v in ref.items() if t in r["values"]]
                worst = f", max rel. difference to one pass {max(diffs):.1e}" if diffs else ""
            print(
                f"  {names.replace(',', ' + '):>28}, {label:>14}: peak {r['peak_kib'] * gib:.2f} GiB "
                f"({r['peak_kib'] / floor['peak_kib']:.2f}x the plain forward), {r['seconds']:.1f} s{worst}",
                flush=True,
            )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
