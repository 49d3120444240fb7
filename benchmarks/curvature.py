"""The ``hessian`` probe against PyHessian and hessian-eigenthings: time, peak memory and accuracy per measurement.

The same model, probe batch, loss (the mean cross-entropy; token cross-entropy with the causal shift for GPT-2)
and tolerance for every method, float32 models as a user trains them:

- ``mlp``: a tanh MLP (32-64-64-10 by default) on Gaussian inputs, 10 classes;
- ``mlp-wide``: the same with 128 inputs and width 512 (334,000 parameters, P = 512): no dense reference, for the
  time and memory of a model where the Lanczos basis (parameters x steps, float64) outweighs the model;
- ``cnn``: conv(3->8, 3x3)-ReLU-conv(8->16, 3x3, stride 2)-ReLU-4x4 average pool-Linear on 3 x 16 x 16 inputs;
- ``gpt2``: ``GPT2LMHeadModel`` from a tiny ``transformers.GPT2Config`` (no weights downloaded) with
  ``attn_implementation="eager"``, random tokens, labels = inputs (the LM loss);
- ``gpt2-sdpa``: the same weights with the default attention (``sdpa``), as a user builds the model: the peers'
  double backward meets ``scaled_dot_product_attention``'s fused CPU kernel, which has no derivative of its
  backward; the probe runs the products through the math kernel.

Methods, each as its user calls it (the peers through their public API, imported when installed):

- top-``k`` eigenvalues: ``probes`` (``probes.attach(model, {"hessian": ...})`` with the density, trace and image
  off, then ``session.measure()``: Lanczos to ``tol``, which also converges the most negative eigenvalue);
  ``PyHessian`` (``hessian(model, criterion, data=(x, y), cuda=False).eigenvalues(top_n=k, tol=tol)``: power
  iteration with deflation, at most 100 iterations per eigenvalue); ``eigenthings`` (hessian-eigenthings 1.0:
  ``lanczos(HessianOperator(...), k=k, which="LA", tol=tol)`` at its default ``2 k`` steps; it has no stopping
  rule, its ``tol`` only flags convergence) and ``eigenthings, N steps`` (the smallest ``N`` in ``2k, 4k, 8k, ...``
  at which its own flags say converged, found before the clock starts: what a user tuning ``max_iter`` gets);
  hessian-eigenthings 1.0 has no ``compute_hessian_eigenthings`` (the 0.x API) any more;
- trace: ``probes`` (the probe's own products, ``Hessian().products(batch)``, and ``m`` Rademacher vectors with
  ``probes.functional.hessian.hutchinson``, as the probe's measurement does), ``PyHessian`` (``.trace(tol=tol)``:
  Hutchinson until the running mean moves by less than ``tol``, at most 100 vectors), ``eigenthings``
  (``trace(op, num_matvecs=m, method="hutchinson")``, and its default ``hutch++``).

Printed per case: seconds per measurement (median over interleaved rounds, ``benchmarks/_timing.py``; a peer builds
its operator inside the timed call, as a measurement needs) and the ratio ``method / probes`` (median of the
per-round ratios; above 1 the peer is slower); the peak memory of one measurement in a fresh process per method
(after one untimed measurement, the peak reset through ``/proc/self/clear_refs``: the resident peak of a second
measurement less the resident memory before it; ``ru_maxrss`` less the RSS before the first where the reset is
unavailable; ``--no-memory`` skips it);
the accuracy against the dense Hessian in float64 (``torch.func.jacrev(torch.func.grad(loss))`` on a float64 copy,
in chunks of columns; ``eigvalsh``; models up to ``--dense-max`` parameters): the largest relative error of the
top-``k`` eigenvalues, and the trace's relative error. A peer that is not installed, or fails, says so in its row
("cannot run: <why>"). Times are never asserted.

    python benchmarks/curvature.py                 # every case, default sizes (a few minutes)
    python benchmarks/curvature.py --quick         # smaller batches, 3 rounds
    python benchmarks/curvature.py --smoke         # tiny MLP and GPT-2s, no peer needed (the test suite runs it)
    python benchmarks/curvature.py --cases mlp,gpt2 --json out.json

Install the peers with ``pip install --no-deps PyHessian hessian-eigenthings`` (their requirements would replace
torch); neither is a dependency of probes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import paired_ratios, rotated_rounds, rss_now, rss_peak  # noqa: E402

import probes  # noqa: E402
from probes.builtin.hessian import Hessian  # noqa: E402
from probes.functional.hessian import hutchinson  # noqa: E402
from probes.probe import Probe  # noqa: E402

#: sizes per mode: P samples, MLP width and inputs, GPT-2 (layers, width, sequence) and its P, wide MLP (d, width, P)
SIZES = {
    "full": {"P": 256, "width": 64, "d": 32, "gpt": (1, 16, 16), "gpt_P": 16, "wide": (128, 512, 512)},
    "quick": {"P": 128, "width": 48, "d": 32, "gpt": (1, 16, 16), "gpt_P": 8, "wide": (64, 256, 256)},
    "smoke": {"P": 16, "width": 8, "d": 6, "gpt": (1, 8, 8), "gpt_P": 2, "wide": (8, 16, 16)},
}


@dataclass
class Case:
    """A model, its probe batch, the mean loss ``loss(output, y)`` all methods share, and what a peer needs."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    label_shift: int = 0
    hf: bool = False

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _class_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy: the logits at ``t`` against the token at ``t + 1``, mean over the kept positions."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())


