"""``grad_noise``: how noisy the per-sample gradients of the loss are on the probe batch (McCandlish et al. 2018;
Liu et al. 2020).

Per-sample gradients ``g_i`` of the loss w.r.t. the trainable parameters (``probes.autodiff.grad_noise``), their
mean ``g`` and unbiased covariance ``Sigma``, from sums over samples (``probes.functional.grad_noise``):

- ``grad_noise/noise_scale``: ``B_simple = tr(Sigma) / |g|^2``;
- ``grad_noise/gsnr``: ``mean_j g_j^2 / Sigma_jj`` over the parameters' coordinates with ``Sigma_jj > 0``, and
  ``grad_noise/<module>/gsnr`` for each module that owns trainable parameters itself (named by module path);
- ``grad_noise/grad_norm``: ``|g|``; histogram ``grad_noise/sample_grad_norm`` of the ``|g_i|``.

Loss (``loss=None``): cross-entropy for integer class labels and ``C > 1`` outputs, binary cross-entropy of the logit
for two classes and one output, ``mean_c (f_c - y_c)^2`` for float targets; token labels ``(P, T)`` (``-100``
ignored, ``attach(label_shift=...)`` and the attention mask as in ``alignment``) give each sequence the mean
cross-entropy over its kept positions, a sequence without one is left out. A callable ``loss(output, y) -> scalar``
is called on each sample alone (``output[i:i+1]``, ``y[i:i+1]``). See ``docs/probes/grad_noise.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from probes import options
from probes.autodiff.grad_noise import ROUTES, all_reduce_sums, sample_gradient_sums, share, trainable
from probes.builtin._narrow import required
from probes.builtin._tokens import token_pairs
from probes.functional.grad_noise import (
    GradientSums,
    grad_norm,
    gsnr,
    noise_scale,
    sample_loss,
    token_targets,
    variance_floor,
)
from probes.functional.labels import is_token_labels
from probes.probe import Needs, Probe, ProbeBatch
from probes.records import Histogram, Record, Scalar

#: default ``max_cost``: per-sample gradient entries ``P x trainable parameters`` of one measurement
MAX_COST = 1e10
#: GSNR leaves out coordinates whose gradient standard deviation is below this many ``eps`` (of the gradients'
#: dtype) times the root mean square gradient entry: rounding, not noise
ROUNDING = 64
#: default ``memory_budget`` (bytes) of one chunk's per-sample gradients
MEMORY_BUDGET = 256 << 20

Problem = tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, Any]


class GradNoise(Probe):
    """Gradient noise on the probe batch: simple noise scale, GSNR (overall and per module), mean gradient norm."""

    name = "grad_noise"
    description = "gradient noise on the probe batch: noise scale, GSNR, gradient norm"
    every = 100
    passive = False
    # DDP and FSDP2: each rank the per-sample gradients of its share, sums all-reduced
    needs = Needs(labels=True, probe_data=True, sharding="per_sample")

    def __init__(
        self,
        loss: Any = None,
        route: str = "auto",
        chunk_size: int | None = None,
        bins: int = 64,
        per_module: bool = True,
        memory_budget: int | float = MEMORY_BUDGET,
        max_cost: int | float | str | None = "auto",
    ) -> None:
        if loss is not None and not callable(loss):
            raise TypeError(f"grad_noise: option 'loss' must be None or a callable (output, y) -> scalar, got {loss!r}")
        self.loss = loss
        self.route = options.choice("grad_noise", "route", route, ("auto", *ROUTES))
        self.chunk_size = options.integer("grad_noise", "chunk_size", chunk_size, minimum=1, optional=True)
        self.bins = required(options.integer("grad_noise", "bins", bins, minimum=1, maximum=options.MAX_BINS))
        self.per_module = options.flag("grad_noise", "per_module", per_module)
        self.memory_budget = required(options.number("grad_noise", "memory_budget", memory_budget, positive=True))
        auto = isinstance(max_cost, str) and max_cost == "auto"
        self.max_cost = (
            MAX_COST if auto else options.number("grad_noise", "max_cost", max_cost, positive=True, optional=True)
        )
        self._route: str | None = None if self.route == "auto" else self.route
        self._eps = torch.finfo(torch.float32).eps  # of the gradients' dtype, set at each measurement

    def check(self, batch: ProbeBatch) -> None:
        """Trainable parameters; on the at-attach batch, labels that fit a loss, no batch statistics, a cost under
        ``max_cost``, and the route (``vmap`` unless it cannot trace the model or disagrees with one backward per
        sample on two samples)."""
        if not trainable(batch.model):
            raise ValueError("grad_noise: the model has no trainable parameters (requires_grad=True)")
        if batch.output is None:
            return
        module, args, target, weight, loss = self.problem(batch)
        if self.loss is not None:
            self._check_loss(module, args, target, weight, loss)
        n_params = sum(p.numel() for p in trainable(batch.model).values())
        cost = float(target.shape[0]) * n_params
        if self.max_cost is not None and cost > self.max_cost:
            raise ValueError(
                f"grad_noise: one measurement takes {target.shape[0]} per-sample gradients of {n_params:,} "
                f"parameters ({cost:.3g} entries, above max_cost={self.max_cost:.3g}): use a smaller probe batch, "
                "or pass max_cost=None (or a larger number) to measure anyway"
            )
        if self._route is None:
            self._route = self._pick_route(module, args, target, weight, loss, batch)

    def _check_loss(
        self, module: nn.Module, args: tuple, target: torch.Tensor, weight: torch.Tensor, loss: Any
    ) -> None:
        """The callable ``loss`` gives a finite scalar on the first sample."""
        try:
            with torch.no_grad():
                value = loss(module(*(a[:1] for a in args)), target[:1], weight[:1])
        except Exception as exc:  # noqa: BLE001 - the user's callable: say which option failed
            raise TypeError(
                f"grad_noise: option 'loss' raised {type(exc).__name__} on one sample ({exc}); it must be a callable "
                "(output, y) -> scalar tensor"
            ) from exc
        if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.is_floating_point():
            raise TypeError(
                f"grad_noise: option 'loss' returned {type(value).__name__}"
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}; it must return a scalar tensor"
            )

    def _pick_route(self, module: nn.Module, args: tuple, target: torch.Tensor, weight: torch.Tensor, loss: Any, batch):
        two = (tuple(a[:2] for a in args), target[:2], weight[:2])
        try:
            fast = sample_gradient_sums(module, *two, loss, chunk=2, route="vmap")
        except Exception as exc:  # noqa: BLE001 - vmap cannot trace every model: one backward per sample instead
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            batch.context.notice(
                "route",
                f"grad_noise: torch.func.vmap cannot trace this model ({reason}); the per-sample gradients take one "
                "backward per sample (route='loop')",
            )
            return "loop"
        slow = sample_gradient_sums(module, *two, loss, chunk=2, route="loop")
        for k in slow.squares:
            if not torch.allclose(fast.squares[k], slow.squares[k], rtol=1e-4, atol=1e-12):
                batch.context.notice(
                    "route",
                    f"grad_noise: the vectorised per-sample gradients of {k!r} differ from one backward per sample; "
                    "route='loop' is used",
                )
                return "loop"
        return "vmap"

    def problem(self, batch: ProbeBatch) -> Problem:
        """``(module, args, target, weight, loss)``: the samples of the loss and the block loss of each.

        Raises:
            ValueError: no labels, labels that fit no loss, or BatchNorm normalising with batch statistics.
        """
        if batch.y is None:
            raise ValueError("grad_noise: this probe needs labels; pass probe_data=(x, y) to probes.attach")
        self._check_norms(batch)
        module, args = batch.context.positional(batch.x)
        out, y = batch.output, batch.y.to(args[0].device)
        dtype = out.dtype if isinstance(out, torch.Tensor) and out.is_floating_point() else torch.float32
        P = int(y.shape[0])
        weight = torch.zeros(P, dtype=dtype, device=y.device)
        if self.loss is not None:
            user = self.loss
            return module, args, y, weight, lambda f, t, w: user(f, t)
        if is_token_labels(y) and isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[:2] == y.shape:
            index, _ = token_pairs("grad_noise", batch, "all", notice=True)
            rows, target, weight = token_targets(y, batch.context.label_shift, index.to(y.device), dtype)
            args = tuple(a[rows.to(a.device)] for a in args)
            return module, args, target, weight, _block_loss("token_cross_entropy")
        target, loss = classification_targets(out, y)
        return module, args, target, weight, loss

    def _check_norms(self, batch: ProbeBatch) -> None:
        norms = [(n, m) for n, m in batch.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for path, m in norms:
            if m.training or m.running_mean is None:
                raise ValueError(
                    f"grad_noise: {type(m).__name__} {path or '<root>'!r} normalises with the statistics of the batch "
                    "(norm_stats='batch' or track_running_stats=False), so a sample's gradient depends on the other "
                    "samples and per-sample gradients are not defined; use attach(norm_stats='running') (the default)"
                )
        if norms:
            batch.context.notice(
                "norms",
                "grad_noise: the model has BatchNorm layers; as for the ntk, the probe pass runs in eval mode and the "
                "per-sample gradients are those of the model normalised by the running statistics (per-sample "
                "gradients are not defined under batch statistics)",
            )

    def measure(self, batch: ProbeBatch) -> list[Record]:
        module, args, target, weight, loss = self.problem(batch)
        if self._route is None:
            self._route = self._pick_route(module, args, target, weight, loss, batch)
        params = trainable(module)
        self._eps = torch.finfo(next(iter(params.values())).dtype).eps
        P, world = int(target.shape[0]), batch.context.world_size
        mine = share(P, batch.context.rank, world) if world > 1 else slice(0, P)
        chunk = self._chunk(batch, params)
        part = tuple(a[mine] for a in args)
        sums = sample_gradient_sums(module, part, target[mine], weight[mine], loss, chunk, self._route)
        if world > 1:
            shapes = {k: p.shape for k, p in params.items()}
            sums = all_reduce_sums(sums, shapes, next(iter(params.values())).device, P, world)
        if sums.n < 2:
            raise ValueError(f"grad_noise: the probe batch gives {sums.n} sample(s); the covariance needs at least 2")
        return self.records(_renamed(sums, module is not batch.model), batch.model)

    def _chunk(self, batch: ProbeBatch, params: dict[str, nn.Parameter]) -> int:
        per_sample = sum(p.numel() * p.element_size() for p in params.values())
        cap = max(1, int(self.memory_budget // max(1, 2 * per_sample)))
        given = self.chunk_size or batch.context.chunk_size or cap
        return max(1, min(given, cap))

    def records(self, sums: GradientSums, model: nn.Module) -> list[Record]:
        """The tags of one measurement from the sums (parameter names of ``model``)."""
        out: list[Record] = [
            Scalar("grad_noise/noise_scale", noise_scale(sums)),
            Scalar("grad_noise/grad_norm", grad_norm(sums)),
        ]
        floor = variance_floor(sums, ROUNDING * self._eps)
        overall = gsnr(sums, floor=floor)
        if overall is not None:
            out.append(Scalar("grad_noise/gsnr", overall))
        if self.per_module:
            for path, names in module_parameters(model, sums.total).items():
                value = gsnr(sums, names, floor)
                if value is not None:
                    out.append(Scalar(f"grad_noise/{path}/gsnr", value))
        out.append(Histogram.of("grad_noise/sample_grad_norm", sums.sample_norms(), bins=self.bins))
        return out


def _block_loss(kind: str) -> Any:
    return lambda f, t, w: sample_loss(kind, f, t, w)


def module_parameters(model: nn.Module, names: Any) -> dict[str, list[str]]:
    """Module path (``root`` for the model itself) -> the names of the trainable parameters it owns directly, among
    ``names``; a parameter tied between modules counts for each of them."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    known = set(names)
    out: dict[str, list[str]] = {}
    for path, m in model.named_modules():
        own = [by_id[id(p)] for p in m.parameters(recurse=False) if p.requires_grad and by_id.get(id(p)) in known]
        if own:
            out[path or "root"] = own
    return out


