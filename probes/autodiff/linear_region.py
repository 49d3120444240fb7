"""Local affine maps of piecewise-linear networks, their linear regions, and the ``L_gen`` identity (seed 003).

A network built from affine layers and piecewise-linear activations is affine on each linear region
(the set of inputs with one activation pattern; Montufar, Pascanu, Cho & Bengio 2014):

    f(z) = A(x) z + c(x)   for z in the region of x,   A(x) = df/dx (the input Jacobian),  c(x) = f(x) - A(x) x,

and ``c = 0`` for a bias-free net of ReLU / LeakyReLU / PReLU units (positive homogeneity).
With ``x* = x + x'`` and ``P* = P + P'`` (parameters), the generalisation term of seed 003 is

    L_gen = (f(x, P) - f(x, P*)) - (f(x*, P) - f(x*, P*)),

and when ``x`` and ``x*`` share their pattern under ``P`` and under ``P*``, ``L_gen = (A(x, P*) - A(x, P)) x'``
exactly (the offsets ``c`` cancel within each parameter set, so biases drop out).

Public functions:

- ``check_piecewise_linear(model, x=None)``: raises ``NotPiecewiseLinearError`` naming the module.
  The check lives here, in three layers: (1) a **scan of the leaf modules** against
  ``PIECEWISE_LINEAR_MODULES`` (identities count: ``nn.Identity`` and an empty ``nn.Sequential()``, the
  shortcut of a standard ResNet block; training-mode Dropout / RReLU and BatchNorm with batch statistics are
  rejected: they are random or mix samples); (2) with an input, a **trace of one forward** under a
  ``TorchFunctionMode`` that rejects smooth functional calls (``torch.tanh``, ``F.gelu``, ``exp``, ...) made
  in any ``forward``, naming the calling module; (3) a **curvature test**: the second directional derivative
  ``d^2/dt^2 f(x + t v)`` by nested ``torch.func.jvp`` is exactly zero for a piecewise-linear map, so any
  nonzero value (a custom smooth forward the first two missed) is an error.
- ``local_affine_map(model, x)`` -> ``LocalAffineMap(A, c, f)``: ``A`` (P, C, D) by batched
  ``vmap(jacrev)`` (``jacfwd`` when C > D), chunked; ``c = f - A x`` (P, C); ``f`` (P, C). Outputs and
  inputs are flattened per sample (C and D numbers per sample).
- ``site_pattern(kind, module, pre)``: the activation pattern of one gated site
  (``pre > 0`` for the ReLU family, both kinks for ReLU6 / Hardtanh, the argmax indices for max pooling).
- ``patterns_differ(a, b)``: (P,) bool, True where any bit of a sample's pattern differs; ``flip_rate(a, b)``
  the fraction of all pattern entries that differ.
- ``perturb_inputs``, ``perturb_params`` (``perturb_tensor``), ``directional``, ``l_gen``: the pieces of the
  probe.
- ``swapped(model, values)``: each module's own parameters and buffers replaced by ``values(module)`` around that
  module's own forward only, for a model whose whole parameters exist one module at a time (FSDP2: its forward
  all-gathers each unit before the unit's modules run, and frees it after); the probe's route under sharding.

Nothing here changes the model: parameters are swapped in through ``torch.func.functional_call``
(copies in the chosen dtype) or, under ``swapped``, for the length of one module's forward, put back before the
module returns; no ``.backward()``, no ``.grad``, modes untouched, hooks removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacfwd, jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode

from probes.functional.linear_region import (
    LocalAffineMap,
    NotPiecewiseLinearError,
    Params,
)

#: leaf modules that are piecewise linear in their input (in eval mode where noted in the check)
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)

#: max-pooling modules: their argmax indices are part of the activation pattern
MAX_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


#: names of smooth (not piecewise-linear) torch functions rejected when a ``forward`` calls them
SMOOTH_FUNCTIONS = frozenset(
    {
        "tanh",
        "tanh_",
        "sigmoid",
        "sigmoid_",
        "gelu",
        "silu",
        "elu",
        "elu_",
        "selu",
        "celu",
        "softplus",
        "mish",
        "hardswish",
        "logsigmoid",
        "exp",
        "exp_",
        "expm1",
        "log",
        "log_",
        "log1p",
        "log2",
        "log10",
        "erf",
        "erfc",
        "sin",
        "cos",
        "tan",
        "sinh",
        "cosh",
        "atan",
        "softmax",
        "log_softmax",
        "softmin",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
        "normalize",
        "sqrt",
        "rsqrt",
        "pow",
        "__pow__",
        "reciprocal",
        "square",
    }
)


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------
def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if not any(True for _ in m.children())]


#: containers that, left empty, are leaves of the module tree: an empty ``nn.Sequential`` is the identity (the
#: shortcut of a ResNet block without downsampling), the other two are never called
EMPTY_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_identity_module(m: nn.Module) -> bool:
    """``nn.Identity`` or an empty container (``nn.Sequential()`` returns its input unchanged); a subclass of a
    container may define its own ``forward``, so only the containers themselves count.

    Args:
        m: a module.

    Returns:
        Whether ``m`` returns its input unchanged.
    """
    return isinstance(m, nn.Identity) or (type(m) in EMPTY_CONTAINERS and not any(True for _ in m.children()))


def _scan_modules(model: nn.Module, who: str, allow: tuple[type[nn.Module], ...], assume_eval: bool) -> None:
    for path, m in _leaf_modules(model):
        name = f"{path or '<root>'!r} ({type(m).__name__})"
        if isinstance(m, allow) or is_identity_module(m):
            continue
        if not isinstance(m, PIECEWISE_LINEAR_MODULES):
            raise NotPiecewiseLinearError(
                f"{who}: module {name} is not a known piecewise-linear layer; the local affine map f = A(x) x + c(x) "
                "needs affine layers (Linear, Conv, pooling, BatchNorm in eval) and ReLU / LeakyReLU / PReLU / "
                "ReLU6 / Hardtanh activations (pass allow=(YourModule,) if you know it is piecewise linear)"
            )
        if (
            isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.RReLU))
            and m.training
            and not assume_eval
        ):
            raise NotPiecewiseLinearError(
                f"{who}: module {name} is random in training mode; call model.eval() (the probe runs in eval mode)"
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            (m.training and not assume_eval) or not m.track_running_stats
        ):
            raise NotPiecewiseLinearError(
                f"{who}: module {name} normalises with batch statistics (training mode or track_running_stats="
                "False), which mixes samples; in eval mode with running statistics it is affine"
            )


class _TraceMode(TorchFunctionMode):
    """Records the smooth functional calls of one forward, with the path of the module whose ``forward`` made them:
    the top of a stack of running modules kept by forward pre- and post-hooks (``traced``), no call frames read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.paths: dict[nn.Module, str] = {}
        for path, module in model.named_modules():
            self.paths.setdefault(module, path)
        self.stack: list[str] = []
        self.found: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SMOOTH_FUNCTIONS:
            self.found.append((self.stack[-1] if self.stack else "", name))
        return func(*args, **(kwargs or {}))


