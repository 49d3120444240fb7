"""``ntk``: the empirical neural tangent kernel ``Theta = J J^T`` on the probe batch and its spectrum (seed 002).

The probe class only: its options, the at-attach budget and the route it takes; the kernel and its cost estimate
are in ``probes.functional.ntk``. What it measures, its tags, options, budget and cost: ``docs/probes/ntk.md``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from probes import options
from probes.autodiff.ntk import (
    MODES,
    REDUCTIONS,
    NTKCost,
    NTKPlan,
    empirical_ntk,
    ntk_cost,
    ntk_operator,
    ntk_plan,
    trace_over_outputs,
)
from probes.autodiff.ntk import cost as ntk_cost_module
from probes.autodiff.ntk.cost import gib as _gib
from probes.autodiff.ntk.outputs import SelectedOutput, gaussian_sketch, last_positions
from probes.builtin._images import ImageCadence, declare_image_state, image_due
from probes.builtin._narrow import required
from probes.functional.alignment import DegenerateKernelError
from probes.functional.labels import label_matrix
from probes.functional.ntk.settings import NTKSettings
from probes.functional.spectra import effective_rank_bounds, kernel_distance, label_alignment, spectrum, top_eigenvalues
from probes.probe import Needs, Probe, ProbeBatch
from probes.records import Chart, Histogram, Image, Record, Scalar, Spectrum

#: ``spectrum`` option: every eigenvalue from the P x P kernel, the top-k matrix-free, or by memory_budget
SPECTRA = ("full", "topk", "auto")
#: default ``memory_budget`` (bytes) of the "full" route: about four n x n float64 matrices
MEMORY_BUDGET = 2 << 30
#: ``positions`` option: which positions of a (P, T, ...) output the kernel covers
POSITIONS = ("last", "all")
#: the most Gaussian projections ``outputs=k`` takes (the exact kernel of fewer outputs is cheaper)
MAX_OUTPUTS = 1 << 20
#: default ``max_cost``: entries of the Jacobian ``J``, P x outputs x trainable parameters (None: no limit; the memory
#: budget ``max_memory`` is what refuses a measurement by default)
MAX_COST = None
#: ``max_memory="auto"``: this fraction of the memory available on the probe batch's device at attach
MEMORY_FRACTION = 0.5
#: a measurement longer than this (seconds) is said once, with the options that shorten it
SLOW_SECONDS = 10.0

log = logging.getLogger("probes")


class NTK(Probe):
    """Empirical NTK on the probe batch: spectrum, alignment with the labels, distance from the first kernel."""

    name = "ntk"
    charts = (Chart("NTK top eigenvalues (ntk/eig_top/<k>, k = 1 largest)", r"^ntk/eig_top/\d+$"),)
    description = "neural tangent kernel on the probe batch: spectrum, label fit, drift"
    every = 1000
    passive = False
    # across ranks: each rank the factors of P / world samples, exchanged (ntk.ranks)
    needs = Needs(probe_data=True, sharding="per_sample")
    # declared states (``add_state``), for the type checker
    init_kernel: torch.Tensor | None
    init_eigenvalues: torch.Tensor | None
    init_step: int | None

    def __init__(
        self,
        mode: str = "trace",
        reduction: str = "sum",
        top_k: int = 5,
        bins: int = 64,
        chunk_size: int | None = None,
        image: bool = True,
        image_every: int | None = None,
        spectrum: str = "auto",
        memory_budget: int | float = MEMORY_BUDGET,
        positions: str = "last",
        outputs: int | None = None,
        seed: int = 0,
        max_memory: int | float | str | None = "auto",
        max_cost: int | float | None = MAX_COST,
    ) -> None:
        self.mode = options.choice("ntk", "mode", mode, MODES)
        self.reduction = options.choice("ntk", "reduction", reduction, REDUCTIONS)
        if mode == "full" and reduction != "sum":
            raise ValueError(
                "ntk: option 'reduction'='mean' applies to the trace over outputs; use it with mode='trace'"
            )
        self.top_k = required(options.integer("ntk", "top_k", top_k, minimum=0))
        self.bins = required(options.integer("ntk", "bins", bins, minimum=1, maximum=options.MAX_BINS))
        self.spectrum = options.choice("ntk", "spectrum", spectrum, SPECTRA)
        if spectrum == "topk" and self.top_k < 1:
            raise ValueError(
                f"ntk: option 'top_k' must be >= 1 with spectrum='topk' (the eigenvalues to compute), got {top_k}"
            )
        self.memory_budget = required(
            options.number("ntk", "memory_budget", memory_budget, positive=True, what="a positive number of bytes")
        )
        self.chunk_size = options.integer("ntk", "chunk_size", chunk_size, minimum=1, optional=True)
        self.positions = options.choice("ntk", "positions", positions, POSITIONS)
        self.outputs = options.integer("ntk", "outputs", outputs, minimum=1, maximum=MAX_OUTPUTS, optional=True)
        self.seed = required(options.integer("ntk", "seed", seed, minimum=0, maximum=2**63 - 1))
        self.max_cost = options.number(
            "ntk",
            "max_cost",
            max_cost,
            positive=True,
            optional=True,
            what="a positive number of Jacobian entries (P x outputs x parameters), or None",
        )
        self.max_memory = (
            max_memory
            if isinstance(max_memory, str) and max_memory == "auto"
            else options.number(
                "ntk",
                "max_memory",
                max_memory,
                positive=True,
                optional=True,
                what="'auto', a positive number of bytes, or None",
            )
        )
        self.settings = NTKSettings()  # the NTK code's budgets and switches: its defaults, passed to every call
        self.cost: NTKCost | None = None  # the estimate made at attach (check)
        self._sketch: torch.Tensor | None = None
        self.image = options.flag("ntk", "image", image)
        self.image_cadence = ImageCadence("ntk", image_every)
        declare_image_state(self)
        # the first kernel and its spectrum: persistent references, checkpointed with the session
        self.add_state("init_kernel", None, reduce=None, window=False)
        self.add_state("init_eigenvalues", None, reduce=None, window=False)
        self.add_state("init_step", None, reduce=None, window=False)
        self._plan: tuple[Any, NTKPlan] | None = None  # a cache (re-planned when the model or its placement changes)
        self._auto_topk: int | None = None  # spectrum="auto": kernels this large take "topk" (max_memory, at attach)

    def check(self, batch: ProbeBatch) -> None:
        """The model has trainable parameters and the labels are not all the same; on the at-attach pass, class
        labels must index the model's outputs (``ntk/alignment`` builds ``Y`` from them), and the model must have
        an NTK this probe computes: the plan on two samples finds a non-tensor output, dropout, or layers that mix
        samples (without computing any kernel)."""
        if not any(p.requires_grad for p in batch.model.parameters()):
            raise ValueError("ntk: the model has no trainable parameters, so its NTK is zero")
        if batch.y is not None and not _token_labels(batch.y):
            Y = label_matrix(batch.y, who="ntk")
            Yc = Y - Y.mean(dim=0, keepdim=True)
            if Y.shape[0] >= 2 and not bool(torch.linalg.vector_norm(Yc) > 1e-10 * torch.linalg.vector_norm(Y)):
                raise DegenerateKernelError(
                    "ntk: the labels of the probe batch are all the same, so Y Y^T centers to "
                    "zero and ntk/alignment is 0/0; use a probe batch with both classes"
                )

        if batch.output is None:
            return
        if batch.y is not None and isinstance(batch.output, torch.Tensor) and not self._token_labels(batch):
            batch.targets("ntk")
        model, args = self.kernel_model(batch)
        plan = ntk_plan(model, tuple(a[:2] for a in args), who="ntk")
        self.check_cost(batch.size, plan.outputs, model)
        self.check_memory(model, args, plan, batch)

    def _token_labels(self, batch: ProbeBatch) -> bool:
        """Token labels ``(P, T)`` (a language model's): ``ntk/alignment`` needs one label per sample, so it is left
        out (said once) and the kernel is measured all the same."""
        if not _token_labels(batch.y):
            return False
        batch.context.notice(
            "token-labels",
            "ntk: the probe batch has token labels (P, T); ntk/alignment needs one label per sample and is "
            "left out (the kernel, its spectrum and its drift are measured)",
        )
        return True

    def kernel_model(self, batch: ProbeBatch) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        """``(module, args)`` whose output is what the kernel covers: the probes' output, at the last kept position
        of each sample when it has more than 2 dimensions and ``positions="last"`` (the last True of ``batch.mask``,
        else the last position; said once), projected on the ``outputs`` sketch when given.

        Args:
            batch: the probe batch.

        Returns:
            The module (the model's parameters, shared) and its positional arguments.
        """
        model, args = batch.context.positional(batch.x)
        out = batch.output
        position = self.positions == "last" and isinstance(out, torch.Tensor) and out.ndim > 2
        if position and isinstance(out, torch.Tensor):  # position: a tensor output
            P, T = int(out.shape[0]), int(out.shape[1])
            masked = batch.mask is not None and tuple(batch.mask.shape) == (P, T)
            args = args + (last_positions(batch.mask if masked else None, P, T, args[0].device),)
            batch.context.notice(
                "position",
                f"ntk: the output has shape {tuple(out.shape)} (samples, positions, ...): the kernel covers "
                f"the outputs at the {'last kept (attention mask)' if masked else 'last'} position of each "
                f"sample only ({math.prod(out.shape[2:])} outputs, not {math.prod(out.shape[1:])}); "
                "positions='all' covers every position, outputs=k sketches the outputs",
            )
        if self.outputs is not None and isinstance(out, torch.Tensor):
            C = math.prod(out.shape[2:] if position else out.shape[1:])
            if self._sketch is None or self._sketch.shape[0] != C:
                self._sketch = gaussian_sketch(C, self.outputs, self.seed)
        if position or self.outputs is not None:
            model = SelectedOutput(model, position=position, sketch=self._sketch if self.outputs else None)
        return model, args

    def check_cost(self, P: int, outputs: int, model: torch.nn.Module) -> float:
        """The work of one measurement, ``P x outputs x trainable parameters`` (entries of the Jacobian ``J``: one
        backward pass per output and sample), against ``max_cost`` (memory is ``check_memory``'s).

        Args:
            P: probe samples.
            outputs: outputs per sample the kernel covers.
            model: the module whose trainable parameters enter ``J``.

        Returns:
            The cost.

        Raises:
            ValueError: the cost is above ``max_cost``; the message names the options that lower it.
        """
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cost = float(P) * outputs * n
        if self.max_cost is not None and cost > self.max_cost:
            k = max(1, int(self.max_cost // max(1, P * n)))
            raise ValueError(
                f"ntk: one measurement costs {cost:.3g} Jacobian entries (P={P} samples x {outputs} outputs x {n:,} "
                f"parameters: the backward passes' work), above max_cost={self.max_cost:.3g}; lower it with "
                f"outputs=k (a Gaussian sketch of the outputs, k={k} fits), positions='last' for a sequence output, "
                f"a smaller probe batch (probe_data), output= (fewer outputs), or raise max_cost (None: no limit)"
            )
        return cost

    def check_memory(
        self, model: torch.nn.Module, args: tuple[torch.Tensor, ...], plan: NTKPlan, batch: ProbeBatch
    ) -> NTKCost:
        """The estimate of one measurement on the route this probe will take (``ntk_cost``), against the memory
        budget ``max_memory``; kept as ``self.cost`` and logged at INFO.

        Args:
            model: the module whose kernel is measured (``kernel_model``).
            args: its inputs for the whole probe batch (one sample is run).
            plan: its ``ntk_plan``.
            batch: the probe batch.

        Returns:
            The estimate.

        Raises:
            ValueError: the estimated peak exceeds the budget; the message gives the estimate and what each option
                that lowers it would need.
        """
        Ce = plan.outputs if self.mode == "full" else 1
        labels = batch.y is not None and not _token_labels(batch.y)
        route = "topk" if self.uses_topk(batch.size * Ce) else "full"
        cost = ntk_cost(
            model,
            tuple(a[:1] for a in args),
            P=batch.size,
            plan=plan,
            mode=self.mode,
            route=route,
            top_k=max(1, self.top_k),
            chunk_size=self.chunk_size,
            world=batch.context.world_size,
            kernels=7 if labels else 5,
            settings=self.settings,
        )
        budget, source = self.memory_limit(args[0].device)
        if budget is not None and cost.peak_bytes > budget and route == "full" and self.spectrum == "auto":
            topk = cost.at(route="topk")
            if topk.peak_bytes <= budget:  # "auto" chooses the route: the one that fits
                batch.context.notice(
                    "auto-topk",
                    f"ntk: spectrum='auto' takes 'topk' (the top_k eigenvalues, the trace and the effective rank "
                    f"only): the full route would need about {_gib(cost.peak_bytes)}, above the memory budget, "
                    f"{source}",
                )
                self._auto_topk, cost = cost.n, topk
        self.cost = cost
        if budget is not None and cost.peak_bytes > budget:
            raise ValueError(self._refusal(cost, budget, source))
        log.info("ntk: one measurement: %s; memory budget: %s", cost.summary(), source)
        return cost

    def memory_limit(self, device: torch.device) -> tuple[int | None, str]:
        """``(bytes, where they come from)`` of the memory budget on ``device`` (None: no limit)."""
        if self.max_memory is None:
            return None, "none (max_memory=None)"
        if self.max_memory != "auto":
            return int(self.max_memory), f"max_memory={int(self.max_memory):,} bytes"
        avail = ntk_cost_module.available_memory(device)
        if avail is None:
            return None, f"none (the memory available on {device} cannot be read; max_memory= sets one)"
        return int(MEMORY_FRACTION * avail), (
            f"max_memory='auto', {MEMORY_FRACTION:g} of the {_gib(avail)} "
            f"available on {device} now, {_gib(MEMORY_FRACTION * avail)}"
        )

    def _alternative(self, cost: NTKCost, **changes: Any) -> NTKCost:
        """``cost`` with other options (``P``, ``outputs``, ``mode``), on the route this probe would take then."""
        P, C = changes.get("P", cost.P), changes.get("outputs", cost.outputs)
        n = P * (C if changes.get("mode", cost.mode) == "full" else 1)
        return cost.at(**changes, route="topk" if self.uses_topk(n) else "full")

    def _refusal(self, cost: NTKCost, budget: int, source: str) -> str:
        """The message of a refused measurement: the estimate, and what each fix would need."""

        def largest(name: str, top: int) -> int:
            """The largest value of ``name`` in ``1..top`` that fits the budget (0: none), by bisection."""
            lo, hi = 0, top + 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self._alternative(cost, **{name: mid}).peak_bytes <= budget else (lo, mid)
            return lo

        fixes = []
        if cost.route == "full":
            topk = cost.at(route="topk")
            fixes.append(
                f"spectrum='topk' (the top_k eigenvalues and the trace without the n x n kernel: about "
                f"{_gib(topk.peak_bytes)}{'' if topk.peak_bytes <= budget else ', still above the budget'})"
            )
        P = largest("P", cost.P - 1)
        fixes.append(
            f"a smaller probe batch (P <= {P:,} fits)" if P else "a smaller probe batch (not even one sample fits)"
        )
        C = cost.outputs
        k = largest("outputs", C - 1) if C > 1 else 0
        if C == 1:
            fixes.append("outputs=k (no help here: the kernel covers one output)")
        elif k:
            fixes.append(f"outputs=k (a Gaussian sketch of the {C} outputs; k <= {k:,} fits)")
        else:
            fixes.append(
                f"outputs=k (a Gaussian sketch of the {C} outputs; even k=1 needs about "
                f"{_gib(self._alternative(cost, outputs=1).peak_bytes)})"
            )
        if cost.mode == "full":
            fixes.append(f"mode='trace' (about {_gib(self._alternative(cost, mode='trace').peak_bytes)})")
        return (
            f"ntk: one measurement would need about {_gib(cost.peak_bytes)} (route {cost.route!r}, n = {cost.n:,}: "
            f"{cost.parts()}; {cost.time()}), above the memory budget, {source}: it would fail in the allocator "
            f"or thrash. Lower it with {'; '.join(fixes)}; or set max_memory= (bytes; None: no limit)"
        )

    def measure(self, batch: ProbeBatch) -> list[Record]:
        t0 = time.monotonic()
        records = self._measure(batch)
        seconds = time.monotonic() - t0
        if seconds > SLOW_SECONDS:
            batch.context.notice(
                "slow",
                f"ntk: one measurement took {seconds:.0f} s (progress: logging.getLogger('probes') at INFO); "
                "outputs=k (a sketch of the outputs), a smaller probe batch or a longer cadence (every=) "
                "make it cheaper",
            )
        return records

    def _measure(self, batch: ProbeBatch) -> list[Record]:
        model, args = self.kernel_model(batch)  # model(*args) is what the kernel covers (see kernel_model)
        key = (
            id(batch.model),
            tuple((n, id(p), p.requires_grad, p.dtype, p.device) for n, p in batch.model.named_parameters()),
            tuple((tuple(t.shape), t.dtype, t.device) for t in args),
        )
        if self._plan is None or self._plan[0] != key:  # the two discovery passes only when the model changed
            self._plan = (key, ntk_plan(model, args, who="ntk"))
        if self.uses_topk(batch.size * (self._plan[1].outputs if self.mode == "full" else 1)):
            return self._measure_topk(model, args, batch.step, batch.context.world_size > 1)
        theta = empirical_ntk(
            model,
            args,
            mode=self.mode,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            dtype=torch.float64,
            plan=self._plan[1],
            distributed=batch.context.world_size > 1,
            settings=self.settings,
        )
        P = batch.size
        C = theta.shape[0] // P
        s = spectrum(theta)
        records: list[Record] = [
            Scalar("ntk/trace", s.trace),
            Scalar("ntk/eig_max", s.eig_max),
            Scalar("ntk/eig_min", s.eig_min),
            Scalar("ntk/condition", s.condition),
            Scalar("ntk/effective_rank", s.effective_rank),
        ]
        top = s.top(self.top_k)
        records += [Scalar(f"ntk/eig_top/{k + 1}", top[k]) for k in range(top.numel())]
        if batch.y is not None and P >= 2 and not self._token_labels(batch):
            Y = batch.targets("ntk")
            traced = trace_over_outputs(theta, C) if C > 1 else theta
            records.append(Scalar("ntk/alignment", label_alignment(traced, Y)))
        if self.init_kernel is None or self.init_kernel.shape != theta.shape:
            self.init_kernel = theta.detach().clone()
            self.init_eigenvalues = s.eigenvalues.detach().clone()
            self.init_step = batch.step
            distance = torch.zeros((), dtype=torch.float64)  # 0 by definition (rounding would give ~1e-15)
        else:
            distance = kernel_distance(self.init_kernel.to(theta.device), theta)
        records.append(Scalar("ntk/distance_from_init", distance))
        lam = s.eigenvalues
        positive = lam[lam > 0]
        records.append(Histogram.of("ntk/log10_eigenvalues", torch.log10(positive), bins=self.bins))
        if self.image and image_due(self, self.image_cadence, batch.step):
            records.append(
                Image(
                    "ntk/spectrum",
                    spectrum_drawing(lam, self.init_eigenvalues, batch.step, self.init_step, self.reduction, self.mode),
                )
            )
        return records

    def uses_topk(self, n: int) -> bool:
        """Whether an ``n x n`` kernel takes the matrix-free top-k route: ``spectrum="topk"``, or ``"auto"`` when
        the full route's four ``n x n`` float64 matrices (kernel, symmetrised copy for ``eigvalsh``, its workspace,
        the first kernel for ``distance_from_init``) exceed ``memory_budget``, or when at attach the full route
        did not fit the memory budget ``max_memory`` and the top-k route did (``check_memory``)."""
        return self.spectrum == "topk" or (
            self.spectrum == "auto"
            and (4 * 8 * n * n > self.memory_budget or (self._auto_topk is not None and n >= self._auto_topk))
        )

    def _measure_topk(
        self, model: torch.nn.Module, args: tuple[torch.Tensor, ...], step: int, distributed: bool = False
    ) -> list[Record]:
        """Trace (exact), the ``top_k`` largest eigenvalues (block Krylov on ``Theta V`` from the layerwise factors,
        float64) and the effective rank estimated from them (``effective_rank_bounds``); no ``n x n`` matrix. The
        image plots the top eigenvalues, now and at the first measurement."""
        if self._plan is None:
            raise RuntimeError("ntk: the top-k route runs after _measure has planned the model (self._plan)")
        op = ntk_operator(
            model,
            args,
            mode=self.mode,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            dtype=torch.float64,
            plan=self._plan[1],
            distributed=distributed,
            settings=self.settings,
        )
        n = op.shape[0]
        trace = op.trace()
        top = top_eigenvalues(op.matmat, n, max(1, self.top_k), device=trace.device).values
        estimate = effective_rank_bounds(top, trace, n)[0]
        records: list[Record] = [
            Scalar("ntk/trace", trace),
            Scalar("ntk/eig_max", top[0]),
            Scalar("ntk/effective_rank", torch.tensor(estimate, dtype=torch.float64)),
        ]
        records += [Scalar(f"ntk/eig_top/{k + 1}", top[k]) for k in range(min(self.top_k, top.numel()))]
        if self.init_eigenvalues is None:
            self.init_eigenvalues, self.init_step = top.detach().clone(), step
        if self.image and image_due(self, self.image_cadence, step):
            records.append(
                Image(
                    "ntk/spectrum",
                    spectrum_drawing(top, self.init_eigenvalues, step, self.init_step, self.reduction, self.mode, of=n),
                )
            )
        return records


def spectrum_drawing(
    eigs: torch.Tensor,
    reference: torch.Tensor | None = None,
    step: int | None = None,
    reference_step: int | None = None,
    reduction: str = "sum",
    mode: str = "trace",
    of: int | None = None,
) -> Spectrum:
    """The picture data of the positive eigenvalues against their rank (largest first), log y; ``reference``
    (the first kernel's) dashed (host copies of the eigenvalues). ``of``: the kernel's size when
    ``eigs`` are only its largest eigenvalues."""
    what = (
        "PC x PC kernel" if mode == "full" else f"kernel {'summed' if reduction == 'sum' else 'averaged'} over outputs"
    )
    which = f"top {eigs.numel()} of {of:,} NTK eigenvalues" if of is not None else "NTK eigenvalues"
    title = f"ntk/spectrum: {which}" + (f", step {step}" if step is not None else "") + f"\n({what})"
    if reference is not None and step is not None and step == reference_step:
        reference = None  # at the first measurement, now is the initialization: one curve
    return Spectrum(
        eigs.detach().double().cpu().numpy(),
        None if reference is None else reference.detach().double().cpu().numpy(),
        step=step,
        reference_step=reference_step,
        title=title,
        ylabel="eigenvalue of the NTK (log scale)",
    )


def _token_labels(y: torch.Tensor | None) -> bool:
    """Integer labels with one class per position, ``(P, T)``."""
    return y is not None and y.ndim == 2 and not y.is_floating_point() and y.dtype != torch.bool
