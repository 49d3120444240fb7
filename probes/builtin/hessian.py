"""``hessian``: curvature of the mean loss over the probe batch (Cohen et al. 2021, 2022; Ghorbani et al. 2019).

Only products ``H v`` (``probes.autodiff.hessian``), never a dense ``H``: the ``top_k`` largest eigenvalues and the
most negative one by Lanczos with full reorthogonalisation in float64, the trace by Hutchinson, the spectral density
by stochastic Lanczos quadrature, and the edge of stability against the attached optimizer. See
``docs/probes/hessian.md`` for the tags, options and cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from probes import options
from probes.autodiff.hessian import Chunk, HessianProducts, adam_diagonal, preconditioned, share, trainable
from probes.autodiff.ntk.cost import available_memory
from probes.builtin._images import ImageCadence, declare_image_state, image_due
from probes.builtin._narrow import labels, required
from probes.functional.hessian import EdgeSetting, edge_setting, hutchinson
from probes.functional.spectra import Quadrature, density_grid, extreme_eigenvalues, slq_runs
from probes.inputs import take
from probes.probe import Needs, Probe, ProbeBatch, ProbeContext
from probes.records import Chart, Curves, Histogram, Image, Record, Scalar

#: ``max_memory="auto"``: this fraction of the memory available on the model's device at attach
MEMORY_FRACTION = 0.5


class Hessian(Probe):
    """Top and bottom eigenvalues, trace, spectral density and edge of stability of the loss Hessian."""

    name = "hessian"
    description = "loss curvature on the probe batch: top/min eigenvalues, trace, density, edge of stability"
    charts = (Chart("Hessian top eigenvalues (hessian/eig_top/<k>, k = 1 largest)", r"^hessian/eig_top/\d+$"),)
    every = 1000
    passive = False
    # DDP and FSDP2: every rank takes its share of the probe batch; products all-reduced
    needs = Needs(labels=True, probe_data=True, sharding="per_sample")

    def __init__(
        self,
        top_k: int = 5,
        trace_samples: int = 32,
        tol: float = 1e-8,
        max_steps: int | None = None,
        density: bool = True,
        density_vectors: int = 1,
        density_steps: int = 32,
        bins: int = 64,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        image: bool = True,
        image_every: int | None = None,
        max_memory: int | float | str | None = "auto",
    ) -> None:
        self.top_k = required(options.integer("hessian", "top_k", top_k, minimum=1))
        self.trace_samples = required(options.integer("hessian", "trace_samples", trace_samples, minimum=0))
        self.tol = required(options.number("hessian", "tol", tol, positive=True))
        self.max_steps = options.integer("hessian", "max_steps", max_steps, minimum=2, optional=True)
        self.density = options.flag("hessian", "density", density)
        self.density_vectors = required(options.integer("hessian", "density_vectors", density_vectors, minimum=1))
        self.density_steps = required(options.integer("hessian", "density_steps", density_steps, minimum=2))
        self.bins = required(options.integer("hessian", "bins", bins, minimum=1, maximum=options.MAX_BINS))
        if loss is not None and not callable(loss):
            raise ValueError(f"hessian: option 'loss' must be None or a callable (output, y) -> loss, got {loss!r}")
        self.loss = loss
        self.seed = required(options.integer("hessian", "seed", seed, minimum=0, maximum=2**63 - 1))
        self.image = options.flag("hessian", "image", image)
        self.image_cadence = ImageCadence("hessian", image_every)
        auto = isinstance(max_memory, str) and max_memory == "auto"
        self.max_memory = (
            max_memory if auto else options.number("hessian", "max_memory", max_memory, positive=True, optional=True)
        )
        self.optimizer: Any = None
        self._context: ProbeContext | None = None  # the last batch's context: notices said through it
        declare_image_state(self)

    # -- attach ---------------------------------------------------------------------------------
    def check(self, batch: ProbeBatch) -> None:
        """Trainable parameters whose Lanczos basis fits ``max_memory`` and the attached optimizer
        (``hessian/edge_ratio``); batch-norm layers are said once."""
        self._context = batch.context
        params = trainable(batch.model)
        if not params:
            raise ValueError("hessian: the model has no trainable parameter (requires_grad)")
        self.optimizer = batch.context.optimizer
        self._check_memory(sum(p.numel() for p in params), params[0].device)
        if any(
            isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm))
            for m in batch.model.modules()
        ):
            self._notice(
                "norms",
                "hessian: the model has batch-norm layers; the Hessian is that of the probe pass's loss (eval mode: "
                "their running statistics, or the statistics of each chunk with attach(norm_stats='batch')), as "
                "for the NTK",
            )

    def steps(self, n: int) -> int:
        """The most Lanczos steps of the extremes run on ``n`` parameters."""
        return min(n, self.max_steps if self.max_steps is not None else max(100, 10 * self.top_k))

    def _check_memory(self, n: int, device: torch.device) -> None:
        """Refuse when the Lanczos basis (``n x steps`` float64) and a few vectors exceed ``max_memory``."""
        need = 8 * n * (self.steps(n) + 8)
        limit = self.max_memory
        if isinstance(limit, str):
            free = available_memory(device)
            limit = None if free is None else MEMORY_FRACTION * free
        if limit is not None and need > limit:
            raise ValueError(
                f"hessian: the Lanczos basis of {n:,} parameters x {self.steps(n)} steps in float64 takes "
                f"{need / 2**30:.2f} GiB, over the limit of {limit / 2**30:.2f} GiB (max_memory); pass a smaller "
                "max_steps, freeze parameters (requires_grad=False), or raise max_memory"
            )

    def _notice(self, key: str, message: str) -> None:
        if self._context is not None:
            self._context.notice(key, message + " (said once)")

    # -- measure --------------------------------------------------------------------------------
    def products(self, batch: ProbeBatch) -> HessianProducts:
        """``v -> H v`` on this rank's share of the probe batch, in chunks of ``probe_batch_size``."""
        context = batch.context
        part = share(batch.size, context.rank, context.world_size)
        size = context.chunk_size or max(1, part.stop - part.start)
        chunks = []
        for start in range(part.start, part.stop, size):
            rows = slice(start, min(start + size, part.stop))
            mask = batch.mask[rows] if batch.mask is not None else None
            chunks.append(Chunk(take(batch.x, rows), labels("hessian", batch)[rows], mask))
        params = trainable(batch.model)
        return HessianProducts(
            context.forward,
            chunks,
            params,
            loss=self.loss,
            label_shift=context.label_shift,
            distributed=context.world_size > 1,
            model=batch.model,  # FSDP2: each product on the whole parameters (all_gathered)
        )

    def measure(self, batch: ProbeBatch) -> list[Record]:
        self._context = batch.context
        hv = self.products(batch)
        n, device = hv.n, hv.device
        steps = self.density_steps if self.density else 0
        ext = extreme_eigenvalues(
            hv, n, self.top_k, tol=self.tol, max_steps=self.steps(n), min_steps=steps, seed=self.seed, device=device
        )
        if not ext.converged:
            self._notice(
                "converged",
                f"hessian: Lanczos stopped at {ext.run.products} steps before meeting tol={self.tol}; raise max_steps",
            )
        records: list[Record] = [Scalar(f"hessian/eig_top/{i + 1}", v) for i, v in enumerate(ext.top)]
        records.append(Scalar("hessian/eig_min", ext.min))
        if self.trace_samples:
            records += self._trace(hv, n, device)
        if self.density:
            records += self._density(hv, n, device, ext.run, batch.step)
        records += self._edge(batch, hv, ext.top[0], n, device)
        hv.release()
        return records

    def _trace(self, hv: HessianProducts, n: int, device: torch.device) -> list[Record]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        forms = []
        for _ in range(self.trace_samples):
            z = (torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1).to(device)
            forms.append(torch.dot(z, hv(z)))
        mean, stderr = hutchinson(torch.stack(forms))
        return [Scalar("hessian/trace", mean), Scalar("hessian/trace_stderr", stderr)]

    def _density(self, hv: HessianProducts, n: int, device: torch.device, run: Any, step: int) -> list[Record]:
        extra = slq_runs(hv, n, self.density_steps, self.density_vectors - 1, seed=self.seed + 2, device=device)
        quad = Quadrature.of_runs([run, *extra])
        records: list[Record] = [Histogram.of("hessian/ritz_values", quad.all_nodes(), bins=self.bins)]
        if self.image and image_due(self, self.image_cadence, step):
            grid, phi = density_grid(quad)
            records.append(Image("hessian/density", density_curve(grid, phi, step, len(quad.nodes))))
        return records

    def _edge(self, batch: ProbeBatch, hv: HessianProducts, top: torch.Tensor, n: int, device: Any) -> list[Record]:
        setting = edge_setting(self.optimizer)
        if isinstance(setting, str):
            self._notice("edge", f"hessian: hessian/edge_ratio is left out: {setting}")
            return []
        records: list[Record] = [
            Scalar("hessian/stability_threshold", torch.tensor(setting.threshold, dtype=torch.float64))
        ]
        if setting.kind == "sgd":
            return records + [Scalar("hessian/edge_ratio", top / setting.threshold)]
        return records + self._adam_edge(hv, setting, n, device)

    def _adam_edge(self, hv: HessianProducts, setting: EdgeSetting, n: int, device: Any) -> list[Record]:
        d = adam_diagonal(self.optimizer, hv.params, setting)
        if isinstance(d, str):
            self._notice("adam", f"hessian: the preconditioned sharpness and hessian/edge_ratio are left out while {d}")
            return []
        pre = extreme_eigenvalues(
            preconditioned(hv, d), n, 1, tol=self.tol, max_steps=self.steps(n), seed=self.seed + 3, device=device
        )
        top = pre.top[0]
        return [Scalar("hessian/preconditioned_eig_top/1", top), Scalar("hessian/edge_ratio", top / setting.threshold)]


def density_curve(grid: torch.Tensor, density: torch.Tensor, step: int | None, vectors: int) -> Curves:
    """The SLQ spectral density against the eigenvalue, log y, as picture data (host copies)."""
    floor = float(density.max()) * 1e-8
    title = "hessian/density: spectral density of the loss Hessian (SLQ" + f", {vectors} vector{'s' * (vectors > 1)}"
    title += f", step {step})" if step is not None else ")"
    series = (("density", grid.cpu().numpy(), density.clamp_min(floor).cpu().numpy()),)
    return Curves(series, title=title, xlabel="eigenvalue of H", ylabel="density (log scale)", logy=True)
