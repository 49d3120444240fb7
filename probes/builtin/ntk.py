"""``ntk``: the empirical neural tangent kernel on the probe batch and its spectrum (seed 002).

``Theta = J J^T`` over every trainable parameter (``probes.functional.ntk.empirical_ntk``: a layerwise formula for
``nn.Linear`` layers, per-sample Jacobians with ``torch.func`` for everything else; exact for any model
whose samples do not interact). By default the ``P x P`` kernel **summed** over outputs is logged
(``reduction="mean"`` divides by the number of outputs, neural-tangents' default); ``mode="full"``
analyses the ``PC x PC`` kernel instead. The session runs the probe with the model in eval mode, so
BatchNorm uses its running statistics; a model that still mixes samples is an error.

Tags (eigenvalues in float64, ``torch.linalg.eigvalsh``):

- ``ntk/trace``, ``ntk/eig_max``, ``ntk/eig_min``, ``ntk/condition`` (``inf`` when numerically singular),
  ``ntk/effective_rank`` (``exp(entropy(lambda / sum lambda))``);
- ``ntk/eig_top/<k>`` for ``k = 1..top_k``: the k-th largest eigenvalue;
- ``ntk/alignment``: centered alignment of the trace kernel (summed over outputs, also in ``mode="full"``)
  with ``Y Y^T`` (left out when the probe batch has no labels);
- ``ntk/distance_from_init``: ``1 - <Theta_0, Theta_t>_F / (||Theta_0|| ||Theta_t||)`` with ``Theta_0`` the
  first kernel this probe measured (kept in ``state_dict`` for checkpoints);
- histograms ``ntk/eigenvalues`` and ``ntk/log10_eigenvalues`` (positive eigenvalues only);
- image ``ntk/spectrum``: eigenvalues against their rank, log-log (blue: now, orange: the first kernel).

Options: ``mode``, ``reduction``, ``top_k`` (5), ``bins`` (64), ``chunk_size`` (None: automatic),
``image`` (True). Default cadence: every 1000 steps (the kernel costs about ``P^2`` times the layer widths,
the eigenvalues ``P^3``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from probes.figures import plot
from probes.functional.alignment import DegenerateKernelError
from probes.functional.labels import label_matrix
from probes.functional.ntk import MODES, REDUCTIONS, NTKPlan, empirical_ntk, ntk_plan, trace_over_outputs
from probes.functional.spectra import kernel_distance, label_alignment, spectrum
from probes.probe import Context, Probe, ProbeBatch
from probes.records import Histogram, Image, Record, Scalar


class NTK(Probe):
    """Empirical NTK on the probe batch: spectrum, alignment with the labels, distance from the first kernel."""

    name = "ntk"
    description = "empirical NTK on the probe batch: eigenvalues, condition, effective rank, label alignment, drift"
    every = 1000
    passive = False
    needs_sites = False
    needs_probe_data = True

    def __init__(self, mode: str = "trace", reduction: str = "sum", top_k: int = 5, bins: int = 64,
                 chunk_size: int | None = None, image: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"ntk: mode must be one of {MODES}, got {mode!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"ntk: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if mode == "full" and reduction != "sum":
            raise ValueError("ntk: reduction='mean' applies to the trace over outputs; use it with mode='trace'")
        if int(top_k) < 0 or int(bins) < 1:
            raise ValueError(f"ntk: top_k must be >= 0 and bins >= 1, got top_k={top_k}, bins={bins}")
        self.mode, self.reduction = mode, reduction
        self.top_k, self.bins = int(top_k), int(bins)
        self.chunk_size = chunk_size
        self.image = bool(image)
        self.init_kernel: torch.Tensor | None = None
        self.init_eigenvalues: torch.Tensor | None = None
        self.init_step: int | None = None
        self._plan: tuple[Any, NTKPlan] | None = None

    def setup(self, context: Context) -> None:
        if not any(p.requires_grad for p in context.model.parameters()):
            raise ValueError("ntk: the model has no trainable parameters, so its NTK is zero")
        if context.y is not None:
            Y = label_matrix(context.y, who="ntk")
            Yc = Y - Y.mean(dim=0, keepdim=True)
            if Y.shape[0] >= 2 and not bool(torch.linalg.vector_norm(Yc) > 1e-10 * torch.linalg.vector_norm(Y)):
                raise DegenerateKernelError("ntk: the labels of the probe batch are all the same, so Y Y^T centers to "
                                            "zero and ntk/alignment is 0/0; use a probe batch with both classes")

    def measure(self, batch: ProbeBatch) -> list[Record]:
        key = (id(batch.model), tuple((n, id(p), p.requires_grad) for n, p in batch.model.named_parameters()),
               tuple(tuple(t.shape) for t in (batch.x if isinstance(batch.x, (tuple, list)) else (batch.x,))))
        if self._plan is None or self._plan[0] != key:  # the two discovery passes only when the model changed
            self._plan = (key, ntk_plan(batch.model, batch.x, who="ntk"))
        theta = empirical_ntk(batch.model, batch.x, mode=self.mode, reduction=self.reduction,
                              chunk_size=self.chunk_size, dtype=torch.float64, plan=self._plan[1])
        P = batch.size
        C = theta.shape[0] // P
        s = spectrum(theta)
        records: list[Record] = [
            Scalar("ntk/trace", s.trace), Scalar("ntk/eig_max", s.eig_max), Scalar("ntk/eig_min", s.eig_min),
            Scalar("ntk/condition", s.condition), Scalar("ntk/effective_rank", s.effective_rank)]
        top = s.top(self.top_k)
        records += [Scalar(f"ntk/eig_top/{k + 1}", top[k]) for k in range(top.numel())]
        if batch.y is not None and P >= 2:
            Y = batch.targets("ntk")
            traced = trace_over_outputs(theta, C) if C > 1 else theta
            records.append(Scalar("ntk/alignment", label_alignment(traced, Y)))
        if self.init_kernel is None or self.init_kernel.shape != theta.shape:
            self.init_kernel = theta.detach().clone()
            self.init_eigenvalues = s.eigenvalues.detach().clone()
            self.init_step = batch.step
        records.append(Scalar("ntk/distance_from_init", kernel_distance(self.init_kernel.to(theta.device), theta)))
        lam = s.eigenvalues
        records.append(Histogram.of("ntk/eigenvalues", lam, bins=self.bins))
        positive = lam[lam > 0]
        records.append(Histogram.of("ntk/log10_eigenvalues", torch.log10(positive), bins=self.bins))
        if self.image:
            records.append(Image("ntk/spectrum", spectrum_image(lam, self.init_eigenvalues)))
        return records

    def state_dict(self) -> dict[str, Any]:
        return {"init_kernel": self.init_kernel, "init_eigenvalues": self.init_eigenvalues,
                "init_step": self.init_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init_kernel = state.get("init_kernel")
        self.init_eigenvalues = state.get("init_eigenvalues")
        self.init_step = state.get("init_step")


def spectrum_image(eigs: torch.Tensor, reference: torch.Tensor | None = None) -> np.ndarray:
    """Log-log plot of the positive eigenvalues against their rank (largest first); ``reference`` second."""
    series = []
    for lam in (eigs, reference):
        if lam is None:
            continue
        v = np.sort(lam.detach().double().cpu().numpy())[::-1]
        v = v[v > 0]
        if v.size == 0:
            v = np.array([1.0])
        series.append((np.arange(1, v.size + 1, dtype=np.float64), v))
    return plot(series, logx=True, logy=True)
