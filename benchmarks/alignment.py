"""Centered alignment of features with labels: feature space vs two P x P routes.

For features ``F`` (P x d) and one-hot labels ``Y`` (P x C), all three routes compute the same number,
``<Kc, Lc>_F / (||Kc||_F ||Lc||_F)`` with ``K = F F^T`` and ``L = Y Y^T``, in float64:

- ``feature space``: ``probes.kernels.cka``: ``||Fc^T Yc||_F^2 / (||Fc^T Fc||_F ||Yc^T Yc||_F)``,
  ``O(P d^2)`` time and ``O(P d)`` memory;
- ``P x P, mean subtraction``: ``probes.kernels.alignment(F F^T, Y Y^T)``: builds the two P x P kernels
  and centers them by subtracting row, column and grand means, ``O(P^2 d)`` time, ``O(P^2)`` memory;
- ``P x P, seed``: the seed's route, ``K = F F^T`` centered by multiplying with ``C = I - 11^T/P`` on both
  sides (``C K C``, two ``P^3`` products per kernel), with the Frobenius inner product (the seed's
  matrix product is a bug, not a cost).

A route whose matrices will not fit in the memory available now is skipped, and the table says so.
The seed route is timed up to ``--seed-max`` samples; above that its time is extrapolated from
``t = a P^2 + b P^3`` fitted to the sizes it was timed at (``P^2 d`` for ``F F^T``, ``P^3`` for the
products with ``C``; a pure power law fitted where ``P ~ d`` would underestimate the cubic term).
``--seed-max 10000`` times it directly (minutes on a few cores).

    python benchmarks/alignment.py            # P = 10,000 and 60,000, d = 1000, C = 10
    python benchmarks/alignment.py --quick    # fewer repeats, a smaller seed fit
    python benchmarks/alignment.py --smoke    # seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from probes.kernels import alignment, cka

BYTES = 8  # float64


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_needed(route: str, P: int, d: int, C: int) -> int:
    """Peak bytes of a route, counted from the float64 arrays it holds at once."""
    features = (2 * P * d + 2 * P * C) * BYTES  # float64 copy and its centered copy
    if route == "features":
        return features + (d * d + d * C) * BYTES
    if route == "efficient":
        return features + 4 * P * P * BYTES  # K, L, Kc, Lc (the mean subtraction works in place)
    return features + 5 * P * P * BYTES  # C, CKC, L, CL, CLC (K and CK are freed before L is built)


def route_features(F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return cka(F, Y, method="features")


def route_efficient(F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    F64, Y64 = F.double(), Y.double()
    return alignment(F64 @ F64.T, Y64 @ Y64.T)


def route_seed(F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    F64, Y64 = F.double(), Y.double()
    P = F64.shape[0]
    Cm = torch.eye(P, dtype=torch.float64) - torch.full((P, P), 1.0 / P, dtype=torch.float64)
    K = F64 @ F64.T
    Kc = Cm @ K @ Cm
    del K
    L = Y64 @ Y64.T
    Lc = Cm @ L @ Cm
    del L, Cm
    return torch.dot(Kc.reshape(-1), Lc.reshape(-1)) / (torch.linalg.vector_norm(Kc) * torch.linalg.vector_norm(Lc))


ROUTES = {
    "features": ("feature space", route_features),
    "efficient": ("P x P, mean subtraction", route_efficient),
    "seed": ("P x P, seed (C K C)", route_seed),
}


def make_data(P: int, d: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 features with some label signal (as a network would give) and one-hot labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (P,), generator=g)
    Y = torch.nn.functional.one_hot(y, C).float()
    F = torch.randn(P, d, generator=g) + Y @ torch.randn(C, d, generator=g)
    return F, Y


def timed(fn, F, Y, repeat: int) -> tuple[float, float]:
    best, value = math.inf, float("nan")
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = float(fn(F, Y))
        best = min(best, time.perf_counter() - t0)
    return best, value


def fit_seed_model(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Fit ``t = a P^2 + b P^3`` (the kernel products and the ``P^3`` centering) by least squares on
    relative errors; ``a = 0`` when the two-term fit gives a negative coefficient. Returns (a, b)."""
    rows = [(P**2 / t, P**3 / t) for P, t in points]
    s11 = sum(u * u for u, _ in rows)
    s12 = sum(u * v for u, v in rows)
    s22 = sum(v * v for _, v in rows)
    r1 = sum(u for u, _ in rows)
    r2 = sum(v for _, v in rows)
    det = s11 * s22 - s12 * s12
    if det > 0:
        a, b = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
        if a >= 0 and b > 0:
            return a, b
    return 0.0, r2 / s22


