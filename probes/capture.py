"""Where activations come from: module hooks, functional calls, call sites.

A **site** is an activation module (``nn.ReLU``, ``nn.GELU``, ... or any module a probe asks
for) or a functional activation call (``F.relu``, ``torch.relu``, ``Tensor.relu``, ...) made
inside some module's ``forward``. A module called k > 1 times per forward gives sites
``path#1`` ... ``path#k``; a functional call in the forward of the module at ``path`` is the site
``path:relu`` (``forward:relu`` for the root module), ``#k`` again when there are several.

Functional calls are caught by a ``TorchFunctionMode`` that a root forward pre-hook enters
and the root forward hook leaves, only while someone needs them: torch is never patched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from probes.probe import Activation, Call, Site

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
)

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


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATION_MODULES)


def kind_of(module: nn.Module) -> str:
    return type(module).__name__.lower()


def site_name(path: str, call: int, multi: bool) -> str:
    return f"{path}#{call}" if multi else path


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


class _FunctionalMode(TorchFunctionMode):
    """Catches functional activation calls and reports them to the capture."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = FUNCTIONAL_ACTIVATIONS.get(func)
        if entry is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        path = self.capture.calling_path()
        if path is None:  # inside an activation module that is a site already
            return func(*args, **kwargs)
        kind, inplace = entry
        inplace = inplace or bool(kwargs.get("inplace", False))
        pre = args[0]
        if self.capture.keep_pre:
            pre = pre.detach().clone() if inplace else pre.detach()
        out = func(*args, **kwargs)
        self.capture.record(path, kind, None, pre, out, functional=True)
        return out