def _renamed(sums: GradientSums, wrapped: bool) -> GradientSums:
    """The sums keyed by the model's own parameter names (``Positional`` names them ``model.<name>``)."""
    if not wrapped:
        return sums

    def strip(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("model."): v for k, v in d.items()}

    return GradientSums(sums.n, strip(sums.total), strip(sums.squares), sums.norms)


def classification_targets(out: Any, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The target and block loss of one label per sample: float targets (MSE), two classes and one output (binary
    cross-entropy of the logit), or integer classes (cross-entropy)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"grad_noise: the model output is a {type(out).__name__}, not a tensor")
    C = math.prod(out.shape[1:])
    if y.is_floating_point():
        if y.numel() != out.numel():
            raise ValueError(
                f"grad_noise: float targets of shape {tuple(y.shape)} do not match the output {tuple(out.shape)} "
                "(MSE needs one target per output); pass targets shaped like the output, or loss=callable"
            )
        return y.reshape(out.shape), _block_loss("mse")
    if y.ndim != 1:
        raise ValueError(
            f"grad_noise: integer labels of shape {tuple(y.shape)} fit no loss for an output {tuple(out.shape)}: "
            "pass one class index per sample, token labels (P, T) with logits (P, T, C), or loss=callable"
        )
    if C == 1:
        values = torch.unique(y)
        if values.numel() > 2:
            raise ValueError(f"grad_noise: one output needs two classes, got {values.numel()} label values")
        return (y == values.max()).to(out.dtype), _block_loss("binary_cross_entropy")
    if bool((y < 0).any()) or bool((y >= C).any()):
        raise ValueError(
            f"grad_noise: class labels must lie in 0..{C - 1} for {C} outputs, got {int(y.min())}..{int(y.max())}"
        )
    return y.long(), _block_loss("cross_entropy")