def seed_time(law: tuple[float, float], P: int) -> float:
    return law[0] * P**2 + law[1] * P**3


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="alignment: feature space vs P x P routes")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes (run by the tests)")
    p.add_argument("--quick", action="store_true", help="one repeat, smaller sizes for the seed fit")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000], help="sample counts P")
    p.add_argument("--d", type=int, default=1000, help="feature dimension")
    p.add_argument("--classes", type=int, default=10, help="number of classes C")
    p.add_argument(
        "--seed-max",
        type=int,
        default=3000,
        help="largest P at which the seed's P^3 route is timed; above it, extrapolated",
    )
    p.add_argument(
        "--seed-fit",
        type=int,
        nargs="+",
        default=[1000, 2000, 3000],
        help="sizes at which the seed route is timed for the power-law fit",
    )
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (1 for routes over 30 s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.d, args.classes = [200, 400], 50, 3
        args.seed_max, args.seed_fit, args.repeat = 200, [100, 200], 1
    elif args.quick:
        args.seed_fit, args.repeat = [500, 1000, 1500], 1
        args.seed_max = min(args.seed_max, 1500)
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    d, C = args.d, args.classes
    print(
        f"alignment benchmark: d = {d}, C = {C}, float64; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{available_memory() / 2**30:.1f} GiB available"
    )
    rows: list[dict] = []
    F, Y = make_data(64, 8, 3, args.seed)
    for _, fn in ROUTES.values():  # warm up: first calls pay for thread pools and allocator set-up
        fn(F, Y)

    # the seed route's power law, from sizes small enough to time
    fit_points = []
    for P in sorted(set(args.seed_fit)):
        if memory_needed("seed", P, d, C) > 0.8 * available_memory():
            continue
        F, Y = make_data(P, d, C, args.seed)
        t, _ = timed(route_seed, F, Y, 1)
        fit_points.append((P, t))
    law = fit_seed_model(fit_points) if len(fit_points) >= 2 else None
    if law:
        print(
            "seed route timed at "
            + ", ".join(f"P={p}: {t:.3g} s" for p, t in fit_points)
            + f"; fitted t = {law[0]:.3g} P^2 + {law[1]:.3g} P^3 s"
        )

    header = f"{'P':>7} {'route':<26} {'time (s)':>12} {'ratio':>9} {'value':>12}  note"
    print(header)
    print("-" * len(header))
    for P in args.sizes:
        F, Y = make_data(P, d, C, args.seed)
        free = available_memory()
        base_t: float | None = None
        values = []
        for key in ("features", "efficient", "seed"):
            label, fn = ROUTES[key]
            need = memory_needed(key, P, d, C)
            row = {"P": P, "route": key, "seconds": None, "value": None, "note": ""}
            if need > 0.8 * free:
                row["note"] = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
                if key == "seed" and law:
                    row["seconds"] = seed_time(law, P)
                    row["note"] += f"; would take ~{row['seconds']:.3g} s (extrapolated)"
            elif key == "seed" and P > args.seed_max:
                if law:
                    row["seconds"] = seed_time(law, P)
                    row["note"] = f"extrapolated (a P^2 + b P^3 fitted at P <= {max(p for p, _ in fit_points)})"
                else:
                    row["note"] = "not timed (P > --seed-max) and no fit"
            else:
                repeat = args.repeat if key == "features" or P <= 20_000 else 1
                t, v = timed(fn, F, Y, repeat)
                row["seconds"], row["value"] = t, v
                values.append(v)
            if key == "features":
                base_t = row["seconds"]
            ratio = row["seconds"] / base_t if row["seconds"] and base_t else None
            row["ratio"] = ratio
            rows.append(row)
            secs = f"{row['seconds']:.4g}" if row["seconds"] is not None else "-"
            rat = f"{ratio:.1f}x" if ratio is not None else "-"
            val = f"{row['value']:.9f}" if row["value"] is not None else "-"
            print(f"{P:>7} {label:<26} {secs:>12} {rat:>9} {val:>12}  {row['note']}")
        if len(values) > 1:
            print(f"{'':>7} largest difference between measured values: {max(values) - min(values):.2e}")
        del F, Y
    print("ratio = time of the route / time of the feature-space route at the same P (higher: feature space faster)")
    return rows


if __name__ == "__main__":
    main()