@contextmanager
def _traced(mode: _TraceMode) -> Iterator[_TraceMode]:
    """``mode`` entered, with hooks on every module of its model pushing and popping the running module's path."""

    def push(path: str) -> Callable[..., None]:
        return lambda module, args: mode.stack.append(path)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        mode.stack.pop()

    handles = []
    try:
        for module, path in mode.paths.items():
            handles.append(module.register_forward_pre_hook(push(path)))
            handles.append(module.register_forward_hook(pop, always_call=True))
        with mode:
            yield mode
    finally:
        for h in handles:
            h.remove()


def _curvature(model: nn.Module, x: torch.Tensor, params: Params | None) -> torch.Tensor:
    """``max |d^2/dt^2 f(x + t v)|`` over a few samples, by nested forward-mode AD (0 for piecewise-linear f);
    ``params=None``: the model's own parameters (its own forward)."""
    g = torch.Generator(device=x.device).manual_seed(12345)
    v = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    def f(z):
        return model(z) if params is None else functional_call(model, params, (z,))

    def df(z):
        return jvp(f, (z,), (v,))[1]

    second = jvp(df, (x,), (v,))[1]
    return second.detach().abs().max()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def check_piecewise_linear(
    model: nn.Module,
    x: torch.Tensor | None = None,
    *,
    who: str = "linear_region",
    allow: tuple[type[nn.Module], ...] = (),
    curvature: bool = True,
    assume_eval: bool = False,
    own_parameters: bool = False,
) -> None:
    """Raise ``NotPiecewiseLinearError`` (naming the module) unless ``model`` is piecewise linear per sample.

    Module scan always; with ``x`` (a few samples suffice) a traced forward for smooth functional calls and,
    with ``curvature=True``, the nested-``jvp`` second derivative, which must vanish exactly.
    ``assume_eval=True`` (the probe at attach) judges the model as it will run, in eval mode: the forwards of
    the check then run in eval mode (modes restored afterwards), so nothing random runs and no buffer changes.

    Args:
        model: the network.
        x: a few input samples (samples first), for the traced forward and the curvature test; ``None``: the
            module scan only.
        who: the name that error messages start with.
        allow: module classes to accept as piecewise linear without the scan.
        curvature: run the second-derivative test (with ``x``).
        assume_eval: judge the model as it runs in eval mode.
        own_parameters: run the forwards of the check with the model's own parameters, through its own forward and
            without gradients (a sharded model, whose forward gathers them unit by unit), instead of through
            ``functional_call`` on detached copies.

    Raises:
        NotPiecewiseLinearError: a module that is not a known piecewise-linear layer, random or mixing samples,
            a smooth functional call in some ``forward``, or a nonzero second derivative.
        TypeError: ``x`` is not a floating tensor with samples first.
    """
    _scan_modules(model, who, tuple(allow), assume_eval)
    if x is None:
        return
    with _eval_mode(model) if assume_eval else nullcontext():
        _check_forward(model, x, who, curvature, own_parameters)


