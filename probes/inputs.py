"""Probe inputs and outputs for any forward signature.

``x`` is a tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``); nested
tuples, lists and dicts are walked. The number of samples is the leading dimension of every tensor
inside (they must agree). Floating tensors are cast to the model's parameter dtype; integer ones
(token ids, masks) keep theirs.

What the model returns is reduced to the one tensor the active probes use by ``select_output``:
a tensor is itself, a ``ModelOutput`` / dict with ``logits`` gives ``logits``, a tuple or list its
first tensor; ``output=`` (a key or attribute name, or a callable ``output -> tensor``) overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "call_model",
    "map_tensors",
    "iter_tensors",
    "sample_count",
    "take",
    "select_output",
    "split_probe_data",
    "check_output_option",
]


def map_tensors(x: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor inside ``x`` (tensors, tuples, lists, dicts), keeping the structure."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(map_tensors(v, fn) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(v, fn) for v in x)
    if isinstance(x, Mapping):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x


def iter_tensors(x: Any, prefix: str = "x") -> Iterator[tuple[str, torch.Tensor]]:
    """``(where, tensor)`` for every tensor inside ``x``; ``where`` reads like ``x[0]`` or ``x['input_ids']``."""
    if isinstance(x, torch.Tensor):
        yield prefix, x
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from iter_tensors(v, f"{prefix}[{i}]")
    elif isinstance(x, Mapping):
        for k, v in x.items():
            yield from iter_tensors(v, f"{prefix}[{k!r}]")


def sample_count(x: Any, who: str = "probe_data") -> int:
    """The shared leading dimension of the tensors in ``x``; raises naming the tensor that disagrees."""
    found = list(iter_tensors(x))
    if not found:
        raise ValueError(f"{who}: x holds no tensor (got {type(x).__name__})")
    where0, t0 = found[0]
    if t0.ndim == 0:
        raise ValueError(f"{who}: {where0} is a 0-d tensor; probe inputs need samples along the first axis")
    n = int(t0.shape[0])
    for where, t in found[1:]:
        if t.ndim == 0 or int(t.shape[0]) != n:
            raise ValueError(
                f"{who}: {where} has shape {tuple(t.shape)} but {where0} has {n} samples; "
                "every tensor of the probe batch needs the samples along its first axis"
            )
    return n


def take(x: Any, index: slice | torch.Tensor) -> Any:
    """Rows ``index`` of every tensor in ``x``."""
    return map_tensors(x, lambda t: t[index])


def call_model(model: Callable[..., Any], x: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _describe(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {[type(v).__name__ for v in out]}"
    return type(out).__name__


def select_output(out: Any, output: str | Callable[[Any], Any] | None = None) -> torch.Tensor:
    """The tensor active probes use from what the model returned (see the module docstring)."""
    if output is not None:
        if callable(output):
            picked = output(out)
        elif isinstance(out, Mapping) and output in out:
            picked = out[output]
        elif hasattr(out, output):
            picked = getattr(out, output)
        else:
            raise ValueError(
                f"attach(output={output!r}): the model returned a {_describe(out)}, which has no {output!r}"
            )
        if not isinstance(picked, torch.Tensor):
            raise TypeError(f"attach(output={output!r}) gave a {type(picked).__name__}, not a tensor")
        return picked
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(
        f"the model returned a {_describe(out)}; the probes need one tensor: pass attach(output=...) "
        "with a key or attribute name or a callable output -> tensor"
    )


def check_output_option(output: Any) -> None:
    if output is not None and not isinstance(output, str) and not callable(output):
        raise TypeError(
            f"attach(output=...) must be a key/attribute name or a callable output -> tensor, got {output!r}"
        )


def split_probe_data(probe_data: Any, label_key: str | None = None) -> tuple[Any, Any]:
    """``(x, y)`` from ``probe_data``: ``(x, y)``, ``(x,)``, ``x``, or a dict batch with ``label_key`` inside."""
    if probe_data is None:
        return None, None
    if label_key is not None:
        if not isinstance(probe_data, Mapping):
            raise TypeError(
                f"attach(label_key={label_key!r}) needs probe_data to be a dict batch, got {type(probe_data).__name__}"
            )
        if label_key not in probe_data:
            raise KeyError(
                f"attach(label_key={label_key!r}): the probe batch has no such key; it has {list(probe_data.keys())}"
            )
        # the labels leave the inputs: a Hugging Face model given `labels` would also compute a loss
        return {k: v for k, v in probe_data.items() if k != label_key}, probe_data[label_key]
    if isinstance(probe_data, (tuple, list)) and not isinstance(probe_data, torch.Tensor):
        if len(probe_data) == 2:
            return probe_data[0], probe_data[1]
        if len(probe_data) == 1:
            return probe_data[0], None
        raise ValueError(
            f"probe_data must be x or (x, y), got a sequence of {len(probe_data)} items; several "
            "model inputs go in a tuple or dict as x: probe_data=((a, b), y)"
        )
    return probe_data, None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return p.dtype if p is not None else None


class Positional(nn.Module):
    """``model`` seen as ``f(*tensors) -> tensor``: the probe inputs flattened to positional tensors, the output
    selected. For code that needs one tensor out and tensors in (per-sample Jacobians, ``torch.func``).

    ``Positional.wrap(model, x, output)`` returns the module and the positional tensors; its parameters are the
    model's (named ``model.<name>``).
    """

    def __init__(self, model: nn.Module, rebuild: Callable[[tuple[torch.Tensor, ...]], Any], output: Any) -> None:
        super().__init__()
        self.model = model
        self._rebuild = rebuild
        self._output = output

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return select_output(call_model(self.model, self._rebuild(tensors)), self._output)

    @classmethod
    def wrap(
        cls, model: nn.Module, x: Any, output: Any = None, force: bool = False
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """``(module, args)`` with ``module(*args)`` the selected output; the model itself when nothing is to do."""
        if isinstance(x, torch.Tensor) and output is None and not force:
            return model, (x,)
        leaves = [t for _, t in iter_tensors(x)]

        def rebuild(tensors: tuple[torch.Tensor, ...]) -> Any:
            it = iter(tensors)
            return map_tensors(x, lambda _t: next(it))

        return cls(model, rebuild, output), tuple(leaves)
