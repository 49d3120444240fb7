"""The one probe pass: the fixed probe batch through the model, without gradients and in eval mode.

Every active probe reads the model through this pass: the shared pass at each measurement (the sites that the due
probes need, only what they read of each), and ``batch.context.run`` for a probe's own passes (perturbed inputs or
parameters, site groups that must not all be held at once). All go through one ``Capture``, so every pass sees the
same sites, in chunks of the session's ``probe_batch_size``. Around a measurement ``guarded`` puts the model in
eval mode and restores every module's mode (through its own ``train()``) and the RNG state afterwards.

The probe batch follows the model: ``ProbeData.current()`` casts the inputs as given to the model's device and
floating dtype as they are now (after ``model.double()`` or a device move, equal to a fresh attach).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from probes import inputs
from probes.engine import distributed
from probes.engine.capture import Capture
from probes.engine.context import isolated
from probes.engine.failures import ProbesNoticeWarning
from probes.legacy import site_filter
from probes.probe import Activation, Pass, Probe, ProbeBatch, ProbeContext, Site

Keep = Callable[[Site], frozenset[str]]


class OutputError(Exception):
    """The model's output cannot be reduced to one tensor (the cause says why)."""


def model_placement(module: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device of the model's first parameter (or buffer) and its floating dtype, as they are now."""
    first: torch.Tensor | None = next(module.parameters(), None)
    if first is None:
        first = next(module.buffers(), None)
    return (first.device if first is not None else torch.device("cpu")), inputs.model_dtype(module)


def lazy_pending(module: nn.Module) -> bool:
    """Whether the model still has uninitialised lazy parameters (``nn.LazyLinear`` before its first forward)."""
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())


class ProbeData:
    """The probe batch as the user gave it, and as the model needs it now.

    ``check`` validates it once at attach (sizes, finite values); ``current()`` returns ``(x, y)`` on the model's
    current device with floating inputs in its current dtype, cached until the model moves.
    """

    def __init__(self, x: Any, y: torch.Tensor | None, module: nn.Module) -> None:
        self.module = module
        self.given_x, self.given_y = x, y
        self._at: tuple[torch.device, torch.dtype | None] | None = None
        self._current: tuple[Any, torch.Tensor | None] = (None, None)

    @classmethod
    def from_probe_data(cls, probe_data: Any, label_key: str | None, module: nn.Module) -> ProbeData:
        """Split ``probe_data`` into inputs and labels and check them (see ``attach``)."""
        x, y = inputs.split_probe_data(probe_data, label_key)
        if x is not None and y is not None:
            y = _labels_tensor(y)
        data = cls(x, y if x is not None else None, module)
        if x is not None:
            data.check()
        return data

    def check(self) -> None:
        """Every tensor of the probe batch holds values (not meta), is dense and real; the labels are bool, integer
        or floating; inputs and labels have as many samples; floating values are finite. Errors name
        ``probe_data``, the part (inputs ``x[...]`` or labels ``y``) and what is wrong."""
        x, y = self.given_x, self.given_y
        if not any(True for _ in inputs.iter_tensors(x)):
            raise TypeError(
                f"probe_data: the inputs (x) hold no tensor (got {type(x).__name__}); give a tensor, a "
                "tuple or a dict of tensors (numpy arrays and lists: torch.as_tensor(x) first)"
            )
        for where, t in inputs.iter_tensors(x):
            _check_tensor(f"the inputs ({where})", t)
        if y is not None:
            _check_tensor("the labels (y)", y)
        n = inputs.sample_count(x)
        if n == 0:
            raise ValueError("probe_data: the probe batch is empty (0 samples)")
        for where, t in inputs.iter_tensors(x):
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"probe_data: {where} has {bad} NaN or infinite values; the probe batch must be finite"
                )
        if y is not None:
            if y.ndim == 0 or y.shape[0] != n:
                raise ValueError(f"probe_data: x has {n} samples but y has shape {tuple(y.shape)}")
            if y.is_floating_point() and not torch.isfinite(y).all():
                raise ValueError("probe_data: y has NaN or infinite values")

    def replace(self, x: Any, y: torch.Tensor | None) -> None:
        """Use another probe batch from now on (under FSDP every rank takes rank 0's)."""
        self.given_x, self.given_y, self._at = x, y, None

    def mask(self, key: str | None) -> torch.Tensor | None:
        """The probe inputs' attention mask (``x[key]`` of dict inputs) as a bool ``(P, positions)`` tensor, or None."""
        x = self.current()[0]
        m = x.get(key) if key is not None and isinstance(x, Mapping) else None
        return m != 0 if isinstance(m, torch.Tensor) and m.ndim == 2 else None

    def same_on_every_rank(self, device: torch.device, rank: int) -> None:
        """Under a sharded model every rank runs the probe pass: all take rank 0's probe batch (said once)."""
        if not self.present:
            return
        x, y, replaced = distributed.same_probe_batch(*self.current(), device)
        self.replace(x, y)
        if replaced and rank == 0:
            warnings.warn(
                "probe_data differs between the ranks, which measure together; every rank uses rank 0's probe batch",
                ProbesNoticeWarning,
                stacklevel=4,
            )

    @property
    def present(self) -> bool:
        return self.given_x is not None

    def current(self) -> tuple[Any, torch.Tensor | None]:
        """``(x, y)`` on the model's device, floating inputs in the model's floating dtype (as a fresh attach)."""
        if self.given_x is None:
            return None, None
        at = model_placement(self.module)
        if at != self._at:
            device, dtype = at

            def to_model(t: torch.Tensor) -> torch.Tensor:
                t = t.to(device)
                return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

            y = self.given_y.to(device) if self.given_y is not None else None
            self._current, self._at = (inputs.map_tensors(self.given_x, to_model), y), at
        return self._current


