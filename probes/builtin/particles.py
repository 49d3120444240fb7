"""``particles``: the hidden units of a two-layer net as particles ``a_j w_j``, with their trails (seed 001; Chizat &
Bach 2018).

The probe class: which layers, the projection basis fixed at the first measurement, the trails it keeps. What it
measures, its tags, options and cost: ``docs/probes/particles.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from probes import options
from probes.builtin._images import ImageCadence, declare_image_state, image_due
from probes.functional.particles import MeanField, principal_plane
from probes.probe import Needs, Probe, ProbeBatch
from probes.records import Histogram, Image, Record, Scalar, Trails


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for path, mod in model.named_modules(prefix=prefix):
        if not any(True for _ in mod.children()):
            out.append((path, mod))
    return out


def _has_params(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False))


def _describe(leaves: list[tuple[str, nn.Module]]) -> str:
    """The parametrised leaves in a few words: up to three by name, else how many."""
    shown = [f"{p or '<root>'} ({type(m).__name__})" for p, m in leaves if _has_params(m)]
    if not shown:
        return "it has no parametrised module"
    if len(shown) > 3:
        return f"it has {len(shown)} parametrised modules"
    return "its parametrised modules: " + ", ".join(shown)


def find_two_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Linear, str, nn.Linear]:
    """Locate the hidden and output ``nn.Linear`` of a two-layer net: ``(hidden_path, hidden, out_path, out)``.

    ``layer`` names the hidden ``nn.Linear``, a ``MeanField`` module, or a sub-module that is itself
    a two-layer net. Without it: the one ``MeanField`` inside ``model``, else the model's only two
    parametrised leaves, which must be Linear layers with ``hidden.out_features == out.in_features``
    (parameter-free modules such as activations may sit between them).
    """
    who = type(model).__name__
    prefix = ""
    target = model
    if layer is not None:
        try:
            target = model.get_submodule(layer)
        except AttributeError as exc:
            names = [p for p, _ in model.named_modules() if p]
            raise ValueError(
                f"particles: option 'layer'={layer!r}: model {who} has no such module; its modules: "
                f"{', '.join(names[:20]) or 'none'}"
            ) from exc
        prefix = layer
    if isinstance(target, MeanField):
        p = f"{prefix}." if prefix else ""
        return p + "hidden", target.hidden, p + "output", target.output
    if layer is None:
        fields = [(p, m) for p, m in model.named_modules() if isinstance(m, MeanField)]
        if len(fields) == 1:
            p = f"{fields[0][0]}." if fields[0][0] else ""
            return p + "hidden", fields[0][1].hidden, p + "output", fields[0][1].output
        if len(fields) > 1:
            raise ValueError(
                f"particles: model {who} holds {len(fields)} MeanField modules "
                f"({', '.join(p for p, _ in fields)}); name one with layer="
            )
    leaves = _leaves(model)
    if isinstance(target, nn.Linear):
        # the hidden layer is named: its output layer is the next Linear (registration order)
        idx = next(i for i, (p, _) in enumerate(leaves) if p == layer)
        for path, mod in leaves[idx + 1 :]:
            if isinstance(mod, nn.Linear):
                if mod.in_features != target.out_features:
                    raise ValueError(
                        f"particles: option 'layer': in model {who}, the Linear after {layer!r} is "
                        f"{path!r} with {mod.in_features} inputs, but {layer!r} has "
                        f"{target.out_features} units; this is not a two-layer net Linear -> activation "
                        "-> Linear"
                    )
                return prefix, target, path, mod  # prefix: layer, the Linear found
            if _has_params(mod) and not isinstance(mod, nn.PReLU):
                raise ValueError(
                    f"particles: option 'layer': in model {who}, {path!r} ({type(mod).__name__}) has "
                    f"parameters between the hidden layer {layer!r} and the output layer; particles needs "
                    "Linear -> activation -> Linear"
                )
        raise ValueError(
            f"particles: option 'layer': in model {who}, no Linear layer follows {layer!r}; particles "
            "needs Linear -> activation -> Linear"
        )
    sub = _leaves(target, prefix)
    with_params = [(p, m) for p, m in sub if _has_params(m) and not isinstance(m, nn.PReLU)]
    where = f"module {prefix!r} (option 'layer') of model {who}" if prefix else f"model {who}"
    linears = [(p, m) for p, m in with_params if isinstance(m, nn.Linear)]
    if len(with_params) != 2 or len(linears) != 2:
        raise ValueError(
            f"particles: {where} is not a two-layer net Linear -> activation -> Linear "
            f"({_describe(sub)}); name the hidden Linear with layer="
        )
    (hp, hidden), (op, out) = linears
    if hidden.out_features != out.in_features:
        raise ValueError(
            f"particles: in {where}, {hp!r} has {hidden.out_features} units but {op!r} takes "
            f"{out.in_features} inputs; this is not a two-layer net"
        )
    return hp, hidden, op, out


#: the most positions kept per particle (``trail``: a trail x m x 2 float64 buffer) and the largest image side
MAX_TRAIL, MAX_SIZE = 100_000, 4096
TEACHER = "an M x D tensor of positions, or a tuple (a, W) / (a, W, b) of tensors"


def _rectangular(value: list | tuple) -> bool:
    """Whether a nested list is a rectangular array of numbers (the ``M x D`` positions, not ``(a, W)``)."""
    try:
        return np.asarray(value).dtype.kind in "iuf"
    except (ValueError, TypeError):  # ragged
        return False


def _teacher_option(teacher: Any) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
    """The ``teacher`` option as float64 CPU tensors: an ``M x D`` (or ``D``) array (a tensor, a numpy array or a
    rectangular nested list of numbers), or ``(a, W)`` / ``(a, W, b)`` (a tuple or list of tensors, numpy arrays or
    lists); their shapes against the model are checked at attach, in ``check``."""
    if teacher is None:
        return None
    if isinstance(teacher, (tuple, list)) and (
        any(isinstance(v, (torch.Tensor, np.ndarray)) for v in teacher)
        or (any(isinstance(v, (list, tuple)) for v in teacher) and not _rectangular(teacher))
    ):
        if len(teacher) not in (2, 3):
            raise ValueError(f"particles: option 'teacher' must be {TEACHER}, got a sequence of {len(teacher)}")
        parts = [options.array("particles", "teacher", v, ndim=(0, 1, 2), what=TEACHER) for v in teacher]
        if parts[1].ndim != 2:
            raise ValueError(
                f"particles: option 'teacher' (a, W) needs W of shape (M, d), got shape {tuple(parts[1].shape)}"
            )
        return tuple(parts)
    return options.array("particles", "teacher", teacher, ndim=(1, 2), what=TEACHER)


class Particles(Probe):
    """Hidden units of a two-layer net as particles ``a_j w_j`` with trails (Chizat & Bach 2018).

    Options (each checked at attach through ``probes.options``): ``layer`` (the module path, a string, of the
    hidden Linear, of a ``MeanField``, or of a two-layer sub-module), ``teacher`` (an M x D array of teacher
    positions drawn as lines through the origin: a tensor, a numpy array or a rectangular nested list of finite
    numbers; or a tuple/list ``(a, W)`` / ``(a, W, b)`` of such arrays, the teacher output weights (M,) and input
    weights (M x d), turned into positions as the student's), ``trail`` (positions kept per particle, 2 to
    ``MAX_TRAIL``), ``trail_mode`` ("thin" or "ring"), ``basis`` ("init", "teacher" or a D x 2 array of finite
    numbers), ``signed``, ``bias`` (append ``b_j`` to ``w_j``), ``output_index`` (which output's weight is
    ``a_j`` when there are several), ``size`` (image side in pixels, 240 to ``MAX_SIZE``), ``limit`` (fixed
    half-width of the axes instead of grow-only), ``image_every`` (None: an image at every measurement;
    k: at the first, then once at least k steps have passed since the last image; the trail is still
    updated at every measurement).
    """

    name = "particles"
    description = "hidden units of a two-layer net as moving points, with trails"
    every = 20
    passive = False
    # FSDP2: positions() reads the hidden layer inside batch.context.gathered(hidden), then the output layer inside
    # batch.context.gathered(out): one unit's whole parameters at a time (two blocks even when one unit holds both)
    needs = Needs(probe_data=False, sharding="per_module")
    # declared states (``add_state``), for the type checker
    basis: torch.Tensor | None
    trail: torch.Tensor | None
    filled: int
    stride: int
    seen: int
    limit: float

    def __init__(
        self,
        layer: str | None = None,
        teacher: Any = None,
        trail: int = 200,
        trail_mode: str = "thin",
        basis: Any = "init",
        signed: bool = True,
        bias: bool = False,
        output_index: int | None = None,
        size: int = 480,
        limit: float | None = None,
        image_every: int | None = None,
    ) -> None:
        options.integer("particles", "trail", trail, minimum=2, maximum=MAX_TRAIL)
        options.integer("particles", "size", size, minimum=240, maximum=MAX_SIZE)
        options.integer("particles", "output_index", output_index, minimum=0, optional=True)
        options.flag("particles", "signed", signed)
        options.flag("particles", "bias", bias)
        options.number("particles", "limit", limit, positive=True, optional=True)
        options.choice("particles", "trail_mode", trail_mode, ("thin", "ring"))
        layer = options.text(
            "particles",
            "layer",
            layer,
            optional=True,
            what="the module path of the hidden Linear, a MeanField or a two-layer sub-module",
        )
        teacher = _teacher_option(teacher)
        if isinstance(basis, str):
            options.choice("particles", "basis", basis, ("init", "teacher"))
        else:
            basis = options.array(
                "particles", "basis", basis, ndim=(2,), what="'init', 'teacher' or a D x 2 matrix of finite numbers"
            )
        if isinstance(basis, str) and basis == "teacher" and teacher is None:
            raise ValueError("particles: option basis='teacher' needs option 'teacher'")
        self.layer = layer
        self._who = "particles"
        self.teacher_spec = teacher
        self.trail_length = int(trail)
        self.trail_mode = trail_mode
        self.basis_spec = basis
        self.signed = bool(signed)
        self.bias = bool(bias)
        self.output_index = output_index
        self.size = int(size)
        self.fixed_limit = float(limit) if limit is not None else None
        self.image_cadence = ImageCadence("particles", image_every)
        declare_image_state(self)
        self.hidden: nn.Linear | None = None
        self.out: nn.Linear | None = None
        self.paths: tuple[str, str] = ("", "")
        self.teacher: torch.Tensor | None = None  # M x D float64 positions
        self.teacher_sign: torch.Tensor | None = None  # M bool (a >= 0) or None
        # checkpointed state (add_state): the projection basis fixed at the first measurement (D x 2 float64), the
        # trail buffer (trail x m x 2 float64, CPU) and its bookkeeping, the grow-only half-width of the axes
        self.add_state("basis", None, reduce=None, window=False)
        self.add_state("trail", None, reduce=None, window=False)
        self.add_state("filled", 0, reduce=None, window=False)
        self.add_state("stride", 1, reduce=None, window=False)
        self.add_state("seen", 0, reduce=None, window=False)
        self.add_state("limit", 0.0, reduce=None, window=False)

    # -- set-up -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """``D``: the dimension of a particle's position (inputs, plus one with ``bias=True``)."""
        assert self.hidden is not None
        return self.hidden.in_features + int(self.bias)

    @property
    def width(self) -> int:
        assert self.hidden is not None
        return self.hidden.out_features

    def check(self, batch: ProbeBatch) -> None:
        """A two-layer net at ``layer`` (``find_two_layer``) that fits the options; binds its layers."""
        self._bind(batch.model)

    def _bind(self, model: nn.Module) -> None:
        hp, hidden, op, out = find_two_layer(model, self.layer)
        who = f"particles ({type(model).__name__}.{hp})"
        if self.bias and hidden.bias is None:
            raise ValueError(f"{who}: bias=True but the hidden layer has no bias")
        c = out.out_features
        if self.output_index is not None and not (0 <= int(self.output_index) < c):
            raise ValueError(f"{who}: output_index={self.output_index} but the output layer has {c} outputs")
        self.hidden, self.out, self.paths = hidden, out, (hp, op)
        self._who = who
        dev = hidden.weight.device
        if self.teacher_spec is not None:
            self.teacher, self.teacher_sign = self._teacher_positions(self.teacher_spec, dev)
        if isinstance(self.basis_spec, torch.Tensor):  # checked at construction: finite, 2-d, float64
            b = self.basis_spec.to(device=dev)
            if b.shape != (self.dim, 2):
                raise ValueError(
                    f"{who}: option 'basis' must be a {self.dim} x 2 matrix (D = {self.dim} = input "
                    f"dimension{' + 1 for the bias' if self.bias else ''}), got shape {tuple(b.shape)}"
                )
            self.basis = b
        elif self.dim <= 2 and self.basis_spec != "teacher":
            self.basis = torch.eye(self.dim, 2, dtype=torch.float64, device=dev)
        elif self.basis_spec == "teacher":
            assert self.teacher is not None
            self.basis = principal_plane(self.teacher, center=False)
        if self.trail is None or self.trail.shape[1] != self.width:
            self.trail = torch.full((self.trail_length, self.width, 2), float("nan"), dtype=torch.float64)
            self.filled, self.stride, self.seen, self.limit = 0, 1, 0, 0.0

    def _teacher_positions(self, spec: Any, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.hidden is not None  # called by _bind, after it binds the layers
        who, dim = self._who, self.dim
        if isinstance(spec, tuple):  # (a, W) or (a, W, b): float64 tensors, checked at construction
            a = spec[0].to(dev).reshape(-1)
            w = spec[1].to(dev)
            if w.ndim != 2 or w.shape[0] != a.shape[0] or w.shape[1] != self.hidden.in_features:
                raise ValueError(
                    f"{who}: option 'teacher' (a, W) needs a of shape (M,) and W of shape "
                    f"(M, {self.hidden.in_features}), got {tuple(a.shape)} and {tuple(w.shape)}"
                )
            if self.bias:
                if len(spec) != 3:
                    raise ValueError(f"{who}: bias=True needs option 'teacher' as (a, W, b)")
                b = spec[2].to(dev).reshape(-1, 1)
                if b.shape[0] != a.shape[0]:
                    raise ValueError(f"{who}: option 'teacher': b has {b.shape[0]} entries for {a.shape[0]} units")
                w = torch.cat([w, b], dim=1)
            pos = (a if self.signed else a.abs())[:, None] * w
            sign = a >= 0
        else:
            pos = spec.to(dev)
            if pos.ndim == 1:
                pos = pos[None]
            if pos.shape[1] != dim:
                raise ValueError(
                    f"{who}: option 'teacher' must be an M x {dim} tensor of positions (D = input "
                    f"dimension{' + 1 for the bias' if self.bias else ''}), got shape "
                    f"{tuple(spec.shape)}"
                )
            sign = None
        if not torch.isfinite(pos).all():
            raise ValueError(f"{who}: option 'teacher' gives positions a_j w_j that overflow")
        return pos, sign

    # -- measurement ----------------------------------------------------------------
    @torch.no_grad()
    def positions(
        self, gathered: Callable[..., AbstractContextManager[None]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(p, sign, norms)``: positions (m x D float64), ``a_j >= 0`` (or None) and ``|a_j| ||w_j||``.

        Args:
            gathered: ``ProbeBatch.gathered`` under FSDP2: the hidden layer's weights are read (copied) inside
                ``gathered(hidden)``, then the output layer's inside ``gathered(out)``; None: read directly.

        Returns:
            ``(p, sign, norms)``.

        Raises:
            RuntimeError: called before ``check``.
        """
        if self.hidden is None or self.out is None:
            raise RuntimeError("particles: positions() before check; attach the probe first")
        gather = gathered if gathered is not None else (lambda *modules: nullcontext())
        # float64 copies: they outlive the block (under FSDP2 the gathered tensors are freed after it)
        with gather(self.hidden):
            w = self.hidden.weight.detach().to(torch.float64, copy=True)
            if self.bias:
                w = torch.cat([w, self.hidden.bias.detach().double()[:, None]], dim=1)
        with gather(self.out):
            a_all = self.out.weight.detach().to(torch.float64, copy=True)
        if a_all.shape[0] == 1 or self.output_index is not None:
            a = a_all[0 if self.output_index is None else int(self.output_index)]
            sign = a >= 0
        else:
            a = a_all.norm(dim=0)
            sign = None
        p = (a if self.signed else a.abs())[:, None] * w
        norms = a.abs() * w.norm(dim=1)
        return p, sign, norms

    def trails(self) -> torch.Tensor:
        """Stored projected positions in time order, shape (k, m, 2) with ``k <= trail``."""
        if self.trail is None:
            return torch.zeros(0, 0, 2, dtype=torch.float64)
        if self.trail_mode == "ring" and self.seen > self.trail_length:
            return torch.roll(self.trail, -(self.seen % self.trail_length), dims=0)
        return self.trail[: self.filled]

    def _store(self, xy: torch.Tensor) -> None:
        n = self.seen
        self.seen += 1
        buf = self.trail
        if buf is None:
            raise RuntimeError("particles: no trail buffer before check binds the layers; attach the probe first")
        if self.trail_mode == "ring":
            buf[n % self.trail_length] = xy
            self.filled = min(self.filled + 1, self.trail_length)
            return
        if n % self.stride:
            return
        if self.filled == self.trail_length:
            kept = buf[0 : self.trail_length : 2].clone()
            buf.fill_(float("nan"))
            buf[: kept.shape[0]] = kept
            self.filled = kept.shape[0]
            self.stride *= 2
            if n % self.stride:
                return
        buf[self.filled] = xy
        self.filled += 1

    def measure(self, batch: ProbeBatch) -> Sequence[Record]:
        if self.hidden is None:
            self._bind(batch.model)
        p, sign, norms = self.positions(batch.context.gathered)
        if self.basis is None:
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"{self._who}: non-finite weights at the first measurement; cannot fix the projection basis"
                )
            self.basis = principal_plane(p, center=True)
        if tuple(self.basis.shape) != (self.dim, 2):
            raise ValueError(
                f"{self._who}: the projection basis has shape {tuple(self.basis.shape)}, expected "
                f"({self.dim}, 2): a checkpoint of another model?"
            )
        xy = (p @ self.basis.to(p.device)).cpu()  # the basis may come from another device (a moved model)
        self._store(xy)
        records: list[Record] = [Scalar("particles/mean_norm", norms.mean()), Histogram.of("particles/norms", norms)]
        if image_due(self, self.image_cadence, batch.step):
            records.append(
                Image("particles/positions", self.drawing(xy, None if sign is None else sign.cpu(), step=batch.step))
            )
        return records

    # -- image ----------------------------------------------------------------------
    def drawing(self, xy: torch.Tensor, sign: torch.Tensor | None, step: int | None = None) -> Trails:
        """The picture data (host copies of the positions): trails, teacher lines, current particles ``xy``
        (m x 2)."""
        cur = xy.numpy()
        hist = self.trails().numpy()
        basis = self.basis
        if self.teacher is None:
            teacher = np.zeros((0, 2))
        elif basis is None:
            raise RuntimeError("particles: no projection basis to draw the teacher in before the first measurement")
        else:
            teacher = (self.teacher.to(basis.device) @ basis).cpu().numpy()
        if self.fixed_limit is not None:
            lim = self.fixed_limit
        else:
            pts = np.concatenate([cur.reshape(-1), hist.reshape(-1), teacher.reshape(-1)])
            pts = np.abs(pts[np.isfinite(pts)])
            self.limit = max(self.limit, 1.08 * float(pts.max()) if pts.size else 0.0)
            lim = self.limit if self.limit > 0 else 1.0
        tsign = None
        if self.teacher_sign is not None and not self.signed:
            tsign = self.teacher_sign.cpu().numpy()
        at = f", step {step}" if step is not None else ""
        title = f"particles/positions: {self._position_name()} of {cur.shape[0]} hidden units{at}"
        return Trails(
            cur,
            hist,
            None if sign is None else sign.numpy(),
            teacher,
            tsign,
            lim,
            title=title,
            axis_labels=self._axis_labels(),
            size=self.size,
        )

    def _position_name(self) -> str:
        w = "(w_j, b_j)" if self.bias else "w_j"
        if self.out is not None and self.out.out_features > 1 and self.output_index is None:
            return f"||a_j|| {w}"  # a_j is the norm of the output weights' column j
        return f"a_j {w}" if self.signed else f"|a_j| {w}"

    def _axis_labels(self) -> tuple[str, str]:
        pos = self._position_name()
        if isinstance(self.basis_spec, str) and self.basis_spec == "teacher":
            return f"{pos} on PC 1 of the teacher", f"{pos} on PC 2 of the teacher"
        if not isinstance(self.basis_spec, str) and self.basis_spec is not None:
            return f"{pos} on basis column 1", f"{pos} on basis column 2"
        if self.hidden is not None and self.dim <= 2:
            return f"{pos}, coordinate 1", (f"{pos}, coordinate 2" if self.dim == 2 else "(one-dimensional)")
        return f"{pos} on PC 1 (at init)", f"{pos} on PC 2 (at init)"