def build(name: str, mode: str) -> Case:
    """The case ``name`` at the sizes of ``mode``, the same in every process (fixed seeds)."""
    s = SIZES[mode]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("mlp", "mlp-wide"):
        d, w, P = (s["d"], s["width"], s["P"]) if name == "mlp" else s["wide"]
        model = nn.Sequential(nn.Linear(d, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10))
        x = torch.randn(P, d, generator=g)
        return Case(name, model.eval(), x, torch.randint(0, 10, (P,), generator=g), _class_loss)
    if name == "cnn":
        c = 8 if mode != "smoke" else 2
        model = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * c * 16, 10),
        )
        side = 16 if mode != "smoke" else 8
        x = torch.randn(s["P"], 3, side, side, generator=g)
        return Case(name, model.eval(), x, torch.randint(0, 10, (s["P"],), generator=g), _class_loss)
    if name in ("gpt2", "gpt2-sdpa"):
        from transformers import GPT2Config, GPT2LMHeadModel

        layers, width, T = s["gpt"]
        attn = "eager" if name == "gpt2" else "sdpa"
        cfg = GPT2Config(
            n_layer=layers, n_embd=width, n_head=2, vocab_size=64, n_positions=T, bos_token_id=0, eos_token_id=0
        )
        cfg._attn_implementation = attn
        model = GPT2LMHeadModel(cfg).eval()
        ids = torch.randint(0, 64, (s["gpt_P"], T), generator=g)
        return Case(name, model, ids, ids, _lm_loss, label_shift=1, hf=True)
    raise ValueError(f"unknown case {name!r}")