def _labels_tensor(y: Any) -> torch.Tensor:
    """The labels as a tensor (arrays and lists of numbers are converted); anything else is an error naming them."""
    if isinstance(y, torch.Tensor):
        return y
    try:
        return torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"probe_data: the labels (y) must be a tensor, or an array or list of numbers; got a "
            f"{type(y).__name__} that torch cannot convert ({str(exc).splitlines()[0]})"
        ) from None


def _check_tensor(where: str, t: torch.Tensor) -> None:
    if t.is_meta:
        raise ValueError(
            f"probe_data: {where} are on the meta device, which holds shapes but no values; give "
            "tensors with data (on the CPU or the model's device)"
        )
    if t.layout != torch.strided:
        raise ValueError(
            f"probe_data: {where} are a {str(t.layout).removeprefix('torch.')} tensor; the probe batch "
            "must be dense (t.to_dense())"
        )
    if t.is_complex():
        raise TypeError(
            f"probe_data: {where} are complex ({t.dtype}); the probes measure real-valued inputs and labels"
        )


def check_model(module: nn.Module) -> None:
    """The model's parameters and buffers hold values: a model on the meta device is an error naming a tensor."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            if t.is_meta and not isinstance(t, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
                raise ValueError(
                    f"attach: the model is on the meta device ({kind} {name!r} has a shape but no "
                    "values), so nothing can be measured; materialise it first (model.to_empty("
                    "device=...) and initialise or load the weights), then attach"
                )


def keeper(due: list[Probe]) -> Keep:
    """``site -> what to keep``: the union of what the due probes that read the site need of it."""
    cache: dict[str, frozenset[str]] = {}

    def keep(site: Site) -> frozenset[str]:
        want = cache.get(site.name)
        if want is None:
            want = frozenset().union(*[p.needs.sites for p in due if site_filter(p)(site)])
            cache[site.name] = want
        return want

    return keep


class ProbePass:
    """Runs the model on probe inputs through one ``Capture`` (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        capture: Capture,
        output_spec: Any = None,
        chunk_size: int | None = None,
        norm_stats: str = "running",
    ) -> None:
        self.module, self.capture, self.output_spec, self.chunk_size = module, capture, output_spec, chunk_size
        self.norm_stats = norm_stats
        self.norms = [
            m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        ]

    def run(self, x: Any, keep: Keep | None = None, params: Mapping[str, torch.Tensor] | None = None) -> Pass:
        """``model(x)`` without gradients, in chunks, keeping of each site what ``keep`` asks (default nothing)."""
        P = inputs.sample_count(x)
        chunk = self.chunk_size or P
        if chunk >= P:
            return self._forward(x, keep, params)
        # chunked: every kept tensor goes straight into its place in one preallocated tensor per site
        output: torch.Tensor | None = None
        activations: dict[str, Activation] = {}
        part = Pass(None, {}, [])
        for start in range(0, P, chunk):
            stop = min(start + chunk, P)
            part = self._forward(inputs.take(x, slice(start, stop)), keep, params)
            output = _place(output, part.output, "output", start, stop, P)
            for name, act in part.activations.items():
                whole = activations.get(name)
                activations[name] = Activation(
                    act.site,
                    _place(whole.pre if whole else None, act.pre, name, start, stop, P),
                    _place(whole.post if whole else None, act.post, name, start, stop, P),
                )
        return Pass(output, activations, part.calls, part.tensor_output)

    def _forward(self, x: Any, keep: Keep | None, params: Mapping[str, torch.Tensor] | None) -> Pass:
        module = self.module
        model: Callable[..., Any] = module
        if params is not None:

            def model(*args: Any, **kwargs: Any) -> Any:
                return functional_call(module, dict(params), args, kwargs)

        with torch.no_grad():
            if keep is None:
                raw = inputs.call_model(model, x)
                return Pass(self._select(raw), {}, [], isinstance(raw, torch.Tensor))
            with self.capture.recording(keep=keep) as rec:
                raw = inputs.call_model(model, x)
        return Pass(self._select(raw), rec.activations, rec.calls, isinstance(raw, torch.Tensor))

    def _select(self, raw: Any) -> torch.Tensor:
        try:
            return inputs.select_output(raw, self.output_spec)
        except (TypeError, ValueError) as exc:
            raise OutputError(str(exc)) from exc

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Eval mode, and none of the caller's context (``probes.engine.context.isolated``), while inside; afterwards
        every module's mode (through its own ``train()``) and the RNG state are as they were."""
        module = self.module
        modes = [(m, m.training) for m in module.modules()]
        rng = _rng_state()
        with isolated():
            try:
                module.eval()
                if self.norm_stats == "batch":
                    with self.batch_statistics():
                        yield
                else:
                    yield
            finally:
                _restore_modes(module, modes)
                _set_rng_state(rng)

    @contextmanager
    def batch_statistics(self) -> Iterator[None]:
        """Batch normalization with the statistics of the batch at hand (of each chunk) instead of the running ones,
        in eval mode: the running statistics are set aside (a norm layer without them normalises by the batch) and
        put back untouched."""
        kept = [(m, m.running_mean, m.running_var) for m in self.norms]
        try:
            for m, _, _ in kept:
                m.running_mean = m.running_var = None
            yield
        finally:
            for m, mean, var in kept:
                m.running_mean, m.running_var = mean, var

    def disagreement(self, x: Any, output: torch.Tensor | None) -> float | None:
        """How far the eval-mode output (running statistics) is from the output with batch statistics: the fraction
        of samples whose predicted class differs (or the relative distance of the outputs when there are no classes);
        None without norm layers that keep running statistics, 0 while they have seen no batch."""
        if not self.norms or self.norm_stats != "running" or output is None:
            return None
        if all(m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0 for m in self.norms):
            return 0.0  # running statistics not estimated yet (a fresh model): nothing to compare with
        with self.batch_statistics():
            other = self.run(x).output
        if other is None:
            return None
        if output.ndim == 2 and output.shape[1] > 1:
            return float((output.argmax(1) != other.argmax(1)).double().mean())
        return float((output - other).double().norm() / other.double().norm().clamp_min(1e-300))