def _check_forward(model: nn.Module, x: torch.Tensor, who: str, curvature: bool, own: bool = False) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or not x.is_floating_point():
        raise TypeError(
            f"{who}: the input must be a floating tensor with samples first, got "
            f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else tuple(x.shape)}"
        )
    xs = x[:2].detach().to(_model_dtype(model, x))
    mode = _TraceMode(model)
    with torch.no_grad(), _traced(mode):
        model(xs)
    if mode.found:
        where = ", ".join(f"{fn} in the forward of {path or '<root>'!r}" for path, fn in mode.found[:5])
        raise NotPiecewiseLinearError(
            f"{who}: the model calls smooth functions ({where}); it is not piecewise "
            "linear, so it has no local affine map f = A(x) x + c(x)"
        )
    if curvature:
        params = None if own else parameter_state(model, None)
        try:
            with torch.no_grad() if own else nullcontext():  # forward-mode AD runs under no_grad
                second = _curvature(model, xs, params)
        except (NotImplementedError, RuntimeError):  # an op without forward-mode AD: the scans above stand
            return
        with torch.no_grad():
            # ``params`` is None exactly when ``own``
            scale = 1.0 + float((model(xs) if params is None else functional_call(model, params, (xs,))).abs().max())
        if float(second) > 1e-9 * scale:
            raise NotPiecewiseLinearError(
                f"{who}: the output of {type(model).__name__} has a nonzero second derivative along a random "
                f"direction (max |d2f/dt2| = {float(second):.3g}): some custom forward is not piecewise linear"
            )


# ------------------------------------------------------------------------------------------------
# affine maps
# ------------------------------------------------------------------------------------------------
def parameter_state(model: nn.Module, dtype: torch.dtype | None) -> Params:
    """Detached parameters and buffers (floating ones cast to ``dtype``): what ``functional_call`` swaps in.

    Args:
        model: the network.
        dtype: the dtype of the floating tensors; ``None`` keeps each one's own.

    Returns:
        Name -> detached tensor, parameters then buffers.
    """
    out: Params = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _model_dtype(model: nn.Module, x: torch.Tensor) -> torch.dtype:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return p.dtype if p is not None else x.dtype


