"""The probe interface: what a probe needs, its default cadence, and how it returns records.

A probe is a small class. Passive probes (``passive = True``) observe the activations of
the training forwards through ``observe`` and return records from ``flush``; active
probes return records from ``measure`` on the fixed probe batch. No probe writes to
TensorBoard: the session hands the records to every sink.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from probes.autodiff.fsdp import gathered
from probes.functional.labels import label_matrix
from probes.inputs import Positional, call_model, sample_count, select_output
from probes.records import Chart, Record

#: activation kinds whose zeros mean "gate closed" (module class names, lower case, and functional names)
RELU_FAMILY = frozenset({"relu", "relu6", "leakyrelu", "leaky_relu", "prelu", "rrelu"})


class ProbesNoticeWarning(UserWarning):
    """Something a user should know once: a probe that sees nothing on this model, a window without training."""


@dataclass(frozen=True)
class Site:
    """One place where activations are observed.

    ``name`` is the module path (``features.1``), ``path#k`` for the k-th call of a module
    called more than once per forward, ``path:relu`` (``:relu#k``) for a functional call
    inside the ``forward`` of the module at ``path`` (``forward`` for the root module).

    Attributes:
        name: the site's name in tags.
        path: the module path (of the calling module, for a functional call).
        kind: the lower-case activation name (``"relu"``, ``"tanh"``, ``"gelu"``, ...).
        call: the 1-based call index of this module or function within one forward.
        functional: whether the site is a functional call (``F.relu`` in ``forward``) rather than a module.
        module: the activation module (None for a functional call).
    """

    name: str
    path: str
    kind: str  # lower-case activation name: "relu", "tanh", "gelu", ...
    call: int = 1  # 1-based call index of this module / function within one forward
    functional: bool = False
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    #: a module that a probe of this session declared in its ``site_types`` (max pooling for ``linear_region``)
    #: rather than an activation: the session's capture sees the union of its probes' types, so a probe that reads
    #: activations meets such a site only when another probe of the same session asked for it
    extra: bool = field(default=False, compare=False)

    @property
    def relu_family(self) -> bool:
        return self.kind in RELU_FAMILY


@dataclass
class Activation:
    """What the probe pass saw at one site: ``pre`` the activation's input, ``post`` its output.

    Only what the due probes asked for is kept (``Needs.sites``): when they need only the gates,
    ``pre`` is the boolean ``pre > 0`` itself (so ``pre > 0`` still reads the gates), and ``post`` is
    None when no due probe reads it.

    Attributes:
        site: where it was seen.
        pre: the activation's input (values, or gates as booleans), or None.
        post: the activation's output, or None.
    """

    site: Site
    pre: torch.Tensor | None
    post: torch.Tensor | None

    @property
    def gate(self) -> torch.Tensor:
        """``pre > 0``: for ReLU exactly the units whose output is non-zero."""
        pre = self.pre
        if pre is None:
            raise ValueError(
                f"site {self.site.name!r}: its input was not kept, so it has no gates; declare what the probe "
                'reads in Needs(sites=...) ("gate" or "pre")'
            )
        return pre if pre.dtype == torch.bool else pre > 0


@dataclass(frozen=True)
class Call:
    """One event of the probe pass, in call order: a leaf-module call or a functional activation."""

    path: str  # module path ("" for the root); for functional activations the calling module's path
    kind: str  # lower-case class name ("linear", "relu", "conv2d") or function name ("relu")
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    site: str | None = None  # the activation site name when this call is a site


@dataclass
class Pass:
    """What one run of the probe pass returns: ``output`` (the selected output tensor, samples first),
    ``activations`` (site name -> what was kept of it), ``calls`` (every leaf-module call and functional activation in
    order), and whether the model returned a single tensor."""

    output: torch.Tensor | None
    activations: dict[str, Activation]
    calls: list[Call]
    tensor_output: bool = True


@dataclass(frozen=True)
class Needs:
    """The one declaration of what a probe needs; the engine arranges it and checks it once at attach.

    Attributes:
        sites: what of each site the probe reads: ``"pre"`` (the activation's input), ``"gate"`` (only ``pre > 0``),
            ``"post"`` (its output); empty: no sites. For an active probe, the probe pass keeps these in
            ``ProbeBatch.activations``; for a passive probe, the capture keeps them for ``observe``.
        site_types: extra module types to treat as sites (beyond the activation modules), e.g. ``(nn.MaxPool2d,)``;
            the session's one capture sees the union over its probes, so other probes may meet them
            (``Probe.wants`` filters).
        labels: the probe measures against labels: ``attach`` without labels raises, once, naming the probe.
        probe_data: the probe measures on the fixed probe batch (an active probe): ``attach`` without
            ``probe_data`` raises, naming the probe.
        tensor_input: the probe batch ``x`` must be one floating tensor with samples first (checked at attach).
        sharding: what the probe needs across ranks (``torch.distributed``): ``"activations"`` (the probe pass only;
            under DDP rank 0 measures alone, under FSDP every rank runs the pass), ``"per_module"`` (whole
            parameters of one module at a time, read inside ``batch.context.gathered(module)``), ``"per_sample"``
            (every rank measures its share of the probe batch and the ranks exchange per-sample factors), or None:
            the probe cannot run on a sharded model and is switched off there at attach.
    """

    sites: frozenset[str] = frozenset()
    site_types: tuple[type[nn.Module], ...] = ()
    labels: bool = False
    probe_data: bool = True
    tensor_input: bool = False
    sharding: str | None = "activations"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", frozenset(self.sites))
        object.__setattr__(self, "site_types", tuple(self.site_types))
        if not self.sites <= SITE_VALUES:
            raise ValueError(f"Needs: sites must be among {sorted(SITE_VALUES)}, got {sorted(self.sites)}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"Needs: sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in self.site_types):
            raise TypeError(f"Needs: site_types must be nn.Module subclasses, got {self.site_types!r}")


#: what of a site a probe can read (``Needs.sites``)
SITE_VALUES = frozenset({"pre", "gate", "post"})
#: what a probe can need across ranks (``Needs.sharding``; None: not on a sharded model)
SHARDINGS = ("activations", "per_module", "per_sample", None)


class ProbeContext:
    """How a probe reaches the model and the session while it measures: ``batch.context``.

    The data of a measurement is on the ``ProbeBatch``; what runs the model and what the session knows is here,
    so that a probe never holds an engine handle. Built by the session (or ``probes.testing.probe_batch``); a
    ``ProbeBatch`` made by hand gets one that runs the model directly.

    Attributes:
        model: the user's module (unwrapped from DDP), in eval mode while probes run.
        rank: this process's rank under ``torch.distributed`` (0 without it).
        world_size: the ranks taking part in this measurement (1 where this process measures alone; a
            ``sharding="per_sample"`` probe splits the probe batch over them).
        sharded: the model's parameters are sharded (FSDP2): read whole parameters inside ``gathered``.
        label_shift: token labels ``(P, T)``: features at position t pair with the label at t + label_shift.
        device: the model's device.
        optimizer: the optimizer given to ``attach`` (None without one).
        writes: whether this process writes (rank 0): a probe that writes files itself does so only here.
        logdir: the session's log directory, or None.
        chunk_size: the session's ``probe_batch_size`` (None: one pass): how many samples a probe's own passes
            with gradients (``forward(x, grad=True)`` per chunk) should take at once.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rank: int = 0,
        world_size: int = 1,
        sharded: bool = False,
        label_shift: int = 0,
        device: torch.device | None = None,
        optimizer: Any = None,
        writes: bool = True,
        logdir: str | None = None,
        chunk_size: int | None = None,
        runner: Callable[..., Pass] | None = None,
        output_spec: Any = None,
        tensor_output: bool = True,
        notify: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.model, self.rank, self.world_size, self.sharded = model, rank, world_size, sharded
        self.label_shift, self.optimizer, self.writes, self.logdir = label_shift, optimizer, writes, logdir
        self.device = device if device is not None else _first_device(model)
        self.chunk_size = chunk_size
        self._runner, self._output_spec, self._tensor_output, self._notify = runner, output_spec, tensor_output, notify
        self._said: set[tuple[str, str]] = set()
        #: the probe being called (the engine sets it before each call): ``notice`` says under its name
        self.probe = ""

    def gathered(self, *modules: nn.Module) -> AbstractContextManager[None]:
        """A block inside which the whole parameters of ``modules`` are on this rank.

        Under FSDP2 the FSDP units that own the modules' parameters are all-gathered (``unshard``) on entry, unless
        already gathered, and freed again (``reshard``) on exit, so a probe holds one module's parameters at a time
        beyond what FSDP itself holds. Every rank must enter the same blocks in the same order (all-gathers).
        Read the parameters (``module.weight``) inside the block, not before. Without sharding: nothing happens.

        Args:
            modules: submodules of ``model`` whose parameters the block reads.

        Returns:
            A context manager.
        """
        return gathered(self.model, modules) if self.sharded else nullcontext()

    def run(
        self,
        x: Any,
        *,
        keep: Callable[[Site], frozenset[str]] | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> Pass:
        """One more pass of the engine's probe pass: ``model(x)`` without gradients, in eval mode, in chunks of the
        session's ``probe_batch_size``, through the same sites as the shared pass.

        Args:
            x: inputs in the probe batch's convention.
            keep: ``site -> what to keep`` among ``{"pre", "gate", "post"}`` (default: nothing, the output only).
            params: parameters and buffers by name to run the model with instead of its own
                (``torch.func.functional_call``), e.g. perturbed weights.

        Returns:
            A ``Pass``: the selected output tensor (samples first), the kept activations and the call trace.
        """
        if self._runner is None:
            raise RuntimeError(
                "this ProbeBatch has no probe pass to run: the session gives one; in a test, build the "
                "batch with probes.testing.probe_batch(model, x, y)"
            )
        return self._runner(x, keep=keep, params=params)

    def forward(self, x: Any, *, grad: bool = True, model: Any = None) -> torch.Tensor:
        """``model(x)`` with the session's input convention and output selection.

        Args:
            x: inputs in the probe batch's convention.
            grad: True: with gradients as the caller has them (a probe differentiating through the model); False:
                the engine's probe pass without gradients (as ``run``, output only).
            model: another callable to run the same way (default: the model; only with ``grad=True``).

        Returns:
            The selected output tensor.
        """
        if not grad and model is None and self._runner is not None:
            output = self.run(x).output
            if output is None:  # only a pass over no samples has no output
                raise ValueError("ProbeBatch.forward: the inputs hold no samples, so the model gave no output")
            return output
        with nullcontext() if grad else torch.no_grad():
            out = call_model(model if model is not None else self.model, x)
        return select_output(out, self._output_spec)

    def positional(self, x: Any, *, force: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """``(module, args)`` with ``module(*args)`` the probes' output tensor on ``x``: the model itself for
        ``model(x)`` returning a tensor (unless ``force``), else a wrapper (``probes.inputs.Positional``)
        sharing its parameters.

        Args:
            x: inputs in the probe batch's convention.
            force: wrap even a model that returns a tensor.
        """
        return Positional.wrap(self.model, x, self._output_spec, force=force or not self._tensor_output)

    @property
    def picks_output(self) -> bool:
        """Whether ``attach(output=...)`` picks the probes' output from what the model returns."""
        return self._output_spec is not None

    def notice(self, key: str, message: str) -> None:
        """Say ``message`` once per session and probe for ``key``, on rank 0 only (a ``ProbesNoticeWarning``).

        Args:
            key: what the notice is about (``"slow"``, ``"position"``): said once per key.
            message: the text, starting with the probe's name.
        """
        if (self.probe, key) in self._said:
            return
        self._said.add((self.probe, key))
        if self._notify is not None:
            self._notify(self.probe, key, message)
        elif self.rank == 0:
            warnings.warn(message, ProbesNoticeWarning, stacklevel=3)


def _first_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


#: what the batch of the old contract had and the new one moved to ``batch.context`` (read through with a warning
#: nowhere: these keep working), and what it no longer gives (an error saying what to use)
_MOVED = ("gathered", "rank", "world_size", "sharded", "label_shift", "writes", "logdir", "chunk_size")
_REMOVED = {
    "runner": "batch.context.run(x, keep=..., params=...)",
    "output_spec": "batch.context.forward(x) or batch.context.positional(batch.x)",
}


@dataclass
class ProbeBatch:
    """What an active probe's ``measure`` and ``check`` receive: the data of one measurement, and its context.

    The data: ``x`` the probe inputs as given (a tensor, a tuple for ``model(*x)``, a dict for ``model(**x)``);
    ``y`` the labels; ``output`` the tensor picked from ``model(x)`` (computed without gradients; see
    ``probes.inputs``); ``activations`` site name -> what the shared pass kept (only the sites that the due
    probes need); ``mask`` the attention mask; ``step``. ``context`` (a ``ProbeContext``) runs the model (with or
    without gradients, more probe passes), gathers sharded parameters, says notices once, and knows the ranks.

    Attributes:
        model: the user's module, in eval mode while probes run.
        x: the probe inputs, on the model's current device and dtype.
        y: the probe labels, or None.
        output: the probes' output tensor on ``x`` (samples first), or None (no probe batch).
        activations: site name -> what the shared pass kept of it.
        step: the step of this measurement.
        mask: ``(P, positions)`` bool, True at real tokens (the inputs' attention mask), or None.
        calls: every leaf-module call and functional activation of the pass, in order.
        context: the ``ProbeContext`` (default: one that runs ``model`` directly, without a session).
    """

    model: nn.Module
    x: Any
    y: torch.Tensor | None
    output: torch.Tensor | None
    activations: dict[str, Activation]
    step: int
    mask: torch.Tensor | None = None
    calls: list[Call] = field(default_factory=list)
    context: ProbeContext = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.context is None:
            self.context = ProbeContext(self.model)

    def __getattr__(self, name: str) -> Any:
        # only reached for names the batch lacks: the old contract's engine handles and moved attributes
        if name in _MOVED:
            return getattr(self.__dict__["context"], name) if "context" in self.__dict__ else None
        if name in _REMOVED:
            raise AttributeError(f"ProbeBatch.{name} is no longer part of the probe contract; use {_REMOVED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def run(
        self,
        x: Any = None,
        *,
        keep: Callable[[Site], frozenset[str]] | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> Pass:
        """The old contract's ``batch.run``: ``batch.context.run(x if given else batch.x, ...)``.

        Args:
            x: inputs (default: the probe batch).
            keep: ``site -> what to keep``.
            params: parameters and buffers to run the model with.
        """
        return self.context.run(self.x if x is None else x, keep=keep, params=params)

    def forward(self, x: Any = None, model: Any = None) -> torch.Tensor:
        """The old contract's ``batch.forward``: ``batch.context.forward(x if given else batch.x, grad=True)``.

        Args:
            x: inputs (default: the probe batch).
            model: another callable to run the same way.
        """
        return self.context.forward(self.x if x is None else x, grad=True, model=model)

    def positional(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """``batch.context.positional(batch.x)``."""
        return self.context.positional(self.x)

    @property
    def tensor_output(self) -> bool:
        """Whether the model returned one tensor (no selection was needed)."""
        return self.context._tensor_output

    @property
    def size(self) -> int:
        """Number of probe samples P (0 when the session has no probe batch)."""
        if isinstance(self.output, torch.Tensor) and self.output.ndim > 0:
            return int(self.output.shape[0])
        return sample_count(self.x) if self.x is not None else 0

    def targets(self, probe: str = "probe", num_classes: int | None = None) -> torch.Tensor:
        """Labels as a float64 P x C matrix (binary as +-1 in one column, classes one-hot).

        Args:
            probe: the name error messages start with.
            num_classes: columns of the one-hot matrix (default: the output width of a 2-d output).

        Returns:
            ``Y``, float64 ``P x C``.

        Raises:
            ValueError: no labels, or labels that do not fit the model's outputs (the message says what to pass).
        """
        if self.y is None:
            raise ValueError(f"{probe}: this probe needs labels; pass probe_data=(x, y) to probes.attach")
        out = self.output
        outputs = (
            int(out.shape[1])
            if num_classes is None and isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1
            else None
        )  # the class count read from the model's outputs
        try:
            return label_matrix(self.y, num_classes=num_classes if outputs is None else outputs, who=probe)
        except ValueError as exc:
            if outputs is None:
                raise
            raise ValueError(
                f"{exc}: the model has {outputs} outputs, so class labels must lie in "
                f"0..{outputs - 1}; pass labels that fit the model's outputs in probe_data"
            ) from None


@dataclass
class Context:
    """What a probe learns at attach.

    Attributes:
        model: the unwrapped model.
        x: the probe inputs (or None).
        y: the probe labels (or None).
        logdir: the session's log directory (or None).
        device: the model's device.
        output_spec: ``attach(output=...)``.
        optimizer: ``attach(optimizer=...)`` (or None): a probe that reads its hyper-parameters or state at
            measurement time (``hessian``'s edge of stability) keeps the reference.
    """

    model: nn.Module
    x: Any = None
    y: torch.Tensor | None = None
    logdir: str | None = None
    device: torch.device = torch.device("cpu")
    output_spec: Any = None
    optimizer: Any = None


REDUCTIONS = ("sum", "max", "min", "cat", None)


@dataclass
class State:
    """A declared accumulator: its default (reset value), its reduction over ranks, and whether it is per window."""

    name: str
    default: Any
    reduce: str | None
    window: bool


def _fresh(default: Any) -> Any:
    """A new value equal to ``default`` sharing no storage with it (dicts and lists start empty)."""
    if isinstance(default, torch.Tensor):
        return default.clone()
    if isinstance(default, np.ndarray):
        return default.copy()
    if isinstance(default, (dict, list)):
        return type(default)()
    return default


class Probe:
    """Base class of every probe (built-in or third party).

    A probe declares, as class attributes: ``name``, ``description``, ``passive`` (observes training forwards),
    its default cadence ``every`` (a positive int, or a schedule ``step -> bool`` from ``probes.schedules``),
    ``charts``, and what it needs in one ``needs = Needs(...)`` (sites and what of them, extra site types, labels,
    the probe batch, sharding); ``wants(site)`` narrows the sites. Options given to ``attach`` arrive as keyword
    arguments of ``__init__``; a probe declaring them as a dataclass ``Options`` gets them checked by
    ``probes.options`` and stored as ``self.options`` by the base ``__init__``. ``every`` is taken by the session
    and stored on the instance.

    All state is declared with ``add_state(name, default, reduce=..., window=...)`` (torchmetrics' idea):
    accumulators (reset by the session after each flush, reduced over ranks under DDP) and persistent references
    (``window=False``: a first snapshot, a trail). The base class copies them in ``state_dict`` and restores them
    in ``load_state_dict``; a probe does not override those. A state is read and written as ``self.<name>``.

    At attach, ``check(batch)`` sees the model and the at-attach probe batch: what can be known there raises there.
    ``measure(batch)`` reads the data of ``batch`` and runs more passes through ``batch.context`` (never a capture
    of its own). The old contract (flags ``needs_sites``, ``site_values``, ``needs_probe_data``,
    ``supports_sharding``, ``sharding``, ``site_types``; ``setup``, ``validate``, ``wants_site``) keeps working
    through ``probes.legacy``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    every: Any = 100
    passive: ClassVar[bool] = False
    #: marks the root of the contract for ``probes.legacy`` (which does not import this module)
    _contract_root: ClassVar[bool] = True
    #: what the probe needs (``Needs``); a class declaring the old flags instead gets one built from them
    needs: ClassVar[Needs] = Needs()
    #: the probe's options as a dataclass (fields with defaults, checks in ``probes.options.option``), or None:
    #: options are the keyword arguments of ``__init__``
    Options: ClassVar[type | None] = None
    #: chart groups of this probe's scalar tags that are not ``<probe>/<site>/<quantity>`` (``probes.records.Chart``):
    #: the sinks and the report draw each group in one chart (sites of one quantity are grouped without it)
    charts: ClassVar[tuple[Chart, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from probes import legacy
        from probes.options import signature

        legacy.adapt(cls)
        declared = cls.__dict__.get("Options")
        if declared is not None:  # ``inspect.signature(cls)`` names the options
            if "__init__" not in cls.__dict__:

                def __init__(self: Probe, **options: Any) -> None:
                    super(cls, self).__init__(**options)

                cls.__init__ = __init__  # type: ignore[method-assign]
            params = list(inspect.signature(cls.__dict__["__init__"]).parameters.values())[1:]
            if all(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                cls.__init__.__signature__ = signature(declared)  # type: ignore[attr-defined]

    def __init__(self, **options: Any) -> None:
        """Check ``options`` against ``Options`` (``probes.options.read``) and keep them as ``self.options``; an
        option reads as ``self.options.<name>``, or ``self.<name>`` where the probe has no attribute of that name.

        Args:
            options: the options given to ``attach`` (``every`` taken by the session).
        """
        from probes.options import read

        self.options = read(self.name or type(self).__name__, type(self).Options, options)

    def __getattr__(self, name: str) -> Any:
        # only reached for a name the probe lacks: an option of its ``Options``
        options = self.__dict__.get("options")
        if options is not None and name in getattr(type(options), "__dataclass_fields__", {}):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- declared state ---------------------------------------------------------------
    def add_state(self, name: str, default: Any, reduce: str | None = "sum", window: bool = True) -> None:
        """Declare a state ``self.<name>``: reset, reduced over ranks and checkpointed by the base class.

        Args:
            name: a public identifier; the state is read and written as ``self.<name>``.
            default: the value at construction and after each reset: a tensor (reset to a copy), a number,
                None (a reference not taken yet, e.g. the first kernel), a numpy array (a copy), a ``dict``
                (reset to ``{}``; values are tensors, numbers, None or dicts of them, nested as deep as needed)
                or a ``list`` (reset to ``[]``; ``reduce="cat"`` gathers the items of every rank).
            reduce: ``"sum" | "max" | "min" | "cat" | None`` over ranks under DDP (None: not reduced, e.g. a
                reference that every rank computes alike). None and numpy defaults take ``reduce=None``.
            window: True: reset after each flush (an accumulator); False: kept across flushes (a persistent
                reference: the first snapshot, a trail), still checkpointed.

        Raises:
            ValueError: a bad name, an unknown reduction, or a reduction the default cannot take.

        ``state_dict`` copies every state (tensors detached and cloned, dicts and lists copied deeply);
        ``load_state_dict`` puts saved tensors on the device of the value they replace.
        """
        who = self.name or type(self).__name__
        if not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"{who}: state name {name!r} must be a public identifier")
        if reduce not in REDUCTIONS:
            raise ValueError(f"{who}: state {name!r}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if reduce == "cat" and not isinstance(default, list):
            raise ValueError(f"{who}: state {name!r}: reduce='cat' needs a list default")
        if reduce is not None and (default is None or isinstance(default, np.ndarray)):
            raise ValueError(
                f"{who}: state {name!r}: a {type(default).__name__} default is not reduced over "
                "ranks; declare it with reduce=None"
            )
        specs = self.__dict__.setdefault("_states", {})
        specs[name] = State(name, default, reduce, window)
        setattr(self, name, _fresh(default))

    @property
    def states(self) -> dict[str, State]:
        """The declared states, in declaration order."""
        return self.__dict__.get("_states", {})

    def reset_window(self) -> None:
        """Reset every window state to its default (the session calls this after each flush)."""
        for spec in self.states.values():
            if spec.window:
                setattr(self, spec.name, _fresh(spec.default))

    def settle(self) -> None:
        """Bring the declared state up to date (fold caches into it); called before it is read, reduced or saved."""

    # -- sites ----------------------------------------------------------------------
    def wants(self, site: Site) -> bool:
        """Which sites the probe reads: a passive probe observes them, an active one finds them in
        ``batch.activations`` (default: passive, the ReLU-family sites; active, every activation site and the
        sites of its own ``needs.site_types``, not the extra sites that other probes asked for).

        Args:
            site: a site of the model.
        """
        if self.passive:
            return site.relu_family
        return not site.extra or isinstance(site.module, type(self).needs.site_types)

    # -- passive probes -------------------------------------------------------------
    def observe(self, site: Site, pre: torch.Tensor, post: torch.Tensor) -> None:
        """Hot path, every training forward: accumulate on the device, never sync.

        Args:
            site: where the activation was seen.
            pre: the activation's input.
            post: the activation's output (padded positions left out, see ``attach(mask=...)``).
        """

    def flush(self, step: int) -> Sequence[Record]:
        """Return the window's records (passive probes); the session then resets the window state.

        Args:
            step: the step the records are written at.

        Returns:
            The records (tags under the probe's name).
        """
        return []

    # -- active probes --------------------------------------------------------------
    def check(self, batch: ProbeBatch) -> None:
        """Check, once at attach, that this probe applies: raise when it cannot (also after the model changes).

        The session calls it on the at-attach probe batch (with the model's output), also when
        ``measure_at_attach=False``, so that labels of the wrong kind or range for the model's output width, or a
        model whose structure the probe cannot handle, make ``attach`` raise instead of switching the probe off at
        its first measurement. Passive probes, and active probes while no probe pass can run (no probe batch, lazy
        modules), get a batch whose ``x``, ``y`` are as given and whose ``output`` is None. What ``needs``
        declares (labels, the probe batch, one floating tensor) is checked by the engine before. Keep it cheap:
        checks, not the measurement. The default checks nothing.

        Args:
            batch: the at-attach probe batch; ``batch.output`` is the model's output on it (or None),
                ``batch.context.run`` runs more passes (a couple of samples are enough to see the call structure).

        Raises:
            Exception: any error, with a message naming the probe, the problem and the fix; ``attach`` raises it.
        """

    # -- the old contract (``probes.legacy`` calls these for a probe that defines them) ---
    def setup(self, context: Context) -> None:
        """The old contract's attach hook (``check`` replaces it); called only where a probe defines it.

        Args:
            context: the model, the probe batch as given and the session's settings.
        """

    def validate(self, batch: ProbeBatch) -> None:
        """The old contract's at-attach check (``check`` replaces it); called only where a probe defines it.

        Args:
            batch: the at-attach probe batch.
        """

    def wants_site(self, site: Site) -> bool:
        """The old contract's active-probe site filter (``wants`` replaces it).

        Args:
            site: a site of the model.
        """
        return self.wants(site)

    def measure(self, batch: ProbeBatch) -> Sequence[Record]:
        """Return records for one measurement on the probe batch (active probes).

        Args:
            batch: the probe batch, the shared pass's output and activations, and ``batch.context`` for more
                passes, sharded parameters, notices and the ranks.

        Returns:
            The records (tags under the probe's name).
        """
        return []

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every declared state, copied (``settle`` first): what a checkpoint holds of this probe.

        Returns:
            ``{state name: value}``; tensors detached and cloned, containers copied.
        """
        self.settle()
        return {name: _copy_state(getattr(self, name)) for name in self.states}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the declared states from ``state_dict()`` output (names it lacks keep their value).

        A saved tensor goes to the device of the value it replaces (a checkpoint written on another device); a
        tensor replacing a tensor of another shape is an error (a checkpoint of another configuration).

        Args:
            state: what ``state_dict()`` returned, possibly after ``torch.save`` / ``torch.load``.

        Raises:
            ValueError: a saved tensor's shape differs from the one this probe holds.
        """
        who = self.name or type(self).__name__
        for name in self.states:
            if name in state:
                setattr(self, name, _load_like(getattr(self, name, None), state[name], f"{who}: saved state {name!r}"))


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_state(v) for v in value)
    return value


def _load_like(current: Any, saved: Any, where: str) -> Any:
    """A copy of ``saved``, its tensors on the device of the tensors of ``current`` they replace."""
    if isinstance(saved, torch.Tensor):
        saved = saved.detach().clone()
        if isinstance(current, torch.Tensor):
            if current.shape != saved.shape:
                raise ValueError(
                    f"{where} has shape {tuple(saved.shape)}, but this probe holds "
                    f"{tuple(current.shape)}: the checkpoint comes from another configuration"
                )
            saved = saved.to(current.device)
        return saved
    if isinstance(saved, dict):
        inner = current if isinstance(current, dict) else {}
        return {k: _load_like(inner.get(k), v, f"{where}[{k!r}]") for k, v in saved.items()}
    return _copy_state(saved)
