"""Where activations come from: module hooks, functional calls, call sites.

A **site** is an activation module (``nn.ReLU``, ``nn.GELU``, ..., the activation classes of
Hugging Face transformers and timm recognised by class name, those that plugins declare through
``probes_add_activations``, or any module a probe asks for) or a functional activation call
(``F.relu``, ``torch.relu``, ``Tensor.relu``, ...) made inside some module's ``forward``. A module
called k > 1 times per forward gives sites ``path#1`` ... ``path#k``; a functional call in the
forward of the module at ``path`` is the site ``path:relu`` (``forward:relu`` for the root module),
``#k`` again when there are several.

Hooks are process-wide module hooks (``register_module_forward_hook``) that react only to this
model's modules, so the model itself carries no hook: it can be copied, pickled and averaged
(SWA / EMA) while attached, and copies are not observed. The forward hook also receives the keyword
arguments, where the attention mask of a training forward is found: padded positions (mask 0) of
site tensors shaped ``(batch, positions, ...)`` are left out of what passive probes observe.
Functional calls are caught by a ``TorchFunctionMode`` entered around the root module's forward,
only while someone needs them: torch is never patched.

A training forward is one of the model in train mode with gradients enabled that completes: forwards
under ``no_grad`` or ``inference_mode``, forwards that raise (KeyboardInterrupt included), forwards
recomputed by activation checkpointing (inside the backward pass) and forwards under ``torch.func``
transforms are not observed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from probes.functional._frames import calling_module
from probes.probe import Activation, Call, Site

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
)

#: activation classes of other libraries, by class name (their packages are never imported):
#: Hugging Face ``transformers.activations`` and ``timm.layers.activations``
ACTIVATION_CLASS_NAMES = frozenset({
    "NewGELUActivation", "GELUActivation", "FastGELUActivation", "QuickGELUActivation", "SiLUActivation",
    "GELUTanh", "PytorchGELUTanh", "ClippedGELUActivation", "AccurateGELUActivation", "MishActivation",
    "LaplaceActivation", "ReLUSquaredActivation", "XIELUActivation",
    "Swish", "QuickGELU", "HardSwish", "HardSigmoid", "HardMish", "GELU", "Mish", "Sigmoid", "Tanh", "PReLU",
})

#: functional activations caught inside ``forward``: function -> (kind, in place)
FUNCTIONAL_ACTIVATIONS: dict[Callable, tuple[str, bool]] = {
    F.relu: ("relu", False), torch.relu: ("relu", False), torch.Tensor.relu: ("relu", False),
    F.relu_: ("relu", True), torch.relu_: ("relu", True), torch.Tensor.relu_: ("relu", True),
    F.relu6: ("relu6", False), F.leaky_relu: ("leaky_relu", False), F.gelu: ("gelu", False),
    F.silu: ("silu", False), F.elu: ("elu", False),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
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
    """False inside the backward pass (checkpoint recomputation) and under ``torch.func`` transforms."""
    if torch._C._current_graph_task_id() != -1:
        return False
    return torch._C._functorch.peek_interpreter_stack() is None


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

    keep: Callable[[Site], bool] = lambda site: True
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
        if entry is None or not args or not isinstance(args[0], torch.Tensor) or self.capture._mode is not self \
                or not self.capture._active() or not observable():
            return func(*args, **kwargs)
        module = calling_module(self.capture.paths)
        if module in self.capture.site_modules:  # inside an activation module that is a site already
            return func(*args, **kwargs)
        path = self.capture.paths.get(module, "")
        kind, inplace = entry
        inplace = inplace or bool(kwargs.get("inplace", False))
        pre = args[0]
        rec = self.capture._recording
        want = ALL_VALUES
        if rec is not None:
            want = self.capture._wanted(path, kind, None, functional=True)
            pre = _kept_input(pre, want, inplace)
        out = func(*args, **kwargs)
        self.capture.record(path, kind, None, pre, out if "post" in want else None, functional=True,
                            kept=rec is None or bool(want))
        return out


class Capture:
    """Hooks on one model that turn forwards into site observations.

    Two consumers: ``on_observe(site, pre, post)`` for passive probes during training forwards
    (installed with ``install_passive``), and ``recording()`` for one probe pass that collects
    ``Activation`` captures and the ``Call`` trace. Site names stay stable across forwards:
    once a module is seen called more than once in a forward, its sites are ``path#k``.
    """

    def __init__(self, model: nn.Module, extra_sites: tuple[type[nn.Module], ...] = (),
                 functional: bool | None = None, extra_names: frozenset[str] = frozenset(),
                 mask_key: str | None = None) -> None:
        self.model = unwrap(model)
        self.mask_key = mask_key  # the forward's keyword argument (or dict entry) holding the attention mask
        self._mask: torch.Tensor | None = None  # (batch, positions) of the running training forward
        self._mask_rows: torch.Tensor | None = None
        self.paths: dict[nn.Module, str] = {}
        for path, module in self.model.named_modules():
            self.paths.setdefault(module, site_path(path))
        self.site_types = ACTIVATION_MODULES + tuple(extra_sites)
        names = ACTIVATION_CLASS_NAMES | extra_names
        self.site_modules = {m: p for m, p in self.paths.items()
                             if isinstance(m, self.site_types) or type(m).__name__ in names}
        self.leaves = {m for m in self.paths if m not in self.site_modules and not any(True for _ in m.children())}
        self.functional = functional  # None: auto (on until a forward shows there are no functional sites)
        self.multi: set[str] = set()
        self._sites: dict[tuple[str, int, bool, str], Site] = {}
        self._counts: dict[tuple[str, bool], int] = {}
        self._buffer: list[tuple[str, int, bool, str, nn.Module | None, torch.Tensor, torch.Tensor]] = []
        self._pre_stack: list[tuple[torch.Tensor | None, frozenset[str]]] = []
        self._depth = 0
        self._training_forward = False
        self._root_frame: Any = None  # the frame running the outermost forward of the model (while it runs)
        self._error_at_entry: BaseException | None = None
        self._mode: _FunctionalMode | None = None
        self._handles: list[Any] = []
        self.on_observe: Callable[[Site, torch.Tensor, torch.Tensor], None] | None = None
        self.on_forward: Callable[[list[Site]], None] | None = None  # after each observed training forward
        self.observing = False
        self.keep_pre = False
        self._recording: Recording | None = None

    # -- naming ---------------------------------------------------------------------
    def site(self, path: str, call: int, functional: bool, kind: str, module: nn.Module | None) -> Site:
        key = (path, call, functional, kind)
        site = self._sites.get(key)
        if site is None:  # the cache is cleared whenever a module turns out to be called several times
            base = f"{path or 'forward'}:{kind}" if functional else path
            name = site_name(base, call, base in self.multi)
            site = Site(name=name, path=path, kind=kind, call=call, functional=functional, module=module)
            self._sites[key] = site
        return site

    def seen_sites(self) -> list[Site]:
        """Every site met so far, functional ones included (after a forward or a probe pass)."""
        return list(self._sites.values())

    def module_sites(self) -> list[Site]:
        """The sites of activation modules (functional sites are known only after a forward)."""
        return [self.site(p, 1, False, kind_of(m), m) for m, p in self.site_modules.items()]

    # -- hooks ----------------------------------------------------------------------
    def _active(self) -> bool:
        if self._recording is not None:
            return True
        if self._depth > 0:
            return self._training_forward
        return self.observing and self.model.training and torch.is_grad_enabled() and observable()

    def record(self, path: str, kind: str, module: nn.Module | None, pre: torch.Tensor | None,
               post: torch.Tensor | None, functional: bool = False, kept: bool = True) -> None:
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
        for path, call, functional, kind, module, pre, post, kept in entries:
            site = self.site(path, call, functional, kind, module)
            if rec is not None:
                rec._site_order.append(site.name)
                if kept:
                    rec.activations[site.name] = Activation(site, pre, post)
            elif self.observing and self.on_observe is not None:
                self.on_observe(site, self._masked(pre), self._masked(post))

    def _read_mask(self, args: tuple, kwargs: dict) -> None:
        """At the end of the outermost forward, before its observations are dispatched: the attention mask among its
        keyword arguments (or in a dict argument)."""
        if self.mask_key is None or self._depth != 1 or not self._training_forward:
            return
        mask = kwargs.get(self.mask_key)
        if mask is None and args and isinstance(args[0], Mapping):
            mask = args[0].get(self.mask_key)
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self._mask = mask.detach() != 0

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
        """During a recording: what to keep of this call's site (decided on the site as currently named)."""
        key = (f"{path or 'forward'}:{kind}" if functional else path, functional)
        call = self._counts.get(key, 0) + 1
        return frozenset(self._recording.keep(self.site(path, call, functional, kind, module)))

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if module is self.model:
            self._root_pre_hook(module, args)
        if module in self.site_modules and self._recording is not None and self.keep_pre:
            want = self._wanted(self.site_modules[module], kind_of(module), module)
            self._pre_stack.append((_kept_input(_first_tensor(args), want, inplace=True), want))

    def _post_hook(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        # (kwargs, output); torch passes (output) alone to always-called hooks of a forward that raised
        kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
        if module is self.model:
            self._read_mask(args, kwargs)
        if module in self.site_modules:
            self._site_hook(module, args, output)
        elif self._recording is not None and module in self.leaves:
            self._recording._raw_calls.append((False, self.paths[module], kind_of(module), module))
        if module is self.model:
            self._root_hook(module, args, output)

    def _site_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        recording = self._recording is not None
        pre, want = self._pre_stack.pop() if recording and self.keep_pre and self._pre_stack else (None, ALL_VALUES)
        if not isinstance(output, torch.Tensor) or not self._active() or not observable():
            return
        if not recording:
            self.record(self.site_modules[module], kind_of(module), module, _first_tensor(args), output)
        else:
            self.record(self.site_modules[module], kind_of(module), module, pre, output if "post" in want else None,
                        kept=bool(want))

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._depth > 0 and not self._in_flight():
            self.recover(force=True)  # an interrupt (KeyboardInterrupt) left the last forward unfinished
        self._depth += 1
        if self._depth == 1:
            self._root_frame = sys._getframe(1)
            self._error_at_entry = sys.exc_info()[1]
            self._counts.clear()
            self._buffer.clear()
            self._mask = self._mask_rows = None
            # a training forward: train mode with gradients enabled (not no_grad / inference_mode), outside the
            # backward pass (checkpoint recomputation) and torch.func transforms
            self._training_forward = self._recording is None and self.observing and self.model.training \
                and torch.is_grad_enabled() and observable()
            if self.functional is not False and self._active() and observable():
                self._mode = _FunctionalMode(self)
                self._mode.__enter__()

    def _root_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth > 0:
            return
        self._root_frame = None
        error = sys.exc_info()[1]
        if error is not None and error is not self._error_at_entry:  # the forward raised: nothing of it counts
            self._forget()
            return
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            if self.functional is None and not any(k[1] for k in self._counts):
                self.functional = False  # auto: this model makes no functional activation calls
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
            self.on_forward([self.site(*e[:5]) for e in entries])

    def _in_flight(self) -> bool:
        """Whether the outermost forward that raised ``_depth`` is still running (its frame is on the stack)."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame is self._root_frame:
                return True
            frame = frame.f_back
        return False

    def recover(self, force: bool = False) -> None:
        """Forget a forward that an exception outside ``Exception`` (KeyboardInterrupt, SystemExit) left unfinished:
        torch runs ``always_call`` hooks for ``Exception`` only. Nothing of it is counted; the next forward counts
        normally. Without ``force`` only when no forward of the model is running now."""
        if self._depth > 0 and (force or not self._in_flight()):
            self._forget()

    def _forget(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            stack = _get_current_function_mode_stack()
            if stack and stack[-1] is mode:
                mode.__exit__(None, None, None)
        self._depth, self._root_frame, self._training_forward = 0, None, False
        self._mask = self._mask_rows = None
        self._buffer, self._counts, self._pre_stack = [], {}, []

    def _install(self) -> None:
        if not self._handles:
            self._handles = [
                _module_hooks.register_module_forward_pre_hook(self._pre_hook),
                _module_hooks.register_module_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
            ]

    def install_passive(self, on_observe: Callable[[Site, torch.Tensor, torch.Tensor], None]) -> None:
        """Observe every training forward from now on."""
        self.on_observe = on_observe
        self._install()
        self.observing = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.observing = False
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    @contextmanager
    def recording(self, keep: Callable[[Site], frozenset[str]] | None = None) -> Iterator[Recording]:
        """One probe pass: collects what ``keep(site)`` asks of each site (default pre and post) and the calls."""
        was_observing, had_hooks = self.observing, bool(self._handles)
        self.observing = False
        self.keep_pre = True
        self._pre_stack = []
        rec = Recording(keep if keep is not None else keep_everything)
        self._recording = rec
        self._install()
        try:
            yield rec
        finally:
            if not had_hooks:
                self.remove()
            self._recording = None
            self.keep_pre = False
            self.observing = was_observing
            self._depth = 0
            rec._resolve()  # the site names are final now
