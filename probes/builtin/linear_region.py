"""``linear_region``: how stable the probe samples' linear regions are under small perturbations of the inputs and
of the parameters, and the identity ``L_gen = A'x'`` on the samples that keep their gates (seed 003).

The probe class only; the maths is in ``probes.functional.linear_region``, what needs the model in
``probes.autodiff.linear_region``. What it measures, its tags, options, default sizes, dtype and cost:
``docs/probes/linear_region.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.func import functional_call, jvp

from probes import options
from probes.autodiff.linear_region import (
    MAX_POOLS,
    ModuleValues,
    check_piecewise_linear,
    parameter_state,
    swapped,
    trainable_names,
)
from probes.functional.linear_region import (
    Params,
    flip_rate,
    l_gen,
    patterns_differ,
    perturb_inputs,
    perturb_params,
    perturb_tensor,
    site_pattern,
)
from probes.inputs import take
from probes.options import option
from probes.probe import Needs, Probe, ProbeBatch, ProbeContext, Site
from probes.records import Chart, Record, Scalar

log = logging.getLogger("probes.linear_region")

S = TypeVar("S")

#: ``eps="auto"`` / ``delta="auto"``: the sizes scaled to the model's gates (``auto_sizes``)
AUTO = "auto"


def auto_sizes(gates: int) -> tuple[float, ...]:
    """The default perturbation sizes for a net with ``gates`` pattern entries per sample: ``(b, 10 b, 100 b)``.

    Args:
        gates: pattern entries per sample (gate bits, both kinks of ReLU6 / Hardtanh, pooling indices), all sites.

    Returns:
        ``(b, 10 b, 100 b)`` with ``b = 10 ** -max(3, k)``, ``k`` the least integer with ``10 ** k >= gates``: the
        largest power of ten at most ``1e-3`` and at most ``1 / gates``.
    """
    k = len(str(int(gates) - 1)) if gates > 1 else 0
    e = max(3, k)
    return tuple(float(f"1e-{e - i}") for i in range(3))


#: the dtype of the joint perturbation (L_gen, A'x', the identity check) under ``dtype="auto"``
EXACT_DTYPE = torch.float64


def region_patterns(
    batch: ProbeBatch, x: torch.Tensor, state: Params | None = None, site_types: tuple[type[nn.Module], ...] = MAX_POOLS
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One pass of the engine's probe pass (``batch.context.run``: no grad, eval mode) with parameters ``state``: output
    (P, C) and site -> per-sample pattern (P, ...).

    Patterns: ``pre > 0`` (ReLU, LeakyReLU, PReLU, RReLU, functional relu / leaky_relu), ``(pre > lo, pre < hi)``
    (ReLU6, Hardtanh), argmax indices (max pooling). Two inputs lie in one linear region iff all patterns agree.
    ``site_types``: the extra module types whose patterns count (the session's capture sees them when the probe
    declares them in ``site_types``; ``probes.testing.probe_batch(..., site_types=...)`` for a batch built by hand).
    """
    extra = tuple(site_types)

    def keep(site: Site) -> frozenset[str]:
        return frozenset({"pre"}) if not site.extra or isinstance(site.module, extra) else frozenset()

    run = batch.context.run(x, keep=keep, params=state)
    P = x.shape[0]
    pats: dict[str, torch.Tensor] = {}
    for name, act in run.activations.items():
        if act.pre is None:
            continue
        if act.pre.ndim == 0 or act.pre.shape[0] != P:
            raise ValueError(
                f"linear_region: site {name!r} sees shape {tuple(act.pre.shape)}, not the {P} samples "
                "first; patterns are per sample"
            )
        pats[name] = site_pattern(act.site.kind, act.site.module, act.pre)
    if run.output is None:
        raise ValueError("linear_region: the probe pass gave no output tensor")
    return run.output.detach().reshape(P, -1), pats


