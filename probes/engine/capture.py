"""Where activations come from: module hooks, functional calls, call sites.

A **site** is an activation module (``nn.ReLU``, ``nn.GELU``, ..., the activation classes of
Hugging Face transformers and timm recognised by class name, those that plugins declare through
``probes_add_activations``, or any module a probe of this session asks for) or a functional activation call
(``F.relu``, ``torch.relu``, ``Tensor.relu``, ...) made inside some module's ``forward``. A module
called k > 1 times per forward gives sites ``path#1`` ... ``path#k``; a functional call in the
forward of the module at ``path`` is the site ``path:relu`` (``forward:relu`` for the root module),
``#k`` again when there are several.

**Training forwards** (passive probes) are seen through hooks on the attached model's own modules only: the root
(where a forward begins and ends, and its attention mask) and the site modules; while functional calls are caught,
also a pre/post hook on every module that keeps the stack of running modules, so a functional call's module is the
top of that stack (no call frames are read). Models that are not attached pay nothing. Each hook is a small object
that pickles and deep-copies to a no-op and ignores any module but its own, so copies, pickles, EMA/SWA averages
and DataParallel replicas of an attached model carry nothing that observes them. Functional calls are caught by a
``TorchFunctionMode`` entered around the root's forward, only while someone needs them: torch is never patched.
Under ``torch.compile`` the hooks call opaque custom ops (``probes::begin``, ``probes::site``, ``probes::end``, and
``probes::site_input`` before an in-place site that a passive probe reads the input of), so
dynamo keeps one graph and the observations run on the compiled graph's tensors; functional calls inside a
compiled forward are not seen (said once).

**The model may change after attach.** A module added, replaced or removed is seen at the next training forward
(``torch.nn`` reports every registration of a submodule; a removal is found at the next flush or probe pass):
new sites are named by path and observed, removed ones stop, and ``changes()`` hands what changed to the session,
which says so once. A **probe pass** (``recording()``) indexes the model afresh and hooks every module for its
duration only.

A training forward is one of the model in train mode with gradients enabled that completes: forwards
under ``no_grad`` or ``inference_mode``, forwards that raise (KeyboardInterrupt included), forwards
recomputed by activation checkpointing (inside the backward pass) and forwards under ``torch.func``
transforms are not observed. Padded positions (mask 0) of site tensors shaped ``(batch, positions, ...)`` are left
out of what passive probes observe.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.overrides import TorchFunctionMode

from probes import _torch
from probes.probe import Activation, Call, Site

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
)

#: activation classes of other libraries, by class name (their packages are never imported):
#: Hugging Face ``transformers.activations`` and ``timm.layers.activations``
ACTIVATION_CLASS_NAMES = frozenset(
    {
        "NewGELUActivation",
        "GELUActivation",
        "FastGELUActivation",
        "QuickGELUActivation",
        "SiLUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "ClippedGELUActivation",
        "AccurateGELUActivation",
        "MishActivation",
        "LaplaceActivation",
        "ReLUSquaredActivation",
        "XIELUActivation",
        "Swish",
        "QuickGELU",
        "HardSwish",
        "HardSigmoid",
        "HardMish",
        "GELU",
        "Mish",
        "Sigmoid",
        "Tanh",
        "PReLU",
    }
)

#: functional activations caught inside ``forward``: function -> (kind, in place)
FUNCTIONAL_ACTIVATIONS: dict[Callable, tuple[str, bool]] = {
    F.relu: ("relu", False),
    torch.relu: ("relu", False),
    torch.Tensor.relu: ("relu", False),
    F.relu_: ("relu", True),
    torch.relu_: ("relu", True),
    torch.Tensor.relu_: ("relu", True),
    F.relu6: ("relu6", False),
    F.leaky_relu: ("leaky_relu", False),
    F.gelu: ("gelu", False),
    F.silu: ("silu", False),
    F.elu: ("elu", False),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif (original := _torch.compiled_original(model)) is not None:
            model = original
        else:
            return model


#: attribute names under which wrappers hold the user's module: legacy FSDP, activation checkpointing, torch.compile
WRAPPER_ATTRIBUTES = frozenset({"_fsdp_wrapped_module", "_fpw_module", "_checkpoint_wrapped_module", "_orig_mod"})


def site_path(path: str) -> str:
    """A module path without the wrappers' own components: ``layer1._fsdp_wrapped_module.act`` -> ``layer1.act``,
    so that a site keeps the name it has in the unwrapped model."""
    if "_" not in path:
        return path
    return ".".join(part for part in path.split(".") if part not in WRAPPER_ATTRIBUTES)


def kind_of(module: nn.Module) -> str:
    """Lower-case activation kind of a module: ``relu``, ``gelu``, ``newgelu`` (``NewGELUActivation``), ..."""
    name = type(module).__name__
    if name.endswith("Activation") and len(name) > len("Activation"):
        name = name[: -len("Activation")]
    return name.lower()


def site_name(path: str, call: int, multi: bool) -> str:
    return f"{path}#{call}" if multi else path


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def observable() -> bool:
    """False inside the backward pass (checkpoint recomputation) and under ``torch.func`` transforms (eager only: a
    compiled forward is traced once, and ``probes::begin`` is told what the trace saw)."""
    if _torch.in_backward():
        return False
    return not _torch.in_functorch_transform()


ALL_VALUES = frozenset({"pre", "post"})


def keep_everything(site: Site) -> frozenset[str]:
    return ALL_VALUES


def _kept_input(t: torch.Tensor | None, want: frozenset[str], inplace: bool) -> torch.Tensor | None:
    """What to keep of a site's input: a clone (values, safe from in-place ops), its gates, or nothing."""
    if t is None:
        return None
    if "pre" in want:
        return t.detach().clone() if inplace else t.detach()
    if "gate" in want:
        return t.detach() > 0
    return None


