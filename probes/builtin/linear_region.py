"""``linear_region``: how stable the probe samples' linear regions are under small perturbations (seed 003).

A piecewise-linear net is ``f(x) = A(x) x + c(x)`` on the linear region of ``x`` (``functional.local_affine``). On the
probe batch, with a generator owned by the probe (the global RNG is never drawn from; it is reseeded with
``seed`` at every measurement, so every measurement uses the same directions and changes over training come
from the model, not from new draws):

- input perturbations ``x' = eps ||x_i|| u_i / ||u_i||`` (Gaussian ``u_i``, one per sample, size relative to
  the sample's norm) for each ``eps``: the fraction of samples whose activation pattern changes;
- parameter perturbations ``P'_k = delta ||P_k||_F G_k / ||G_k||_F`` (Gaussian ``G_k``, each trainable tensor,
  one draw per ``delta``, relative size per tensor): the fraction of samples whose pattern changes;
- the joint perturbation (the first ``eps`` with the first ``delta``; order the options to choose it),
  ``x* = x + x'``, ``P* = P + P'``: a sample *keeps its gates* when ``x`` and ``x*`` share their pattern under
  ``P`` and under ``P*``. Then
  ``L_gen = (f(x,P) - f(x,P*)) - (f(x*,P) - f(x*,P*)) = (A(x,P*) - A(x,P)) x' = A'x'`` exactly.

Patterns: ``pre > 0`` at every ReLU / LeakyReLU / PReLU / RReLU site (module or functional), both kinks of
ReLU6 / Hardtanh, the argmax of max pooling. ``A'x'`` is two forward-mode ``jvp`` of ``functional_call``.

Tags (``<eps>``, ``<delta>`` formatted with ``:g``, e.g. ``linear_region/flip_fraction_eps_0.01``; the size
ends the tag, so TensorBoard's shortened card titles still tell the variants apart):

- ``linear_region/flip_fraction_eps_<eps>``: fraction of samples whose pattern flips under ``x'`` of size eps;
- ``linear_region/flip_fraction_delta_<delta>``: the same under ``P'`` of relative size delta;
- ``linear_region/gate_flip_rate_eps_<eps>``, ``linear_region/gate_flip_rate_delta_<delta>``: the fraction of
  all gate bits (samples x units x sites; pooling indices count one each) that flip. In a wide net almost
  every sample flips *some* gate even for tiny perturbations; this rate says how many;
- ``linear_region/flip_fraction``: fraction of samples that do not keep their gates under the joint perturbation;
- ``linear_region/l_gen``: mean over the samples that keep their gates of ``||L_gen||`` (Euclidean over outputs),
  which equals the mean of ``||A'x'||`` there (so that one is not written separately);
- ``linear_region/identity_error``: max over the same samples of ``||L_gen - A'x'||`` (0 up to rounding).

The last two are NaN when no sample keeps its gates (nothing to average). Where the check lives: at attach
``functional.local_affine.check_piecewise_linear`` scans the leaf modules (judged in eval mode, where the probe runs
), traces one forward for smooth functional calls and tests the second derivative; a model that is not
piecewise linear is an error naming the module.

Options: ``eps`` (1e-3, 1e-2, 1e-1), ``delta`` (1e-3, 1e-2, 1e-1), ``seed`` (0), ``dtype`` ("float64": the
probe works on float64 copies of the parameters and the probe batch; None keeps the model's dtype, but
``L_gen`` is a second difference of outputs of size ~ eps * delta * |f|, which float32 rounding swamps),
``max_samples`` (None: the whole probe batch), ``allow`` (extra module types known to be piecewise linear).
Default cadence: every 100 steps (``2 + len(eps) + len(delta)`` forwards and two ``jvp`` of the probe batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from probes.capture import Capture
from probes.functional.local_affine import (
    MAX_POOLS,
    Params,
    check_piecewise_linear,
    default_dtype_of,
    directional,
    flip_rate,
    l_gen,
    parameter_state,
    patterns_differ,
    perturb_inputs,
    perturb_params,
    site_pattern,
    trainable_names,
)
from probes.probe import Context, Probe, ProbeBatch
from probes.records import Record, Scalar


def _sizes(values: Any, what: str) -> tuple[float, ...]:
    vals = (values,) if isinstance(values, (int, float)) else tuple(values)
    if not vals:
        raise ValueError(f"linear_region: give at least one {what}")
    out = tuple(float(v) for v in vals)
    if not all(v > 0 and v != float("inf") for v in out):
        raise ValueError(f"linear_region: every {what} must be a positive finite number, got {vals}")
    return out


def region_patterns(model: nn.Module, x: torch.Tensor, state: Params | None = None,
                    capture: Capture | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward (no grad) with parameters ``state``: output (P, C) and site -> per-sample pattern (P, ...).

    Patterns: ``pre > 0`` (ReLU, LeakyReLU, PReLU, RReLU, functional relu / leaky_relu), ``(pre > lo, pre < hi)``
    (ReLU6, Hardtanh), argmax indices (max pooling). Two inputs lie in one linear region iff all patterns agree.
    """
    capture = capture or Capture(model, extra_sites=MAX_POOLS)
    state = state if state is not None else parameter_state(model, None)
    with torch.no_grad(), capture.recording() as rec:
        out = functional_call(model, state, (x,))
    P = x.shape[0]
    pats: dict[str, torch.Tensor] = {}
    for name, act in rec.activations.items():
        if act.pre.ndim == 0 or act.pre.shape[0] != P:
            raise ValueError(f"linear_region: site {name!r} sees shape {tuple(act.pre.shape)}, not the {P} samples "
                             "first; patterns are per sample")
        pats[name] = site_pattern(act.site.kind, act.site.module, act.pre)
    return out.detach().reshape(P, -1), pats