# -- the dense reference -----------------------------------------------------------------------------------------
def dense_reference(case: Case, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """All eigenvalues (descending) and the trace of the dense Hessian in float64, from ``torch.func`` alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = copy.deepcopy(case.model).double()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    x = case.x.double() if case.x.is_floating_point() else case.x

    def f(t: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, [s.numel() for s in shapes])
        named = {k: v.view(s) for k, v, s in zip(names, parts, shapes)}
        return case.loss(torch.func.functional_call(model, named, (x,)), case.y)

    with sdpa_kernel([SDPBackend.MATH]):
        H = torch.func.jacrev(torch.func.grad(f), chunk_size=chunk)(theta)
    H = (H + H.T) / 2
    return torch.linalg.eigvalsh(H).flip(0), float(H.diagonal().sum())


# -- the methods ---------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What a method gives: the top eigenvalues or the trace (with its sample count), or why it cannot run."""

    top: list[float] | None = None
    trace: float | None = None
    samples: int | None = None
    why: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Grab(Probe):
    """Keeps the probe batch of the session's capture pass."""

    name = "grab"
    needs_sites = False

    def measure(self, batch):
        self.batch = batch
        return []


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def probes_eigen(case: Case, k: int, tol: float) -> Callable[[], Result]:
    """The probe as a user attaches it (top ``k`` to ``tol``; no trace, density or image): one ``measure()``."""
    opts = {"top_k": k, "tol": tol, "trace_samples": 0, "density": False, "image": False, "every": 10**9}
    session = _quiet(
        lambda: probes.attach(
            case.model, {"hessian": opts}, probe_data=(case.x, case.y), sinks=["memory"], label_shift=case.label_shift
        )
    )

    def run() -> Result:
        _quiet(session.measure)
        return Result(top=[session.memory.last(f"hessian/eig_top/{i + 1}") for i in range(k)])

    return run


def probes_trace(case: Case, m: int) -> Callable[[], Result]:
    """The probe's Hutchinson trace: its own products on the probe batch, ``m`` Rademacher vectors, its seed."""
    grab = _Grab()
    session = _quiet(
        lambda: probes.attach(
            case.model, [grab], probe_data=(case.x, case.y), sinks=["memory"], label_shift=case.label_shift
        )
    )
    session.detach()
    probe = Hessian(trace_samples=m)

    def run() -> Result:
        hv = probe.products(grab.batch)
        generator = torch.Generator().manual_seed(probe.seed + 1)
        forms = []
        for _ in range(m):
            z = torch.randint(0, 2, (hv.n,), generator=generator, dtype=torch.float64) * 2 - 1
            forms.append(torch.dot(z, hv(z)))
        hv.release()
        mean, stderr = hutchinson(torch.stack(forms))
        return Result(trace=float(mean), samples=m, extra={"stderr": float(stderr)})

    return run


def _have(module: str) -> str | None:
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def pyhessian_eigen(case: Case, k: int, tol: float) -> Callable[[], Result] | str:
    if why := _have("pyhessian"):
        return why
    from pyhessian import hessian

    def run() -> Result:
        case.model.zero_grad(set_to_none=True)  # PyHessian adds any .grad already there to its gradient
        try:
            h = hessian(case.model, case.loss, data=(case.x, case.y), cuda=False)
            values, _ = h.eigenvalues(top_n=k, tol=tol)
        finally:
            case.model.zero_grad(set_to_none=True)  # it leaves the gradient's graph in .grad
        return Result(top=[float(v) for v in values])

    return run


def pyhessian_trace(case: Case, tol: float) -> Callable[[], Result] | str:
    if why := _have("pyhessian"):
        return why
    from pyhessian import hessian

    def run() -> Result:
        case.model.zero_grad(set_to_none=True)
        try:
            forms = hessian(case.model, case.loss, data=(case.x, case.y), cuda=False).trace(tol=tol)
        finally:
            case.model.zero_grad(set_to_none=True)
        return Result(trace=float(statistics.fmean(forms)), samples=len(forms))

    return run


def _operator(case: Case) -> Any:
    import hessian_eigenthings as he

    if case.hf:  # its own Hugging Face helper: model(**batch).loss with labels = input_ids
        return he.HessianOperator(case.model, [{"input_ids": case.x, "labels": case.y}], he.hf_lm_loss())
    return he.HessianOperator(case.model, [(case.x, case.y)], he.supervised_loss(case.loss))


def eigenthings_eigen(case: Case, k: int, tol: float, steps: int | None = None) -> Callable[[], Result] | str:
    if why := _have("hessian_eigenthings"):
        return why
    import hessian_eigenthings as he

    def run() -> Result:
        r = _quiet(lambda steps=steps: he.lanczos(_operator(case), k=k, which="LA", tol=tol, seed=0, max_iter=steps))
        return Result(top=[float(v) for v in r.eigenvalues], extra={"converged": bool(r.converged.all())})

    return run


def eigenthings_steps(case: Case, k: int, tol: float, most: int = 512) -> int | str:
    """The smallest ``2^j 2k`` steps at which hessian-eigenthings' own flags say all ``k`` converged (untimed)."""
    import hessian_eigenthings as he

    steps = 2 * k
    while True:
        r = _quiet(lambda steps=steps: he.lanczos(_operator(case), k=k, which="LA", tol=tol, seed=0, max_iter=steps))
        if bool(r.converged.all()) or steps >= min(most, case.n):
            return steps
        steps = min(2 * steps, most, case.n)


def eigenthings_trace(case: Case, m: int, method: str) -> Callable[[], Result] | str:
    if why := _have("hessian_eigenthings"):
        return why
    import hessian_eigenthings as he

    def run() -> Result:
        r = _quiet(lambda: he.trace(_operator(case), num_matvecs=m, method=method, seed=0))
        return Result(trace=float(r.estimate), samples=m, extra={"stderr": float(r.stderr)})

    return run


def factories(case: Case, kind: str, k: int, tol: float, m: int, steps: int | None) -> dict[str, Callable[[], Any]]:
    """Each method of ``kind`` ("eigen" or "trace") as a factory: a timed callable, or why it cannot run."""
    if kind == "eigen":
        out: dict[str, Callable[[], Any]] = {
            "probes": lambda: probes_eigen(case, k, tol),
            "PyHessian": lambda: pyhessian_eigen(case, k, tol),
            "eigenthings": lambda: eigenthings_eigen(case, k, tol),
        }
        if steps is not None:
            out["eigenthings-tuned"] = lambda: eigenthings_eigen(case, k, tol, steps)
        return out
    return {
        "probes": lambda: probes_trace(case, m),
        "PyHessian": lambda: pyhessian_trace(case, tol),
        "eigenthings": lambda: eigenthings_trace(case, m, "hutchinson"),
        "eigenthings-hutch++": lambda: eigenthings_trace(case, m, "hutch++"),
    }


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def prepare(make: Callable[[], Any]) -> tuple[Callable[[], Result] | None, Result]:
    """Build a method and run it once (untimed): the callable and its result, or None and why it cannot run."""
    try:
        run = make()
        if isinstance(run, str):
            return None, Result(why=run)
        return run, run()
    except Exception as exc:  # a peer failing on this model is a finding, not a crash of the benchmark
        return None, Result(why=_why(exc))


# -- peak memory in a fresh process ----------------------------------------------------------------------------
def _reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux: ``VmHWM`` through ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return float(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def memory_child(args: argparse.Namespace) -> dict:
    """In this fresh process: build the case and the method and measure once (imports, lazy initialisation and
    allocator caches settle), then reset the peak and measure again: that measurement's peak over the RSS before."""
    case_name, kind, method = args.child
    case = build(case_name, args.mode)
    make = factories(case, kind, args.k, args.tol, args.trace_samples, args.steps)[method]
    base = rss_now()
    run, result = prepare(make)  # builds (probes: attach, which measures once) and measures once
    if run is not None and _reset_peak():
        base = rss_now()
        run()
        peak = _hwm()
        return {"base": base, "peak": peak if peak is not None else rss_peak(), "why": result.why, "second": True}
    return {"base": base, "peak": rss_peak(), "why": result.why, "second": False}


def memory_run(case: str, kind: str, method: str, args: argparse.Namespace, steps: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, kind, method, "--mode", args.mode]
    cmd += ["--k", str(args.k), "--tol", str(args.tol), "--trace-samples", str(args.trace_samples)]
    cmd += ["--threads", str(torch.get_num_threads())] + (["--steps", str(steps)] if steps else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"why": f"memory child failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- one case --------------------------------------------------------------------------------------------------
def _error(result: Result, kind: str, ref: tuple[torch.Tensor, float] | None) -> float | None:
    """The largest relative error of the top eigenvalues, or the trace's, against the dense reference."""
    if ref is None or result.why is not None:
        return None
    if kind == "trace":
        return abs(result.trace - ref[1]) / abs(ref[1])
    exact = ref[0][: len(result.top)]
    return max(abs(v - float(e)) / abs(float(e)) for v, e in zip(result.top, exact))


def _note(result: Result, kind: str, steps: int | None, name: str) -> str:
    if result.why is not None:
        return f"cannot run: {result.why}"
    bits = []
    if result.samples is not None:
        bits.append(f"{result.samples} vectors")
    if "stderr" in result.extra:
        bits.append(f"stderr {result.extra['stderr']:.3g}")
    if name.startswith("eigenthings") and kind == "eigen":
        bits.append(f"{steps if name.endswith('tuned') else 'default'} steps, converged: {result.extra['converged']}")
    return ", ".join(bits)


#: every case, in the order printed
CASES = "mlp,cnn,gpt2,gpt2-sdpa,mlp-wide"


def measure_kind(base: Case, kind: str, args: argparse.Namespace, ref: Any, steps: int | None) -> list[dict]:
    """Every method of ``kind`` on copies of the case's model: interleaved timings, memory, accuracy."""
    runs, results = {}, {}
    for name in factories(base, kind, args.k, args.tol, args.trace_samples, steps):
        own = copy.deepcopy(base)  # each method its own model: no session, mode or .grad left to another
        run, results[name] = prepare(factories(own, kind, args.k, args.tol, args.trace_samples, steps)[name])
        if run is not None:
            runs[name] = run
    measured = rotated_rounds(runs, rounds=args.rounds, warmup=0) if runs else {}
    ratios = paired_ratios(measured, "probes") if "probes" in measured else {}
    chosen = [n for n in runs if args.memory and (args.memory_methods is None or n in args.memory_methods)]
    if args.memory_cases is not None and base.name not in args.memory_cases:
        chosen = []
    memory = {n: memory_run(base.name, kind, n, args, steps) for n in chosen}
    rows = []
    for name, result in results.items():
        mem = memory.get(name, {})
        extra = mem["peak"] - mem["base"] if "peak" in mem else None
        rows.append(
            {
                "case": base.name,
                "kind": kind,
                "method": name,
                "seconds": statistics.median(measured[name]) if name in measured else None,
                "ratio": ratios.get(name),
                "memory_bytes": extra,
                "error": _error(result, kind, ref),
                "values": result.top if kind == "eigen" else result.trace,
                "exact": None if ref is None else ([float(v) for v in ref[0][: args.k]] if kind == "eigen" else ref[1]),
                "stderr": result.extra.get("stderr"),
                "note": _note(result, kind, steps, name),
            }
        )
    anchor = next((r["memory_bytes"] for r in rows if r["method"] == "probes"), None)
    for r in rows:
        r["memory_ratio"] = r["memory_bytes"] / anchor if r["memory_bytes"] is not None and anchor else None
    return rows


def tuned_steps(case: Case, args: argparse.Namespace) -> int | None:
    if _have("hessian_eigenthings"):
        return None
    try:
        steps = eigenthings_steps(copy.deepcopy(case), args.k, args.tol)
    except Exception:  # it cannot run on this model: its row says why
        return None
    return steps if isinstance(steps, int) else None


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    width = int(spec.split(".")[0]) + len(suffix)
    return f"{'-':>{width}}" if v is None else f"{v:{spec}}{suffix}"


def print_rows(case: Case, kind: str, rows: list[dict], ref: Any) -> None:
    what = f"top-{len(rows[0]['values'] or [0])} eigenvalues" if kind == "eigen" else "trace"
    exact = (
        "no dense reference"
        if ref is None
        else (f"exact: {[round(float(v), 5) for v in ref[0][:3]]}..." if kind == "eigen" else f"exact: {ref[1]:.6g}")
    )
    print(f"\n{case.name} ({case.n:,} parameters, P = {case.x.shape[0]}): {what}; {exact}")
    print(
        f"{'method':<20} {'s/measure':>10} {'vs probes':>10} {'peak MiB':>9} {'vs probes':>10} {'rel error':>10}  note"
    )
    for r in rows:
        mib = None if r["memory_bytes"] is None else r["memory_bytes"] / 2**20
        print(
            f"{r['method']:<20} {_fmt(r['seconds'], '10.4f')} {_fmt(r['ratio'], '9.2f', 'x')} {_fmt(mib, '9.1f')} "
            f"{_fmt(r['memory_ratio'], '9.2f', 'x')} {_fmt(r['error'], '10.2e')}  {r['note']}",
            flush=True,
        )


def run_case(name: str, args: argparse.Namespace) -> list[dict]:
    try:
        case = build(name, args.mode)
    except ImportError as exc:
        print(f"\n{name}: skipped: {exc}")
        return []
    ref = dense_reference(case) if case.n <= args.dense_max else None
    steps = tuned_steps(case, args)
    rows = []
    for kind in ("eigen", "trace"):
        kind_rows = measure_kind(case, kind, args, ref, steps)
        print_rows(case, kind, kind_rows, ref)
        rows += kind_rows
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="the hessian probe against PyHessian and hessian-eigenthings")
    p.add_argument("--cases", default=CASES)
    p.add_argument("--k", type=int, default=5, help="top eigenvalues")
    p.add_argument("--tol", type=float, default=1e-3, help="the tolerance given to every method (PyHessian's default)")
    p.add_argument("--trace-samples", type=int, default=32, help="Hutchinson vectors (probes, eigenthings)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dense-max", type=int, default=8000, help="the dense reference up to this many parameters")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the fresh-process peaks")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="smaller batches, 3 rounds")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1 round (seconds; no peer needed)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.memory_methods = args.memory_cases = None
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child is not None:  # the fresh process of a memory case
        row = memory_child(args)
        print(json.dumps(row))
        return [row]
    if args.quick:
        args.mode, args.rounds = "quick", 3
    if args.smoke:
        args.mode, args.rounds, args.trace_samples, args.k = "smoke", 1, 4, 2
        # one fresh process, the probe's, on the first case: the path runs, in seconds; the CNN and the wide MLP add
        # nothing the MLP and GPT-2 do not test here
        args.memory_methods, args.memory_cases = {"probes"}, {"mlp"}
        if args.cases == CASES:
            args.cases = "mlp,gpt2,gpt2-sdpa"
    peers = [f"{m}: {_have(m) or 'installed'}" for m in ("pyhessian", "hessian_eigenthings")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.mode} sizes; tol {args.tol}, "
        f"k = {args.k}, {args.trace_samples} trace vectors; medians of {args.rounds} rounds; " + "; ".join(peers)
    )
    rows = [r for name in args.cases.split(",") if name for r in run_case(name, args)]
    print(
        "\ns/measure: median seconds per measurement; vs probes: median of the per-round ratios method / probes "
        "(above 1: slower than probes); peak MiB: in a fresh process, the peak resident memory of a second "
        "measurement less the resident memory before it (VmHWM reset; ru_maxrss less the RSS before the first "
        "where that reset is unavailable); rel error: against the dense float64 Hessian (largest over the top-k)."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
