"""Empirical NTK of a 20-200-200-1 tanh MLP (float32) on P samples: probes vs torch.func vs a per-sample loop.

Cases, measured round-robin in one process (``benchmarks/_timing.py``):

- ``probes (float64)``: ``probes.functional.ntk.empirical_ntk`` with its defaults (products in float64);
- ``probes (float32)``: the same with ``dtype=torch.float32`` (the precision of the two references);
- ``torch.func``: ``vmap(jacrev)`` per-sample Jacobians of every parameter, then ``J J^T`` (the anchor);
- ``autograd loop``: one ``torch.autograd.grad`` per sample, then ``J J^T``;
- ``products (float64/32)``: only the ``P x P`` products the layerwise formula cannot avoid,
  ``sum_l (G_l G_l^T) * ([Z_l 1][Z_l 1]^T)`` as full matrix products on precomputed factors;
- ``neural-tangents``: ``empirical_ntk_fn`` on the same weights, when JAX and neural-tangents import.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the running total of the allocations
that ``torch.profiler(profile_memory=True)`` attributes to operators. Times are medians; never asserted.

    python benchmarks/ntk.py            # P = 250, 500, 1000
    python benchmarks/ntk.py --quick    # P = 250, 500
    python benchmarks/ntk.py --smoke    # seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import interleaved  # noqa: E402

import probes.functional.ntk as tangent  # noqa: E402

ANCHOR = "torch.func"


def build(P: int, sizes: tuple[int, ...], device: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(device), torch.randn(P, sizes[0], device=device)


def ntk_torch_func(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],)).reshape(-1)

    j = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    J = torch.cat([v.reshape(x.shape[0], -1) for v in j.values()], dim=1)
    return J @ J.T


def ntk_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[i:i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


def product_factors(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    plan = tangent.ntk_plan(model, x)
    f = tangent._linear_factors(model, (x,), x.shape[0], plan, "trace", x.shape[0], dtype, "bench")
    return [(G[:, 0, 0], Z[:, 0]) for G, Z in f.values()]


def products(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    out = None
    for G, Z in factors:
        term = (G @ G.T).mul_(Z @ Z.T)
        out = term if out is None else out.add_(term)
    return out


def neural_tangents_case(model: nn.Module, x: torch.Tensor):
    """A callable computing neural-tangents' empirical NTK (trace, summed) on the same weights, or None."""
    try:
        import jax
        import jax.numpy as jnp
        import neural_tangents as nt
    except Exception:  # noqa: BLE001 - optional column
        return None
    linears = [m for m in model if isinstance(m, nn.Linear)]
    params = [(jnp.asarray(m.weight.detach().cpu().numpy().T), jnp.asarray(m.bias.detach().cpu().numpy()))
              for m in linears]

    def apply(p, xs):
        h = xs
        for i, (w, b) in enumerate(p):
            h = h @ w + b
            if i < len(p) - 1:
                h = jnp.tanh(h)
        return h

    fn = jax.jit(nt.empirical_ntk_fn(apply, trace_axes=(-1,), vmap_axes=0))
    xs = jnp.asarray(x.detach().cpu().numpy())
    return lambda: fn(xs, None, params).block_until_ready()


def cases(model: nn.Module, x: torch.Tensor, loop: bool = True) -> dict:
    f64 = product_factors(model, x, torch.float64)
    f32 = product_factors(model, x, torch.float32)
    out = {
        "probes (float64)": lambda: tangent.empirical_ntk(model, x),
        "probes (float32)": lambda: tangent.empirical_ntk(model, x, dtype=torch.float32),
        ANCHOR: lambda: ntk_torch_func(model, x),
        "products (float64)": lambda: products(f64),
        "products (float32)": lambda: products(f32),
    }
    if loop:
        out["autograd loop"] = lambda: ntk_loop(model, x)
    nt_case = neural_tangents_case(model, x)
    if nt_case is not None:
        out["neural-tangents"] = nt_case
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(fn, device: str) -> float:
    """Peak memory (MiB) that one call of ``fn`` adds: CUDA allocator statistics, or on the CPU the running
    total of the allocations and frees that ``torch.profiler`` attributes to operators (peaks inside one
    operator are not seen)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    total = peak = 0
    for e in events:
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    return peak / 2**20


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--sizes", default="20,200,200,1")
    p.add_argument("--P", default=None, help="comma-separated probe-batch sizes")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.smoke:
        Ps, rounds, sizes, memory = [24], 1, (5, 16, 16, 1), False
    elif args.quick:
        Ps, rounds, memory = [250, 500], 3, not args.no_memory
    else:
        Ps, rounds, memory = [250, 500, 1000], 5, not args.no_memory
    if args.P:
        Ps = [int(v) for v in args.P.split(",")]
    rounds = args.rounds or rounds
    print(f"empirical NTK (trace over outputs) of MLP {'-'.join(map(str, sizes))} (tanh, float32), "
          f"device {args.device}, {torch.get_num_threads()} threads; medians of {rounds} interleaved rounds")
    rows: list[dict] = []
    for P in Ps:
        model, x = build(P, sizes, args.device)
        fns = cases(model, x)
        ref = ntk_torch_func(model, x).double()
        errors = {}
        for name in ("probes (float64)", "probes (float32)", "autograd loop"):
            errors[name] = float((fns[name]().double() - ref).abs().max() / ref.abs().max())
        timed = {k: (lambda f=f: (f(), sync(args.device))) for k, f in fns.items()}
        times = interleaved(timed, rounds=rounds, warmup=1)
        mems = {k: peak_memory(f, args.device) for k, f in fns.items()} if memory else {}
        print(f"\nP = {P}")
        print(f"{'case':<20} {'time (ms)':>11} {'ratio vs ' + ANCHOR:>20} {'x products':>11} {'peak MiB':>9} "
              f"{'rel. error':>11}")
        for name, t in times.items():
            prod = times["products (float32)" if "float32" in name else "products (float64)"]
            vs_products = f"{t / prod:>11.2f}" if name.startswith("probes") else f"{'':>11}"
            mem = mems.get(name)
            mem_s = f"{mem:>9.1f}" if mem is not None else f"{'-':>9}"
            err = errors.get(name)
            err_s = f"{err:>11.1e}" if err is not None else f"{'':>11}"
            print(f"{name:<20} {t * 1e3:>11.2f} {times[ANCHOR] / t:>19.2f}x {vs_products} {mem_s} {err_s}")
            rows.append({"P": P, "case": name, "time": t, "speedup_vs_func": times[ANCHOR] / t,
                         "vs_products": t / prod if name.startswith("probes") else None,
                         "peak_mib": mem, "max_error": err})
    print("\nratio vs torch.func = torch.func time / case time (higher is faster); x products = case time / time "
          "of the P x P products of the layerwise formula in the same precision")
    return rows


if __name__ == "__main__":
    main()