class LinearRegion(Probe):
    """Gate flips under input / parameter perturbations, and ``L_gen`` against ``A'x'`` where gates are kept."""

    name = "linear_region"
    description = "samples whose linear region changes under small input/weight nudges"
    every = 100
    passive = False
    needs_sites = False
    needs_probe_data = True

    def __init__(self, eps: Sequence[float] | float = (1e-3, 1e-2, 1e-1),
                 delta: Sequence[float] | float = (1e-3, 1e-2, 1e-1), seed: int = 0, dtype: Any = "float64",
                 max_samples: int | None = None, allow: tuple[type[nn.Module], ...] = ()) -> None:
        self.eps = _sizes(eps, "eps")
        self.delta = _sizes(delta, "delta")
        self.seed = int(seed)
        self.dtype = default_dtype_of(dtype)
        if max_samples is not None and int(max_samples) < 1:
            raise ValueError(f"linear_region: max_samples must be positive, got {max_samples}")
        self.max_samples = None if max_samples is None else int(max_samples)
        self.allow = tuple(allow)
        self.generator: torch.Generator | None = None
        self._capture: Capture | None = None

    def setup(self, context: Context) -> None:
        if not isinstance(context.x, torch.Tensor) or not context.x.is_floating_point():
            raise TypeError("linear_region: the probe batch x must be one floating tensor with samples first")
        p = next((t for t in context.model.parameters() if t.is_floating_point()), None)
        x = context.x[:2].to(p.dtype if p is not None else context.x.dtype)
        check_piecewise_linear(context.model, x, who="linear_region", allow=self.allow, assume_eval=True)

    def _dtype_for(self, model: nn.Module, x: torch.Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        return p.dtype if p is not None else x.dtype

    def _gen(self, device: torch.device) -> torch.Generator:
        """The probe's own generator, reseeded at every measurement: the same directions each time."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        return self.generator.manual_seed(self.seed)

    def measure(self, batch: ProbeBatch) -> list[Record]:
        model = batch.model
        if not isinstance(batch.x, torch.Tensor):
            raise TypeError("linear_region: the probe batch x must be one floating tensor with samples first")
        x = batch.x.detach()
        if self.max_samples is not None:
            x = x[:self.max_samples]
        dtype = self._dtype_for(model, x)
        x = x.to(dtype)
        g = self._gen(x.device)
        if self._capture is None or self._capture.model is not model:
            self._capture = Capture(model, extra_sites=MAX_POOLS)
        cap = self._capture
        state = parameter_state(model, dtype)
        names = trainable_names(model)

        f_x_p, pat_x_p = region_patterns(model, x, state, cap)
        records: list[Record] = []
        first_x = first_state = None
        f_xs_p = pat_xs_p = f_x_ps = pat_x_ps = None
        for eps in self.eps:
            xp = perturb_inputs(x, eps, g)
            f, pat = region_patterns(model, x + xp, state, cap)
            records += [Scalar(f"linear_region/flip_fraction_eps_{eps:g}",
                               patterns_differ(pat_x_p, pat).double().mean()),
                        Scalar(f"linear_region/gate_flip_rate_eps_{eps:g}", flip_rate(pat_x_p, pat))]
            if first_x is None:
                first_x, f_xs_p, pat_xs_p = xp, f, pat
        for delta in self.delta:
            sp = perturb_params(state, names, delta, g)
            f, pat = region_patterns(model, x, sp, cap)
            records += [Scalar(f"linear_region/flip_fraction_delta_{delta:g}",
                               patterns_differ(pat_x_p, pat).double().mean()),
                        Scalar(f"linear_region/gate_flip_rate_delta_{delta:g}", flip_rate(pat_x_p, pat))]
            if first_state is None:
                first_state, f_x_ps, pat_x_ps = sp, f, pat
        f_xs_ps, pat_xs_ps = region_patterns(model, x + first_x, first_state, cap)
        keep = ~(patterns_differ(pat_x_p, pat_xs_p) | patterns_differ(pat_x_ps, pat_xs_ps))
        lg = l_gen(f_x_p, f_x_ps, f_xs_p, f_xs_ps)
        axp = directional(model, first_state, x, first_x) - directional(model, state, x, first_x)
        w = keep.to(lg.dtype)
        n_keep = w.sum()
        records += [
            Scalar("linear_region/flip_fraction", 1.0 - w.mean().double()),
            Scalar("linear_region/l_gen", ((lg.norm(dim=1) * w).sum() / n_keep).double()),
            Scalar("linear_region/identity_error",
                   torch.where(n_keep > 0, ((lg - axp).norm(dim=1) * w).max(), torch.nan).double()),
        ]
        return records