@dataclass
class Recording:
    """What one probe pass saw: ``activations`` (site name -> Activation) and ``calls`` (in order).

    ``keep(site)`` decides which sites' activations are kept (their inputs cloned before in-place
    activations overwrite them); the call trace is always complete.
    """

    keep: Callable[[Site], Iterable[str]] = keep_everything
    activations: dict[str, Activation] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _raw_calls: list[tuple[bool, str, str, nn.Module | None]] = field(default_factory=list, repr=False)
    _site_order: list[str] = field(default_factory=list, repr=False)

    def _resolve(self) -> None:
        calls: list[Call] = []
        names = iter(self._site_order)
        for is_site, path, kind, module in self._raw_calls:
            calls.append(Call(path, kind, module, next(names, None) if is_site else None))
        self.calls = calls


class _FunctionalMode(TorchFunctionMode):
    """Catches functional activation calls and reports them to the capture."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = FUNCTIONAL_ACTIVATIONS.get(func)
        if (
            entry is None
            or not args
            or not isinstance(args[0], torch.Tensor)
            or self.capture._mode is not self
            or not self.capture._active()
            or not observable()
        ):
            return func(*args, **kwargs)
        stack = self.capture._stack
        module = stack[-1] if stack else None
        if module in self.capture.site_modules:  # inside an activation module that is a site already
            return func(*args, **kwargs)
        path = self.capture.paths.get(module, "") if module is not None else ""
        kind, inplace = entry
        inplace = inplace or bool(kwargs.get("inplace", False))
        pre: torch.Tensor | None = args[0]
        rec = self.capture._recording
        if rec is not None:
            want = self.capture._wanted(path, kind, None, functional=True)
            pre = _kept_input(pre, want, inplace)
        else:  # a training forward: what passive probes read (an in-place op's input copied before it is overwritten)
            want = self.capture.passive_keep
            pre = (args[0].detach().clone() if inplace else args[0]) if "pre" in want else None
        out = func(*args, **kwargs)
        self.capture.record(
            path, kind, None, pre, out if "post" in want else None, functional=True, kept=rec is None or bool(want)
        )
        return out


# -- hooks on the model's own modules ------------------------------------------------------------------------------

#: live captures by id, for the custom ops of compiled forwards (which take plain ints, not objects)
_CAPTURES: weakref.WeakValueDictionary[int, Capture] = weakref.WeakValueDictionary()


class _NoopHook:
    """What a hook becomes in a pickle or a deep copy of the model: nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class _Hook:
    """A hook on one module of the attached model. It ignores other modules (a DataParallel replica shares its
    module's hook dicts) and becomes a no-op in copies and pickles of the model."""

    __slots__ = ("capture", "module", "index")

    def __init__(self, capture: Capture, module: nn.Module, index: int = -1) -> None:
        self.capture, self.module, self.index = capture, module, index

    def __reduce__(self) -> Any:
        return (_NoopHook, ())

    def __deepcopy__(self, memo: Any) -> Any:
        return _NoopHook()


