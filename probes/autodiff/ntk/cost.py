"""What one kernel measurement will cost, before it runs: ``ntk_cost`` describes what the plan will do.

The estimate follows the plan, layer by layer, as ``factors``, ``dense`` and ``operator`` will run it:

- a layerwise layer holds, for all samples, either its **factors** (output gradients ``G`` and inputs ``Z`` per
  position, ``Theta_ij += sum_{k,k'} (g_ik . g_jk') (z_ik . z_jk')``) or its **per-sample gradients** ``D``,
  whichever ``terms._route`` picks at this ``P`` (the same function decides both);
- a parameter left to the fallback holds its **Jacobian** rows (``torch.func``), grouped as ``fallback`` groups
  them under ``settings.fallback_budget`` (all groups at once for the operator, one at a time for the dense kernel);
- the dense kernel adds ``n x n`` float64 matrices (``kernels`` of them at once: the ``ntk`` probe's kernel, its
  first kernel and the temporaries of its spectrum and alignment make five, seven with labels), the top-k route a
  Krylov basis (``2 n m`` numbers and their concatenated copies, ``m`` the vectors ``top_eigenvalues`` typically
  takes, ``EXPECTED_BLOCKS``) and one block of every product;
- the transients: one chunk of the forward/backward passes (``settings.factor_chunk_bytes`` of recorded factors,
  with the chunk's activations and the gradients of its ``C`` batched cotangents), a strip of products
  (``settings.strip_bytes``), the rank test of a factor before the operator expresses it in a row basis, a
  fallback chunk (``settings.fallback_chunk_bytes``).

The peak is the largest of the stages' totals (factors being recorded, products, fallback, spectrum or Krylov),
above what is allocated before the measurement (model, probe batch). The time figure counts floating-point
operations (passes: a forward of one sample times ``1 + C``, with the fallback's ``1 + 2 C`` per parameter
group; products; ``eigvalsh`` as ``4 n^3``, its tridiagonalisation being bound by memory; Krylov products) and
divides them by the rate of one float64 matrix product measured once per device, plus a fixed cost per layer and
chunk (``OVERHEAD_S``): a figure for planning (within a few times), not a promise. It counts the top-k route's
products on the factors as recorded; the operator first expresses low-rank factors in their row bases (the output
gradients of a layer before a linear read-out: ``C n`` columns of rank ``n``), which can make them several times
cheaper.

Shapes come from one forward of one sample with hooks on the planned layers: each call's term is built as the
layerwise path builds it, for one output (its sizes for ``C`` outputs follow), so no figure here is guessed from
parameter counts. ``FlopCounterMode`` counts that forward's operations.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from probes.autodiff.fsdp import tops_gathered
from probes.autodiff.ntk.dense import _strip_rows
from probes.autodiff.ntk.factors import _per_sample_call
from probes.autodiff.ntk.fallback import _fallback_groups
from probes.autodiff.ntk.inputs import _as_args, _detached, _take
from probes.autodiff.ntk.layers import _kind_of, _own_params
from probes.autodiff.ntk.plan import NTKPlan
from probes.autodiff.ntk.planning import ntk_plan
from probes.functional.ntk.settings import DEFAULT, NTKSettings
from probes.functional.ntk.terms import _Embed, _Grad, _merge, _Pairs, _route

#: routes of ``ntk_cost``: the dense ``n x n`` kernel, or the matrix-free top-k operator
ROUTES = ("full", "topk")
#: ``eigvalsh`` of an ``n x n`` matrix counted as this many times ``n^3`` operations at the measured GEMM rate
#: (LAPACK's tridiagonalisation is half matrix-vector work, bound by memory)
EIG_FLOPS = 4.0
#: seconds of fixed work (Python, kernel launches): per measurement, and per term for each chunk of passes and each
#: product
OVERHEAD_S = (1e-3, 1e-4)
#: block products ``top_eigenvalues`` typically takes to converge, beyond 40 vectors (85 vectors for the top 10 of a
#: tanh MLP at P = 50,000); a spectrum that converges slowly grows the basis up to ``max(300, 20 b)`` columns
EXPECTED_BLOCKS = 8


@dataclass(frozen=True)
class _TermShape:
    """One layerwise term as the factors path builds it, per sample and per output."""

    key: str
    kind: str
    form: str  # "pairs" (G, Z), "grad" (D), "embed" (G, tokens)
    K: int = 1  # positions per sample (calls x sequence positions x output pixels)
    g: int = 1  # groups
    n: int = 0  # output features per position and group (pairs), embedding width (embed)
    d: int = 0  # input features per position and group, without the bias column (pairs)
    bias: bool = False
    V: int = 0  # embedding rows
    F: int = 0  # per-sample gradient length per output (grad)
    itemsize: int = 4  # the precision the passes compute the factors in
    outer: bool = False  # per-sample gradients whatever the cost (tied weights, directly used parameters)

    def fresh(self, C: int) -> int:
        """Bytes per sample of the term one chunk records (``terms._term_bytes``)."""
        if self.form == "grad":
            return C * self.F * self.itemsize
        if self.form == "pairs":
            return (C * self.K * self.g * self.n + self.K * self.g * self.d) * self.itemsize
        return C * self.K * self.n * self.itemsize + self.K * 8

    def outer_features(self) -> int:
        """Length of one output's per-sample gradient (``terms._outer_features``)."""
        if self.form == "grad":
            return self.F
        if self.form == "pairs":
            return self.g * self.n * (self.d + self.bias)
        return self.V * self.n

    def route(self, C: int, Ce: int, rows: int, itemsize: int, target: str, settings: NTKSettings = DEFAULT) -> str:
        """ "outer" or "pairs", decided by ``terms._route`` itself on shape-only (meta) tensors."""
        if self.outer or self.form == "grad":
            return "outer"
        meta = torch.device("meta")
        if self.form == "pairs":
            t: Any = _Pairs(
                torch.empty((1, C, self.K, self.g, self.n), device=meta),
                torch.empty((1, self.K, self.g, self.d), device=meta),
                self.bias,
            )
        else:
            t = _Embed(
                torch.empty((1, C, self.K, self.n), device=meta),
                torch.empty((1, self.K), dtype=torch.long, device=meta),
                self.V,
            )
        return _route(t, rows, itemsize, target, Ce, settings)