def local_affine_map(
    model: nn.Module,
    x: torch.Tensor,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    check: bool = True,
) -> LocalAffineMap:
    """The affine map ``f(z) = A(x) z + c(x)`` of a piecewise-linear ``model`` around each row of ``x``.

    ``A(x)`` is the input Jacobian (P, C, D), one per sample, by ``vmap(jacrev)`` (``jacfwd`` when C > D),
    ``chunk_size`` samples at a time; ``c(x) = f(x) - A(x) x`` (P, C). ``params`` overrides parameters /
    buffers by name (e.g. perturbed copies, for ``A(x, P + P')``); ``dtype`` casts parameters, buffers and
    ``x`` (float64 for exact identities). ``check`` runs ``check_piecewise_linear`` first (module scan and
    functional trace; the curvature test is left to ``check_piecewise_linear``).

    Args:
        model: a piecewise-linear network that does not mix samples.
        x: inputs, samples first.
        params: parameters or buffers to use instead of the model's, by name.
        dtype: the precision of the map (default: the model's).
        chunk_size: samples per ``vmap`` chunk (default: all).
        check: run the module scan and the traced forward first.

    Returns:
        ``LocalAffineMap(A, c, f)``: ``A`` (P, C, D), ``c`` (P, C), ``f`` (P, C).

    Raises:
        ValueError: ``x`` is not a tensor with at least one sample.
        NotPiecewiseLinearError: as ``check_piecewise_linear`` (with ``check=True``).
    """
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"local_affine_map: x must be a tensor with samples first, got "
            f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}"
        )
    if check:
        check_piecewise_linear(model, x, who="local_affine_map", curvature=False)
    dtype = dtype or _model_dtype(model, x)
    state = parameter_state(model, dtype)
    if params is not None:
        state.update({n: (t.detach().to(dtype) if t.is_floating_point() else t.detach()) for n, t in params.items()})
    xd = x.detach().to(dtype)
    P = xd.shape[0]

    def one(xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, state, (xi.unsqueeze(0),)).reshape(-1)

    with torch.no_grad():
        f = functional_call(model, state, (xd,)).reshape(P, -1)
    C, D = f.shape[1], xd[0].numel()
    jac = jacrev(one) if C <= D else jacfwd(one)
    A = vmap(jac, chunk_size=chunk_size)(xd).reshape(P, C, D).detach()
    c = f - torch.einsum("pcd,pd->pc", A, xd.reshape(P, D))
    return LocalAffineMap(A, c, f)


def directional(model: nn.Module, state: Params, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A(x) v`` per sample (P, C) by one forward-mode ``jvp`` (samples must not interact: eval mode).

    Args:
        model: the network.
        state: its parameters and buffers (``parameter_state``).
        x: inputs, samples first.
        v: a direction per sample, shaped like ``x``.

    Returns:
        ``A(x) v``, ``(P, C)``, detached.
    """
    out = jvp(lambda z: functional_call(model, state, (z,)), (x,), (v,))[1]
    return out.detach().reshape(x.shape[0], -1)


ModuleValues = Callable[[nn.Module], Mapping[str, torch.Tensor]]


@contextmanager
def swapped(model: nn.Module, values: ModuleValues) -> Iterator[set[nn.Module]]:
    """Inside the block, each module of ``model`` that holds parameters or buffers runs its own forward with
    ``values(module)`` (local name -> tensor) in place of its own tensors of those names, put back as it returns.

    ``values`` is called in the module's forward pre-hook, where its whole parameters are present even when the
    model is sharded: FSDP2 all-gathers a unit in the unit's own pre-hook, which runs first, and frees it in its
    post-hook, which runs after the hook putting the tensors back. So a substitute built from a module's parameters
    (a cast, a perturbed copy) exists for that module's forward only, and no more parameters are whole at a time
    than the model's own forward holds. A parameter read outside its module's own forward (a parent calling
    ``F.linear(x, self.child.weight)``) is not replaced.

    Args:
        model: the network.
        values: ``values(module)``: the tensors to use for some of ``module``'s own (not its children's) parameters
            and buffers during its forward, by local name; called at each call of the module.

    Yields:
        The set of modules whose forward ran inside the block (filled as they run).
    """
    called: set[nn.Module] = set()
    saved: dict[nn.Module, list[list[tuple[dict[str, Any], str, Any]]]] = {}

    def pre(module: nn.Module, args: Any) -> None:
        called.add(module)
        kept: list[tuple[dict[str, Any], str, Any]] = []
        for name, tensor in values(module).items():
            table: dict[str, Any] = module._parameters if name in module._parameters else module._buffers
            kept.append((table, name, table[name]))
            table[name] = tensor  # the dicts themselves: a plain tensor where a Parameter was (functional_call's way)
        saved.setdefault(module, []).append(kept)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        for table, name, tensor in reversed(saved[module].pop()):
            table[name] = tensor

    handles = []
    try:
        for module in model.modules():
            if any(t is not None for t in module._parameters.values()) or any(
                t is not None for t in module._buffers.values()
            ):
                handles.append(module.register_forward_pre_hook(pre))
                # prepended: it runs before FSDP2's post-forward hook frees the parameters; always: after an error too
                handles.append(module.register_forward_hook(post, prepend=True, always_call=True))
        yield called
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# regions
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# perturbations and L_gen
# ------------------------------------------------------------------------------------------------


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the floating trainable parameters (the ones parameter perturbations touch).

    Args:
        model: the network.

    Returns:
        Parameter names, in ``named_parameters`` order.
    """
    return [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