class _RootBegin(_Hook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.module:
            self.capture._begin(args, kwargs)


class _RootEnd(_Hook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        if module is self.module:
            self.capture._end()


class _SiteOutput(_Hook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module is not self.module:
            return
        cap = self.capture
        if torch.compiler.is_compiling():
            if cap._compiled_observing() and isinstance(output, torch.Tensor):
                pre = _first_tensor(args) if "pre" in cap.passive_keep else None
                torch.ops.probes.site(
                    cap._token, cap._id, self.index, pre, output if "post" in cap.passive_keep else None
                )
            return
        if cap._training_forward or (cap._depth == 0 and cap._recording is None and cap._observable_alone()):
            cap._site_call(self.index, args, output)


class _SiteInput(_Hook):
    """Before an in-place site module (``nn.ReLU(inplace=True)``) overwrites its input: a copy of the input, for
    passive probes that read ``pre`` (registered only on in-place site modules, and only when a probe reads it)."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module is not self.module:
            return
        cap = self.capture
        t = _first_tensor(args)
        if t is None:
            return
        if torch.compiler.is_compiling():  # the opaque op copies it when the graph runs, before the activation
            if cap._compiled_observing():
                torch.ops.probes.site_input(cap._token, cap._id, self.index, t)
            return
        if cap._training_forward or (cap._depth == 0 and cap._recording is None and cap._observable_alone()):
            cap._inplace_inputs[self.index] = t.detach().clone()


class _InPlaceSiteOutput(_SiteOutput):
    """``_SiteOutput`` of an in-place site module: hands on the input as ``_SiteInput`` copied it (in a compiled
    graph, ``probes::site`` takes the copy that ``probes::site_input`` made)."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module is self.module and not torch.compiler.is_compiling():
            saved = self.capture._inplace_inputs.pop(self.index, None)
            if saved is not None:
                args = (saved,)
        super().__call__(module, args, output)


class _StackPush(_Hook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module is self.module and not torch.compiler.is_compiling():
            self.capture._stack.append(module)


class _StackPop(_Hook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        if module is self.module and not torch.compiler.is_compiling():
            stack = self.capture._stack
            if stack and stack[-1] is module:
                stack.pop()


# -- the custom ops of compiled forwards ---------------------------------------------------------------------------


@torch.library.custom_op("probes::begin", mutates_args=("token",))
def _op_begin(token: torch.Tensor, capture: int, training: bool, mask: torch.Tensor | None) -> None:
    cap = _CAPTURES.get(capture)
    if cap is not None:
        cap._begin_compiled(training, mask)


@torch.library.custom_op("probes::site", mutates_args=("token",))
def _op_site(
    token: torch.Tensor, capture: int, index: int, pre: torch.Tensor | None, post: torch.Tensor | None
) -> None:
    cap = _CAPTURES.get(capture)
    if cap is not None and cap._training_forward:
        saved = cap._inplace_inputs.pop(index, None)  # an in-place site's input, copied by probes::site_input
        cap._site_values(index, saved if saved is not None else pre, post)


@torch.library.custom_op("probes::site_input", mutates_args=("token",))
def _op_site_input(token: torch.Tensor, capture: int, index: int, pre: torch.Tensor) -> None:
    cap = _CAPTURES.get(capture)
    if cap is not None and cap._training_forward:
        cap._inplace_inputs[index] = pre.detach().clone()


@torch.library.custom_op("probes::end", mutates_args=("token",))
def _op_end(token: torch.Tensor, capture: int) -> None:
    cap = _CAPTURES.get(capture)
    if cap is not None:
        cap._end(compiled=True)


@_op_begin.register_fake
def _(token: torch.Tensor, capture: int, training: bool, mask: torch.Tensor | None) -> None:
    return None


@_op_site.register_fake
def _(token: torch.Tensor, capture: int, index: int, pre: torch.Tensor | None, post: torch.Tensor | None) -> None:
    return None


@_op_site_input.register_fake
def _(token: torch.Tensor, capture: int, index: int, pre: torch.Tensor) -> None:
    return None


@_op_end.register_fake
def _(token: torch.Tensor, capture: int) -> None:
    return None


def dynamo_sees_hooks() -> bool:
    """Once dynamo is in use in this process, make it guard on module hooks, and drop the graphs it compiled without
    that guard (``torch._dynamo.reset()``): by default it skips those guards, so a compiled forward traced before
    the probes' hooks existed (or traced for another model of the same class) would skip the hooks silently.
    Returns whether it reset (said once by the session); a no-op while ``torch._dynamo`` was never imported."""
    dynamo = _torch.dynamo_module()
    if dynamo is None or not getattr(dynamo.config, "skip_nnmodule_hook_guards", False):
        return False
    dynamo.config.skip_nnmodule_hook_guards = False
    compiled = _torch.dynamo_frames_compiled()  # imported is not compiled
    if compiled:
        dynamo.reset()
    return compiled


class Capture:
    """Hooks on one model that turn forwards into site observations.

    Two consumers: ``on_observe(site, pre, post)`` for passive probes during training forwards
    (installed with ``install_passive``; ``passive_keep`` says which of the two they read, the other is None),
    and ``recording()`` for one probe pass that collects ``Activation`` captures and the ``Call`` trace. Site names
    stay stable across forwards: once a module is seen called more than once in a forward, its sites are
    ``path#k``.

    Args:
        model: the model (wrappers are unwrapped).
        extra_sites: module types that this session's probes ask to see as sites (``Probe.site_types``): sites
            marked ``Site.extra``.
        functional: catch functional activation calls (None: until a forward shows there are none).
        extra_names: more activation class names (plugins).
        mask_key: the forward's keyword argument (or dict entry) holding the attention mask.
        activation_types: more activation module types (plugins); their sites are activations, not extra.
    """

    def __init__(
        self,
        model: nn.Module,
        extra_sites: tuple[type[nn.Module], ...] = (),
        functional: bool | None = None,
        extra_names: frozenset[str] = frozenset(),
        mask_key: str | None = None,
        activation_types: tuple[type[nn.Module], ...] = (),
    ) -> None:
        self.model = unwrap(model)
        self.mask_key = mask_key
        self._mask: torch.Tensor | None = None  # (batch, positions) of the running training forward
        self._mask_rows: torch.Tensor | None = None
        self.activation_types = ACTIVATION_MODULES + tuple(activation_types)
        self.extra_types = tuple(t for t in extra_sites if t not in self.activation_types)
        self.site_types = self.activation_types + self.extra_types
        self.activation_names = ACTIVATION_CLASS_NAMES | extra_names
        self.paths: dict[nn.Module, str] = {}
        self.site_modules: dict[nn.Module, str] = {}
        self.leaves: set[nn.Module] = set()
        #: the module of each site hook's id (ids are never reused: a compiled graph keeps the ids it was traced with)
        self._site_by_id: dict[int, nn.Module] = {}
        self._early: dict[nn.Module, tuple[str, str]] = {}  # sites registered since the last index: (path, kind)
        self._index()
        self.functional = functional  # None: auto (on until a forward shows there are no functional sites)
        self.multi: set[str] = set()
        self._sites: dict[tuple[str, int, bool, str], Site] = {}
        self._counts: dict[tuple[str, bool], int] = {}
        self._buffer: list[tuple] = []
        self._pre_stack: list[tuple[torch.Tensor | None, frozenset[str]]] = []
        self._stack: list[nn.Module] = []  # the modules whose forward is running (innermost last)
        self._depth = 0
        self._training_forward = False
        self._error_at_entry: BaseException | None = None
        self._mode: _FunctionalMode | None = None
        self._handles: list[Any] = []  # process-wide hooks: during a recording only
        self._passive_handles: list[Any] = []  # the root's and the site modules' hooks
        self._stack_handles: list[Any] = []  # every module's push/pop hooks, while functional calls are caught
        self._registration: Any = None
        self._dirty = False  # a submodule was registered somewhere in the model since the last index
        self._changes: list[tuple[list[str], list[str], list[str]]] = []
        self._compiled_said = False
        self._token = torch.zeros(())  # the custom ops "mutate" it: they stay in the graph, in order
        self._id = id(self)
        self.on_observe: Callable[[Site, torch.Tensor | None, torch.Tensor | None], None] | None = None
        #: after each observed training forward, with ``() -> its sites`` (made only when asked for)
        self.on_forward: Callable[[Callable[[], list[Site]]], None] | None = None
        self.on_notice: Callable[[str, str], None] | None = None  # (key, message): said once by the session
        self.observing = False
        self.passive_keep: frozenset[str] = ALL_VALUES
        self._inplace_inputs: dict[int, torch.Tensor] = {}  # site index -> its input, copied before an in-place op
        self.keep_pre = False
        self._recording: Recording | None = None

    # -- the model's structure ----------------------------------------------------------
    def _index(self) -> None:
        """Paths, site modules and leaves as the model is now."""
        self.paths = {}
        for path, module in self.model.named_modules():
            self.paths.setdefault(module, site_path(path))
        self.site_modules = {m: p for m, p in self.paths.items() if self._is_site(m)}
        self.leaves = {m for m in self.paths if m not in self.site_modules and not any(True for _ in m.children())}
        self._kinds = {m: kind_of(m) for m in self.site_modules}
        self._extra = {m for m in self.site_modules if self._is_extra(m)}

    def _is_site(self, module: nn.Module) -> bool:
        return isinstance(module, self.site_types) or type(module).__name__ in self.activation_names

    def _is_extra(self, module: nn.Module) -> bool:
        return (
            isinstance(module, self.extra_types)
            and not isinstance(module, self.activation_types)
            and type(module).__name__ not in self.activation_names
        )

    def _registered(self, parent: nn.Module, name: str, child: Any) -> None:
        """torch registers ``child`` under ``parent`` (before it is set): the model is indexed again at the next
        training forward, and while observing, the child's site modules are hooked now, so that a compiled model
        traces their hooks in its next forward too."""
        if parent not in self.paths:
            return
        self._dirty = True
        if not self._passive_handles or not isinstance(child, nn.Module) or self._depth > 0:
            return
        base = ".".join(p for p in (self.paths[parent], name) if p)
        for sub_path, sub in child.named_modules():
            if sub in self.site_modules or sub in self._early:
                continue
            if self._is_site(sub):
                self._early[sub] = (site_path(".".join(p for p in (base, sub_path) if p)), kind_of(sub))
                if self._is_extra(sub):
                    self._extra.add(sub)
                self._hook_site(sub)

    def check_structure(self) -> None:
        """Index the model again when its modules are not those indexed (a removal is found only so); outside a
        forward."""
        if self._depth > 0:
            return
        if self._dirty or self.paths.keys() != set(self.model.modules()):
            self._reindex()

    def _reindex(self) -> None:
        old = {p: m for m, p in self.site_modules.items()}
        self._dirty = False
        self._index()
        new = {p: m for m, p in self.site_modules.items()}
        self._sites.clear()
        if self._passive_handles:
            self._hook_sites()
        if self._stack_handles:
            self._hook_stack()
        added = sorted(p for p in new if p not in old)
        removed = sorted(p for p in old if p not in new)
        replaced = sorted(p for p in new if p in old and new[p] is not old[p])
        if added or removed or replaced:
            self._changes.append((added, removed, replaced))

    def changes(self) -> list[tuple[list[str], list[str], list[str]]]:
        """What changed since the last call: ``(added, removed, replaced)`` site paths per change found."""
        found, self._changes = self._changes, []
        return found

    # -- naming ---------------------------------------------------------------------
    def site(self, path: str, call: int, functional: bool, kind: str, module: nn.Module | None) -> Site:
        key = (path, call, functional, kind)
        site = self._sites.get(key)
        if site is None:  # the cache is cleared whenever a module turns out to be called several times
            base = f"{path or 'forward'}:{kind}" if functional else path
            name = site_name(base, call, base in self.multi)
            site = Site(
                name=name,
                path=path,
                kind=kind,
                call=call,
                functional=functional,
                module=module,
                extra=module is not None and module in self._extra,
            )
            self._sites[key] = site
        return site

    def seen_sites(self) -> list[Site]:
        """Every site met so far, functional ones included (after a forward or a probe pass)."""
        return list(self._sites.values())

    def module_sites(self) -> list[Site]:
        """The sites of activation modules (functional sites are known only after a forward)."""
        return [self.site(p, 1, False, kind_of(m), m) for m, p in self.site_modules.items()]

    # -- training forwards (hooks on the model's modules) -------------------------------
    def _observable_alone(self) -> bool:
        """A site module called outside the root's forward: observed under the conditions of a training forward."""
        return self.observing and self.model.training and torch.is_grad_enabled() and observable()

    def _compiled_observing(self) -> bool:
        return self.observing and self._recording is None and self.model.training and torch.is_grad_enabled()

    def _begin(self, args: tuple, kwargs: dict) -> None:
        if self._recording is not None:
            return
        if torch.compiler.is_compiling():
            if self.observing:
                mask = self._find_mask(args, kwargs)
                torch.ops.probes.begin(self._token, self._id, self._compiled_observing(), mask)
            return
        if self._depth > 0:
            self._forget()  # an interrupt (KeyboardInterrupt) left the last forward unfinished
        if self._dirty:
            self._reindex()  # a module was added or replaced: new sites are observed from this forward on
        self._start(self.observing and self.model.training and torch.is_grad_enabled() and observable())
        self._error_at_entry = sys.exc_info()[1]
        if self._training_forward:
            self._set_mask(self._find_mask(args, kwargs))
            if self.functional is not False:
                self._stack = [self.model]
                self._mode = _FunctionalMode(self)
                self._mode.__enter__()

    def _begin_compiled(self, training: bool, mask: torch.Tensor | None) -> None:
        if self._depth > 0:
            self._forget()
        if self._dirty:
            self._reindex()  # the hooks of new sites are traced when dynamo recompiles
        self._start(training)
        self._error_at_entry = None
        if training:
            self._set_mask(mask)
            if self.functional is not False and not self._compiled_said and self.on_notice is not None:
                self._compiled_said = True
                self.on_notice(
                    "compiled-functional",
                    "the model runs compiled (torch.compile): passive probes "
                    "observe its activation modules, but not functional activation calls (F.relu in "
                    "forward) inside the compiled graph",
                )

    def _start(self, training: bool) -> None:
        self._depth = 1
        self._counts.clear()
        self._buffer.clear()
        self._mask = self._mask_rows = None
        self._training_forward = training

    def _find_mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if self.mask_key is None:
            return None
        mask = kwargs.get(self.mask_key)
        if mask is None and args and isinstance(args[0], Mapping):
            mask = args[0].get(self.mask_key)
        return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = mask.detach() != 0 if mask is not None else None

    def _site_call(self, index: int, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            keep = self.passive_keep
            self._site_values(index, _first_tensor(args) if "pre" in keep else None, output if "post" in keep else None)

    def _site_values(self, index: int, pre: torch.Tensor | None, post: torch.Tensor | None) -> None:
        module = self._site_by_id.get(index)
        if module is None:
            return
        path = self.site_modules.get(module)
        if path is not None:
            self.record(path, self._kinds[module], module, pre, post)
        elif module in self._early:  # registered since the last index
            path, kind = self._early[module]
            self.record(path, kind, module, pre, post)

    def _end(self, compiled: bool = False) -> None:
        if torch.compiler.is_compiling():
            if self.observing and self._recording is None:
                torch.ops.probes.end(self._token, self._id)
            return
        if self._recording is not None or self._depth == 0:
            return
        self._depth = 0
        error = None if compiled else sys.exc_info()[1]
        if error is not None and error is not self._error_at_entry:  # the forward raised: nothing of it counts
            self._forget()
            return
        self._finish()
        self._stack = []

    def _finish(self) -> None:
        """The outermost forward completed: settle the names, dispatch what it saw."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            if self.functional is None and not any(k[1] for k in self._counts):
                self.functional = False  # auto: this model makes no functional activation calls
                self._unhook_stack()
        for (base, _), n in self._counts.items():
            if n > 1 and base not in self.multi:
                self.multi.add(base)
                self._sites.clear()
        entries, self._buffer = self._buffer, []
        self._counts = {}
        self._dispatch(entries)
        self._mask = self._mask_rows = None
        if self._training_forward and self.on_forward is not None:
            self._training_forward = False
            self.on_forward(lambda: [self.site(*e[:5]) for e in entries])
        self._training_forward = False

    # -- shared by both paths ------------------------------------------------------------
    def _active(self) -> bool:
        if self._recording is not None:
            return True
        if self._depth > 0:
            return self._training_forward
        return self._observable_alone()

    def record(
        self,
        path: str,
        kind: str,
        module: nn.Module | None,
        pre: torch.Tensor | None,
        post: torch.Tensor | None,
        functional: bool = False,
        kept: bool = True,
    ) -> None:
        key = (path if not functional else f"{path or 'forward'}:{kind}", functional)
        call = self._counts.get(key, 0) + 1
        self._counts[key] = call
        entry = (path, call, functional, kind, module, pre, post, kept)
        if self._depth > 0:
            self._buffer.append(entry)
        else:  # a submodule called outside the root forward
            self._dispatch([entry])
            self._counts.clear()
        if self._recording is not None:
            self._recording._raw_calls.append((True, path, kind, module))

    def _dispatch(self, entries) -> None:
        rec = self._recording
        if rec is None:  # a training forward: straight to the passive probes
            observe = self.on_observe if self.observing else None
            if observe is None:
                return
            sites, masked = self._sites, self._mask is not None
            for path, call, functional, kind, module, pre, post, _ in entries:
                site = sites.get((path, call, functional, kind)) or self.site(path, call, functional, kind, module)
                if masked:
                    pre, post = self._masked(pre), self._masked(post)
                observe(site, pre, post)
            return
        for path, call, functional, kind, module, pre, post, kept in entries:
            site = self.site(path, call, functional, kind, module)
            rec._site_order.append(site.name)
            if kept:
                rec.activations[site.name] = Activation(site, pre, post)

    def _masked(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` with the padded positions left out, as one sequence of the real ones, ``(1, kept, ...)``, when its
        first two axes are those of the forward's attention mask (``(batch, positions)``); ``t`` otherwise."""
        mask = self._mask
        if mask is None or t is None or t.ndim < 2 or t.shape[:2] != mask.shape:
            return t
        if self._mask_rows is None:  # one index per forward, shared by every site
            self._mask_rows = mask.reshape(-1).nonzero().squeeze(1)
        return t.reshape(-1, *t.shape[2:]).index_select(0, self._mask_rows).unsqueeze(0)

    def _wanted(self, path: str, kind: str, module: nn.Module | None, functional: bool = False) -> frozenset[str]:
        """During a recording: what to keep of this call's site, asked by the name it has once the pass ends.

        A module first seen called twice in this pass is named ``path#k`` only when the pass ends; its k-th call
        (k > 1) is asked as ``path#k`` already, and a first call not yet known to repeat is kept for either name.
        """
        if self._recording is None:  # only asked during a recording; outside one every value counts
            return ALL_VALUES
        base = f"{path or 'forward'}:{kind}" if functional else path
        call = self._counts.get((base, functional), 0) + 1
        site = self.site(path, call, functional, kind, module)
        keep = self._recording.keep
        if base in self.multi:
            return frozenset(keep(site))
        if call > 1:
            return frozenset(keep(replace(site, name=site_name(base, call, True))))
        return frozenset(keep(site)) | frozenset(keep(replace(site, name=site_name(base, 1, True))))

    # -- probe passes (process-wide hooks for the recording's duration) -------------------
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if module not in self.paths:
            return
        if module is self.model:
            self._root_pre_hook(module, args)
        self._stack.append(module)
        if module in self.site_modules and self._recording is not None and self.keep_pre:
            want = self._wanted(self.site_modules[module], kind_of(module), module)
            self._pre_stack.append((_kept_input(_first_tensor(args), want, inplace=True), want))

    def _post_hook(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        if module not in self.paths:
            return
        output = rest[-1]
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        if module in self.site_modules:
            self._recorded_site(module, args, output)
        elif self._recording is not None and module in self.leaves:
            self._recording._raw_calls.append((False, self.paths[module], kind_of(module), module))
        if module is self.model:
            self._root_hook()

    def _recorded_site(self, module: nn.Module, args: tuple, output: Any) -> None:
        pre, want = self._pre_stack.pop() if self.keep_pre and self._pre_stack else (None, ALL_VALUES)
        if not isinstance(output, torch.Tensor) or not observable():
            return
        self.record(
            self.site_modules[module], kind_of(module), module, pre, output if "post" in want else None, kept=bool(want)
        )

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth == 1:
            self._counts.clear()
            self._buffer.clear()
            self._stack = []
            if self.functional is not False and observable():
                self._mode = _FunctionalMode(self)
                self._mode.__enter__()

    def _root_hook(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._finish()

    def recover(self, force: bool = False) -> None:
        """Forget a forward that an exception outside ``Exception`` (KeyboardInterrupt, SystemExit) left unfinished:
        torch runs ``always_call`` hooks for ``Exception`` only. Nothing of it is counted; the next forward counts
        normally. Called between forwards (by the session's methods); ``force`` is kept for callers of old."""
        if self._depth > 0 and self._recording is None:
            self._forget()

    def _forget(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            stack = _torch.function_modes()
            if stack and stack[-1] is mode:
                mode.__exit__(None, None, None)
        self._depth, self._training_forward = 0, False
        self._mask = self._mask_rows = None
        self._buffer, self._counts, self._pre_stack, self._stack = [], {}, [], []

    # -- installing and removing hooks ---------------------------------------------------
    def _install(self) -> None:
        if not self._handles:
            self._handles = [
                _module_hooks.register_module_forward_pre_hook(self._pre_hook),
                # no with_kwargs: torch leaves its id in _global_forward_hooks_with_kwargs after removal, and
                # torch.compile then warns of global hooks for the rest of the process
                _module_hooks.register_module_forward_hook(self._post_hook, always_call=True),
            ]

    def _hook_sites(self) -> None:
        """The root's begin and end hooks (kept) and an output hook on every site module (made anew)."""
        self.follow_dynamo()
        if not self._passive_handles:
            root = self.model
            self._passive_handles = [
                root.register_forward_pre_hook(_RootBegin(self, root), with_kwargs=True, prepend=True),
                root.register_forward_hook(_RootEnd(self, root), always_call=True),
            ]
        for h in self._passive_handles[2:]:
            h.remove()
        del self._passive_handles[2:]
        self._early = {}
        for module in self.site_modules:
            self._hook_site(module)

    def _hook_site(self, module: nn.Module) -> None:
        index = len(self._site_by_id)
        self._site_by_id[index] = module
        if getattr(module, "inplace", False) is True and "pre" in self.passive_keep:  # its input is overwritten
            self._passive_handles.append(module.register_forward_pre_hook(_SiteInput(self, module, index)))
            self._passive_handles.append(module.register_forward_hook(_InPlaceSiteOutput(self, module, index)))
            return
        self._passive_handles.append(module.register_forward_hook(_SiteOutput(self, module, index)))

    def follow_dynamo(self) -> None:
        """While observing: compiled forwards call the hooks (``dynamo_sees_hooks``), said once when it reset."""
        if dynamo_sees_hooks() and self.on_notice is not None:
            self.on_notice(
                "dynamo-reset",
                "torch.compile has compiled graphs in this process: dynamo now guards on "
                "module hooks (torch._dynamo.config.skip_nnmodule_hook_guards = False) and its graphs were "
                "dropped once (torch._dynamo.reset()), so that compiled forwards call the probes' hooks; "
                "compiled models recompile on their next call",
            )

    def _hook_stack(self) -> None:
        self._unhook_stack()
        for module in self.paths:
            if module is not self.model:
                self._stack_handles.append(module.register_forward_pre_hook(_StackPush(self, module)))
                self._stack_handles.append(module.register_forward_hook(_StackPop(self, module), always_call=True))

    def _unhook_stack(self) -> None:
        for h in self._stack_handles:
            h.remove()
        self._stack_handles = []

    def install_passive(
        self,
        on_observe: Callable[[Site, torch.Tensor | None, torch.Tensor | None], None],
        keep: frozenset[str] = ALL_VALUES,
    ) -> None:
        """Observe every training forward from now on, handing ``on_observe`` what ``keep`` says of each site
        (``"pre"``, ``"post"``; the other is None; ``"gate"`` hands on ``pre``, whose ``pre > 0`` are the gates)."""
        self.on_observe = on_observe
        keep = frozenset(keep)
        self.passive_keep = (keep | {"pre"} if "gate" in keep else keep) & ALL_VALUES
        _CAPTURES[self._id] = self
        self._hook_sites()
        if self.functional is not False:
            self._hook_stack()
        if self._registration is None:
            self._registration = _module_hooks.register_module_module_registration_hook(self._registered)
        self.observing = True

    def remove(self) -> None:
        for h in self._handles + self._passive_handles + self._stack_handles:
            h.remove()
        self._handles, self._passive_handles, self._stack_handles = [], [], []
        if self._registration is not None:
            self._registration.remove()
            self._registration = None
        _CAPTURES.pop(self._id, None)
        self._inplace_inputs.clear()
        self.observing = False
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    @contextmanager
    def recording(self, keep: Callable[[Site], frozenset[str]] | None = None) -> Iterator[Recording]:
        """One probe pass: collects what ``keep(site)`` asks of each site (default pre and post) and the calls."""
        self.check_structure()
        was_observing, had_hooks = self.observing, bool(self._handles)
        self.observing = False
        self.keep_pre = True
        self._pre_stack, self._stack = [], []
        rec = Recording(keep if keep is not None else keep_everything)
        self._recording = rec
        self._install()
        try:
            yield rec
        finally:
            if not had_hooks:
                for h in self._handles:
                    h.remove()
                self._handles = []
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None
            self._recording = None
            self.keep_pre = False
            self.observing = was_observing
            self._depth = 0
            self._stack = []
            rec._resolve()  # the site names are final now