def _directional(batch: ProbeBatch, state: Params | None, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A(x) v`` per sample (P, C) by one forward-mode ``jvp`` of the probes' output tensor (``state=None``: the
    model's own forward and parameters)."""
    model = batch.model

    def f(z: torch.Tensor) -> torch.Tensor:
        swapped = None if state is None else (lambda t: functional_call(model, state, (t,)))
        return batch.context.forward(z, model=swapped)

    out = jvp(f, (x,), (v,))[1]
    return out.detach().reshape(x.shape[0], -1)


class WholeParameters:
    """The parameter sets of one measurement as whole tensors (``parameter_state``), swapped in by
    ``functional_call``: a model that is not sharded."""

    def __init__(self, batch: ProbeBatch, names: list[str], site_types: tuple[type[nn.Module], ...]) -> None:
        self.batch, self.names, self.site_types = batch, names, site_types

    def base(self, dtype: torch.dtype) -> Params:
        return parameter_state(self.batch.model, dtype)

    def perturbed(self, base: Params, delta: float, g: torch.Generator) -> Params:
        return perturb_params(base, self.names, delta, g)

    def cast(self, params: Params, dtype: torch.dtype) -> Params:
        return {n: t.to(dtype) if t.is_floating_point() else t for n, t in params.items()}

    def patterns(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return region_patterns(self.batch, x, params, self.site_types)

    def directional(self, params: Params, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _directional(self.batch, params, x, v)


@dataclass(frozen=True)
class Recipe:
    """How a parameter set is made from a module's own tensors, module by module (``ModuleParameters``).

    Attributes:
        dtype: every floating tensor is cast to it first (``parameter_state``).
        delta: the relative size of the perturbation of each trainable tensor (None: none).
        states: the generator state before each trainable tensor's draw, by name (the draws of ``perturb_params``).
        then: a dtype to cast to after the perturbation (a sweep set used in the joint dtype), or None.
    """

    dtype: torch.dtype
    delta: float | None = None
    states: Mapping[str, torch.Tensor] | None = None
    then: torch.dtype | None = None


class ModuleParameters:
    """The parameter sets of one measurement as ``Recipe``s, applied to each module inside its own forward
    (``local_affine.swapped``): a sharded model (FSDP2), whose forward all-gathers one unit at a time; no
    whole-model copy is made. The values are those of ``WholeParameters``: the same casts, and the same draws,
    replayed from the generator state saved before each tensor's draw in ``perturb_params``' order."""

    def __init__(self, batch: ProbeBatch, names: list[str], site_types: tuple[type[nn.Module], ...]) -> None:
        self.batch, self.names, self.site_types = batch, names, site_types
        model = batch.model
        self.tensors = dict(model.named_parameters())  # global shapes (sharded parameters are DTensors)
        first: dict[int, str] = {}
        #: (module, local name) -> the parameter's name in ``named_parameters`` (a tied parameter has one)
        self.qualified: dict[tuple[int, str], str] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            for local, t in module._parameters.items():
                if t is not None:
                    name = first.setdefault(id(t), f"{path}.{local}" if path else local)
                    self.qualified[(id(module), local)] = name

    def base(self, dtype: torch.dtype) -> Recipe:
        return Recipe(dtype)

    def perturbed(self, base: Recipe, delta: float, g: torch.Generator) -> Recipe:
        states: dict[str, torch.Tensor] = {}
        for n in self.names:  # the draws of perturb_params, in its order: only the generator's states are kept
            p = self.tensors[n]
            states[n] = g.get_state()
            torch.randn(p.shape, generator=g, device=p.device, dtype=base.dtype)
        return Recipe(base.dtype, delta, states)

    def cast(self, recipe: Recipe, dtype: torch.dtype) -> Recipe:
        return replace(recipe, then=dtype)

    def values(self, recipe: Recipe) -> ModuleValues:
        """``module -> its tensors in this set``, called inside the module's forward (its parameters whole)."""

        def value(name: str | None, t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if t.is_floating_point():
                t = t.to(recipe.dtype)
            if recipe.delta is not None and recipe.states is not None and name is not None and name in recipe.states:
                g = torch.Generator(device=t.device)
                g.set_state(recipe.states[name])
                t = perturb_tensor(t, recipe.delta, g)
            return t.to(recipe.then) if recipe.then is not None and t.is_floating_point() else t

        def of(module: nn.Module) -> dict[str, torch.Tensor]:
            out = {
                n: value(self.qualified.get((id(module), n)), t) for n, t in module._parameters.items() if t is not None
            }
            out.update({n: value(None, t) for n, t in module._buffers.items() if t is not None})
            return out

        return of

    def patterns(self, x: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with swapped(self.batch.model, self.values(recipe)):
            return region_patterns(self.batch, x, None, self.site_types)

    def directional(self, recipe: Recipe, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with swapped(self.batch.model, self.values(recipe)):
            return _directional(self.batch, None, x, v)


class ParameterSets(Protocol[S]):
    """What ``measure`` reads of ``WholeParameters`` (``S`` = ``Params``) and ``ModuleParameters`` (``Recipe``)."""

    def base(self, dtype: torch.dtype) -> S: ...

    def perturbed(self, base: S, delta: float, g: torch.Generator) -> S: ...

    def cast(self, params: S, dtype: torch.dtype) -> S: ...

    def patterns(self, x: torch.Tensor, params: S) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def directional(self, params: S, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def _sizes_or_auto(probe: str, key: str, value: Any) -> tuple[float, ...] | str:
    """``"auto"`` or ``probes.options.sizes``."""
    return AUTO if isinstance(value, str) and value == AUTO else options.sizes(probe, key, value)


class LinearRegion(Probe):
    """Gate flips under input / parameter perturbations, and ``L_gen`` against ``A'x'`` where gates are kept."""

    name = "linear_region"
    charts = (
        Chart(
            "fraction of samples whose gates flip, per input perturbation size eps",
            r"^linear_region/flip_fraction_eps_[^/]+$",
        ),
        Chart(
            "fraction of samples whose gates flip, per parameter perturbation size delta",
            r"^linear_region/flip_fraction_delta_[^/]+$",
        ),
        Chart(
            "fraction of gate bits that flip, per input perturbation size eps",
            r"^linear_region/gate_flip_rate_eps_[^/]+$",
        ),
        Chart(
            "fraction of gate bits that flip, per parameter perturbation size delta",
            r"^linear_region/gate_flip_rate_delta_[^/]+$",
        ),
    )
    # FSDP2: every forward runs through the model's own forward, which gathers one unit at a time; each module's
    # parameter set (cast, perturbed) is made inside that module's forward (``ModuleParameters``)
    description = "samples whose linear region changes under small input/weight nudges"
    every = 100
    passive = False
    # the argmax of max pooling is part of a sample's linear region
    needs = Needs(site_types=MAX_POOLS, probe_data=True, tensor_input=True, sharding="per_module")

    @dataclass(frozen=True)
    class Options:
        eps: Sequence[float] | float | str = option(AUTO, _sizes_or_auto, doc="input nudge sizes ('auto': from G)")
        delta: Sequence[float] | float | str = option(AUTO, _sizes_or_auto, doc="weight nudge sizes ('auto')")
        seed: int = option(
            0, options.integer, minimum=0, maximum=2**63 - 1, what="a non-negative int below 2**63", doc="seed"
        )
        dtype: Any = option("auto", options.floating_dtype, keywords=("auto", None), doc="the dtype of the sweeps")
        max_samples: int | None = option(None, options.integer, minimum=1, optional=True, doc="samples measured")
        allow: tuple[type[nn.Module], ...] = option((), options.module_types, doc="more piecewise-linear modules")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.generator: torch.Generator | None = None
        self._wrapped: tuple[Any, nn.Module] | None = None
        self._announced: tuple | None = None

    def check(self, batch: ProbeBatch) -> None:
        """A piecewise-linear model (``check_piecewise_linear`` with a traced forward of two samples); under FSDP2
        the structure first, then, on the at-attach pass, the traced checks through the model's own forward and
        that every module holding trainable parameters runs its own forward (where ``ModuleParameters`` makes
        their perturbed copies)."""
        if not batch.context.sharded:
            return self._check(batch.model, batch.x, batch.context, own=False)
        # no forward before the probe pass: the traced checks run on it, on every rank
        check_piecewise_linear(batch.model, None, who="linear_region", allow=self.allow, assume_eval=True)
        if batch.output is not None:
            self._check_sharded(batch)

    def _check(self, model: nn.Module, x: torch.Tensor, context: ProbeContext, own: bool) -> None:
        """``check_piecewise_linear`` with a traced forward of two samples (``own``: the model's own parameters)."""
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        x = x[:2].to(p.dtype if p is not None else x.dtype)
        wrapped = self._tensor_model(model, context, False)
        try:
            check_piecewise_linear(
                wrapped, x, who="linear_region", allow=self.allow, assume_eval=True, own_parameters=own
            )
        except (AttributeError, TypeError):
            if wrapped is not model:
                raise
            # the model returns a dict / tuple / ModelOutput: check the output the probes use
            check_piecewise_linear(
                self._tensor_model(model, context, True),
                x,
                who="linear_region",
                allow=self.allow,
                assume_eval=True,
                own_parameters=own,
            )

    def _check_sharded(self, batch: ProbeBatch) -> None:
        """Under FSDP2, on the at-attach pass: the traced checks through the model's own forward, and that every
        module holding trainable parameters runs its own forward."""
        self._check(batch.model, batch.x, batch.context, own=True)
        model = batch.model
        with swapped(model, lambda module: {}) as called:
            batch.context.run(take(batch.x, slice(0, 2)))
        missing = [
            path or "<root>"
            for path, m in model.named_modules()
            if m not in called and any(p is not None and p.requires_grad for p in m._parameters.values())
        ]
        if missing:
            raise ValueError(
                f"linear_region: under FSDP the probe perturbs each module's parameters inside that "
                f"module's own forward, but the forward never calls module(s) {missing[:5]} whose "
                "parameters it reads (another module uses them directly); leave linear_region out "
                "for this sharded model"
            )

    def _tensor_model(self, model: nn.Module, context: ProbeContext, needed: bool) -> nn.Module:
        """``model`` as ``x -> the probes' output tensor`` when its output needs picking (one wrapper, kept, so the
        capture stays valid); the model itself otherwise."""
        if not needed and not context.picks_output:
            return model
        key = (id(model), context.picks_output)
        if self._wrapped is None or self._wrapped[0] != key:
            self._wrapped = (key, context.positional(torch.empty(0), force=True)[0])
        return self._wrapped[1]

    def dtypes(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """``(sweep, joint)``: the dtype of the per-size flip fractions and that of the joint perturbation
        (``flip_fraction``, ``l_gen``, ``identity_error``)."""
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        own = p.dtype if p is not None else x.dtype
        if self.dtype == "auto":
            return own, EXACT_DTYPE
        chosen = own if self.dtype is None else self.dtype
        return chosen, chosen

    def _announce(self, sweep: torch.dtype, joint: torch.dtype) -> None:
        """Say once (INFO on the ``probes.linear_region`` logger) which dtypes the probe uses and why."""
        if self._announced == (sweep, joint):
            return
        self._announced = (sweep, joint)

        def name(d: torch.dtype) -> str:
            return str(d).replace("torch.", "")

        if sweep != joint:
            log.info(
                "linear_region: flip fractions per eps / delta in %s (the model's dtype: patterns need no more); "
                "the joint perturbation (flip_fraction, l_gen, identity_error) in %s, because L_gen is a second "
                "difference of outputs of size ~ eps * delta * |f| that %s rounding (%.0e |f|) would swamp. "
                "Option dtype=None keeps %s throughout, dtype='float64' uses float64 throughout.",
                name(sweep),
                name(joint),
                name(sweep),
                torch.finfo(sweep).eps,
                name(sweep),
            )
            return
        if self.dtype == "auto":
            source = "the model's dtype"
        elif self.dtype is None:
            source = "the model's dtype, option dtype=None"
        else:
            source = f"option dtype={name(sweep)!r}"
        note = (
            ""
            if sweep == EXACT_DTYPE
            else (
                f"; L_gen, a second difference of size ~ eps * delta * |f|, is then at "
                f"{name(sweep)} rounding ({torch.finfo(sweep).eps:.0e} |f|)"
            )
        )
        log.info("linear_region: everything in %s (%s)%s.", name(sweep), source, note)

    def _gen(self, device: torch.device) -> torch.Generator:
        """The probe's own generator, reseeded at every measurement: the same directions each time."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        return self.generator.manual_seed(self.seed)

    def measure(self, batch: ProbeBatch) -> list[Record]:
        model = batch.model
        x0 = batch.x.detach()
        if self.max_samples is not None:
            x0 = x0[: self.max_samples]
        sweep, joint = self.dtypes(model, x0)
        if batch.context.writes:  # said on rank 0 only (under FSDP every rank measures)
            self._announce(sweep, joint)
        x = x0.to(sweep)
        g = self._gen(x.device)
        names = trainable_names(model)
        # the parameter sets: whole copies, or under FSDP2 recipes applied module by module in the forward
        sets: ParameterSets[Any] = (ModuleParameters if batch.context.sharded else WholeParameters)(
            batch, names, self.needs.site_types
        )
        state = sets.base(sweep)
        patterns = sets.patterns

        f_x_p, pat_x_p = patterns(x, state)
        gates = sum(p[0].numel() for p in pat_x_p.values())
        eps_sizes = auto_sizes(gates) if self.eps == AUTO else self.eps
        delta_sizes = auto_sizes(gates) if self.delta == AUTO else self.delta
        records: list[Record] = []
        first_x = first_state = None
        f_xs_p = pat_xs_p = f_x_ps = pat_x_ps = None
        for eps in eps_sizes:
            xp = perturb_inputs(x, eps, g)
            f, pat = patterns(x + xp, state)
            records += [
                Scalar(f"linear_region/flip_fraction_eps_{eps:g}", patterns_differ(pat_x_p, pat).double().mean()),
                Scalar(f"linear_region/gate_flip_rate_eps_{eps:g}", flip_rate(pat_x_p, pat)),
            ]
            if first_x is None:
                first_x, f_xs_p, pat_xs_p = xp, f, pat
        for delta in delta_sizes:
            sp = sets.perturbed(state, delta, g)
            f, pat = patterns(x, sp)
            records += [
                Scalar(f"linear_region/flip_fraction_delta_{delta:g}", patterns_differ(pat_x_p, pat).double().mean()),
                Scalar(f"linear_region/gate_flip_rate_delta_{delta:g}", flip_rate(pat_x_p, pat)),
            ]
            if first_state is None:
                first_state, f_x_ps, pat_x_ps = sp, f, pat
        if first_x is None or f_xs_p is None or pat_xs_p is None or f_x_ps is None or pat_x_ps is None:
            raise RuntimeError("linear_region: no eps or no delta size (both options are non-empty)")
        if joint != sweep:  # the same draws, cast (exactly) to the joint dtype; three forwards again in it
            x, state = x0.to(joint), sets.base(joint)
            first_x = first_x.to(joint)
            first_state = sets.cast(first_state, joint)
            f_x_p, pat_x_p = patterns(x, state)
            f_xs_p, pat_xs_p = patterns(x + first_x, state)
            f_x_ps, pat_x_ps = patterns(x, first_state)
        f_xs_ps, pat_xs_ps = patterns(x + first_x, first_state)
        keep = ~(patterns_differ(pat_x_p, pat_xs_p) | patterns_differ(pat_x_ps, pat_xs_ps))
        lg = l_gen(f_x_p, f_x_ps, f_xs_p, f_xs_ps)
        axp = sets.directional(first_state, x, first_x) - sets.directional(state, x, first_x)
        w = keep.to(lg.dtype)
        n_keep = w.sum()
        records += [
            Scalar("linear_region/flip_fraction", 1.0 - w.mean().double()),
            Scalar("linear_region/l_gen", ((lg.norm(dim=1) * w).sum() / n_keep).double()),
            Scalar(
                "linear_region/identity_error",
                torch.where(n_keep > 0, ((lg - axp).norm(dim=1) * w).max(), torch.nan).double(),
            ),
        ]
        return records