@dataclass
class _Layout:
    """What ``ntk_cost`` found on one sample: the terms, the fallback's parameters, one forward's work."""

    terms: list[_TermShape]
    fallback: dict[str, tuple[int, int]]  # name -> (numel, length of its first axis; 0 for a 0-d parameter)
    model_itemsize: int
    forward_flops: float
    activation_bytes: int  # one sample's recorded layer inputs and outputs
    device: torch.device
    outputs: int


@dataclass
class NTKCost:
    """The estimate of one kernel measurement (``ntk_cost``).

    Attributes:
        route: ``"full"`` (the dense ``n x n`` kernel) or ``"topk"`` (the matrix-free operator).
        P: probe samples.
        n: the kernel's size (``P``, or ``P C`` in ``mode="full"``).
        outputs: ``C``, outputs per sample.
        mode: ``"trace"`` or ``"full"``.
        factor_bytes: layerwise factors ``G, Z`` (and embedding tokens) held for all samples.
        gradient_bytes: per-sample gradients ``D`` held for all samples (layers on the outer-product route, norm
            layers, tied weights, directly used parameters).
        jacobian_bytes: fallback Jacobians held at once (every group for the operator, the largest group, taken
            while the previous one is still referenced, for the dense kernel).
        kernel_bytes: the ``n x n`` float64 matrices alive at once on the full route (0 for top-k).
        krylov_bytes: the top-k route's Krylov basis, its images and their concatenated copies (0 for full).
        transient_bytes: the largest temporary of a stage (a chunk of passes, a strip or block of products).
        peak_bytes: the largest stage total: memory the measurement adds to what is allocated before it.
        stages: stage -> its total bytes.
        flops: operations counted (see the module's docstring).
        rate: the float64 matrix-product rate assumed, operations per second (measured on the device).
        seconds: the time figure, ``flops / rate`` and a fixed cost per layer and chunk (``OVERHEAD_S``).
        terms: ``(key, kind, route, bytes held)`` per layerwise term; fallback groups as ``("fallback", names,
            "jacobian" or "streamed", bytes)``.
        products: vectors the operator multiplies (top-k; the typical count, for the time figure).
        basis: columns of the Krylov basis the memory figure allows for (top-k: as ``products``; a slowly
            converging spectrum takes more, up to ``max(300, 20 b)``).
    """

    route: str
    P: int
    n: int
    outputs: int
    mode: str
    factor_bytes: int
    gradient_bytes: int
    jacobian_bytes: int
    kernel_bytes: int
    krylov_bytes: int
    transient_bytes: int
    peak_bytes: int
    stages: dict[str, int]
    flops: float
    rate: float
    seconds: float
    terms: list[tuple[str, str, str, int]]
    products: int = 0
    basis: int = 0
    _layout: _Layout | None = field(default=None, repr=False)
    _options: dict[str, Any] = field(default_factory=dict, repr=False)

    def at(self, **changes: Any) -> NTKCost:
        """The same estimate with some options changed: ``P``, ``outputs`` (``C``, e.g. a sketch's ``k``),
        ``route``, ``mode``, ``top_k``, ``chunk_size``, ``world``, ``kernels``."""
        options = {**self._options, **changes}
        if self._layout is None:
            raise ValueError("NTKCost.at: this estimate keeps no layout to re-evaluate (made by ntk_cost, it has one)")
        return _evaluate(self._layout, **options)

    def parts(self) -> str:
        """The memory held, part by part, and the largest temporary."""
        return ", ".join(
            f"{what} {gib(b)}"
            for what, b in (
                ("layer factors", self.factor_bytes),
                ("per-sample gradients", self.gradient_bytes),
                ("fallback Jacobians", self.jacobian_bytes),
                (f"{self.kernel_bytes // max(1, 8 * self.n * self.n)} n x n kernels", self.kernel_bytes),
                (f"Krylov basis ({self.basis} vectors)", self.krylov_bytes),
                ("largest temporary", self.transient_bytes),
            )
            if b
        )

    def time(self) -> str:
        """The time figure and what it counts."""
        return (
            f"about {_duration(self.seconds)} ({self.flops:.2g} operations at {self.rate / 1e9:.3g} GFLOP/s"
            + (f", {self.products} products" if self.route == "topk" else "")
            + ")"
        )

    def summary(self) -> str:
        """One line: the route, the peak, its parts, and the time figure."""
        return (
            f"route {self.route!r}, n = {self.n:,}: peak about {gib(self.peak_bytes)} ({self.parts()}); {self.time()}"
        )