def standalone_batch(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    *,
    step: int = 0,
    output: Any = None,
    probe_batch_size: int | None = None,
    site_types: tuple[type[nn.Module], ...] = (),
    optimizer: Any = None,
) -> ProbeBatch:
    """A ``ProbeBatch`` outside a session (``probes.testing.probe_batch``): the model's output on ``x`` and a probe
    pass of its own for ``batch.context.run``, each run in eval mode with the modes and RNG state restored
    (``site_types``: extra module types to treat as sites, as a session takes them from its probes; ``optimizer``:
    ``batch.context.optimizer``)."""
    probe_pass = ProbePass(model, Capture(model, extra_sites=tuple(site_types)), output, probe_batch_size)

    def run(x: Any, keep: Keep | None = None, params: Mapping[str, torch.Tensor] | None = None) -> Pass:
        with probe_pass.guarded():
            return probe_pass.run(x, keep, params)

    shared = run(x)
    context = ProbeContext(
        model,
        optimizer=optimizer,
        chunk_size=probe_batch_size,
        runner=run,
        output_spec=output,
        tensor_output=shared.tensor_output,
    )
    return ProbeBatch(model, x, y, shared.output, {}, step, context=context)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _restore_modes(root: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    """Put every module back in its mode through its own ``train()`` (overrides run), parents first."""
    root.train(modes[0][1])
    for m, training in modes[1:]:
        if m.training != training:
            m.train(training)


def _place(
    whole: torch.Tensor | None, part: torch.Tensor | None, site_name: str, start: int, stop: int, total: int
) -> torch.Tensor | None:
    """Copy the rows ``start:stop`` of a chunked pass into ``whole`` (allocated at the first chunk)."""
    if part is None:
        return None
    if part.ndim == 0 or part.shape[0] != stop - start:
        raise ValueError(
            f"probe_batch_size: site {site_name!r} has shape {tuple(part.shape)} for a chunk of "
            f"{stop - start} samples; chunked probe passes need the samples along the first axis of "
            "every site (pass probe_batch_size=None to run the probe batch in one pass)"
        )
    if whole is None:
        whole = torch.empty((total, *part.shape[1:]), dtype=part.dtype, device=part.device)
    whole[start:stop] = part
    return whole