class Capture:
    """Hooks on one model that turn forwards into site observations.

    Two consumers: ``on_observe(site, pre, post)`` for passive probes during training forwards
    (installed with ``install_passive``), and ``recording()`` for one probe pass that collects
    ``Activation`` captures and the ``Call`` trace. Site names stay stable across forwards:
    once a module is seen called more than once in a forward, its sites are ``path#k``.
    """

    def __init__(self, model: nn.Module, extra_sites: tuple[type[nn.Module], ...] = (),
                 functional: bool | None = None) -> None:
        self.model = unwrap(model)
        self.paths: dict[nn.Module, str] = {}
        for path, module in self.model.named_modules():
            self.paths.setdefault(module, path)
        self.site_types = ACTIVATION_MODULES + tuple(extra_sites)
        self.site_modules = {m: p for m, p in self.paths.items() if isinstance(m, self.site_types)}
        self.functional = functional  # None: auto (on until a forward shows there are no functional sites)
        self.multi: set[str] = set()
        self.kinds: dict[str, str] = {}
        self._sites: dict[tuple[str, int, bool, str], Site] = {}
        self._counts: dict[tuple[str, bool], int] = {}
        self._buffer: list[tuple[str, int, bool, str, nn.Module | None, torch.Tensor, torch.Tensor]] = []
        self._depth = 0
        self._mode: _FunctionalMode | None = None
        self._passive_handles: list[Any] = []
        self._root_handles: list[Any] = []
        self.on_observe: Callable[[Site, torch.Tensor, torch.Tensor], None] | None = None
        self.observing = False
        self.keep_pre = False
        self._recording: dict[str, Any] | None = None
        self.forwards_seen = 0

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

    def calling_path(self) -> str | None:
        """Module path of the nearest ``forward`` on the stack; None inside a site module."""
        frame = sys._getframe(2)
        while frame is not None:
            obj = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if isinstance(obj, nn.Module) and obj in self.paths:
                return None if obj in self.site_modules else self.paths[obj]
            frame = frame.f_back
        return ""

    # -- hooks ----------------------------------------------------------------------
    def record(self, path: str, kind: str, module: nn.Module | None, pre: torch.Tensor, post: torch.Tensor,
               functional: bool = False) -> None:
        key = (path if not functional else f"{path or 'forward'}:{kind}", functional)
        call = self._counts.get(key, 0) + 1
        self._counts[key] = call
        self.kinds[key[0]] = kind
        entry = (path, call, functional, kind, module, pre, post)
        if self._depth > 0:
            self._buffer.append(entry)
        else:  # a submodule called outside the root forward
            self._dispatch([entry])
            self._counts.clear()
        if self._recording is not None:
            self._recording["calls"].append((True, path, kind, module))

    def _dispatch(self, entries) -> None:
        for path, call, functional, kind, module, pre, post in entries:
            site = self.site(path, call, functional, kind, module)
            if self._recording is not None:
                self._recording["activations"][site.name] = Activation(site, pre, post)
                self._recording["sites"].append(site.name)
            elif self.observing and self.on_observe is not None:
                self.on_observe(site, pre, post)

    def _site_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.keep_pre:
            t = _first_tensor(args)
            if t is not None:
                self._pre_stack.append(t.detach().clone())

    def _site_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if self._recording is None and not (self.observing and self.model.training):
            return
        if self.keep_pre:
            pre = self._pre_stack.pop() if self._pre_stack else _first_tensor(args)
        else:
            pre = _first_tensor(args)
        self.record(self.site_modules[module], kind_of(module), module, pre, output)

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth == 1:
            self._counts.clear()
            self._buffer.clear()
            if self.functional is not False and (self._recording is not None
                                                 or (self.observing and self.model.training)):
                self._mode = _FunctionalMode(self)
                self._mode.__enter__()

    def _root_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth -= 1
        if self._depth > 0:
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
        self.forwards_seen += 1
        self._dispatch(entries)

    def _ensure_root(self) -> None:
        if not self._root_handles:
            self._root_handles = [
                self.model.register_forward_pre_hook(self._root_pre_hook),
                self.model.register_forward_hook(self._root_hook, always_call=True),
            ]

    def install_passive(self, on_observe: Callable[[Site, torch.Tensor, torch.Tensor], None]) -> None:
        """Observe every training forward (``model.training``) from now on."""
        self.on_observe = on_observe
        self._pre_stack: list[torch.Tensor] = []
        self._ensure_root()
        for m in self.site_modules:
            self._passive_handles.append(m.register_forward_hook(self._site_hook))
        self.observing = True

    def remove(self) -> None:
        for h in self._passive_handles + self._root_handles:
            h.remove()
        self._passive_handles, self._root_handles = [], []
        self.observing = False
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    @contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        """One probe pass: collects ``activations`` (site -> Activation) and ``calls`` (list of Call)."""
        was_observing = self.observing
        self.observing = False
        self.keep_pre = True
        self._pre_stack = []
        rec: dict[str, Any] = {"activations": {}, "calls": [], "sites": []}
        self._recording = rec
        handles = []
        own_root = not self._root_handles
        if own_root:
            self._ensure_root()
        if not self._passive_handles:
            for m in self.site_modules:
                handles.append(m.register_forward_pre_hook(self._site_pre_hook))
                handles.append(m.register_forward_hook(self._site_hook))
        else:
            for m in self.site_modules:
                handles.append(m.register_forward_pre_hook(self._site_pre_hook))
        def leaf_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if module not in self.site_modules:
                rec["calls"].append((False, self.paths[module], kind_of(module), module))

        for m in self.paths:
            if m not in self.site_modules and not any(True for _ in m.children()):
                handles.append(m.register_forward_hook(leaf_hook))
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()
            if own_root:
                for h in self._root_handles:
                    h.remove()
                self._root_handles = []
            self._recording = None
            self.keep_pre = False
            self.observing = was_observing
            # the site names are final now; resolve the trace
            names = rec["sites"]
            calls: list[Call] = []
            i = 0
            for is_site, path, kind, module in rec["calls"]:
                if not is_site:
                    calls.append(Call(path, kind, module, None))
                else:
                    calls.append(Call(path, kind, module, names[i] if i < len(names) else None))
                    i += 1
            rec["calls"] = calls