def _significant(v: float) -> str:
    """Two significant digits, without an exponent."""
    if v < 100:
        return f"{v:.2g}"
    return f"{round(v, 1 - int(math.floor(math.log10(v)))):,.0f}"


def gib(b: float) -> str:
    """Bytes in MiB, GiB or TiB, two or three significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b / 2**20:.3g} MiB" if b >= 2**20 / 10 else f"{b / 2**10:.3g} KiB"


def _duration(s: float) -> str:
    return (
        f"{_significant(s)} s"
        if s < 120
        else f"{_significant(s / 60)} min"
        if s < 7200
        else f"{_significant(s / 3600)} h"
    )


def ntk_cost(
    model: nn.Module,
    x: Any,
    *,
    P: int | None = None,
    plan: NTKPlan | None = None,
    mode: str = "trace",
    route: str = "full",
    top_k: int = 5,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
    world: int = 1,
    kernels: int = 1,
    settings: NTKSettings = DEFAULT,
) -> NTKCost:
    """Estimate the memory and time of one kernel measurement, without computing it.

    Args:
        model: as for ``empirical_ntk``.
        x: the model's inputs; only the first sample is run (one forward, no backward).
        P: the probe samples the measurement will take (default: the samples of ``x``).
        plan: the ``ntk_plan`` of this model and input (default: made now).
        mode: ``"trace"`` or ``"full"``.
        route: ``"full"``: ``empirical_ntk`` (the ``n x n`` kernel); ``"topk"``: ``ntk_operator`` and
            ``top_eigenvalues`` for ``top_k`` eigenvalues.
        top_k: eigenvalues of the top-k route.
        dtype: the precision of the products.
        chunk_size: as for ``empirical_ntk``.
        world: ranks sharing the samples (``distributed=True``).
        kernels: ``n x n`` float64 matrices alive at once after the kernel is made (1 for ``empirical_ntk``
            alone; the ``ntk`` probe keeps the kernel, its first kernel and the temporaries of its spectrum or
            alignment: 5, or 7 with labels).
        settings: as for ``empirical_ntk``.

    Returns:
        The ``NTKCost``; ``NTKCost.at(P=...)`` re-evaluates it for other options without another forward.

    Raises:
        ValueError: an unknown ``route``, and the errors of ``ntk_plan`` when no plan is given.
        TypeError: as ``ntk_plan``.
    """
    if route not in ROUTES:
        raise ValueError(f"ntk_cost: route must be one of {ROUTES}, got {route!r}")
    args, P0 = _as_args(x, "ntk_cost")
    if plan is None:
        plan = ntk_plan(model, args, who="ntk_cost")
    layout = _layout(model, _take(args, 0, 1), plan, settings)
    return _evaluate(
        layout,
        P=P0 if P is None else int(P),
        mode=mode,
        route=route,
        top_k=top_k,
        itemsize=torch.finfo(dtype).bits // 8,
        chunk_size=chunk_size,
        world=world,
        kernels=kernels,
        outputs=plan.outputs,
        settings=settings,
    )


def _counted_forward(model: nn.Module, args: tuple[torch.Tensor, ...], calls: dict[str, list]) -> float | None:
    """``model(*args)`` with grad on, as in the measured passes (some modules take fused paths without grad), under
    torch's FLOP counter: its total, or None for a model the counter cannot follow (run again without it, the
    hooks' ``calls`` cleared first; the work is then counted from the layers)."""
    with torch.enable_grad():
        try:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                model(*args)
            return float(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - a model the counter cannot follow: counted from the layers
            for v in calls.values():
                v.clear()
            model(*args)
            return None


def _layout(
    model: nn.Module, args: tuple[torch.Tensor, ...], plan: NTKPlan, settings: NTKSettings = DEFAULT
) -> _Layout:
    """One forward of one sample: each planned layer's term for one output (its shapes), the forward's work."""
    calls: dict[str, list] = {p: [] for p in plan.fast}

    def make_hook(path: str):
        def hook(module, hargs, hkwargs, output):
            if isinstance(output, torch.Tensor):
                calls[path].append((_detached(hargs), _detached(hkwargs), output.detach()))

        return hook

    handles = [m.register_forward_hook(make_hook(p), with_kwargs=True) for p, m in plan.modules.items()]
    flops: float | None = None
    tied = {p for group in plan.tied for p in group}
    kinds = {p: plan.layer_kinds.get(p) or _kind_of(m) for p, m in plan.modules.items()}
    shapes: dict[str, _TermShape] = {}
    activations = 0
    try:
        with tops_gathered(model):
            flops = _counted_forward(model, args, calls)
            with torch.no_grad():
                for path, recorded in calls.items():
                    m, kind = plan.modules[path], kinds[path]
                    if kind is None:
                        raise RuntimeError(f"ntk_cost: no layer formula for the planned {type(m).__name__} {path!r}")
                    layer_terms = []
                    for a, kw, o in recorded[: plan.fast[path]]:
                        activations += sum(t.numel() * t.element_size() for t in (*a, o) if isinstance(t, torch.Tensor))
                        g = o.new_zeros((1, 1) + tuple(o.shape[1:]))  # one output's gradient at the layer's output
                        layer_terms.append(kind.term_call(m, *_per_sample_call(a, kw, 1), g, settings))
                    label = plan.kinds.get(path, type(m).__name__)
                    shapes[path] = (
                        _shape_of(path, label, _merge(layer_terms), path in tied)
                        if layer_terms
                        else _TermShape(
                            path, label, "grad", F=sum(p.numel() for p in _own_params(m).values()), outer=True
                        )
                    )
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    terms = [s for p, s in shapes.items() if p not in tied]
    for group in plan.tied:  # one term: the per-sample gradients of the group's parameters
        params = {id(p): p for path in group for p in plan.modules[path].parameters() if p.requires_grad}
        terms.append(
            _TermShape(
                "+".join(group), "tied", "grad", F=sum(p.numel() for p in params.values()), itemsize=8, outer=True
            )
        )
    named = dict(model.named_parameters())
    terms += [
        _TermShape(name, "parameter", "grad", F=named[name].numel(), itemsize=8, outer=True) for name in plan.direct
    ]
    if flops is None:
        flops = sum(2.0 * t.K * t.g * t.n * t.d for t in terms if t.form == "pairs") + sum(
            2.0 * named[n].numel() for n in plan.fallback
        )
    device = args[0].device if args[0].device.type != "meta" else torch.device("cpu")
    fallback = {n: (named[n].numel(), int(named[n].shape[0]) if named[n].ndim else 0) for n in plan.fallback}
    return _Layout(
        terms,
        fallback,
        next((p.element_size() for p in model.parameters()), 4),
        flops,
        activations,
        device,
        plan.outputs,
    )


def _shape_of(key: str, kind: str, t: Any, tied: bool) -> _TermShape:
    """The shape of a layer's term for one sample and one output (``t``, from its ``term_call``)."""
    if isinstance(t, _Grad):
        return _TermShape(key, kind, "grad", F=int(t.D.shape[2]), itemsize=t.D.element_size(), outer=tied)
    if isinstance(t, _Pairs):
        _, _, K, g, n = t.G.shape
        return _TermShape(
            key,
            kind,
            "pairs",
            K=int(K),
            g=int(g),
            n=int(n),
            d=int(t.Z.shape[-1]),
            bias=t.bias,
            itemsize=t.G.element_size(),
            outer=tied,
        )
    _, _, K, d = t.G.shape
    return _TermShape(key, kind, "embed", K=int(K), n=int(d), V=int(t.V), itemsize=t.G.element_size(), outer=tied)


@dataclass(frozen=True)
class _Geometry:
    """The sizes one evaluation is made for."""

    P: int
    C: int
    Ce: int  # rows per sample: C in mode="full", else 1
    n: int  # the kernel's size
    rows: int  # samples whose factors this process computes
    itemsize: int  # of the products' dtype
    route: str
    b: int  # Krylov block (top-k)
    chunk_size: int | None
    world: int
    settings: NTKSettings = DEFAULT


@dataclass
class _Tally:
    """What ``_evaluate`` adds up over the terms and the fallback."""

    factor: int = 0
    gradient: int = 0
    largest_term: int = 0
    strip: int = 0  # dense: the largest strip of products
    block: int = 0  # operator: the largest block of one product's temporaries (operator._block_rows), and W
    squeeze: int = 0  # operator in one process: the largest temporary of a factor's row basis (operator._compressed)
    jac_held: int = 0
    jac_largest: int = 0
    flops: float = 0.0
    per_column: float = 0.0  # operator: operations per product column
    diag: float = 0.0  # operator: operations of the exact diagonal
    listing: list[tuple[str, str, str, int]] = field(default_factory=list)


def _add_term(s: _Tally, t: _TermShape, geo: _Geometry) -> None:
    """One layerwise term: held bytes on its route, the operations of its products, its temporaries."""
    P, C, Ce, n, rows, it, b = geo.P, geo.C, geo.Ce, geo.n, geo.rows, geo.itemsize, geo.b
    full = geo.route == "full"
    settings = geo.settings
    how = t.route(C, Ce, rows, it, "dense" if full else "operator", settings)
    if how == "outer":
        F = t.outer_features()
        held = rows * C * F * it
        s.gradient += held
        if t.form == "pairs":
            s.flops += 2.0 * P * C * t.K * t.g * t.n * t.d  # forming D
        Fp = C * F // Ce  # per row of the kernel, outputs folded in
        s.flops += n * n * Fp if full else 0.0
        s.per_column += 4.0 * n * Fp
        s.diag += 2.0 * n * Fp
        per_pair = Ce * Ce
        s.block = max(s.block, 8 * b * n + 8 * C * F * b)  # D^T V and W
    else:
        lit = it if full else t.itemsize  # the operator keeps factors in the passes' precision
        np_ = C * t.n // Ce
        if t.form == "pairs":
            dd = t.d + t.bias
            held = rows * (C * t.K * t.g * t.n + t.K * t.g * dd) * lit
            if full:
                s.flops += t.g * (
                    (n * n * np_ + P * P * dd + n * n)
                    if t.K == 1
                    else (n * n * t.K * t.K * (np_ + 2) + P * P * t.K * t.K * dd)
                )
            s.per_column += 4.0 * n * t.K * t.g * np_ * dd
            s.diag += 2.0 * n * t.K * t.K * t.g * (np_ + dd)
            if not full and geo.world == 1 and t.g == 1:
                for m, r in ((np_, n * t.K), (dd, P * t.K)):
                    memory, ops = _compress_cost(m, r, settings)
                    s.squeeze, s.flops = max(s.squeeze, memory), s.flops + ops
            per_row, W = Ce * t.K * (np_ + 2 * b * dd) + t.K * dd, t.g * np_ * b * dd * 8
        else:
            held = rows * (C * t.K * t.n * lit + t.K * 8)
            s.flops += n * n * t.K * t.K * (np_ + 2) if full else 0.0
            s.per_column += 4.0 * n * t.K * np_
            s.diag += 2.0 * n * t.K * t.K * np_
            per_row, W = t.K * (2 * np_ * b + Ce * np_), t.V * np_ * b * 8
        s.block = max(s.block, min(rows, max(1, settings.strip_bytes // (8 * per_row))) * per_row * 8 + W)
        s.factor += held
        per_pair = Ce * Ce * t.K * t.K * 2
    s.largest_term = max(s.largest_term, held)
    s.listing.append((t.key, t.kind, "per-sample gradients" if how == "outer" else "factors", held))
    if full:
        r = _strip_rows(P, per_pair, it, geo.chunk_size, settings)
        s.strip = max(s.strip, r * P * (per_pair + Ce * Ce) * it)


def _add_fallback(s: _Tally, layout: _Layout, geo: _Geometry) -> None:
    """The fallback's Jacobian rows, grouped and sliced as ``fallback._fallback_blocks`` does."""
    P, C, Ce, n, rows, it, settings = geo.P, geo.C, geo.Ce, geo.n, geo.rows, geo.itemsize, geo.settings
    sizes = {name: numel * (C // Ce) for name, (numel, _) in layout.fallback.items()}
    for group in _fallback_groups(sizes, rows * Ce, it, settings):
        size = sum(sizes[name] for name in group)
        J = rows * Ce * size * it
        _numel, first = layout.fallback[group[0]]
        step = max(1, min(rows, settings.fallback_chunk_bytes // max(1, 3 * C * size * layout.model_itemsize)))
        slices = 1
        if J > settings.fallback_budget:
            per_row = rows * Ce * (sizes[group[0]] // max(1, first)) * it
            if first == 0 or per_row > settings.fallback_budget:  # streamed: blocks recomputed, nothing held
                blocks = -(-rows // step)
                one = step * layout.forward_flops * (1 + 2 * C)
                s.jac_largest = max(s.jac_largest, 2 * step * Ce * size * it)
                s.listing.append(("fallback", ",".join(group), "streamed", 0))
                s.flops += one * (blocks + blocks * (blocks - 1) / 2) if geo.route == "full" else 0.0
                s.per_column += 2.0 * one * blocks / geo.b  # every block twice per product
                continue
            slices = -(-first // max(1, settings.fallback_budget // per_row))
        s.listing.append(("fallback", ",".join(group), "jacobian", J))
        s.jac_held += J
        s.jac_largest = max(s.jac_largest, J)
        s.flops += slices * P * layout.forward_flops * (1 + 2 * C)  # a forward and 2 C backward work per sample
        s.flops += n * n * size if geo.route == "full" else 0.0
        s.per_column += 4.0 * n * size
        s.diag += 2.0 * n * size


def _passes(s: _Tally, layout: _Layout, geo: _Geometry) -> tuple[int, int]:
    """The layerwise passes: chunks of one forward and one backward vectorised over the ``C`` outputs, their
    operations added to ``s.flops``. Returns the bytes of one chunk's temporaries (recorded, merged, converted) and
    the calls (chunks and products, each costing ``OVERHEAD_S[1]`` per term)."""
    if not layout.terms:
        return 0, 1
    C, settings = geo.C, geo.settings
    per_fresh = sum(t.fresh(C) for t in layout.terms)
    s.flops += geo.P * layout.forward_flops * (1 + C)
    if geo.chunk_size is not None:
        chunk = min(geo.rows, int(geo.chunk_size))
    else:
        budget = settings.cpu_factor_chunk_bytes if layout.device.type == "cpu" else settings.factor_chunk_bytes
        chunk = max(min(geo.rows, 8), min(geo.rows, settings.fast_chunk, budget // max(1, per_fresh)))
    passes = chunk * (3 * per_fresh + (2 + C) * layout.activation_bytes)
    return passes, -(-geo.rows // chunk) + (2 if geo.route == "full" else 0)


def _evaluate(
    layout: _Layout,
    *,
    P: int,
    mode: str,
    route: str,
    top_k: int,
    itemsize: int,
    chunk_size: int | None,
    world: int,
    kernels: int,
    outputs: int,
    settings: NTKSettings = DEFAULT,
) -> NTKCost:
    """The estimate for ``P`` samples and ``outputs`` outputs per sample (sizes only: no tensor is made)."""
    C = int(outputs)
    Ce = C if mode == "full" else 1
    n = P * Ce
    geo = _Geometry(
        P,
        C,
        Ce,
        n,
        -(-P // world) if world > 1 else P,
        itemsize,
        route,
        _block_size(top_k, n),
        chunk_size,
        world,
        settings,
    )
    s = _Tally()
    for t in layout.terms:
        _add_term(s, t, geo)
    passes, calls = _passes(s, layout, geo)
    fb_chunk = settings.fallback_chunk_bytes if layout.fallback else 0
    if layout.fallback:
        _add_fallback(s, layout, geo)
    if route == "full":
        m = _full_route(s, geo, passes, fb_chunk, kernels, bool(layout.fallback))
    else:
        m = _topk_route(s, geo, passes, fb_chunk, top_k, bool(layout.fallback))
        calls += 2 * -(-m.basis // geo.b)
    stages, kernel, jacobian, krylov, basis, transient = m.stages, m.kernel, m.jacobian, m.krylov, m.basis, m.transient
    rate = _gemm_rate(str(layout.device))
    seconds = s.flops / rate + OVERHEAD_S[0] + OVERHEAD_S[1] * calls * len(s.listing)
    return NTKCost(
        route=route,
        P=P,
        n=n,
        outputs=C,
        mode=mode,
        factor_bytes=s.factor,
        gradient_bytes=s.gradient,
        jacobian_bytes=jacobian,
        kernel_bytes=kernel,
        krylov_bytes=krylov,
        transient_bytes=transient,
        peak_bytes=int(max(stages.values())),
        stages=stages,
        flops=s.flops,
        rate=rate,
        seconds=seconds,
        terms=s.listing,
        products=basis,
        basis=basis,
        _layout=layout,
        _options=dict(
            P=P,
            mode=mode,
            route=route,
            top_k=top_k,
            itemsize=itemsize,
            chunk_size=chunk_size,
            world=world,
            kernels=kernels,
            outputs=C,
            settings=settings,
        ),
    )


@dataclass
class _Memory:
    """What one route holds: bytes per stage, the kernel matrices, the Jacobians, the Krylov basis (columns and
    bytes), the largest temporary."""

    stages: dict[str, int]
    kernel: int
    jacobian: int
    transient: int
    krylov: int = 0
    basis: int = 0


def _full_route(s: _Tally, geo: _Geometry, passes: int, fb_chunk: int, kernels: int, fallback: bool) -> _Memory:
    """The ``n x n`` kernel's stages: factors being recorded, products (with the shares gathered across ranks),
    the fallback, the spectrum; adds the eigenvalue operations to ``s.flops``."""
    n, world = geo.n, geo.world
    theta = 8 * n * n
    gathered = 2 * s.largest_term * (world - 1) if world > 1 else 0  # the shares of one term, and the next
    held = s.factor + s.gradient
    stages = {
        "factors": theta + held + passes,
        "products": theta + held + gathered + min(s.strip, theta + geo.settings.strip_bytes),
    }
    if fallback:  # the previous group still referenced, a group's chunks and their concatenation
        stages["fallback"] = theta + 3 * s.jac_largest + fb_chunk
    stages["spectrum"] = kernels * theta
    s.flops += EIG_FLOPS * n**3
    return _Memory(stages, kernels * theta, 2 * s.jac_largest, max(passes, s.strip, s.jac_largest + fb_chunk))


def _topk_route(s: _Tally, geo: _Geometry, passes: int, fb_chunk: int, top_k: int, fallback: bool) -> _Memory:
    """The operator's stages: factors, the fallback, the Krylov iterations; adds their operations to
    ``s.flops``."""
    n = geo.n
    basis = min(_basis_cap(top_k, n), EXPECTED_BLOCKS * geo.b + 40)
    krylov = 4 * 8 * n * basis  # basis and images, and their concatenations at each step
    matmat = s.block + 4 * 8 * geo.b * n  # a product's largest block, V, Theta V and their float64 copies
    held = s.factor + s.gradient + s.jac_held
    stages = {"factors": s.factor + s.gradient + max(passes, s.squeeze)}
    if fallback:
        stages["fallback"] = held + s.jac_largest + fb_chunk
    stages["krylov"] = held + krylov + matmat
    s.flops += basis * s.per_column + 4.0 * n * basis**2 + s.diag
    transient = max(passes, s.squeeze, matmat, s.jac_largest + fb_chunk)
    return _Memory(stages, 0, s.jac_held, transient, krylov, basis)


def _compress_cost(m: int, rows: int, settings: NTKSettings = DEFAULT) -> tuple[int, float]:
    """Bytes of the largest temporary and operations of ``operator._row_basis`` on a ``rows x m`` factor: the rank
    test on ``2 m`` spread rows, then the Gram accumulated by row blocks, its ``eigh`` and the projection."""
    if m < 16 or m > settings.compress_max or rows < 2 * m:
        return 0, 0.0
    block = min(rows, max(1, settings.strip_bytes // (m * 8))) * m * 8
    memory = block + 4 * m * m * 8 + min(rows, 4096) * m * 8  # a block, Gram and eigh (vectors, workspace), a slice
    flops = 2.0 * rows * m * m + 3 * EIG_FLOPS * m**3
    if rows > 4 * m:
        flops += 4.0 * m**3 + EIG_FLOPS * m**3
    return memory, flops


def _block_size(k: int, n: int) -> int:
    """``top_eigenvalues``' default block ``b``."""
    return max(1, min(n, max(4, (max(1, k) + 1) // 2)))


def _basis_cap(k: int, n: int) -> int:
    """``top_eigenvalues``' largest basis (its default ``max_basis``)."""
    return min(n, max(300, 20 * _block_size(k, n)))


#: side of the float64 matrix product that measures a device's rate (smaller ones measure thread start-up on CPUs)
RATE_SIZE = 1024


@functools.cache
def _gemm_rate(device: str) -> float:
    """Operations per second of a ``RATE_SIZE`` square float64 matrix product on ``device`` (best of three, after
    one; once per process and device)."""
    try:
        dev = torch.device(device)
        a = torch.randn(RATE_SIZE, RATE_SIZE, dtype=torch.float64, device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        a @ a
        sync()
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            sync()
            best = min(best, time.perf_counter() - t0)
        return 2 * RATE_SIZE**3 / max(best, 1e-9)
    except Exception:  # noqa: BLE001 - a device without float64 products (mps): a nominal rate
        return 1e10


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that one measurement on ``device`` can still take, or None where it cannot be read.

    CUDA: the free memory (``torch.cuda.mem_get_info``) and what torch's allocator holds without using it. CPU:
    ``MemAvailable`` of ``/proc/meminfo`` (else ``os.sysconf``), and at most what the process's cgroup still allows
    (``memory.max`` or ``memory.limit_in_bytes``, less the usage).

    Args:
        device: where the measurement runs.

    Returns:
        Bytes, or None (another device type, or nothing to read).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except Exception:  # noqa: BLE001 - no driver to ask
            return None
    if device.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (v1 + "limit_in_bytes", v1 + "usage_in_bytes"),
    ):
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 1 << 60:
                continue
            with open(usage) as f:
                avail = min(avail, max(0, int(text) - int(f.read().strip())))
        except (OSError, ValueError):
            continue
    return avail


__all__ = ["NTKCost", "ntk_cost", "available_memory", "ROUTES", "EIG_FLOPS"]
