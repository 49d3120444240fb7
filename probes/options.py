"""The one schema of probe options: every probe checks each option of ``__init__`` through these functions.

Each function returns the value normalised (a Python ``int`` for a numpy integer, a tuple for a sequence) or raises
naming the probe and the option: a ``TypeError`` for a value of the wrong type, a ``ValueError`` for a value of the
right type out of range. A bad option therefore fails when the probe is made, i.e. inside ``attach``, before
anything is measured.

A probe declares its options once, as a dataclass ``Options`` whose fields carry their check
(``option(default, check, **bounds)``); ``read`` checks what ``attach`` gave against it and returns one object,
and ``described`` lists the options with their defaults and help for the docs and ``probes list``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "MAX_BINS",
    "option",
    "read",
    "described",
    "signature",
    "integer",
    "number",
    "choice",
    "flag",
    "names",
    "text",
    "sizes",
    "array",
    "floating_dtype",
    "module_types",
    "ordered",
    "path",
]


#: the most bins a probe's histogram option (``bins``) allows
MAX_BINS = 10_000


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _int_words(minimum: int | None, optional: bool) -> str:
    words = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    return f"None or {words}" if optional else words


def integer(
    probe: str,
    option: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
    what: str | None = None,
) -> int | None:
    """An integer (Python or numpy; not a bool, not a float) ``>= minimum``.

    Args:
        probe: the probe's name, for the message.
        option: the option's name, for the message.
        value: the value given.
        minimum: the smallest allowed value (None: no bound).
        maximum: the largest allowed value (None: no bound).
        optional: whether None is allowed (and returned).
        what: how the message describes a valid value (default from ``minimum``, ``maximum`` and ``optional``).

    Returns:
        ``int(value)``, or None when ``optional`` and ``value`` is None.

    Raises:
        TypeError: not an integer.
        ValueError: below ``minimum``.
    """
    if value is None and optional:
        return None
    if what is None and maximum is not None and minimum not in (None, 0, 1):
        what = f"{'None or ' if optional else ''}an int from {minimum} to {maximum}"
    what = what or _int_words(minimum, optional) + (f" <= {maximum}" if maximum is not None else "")
    if not _is_int(value):
        raise TypeError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    if (minimum is not None and int(value) < minimum) or (maximum is not None and int(value) > maximum):
        raise ValueError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    return int(value)


def _float(value: Any) -> float:
    """``float(value)``, infinite for an int too large for a float (refused as not finite, with the option named)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def number(
    probe: str,
    option: str,
    value: Any,
    *,
    minimum: float | None = None,
    positive: bool = False,
    below: float | None = None,
    optional: bool = False,
    what: str | None = None,
) -> float | None:
    """A finite real number (int, float or numpy scalar; not a bool, not a string) in range.

    Args:
        probe: the probe's name, for the message.
        option: the option's name, for the message.
        value: the value given.
        minimum: the smallest allowed value (inclusive).
        positive: whether the value must be > 0.
        below: an exclusive upper bound.
        optional: whether None is allowed (and returned).
        what: how the message describes a valid value.

    Returns:
        ``float(value)``, or None when ``optional`` and ``value`` is None.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite or out of range.
    """
    if value is None and optional:
        return None
    if what is None:
        if positive and below is not None:
            what = f"a number in (0, {below:g})"
        else:
            what = "a positive finite number" if positive else "a finite number"
            if minimum is not None:
                what += f" >= {minimum:g}"
            if below is not None:
                what += f" < {below:g}"
        what = f"None or {what}" if optional else what
    if not _is_real(value):
        raise TypeError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    v = _float(value)
    if (
        not math.isfinite(v)
        or (positive and not v > 0)
        or (minimum is not None and v < minimum)
        or (below is not None and not v < below)
    ):
        raise ValueError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    return v


def choice(probe: str, option: str, value: Any, allowed: Iterable[Any]) -> Any:
    """One of ``allowed`` (strings, None, ...).

    Args:
        probe: the probe's name, for the message.
        option: the option's name, for the message.
        value: the value given.
        allowed: the valid values.

    Returns:
        ``value``.

    Raises:
        TypeError: of a type none of ``allowed`` has (e.g. a number where names are expected).
        ValueError: of the right type but not among ``allowed``.
    """
    allowed = tuple(allowed)
    shown = ", ".join(repr(a) for a in allowed)
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        kinds = {type(a) for a in allowed}
        error = ValueError if type(value) in kinds or value is None else TypeError
        raise error(f"{probe}: option {option!r} must be one of {shown}, got {value!r}")
    return value


def flag(probe: str, option: str, value: Any) -> bool:
    """True or False (a Python or numpy bool; not 0 or 1, not a string).

    Raises:
        TypeError: anything else.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{probe}: option {option!r} must be True or False, got {value!r}")
    return bool(value)


def names(probe: str, option: str, value: Any) -> list[str] | None:
    """None, one site name / fnmatch pattern, or a non-empty sequence of them.

    Raises:
        TypeError: anything else.
    """
    if value is None:
        return None
    items: Sequence[Any] = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
        raise TypeError(f"{probe}: option {option!r} must be site names or fnmatch patterns, got {value!r}")
    return list(items)


def text(
    probe: str, option: str, value: Any, *, optional: bool = False, what: str = "a non-empty string"
) -> str | None:
    """A non-empty string (a module path, a name).

    Args:
        probe: the probe's name, for the message.
        option: the option's name, for the message.
        value: the value given.
        optional: whether None is allowed (and returned).
        what: how the message describes a valid value.

    Returns:
        ``value``, or None when ``optional`` and ``value`` is None.

    Raises:
        TypeError: anything else (an empty string included).
    """
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{probe}: option {option!r} must be {'None or ' if optional else ''}{what}, got {value!r}")
    return value


def path(probe: str, option: str, value: Any, *, optional: bool = False) -> str | None:
    """A file-system path (a string or an ``os.PathLike``), returned as a string.

    Raises:
        TypeError: anything else (None unless ``optional``).
    """
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{probe}: option {option!r} must be {'None or ' if optional else ''}a path, got {value!r}")
    return os.fspath(value)


def sizes(probe: str, option: str, value: Any) -> tuple[float, ...]:
    """One positive finite number or a non-empty sequence (list, tuple, 1-d array or tensor) of them.

    Raises:
        TypeError: not a number or a sequence of numbers.
        ValueError: empty, or a number that is not positive and finite.
    """
    wanted = "a positive finite number or a non-empty sequence of them"
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:  # a 0-d array or tensor: one number
        value = value.item()
    if _is_real(value):
        values: tuple = (value,)
    elif isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"{probe}: option {option!r} must be {wanted}, got {value!r}")
    else:
        values = tuple(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
    if not values:
        raise ValueError(f"{probe}: option {option!r} must be {wanted}, got {value!r}")
    if not all(_is_real(v) for v in values):
        raise TypeError(f"{probe}: option {option!r} must be {wanted}, got {value!r}")
    out = tuple(_float(v) for v in values)
    if not all(v > 0 and math.isfinite(v) for v in out):
        raise ValueError(f"{probe}: option {option!r} must be {wanted}, got {value!r}")
    return out


def array(
    probe: str,
    option: str,
    value: Any,
    *,
    ndim: Iterable[int] | None = None,
    what: str = "a tensor of finite real numbers",
) -> torch.Tensor:
    """A tensor, numpy array or nested list/tuple of real numbers, returned as a detached float64 CPU tensor.

    Args:
        probe: the probe's name, for the message.
        option: the option's name, for the message.
        value: the value given.
        ndim: the allowed numbers of dimensions (None: any).
        what: how the message describes a valid value.

    Returns:
        A new float64 tensor on the CPU (the shape checks against the model are the probe's).

    Raises:
        TypeError: not numbers (strings, bools, complex numbers, objects, a dtype, a module, ...).
        ValueError: of the wrong number of dimensions, empty, or with a NaN or infinite entry.
    """
    bad_type = TypeError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex() or value.layout != torch.strided:
            raise bad_type
        out = value.detach().to("cpu", torch.float64, copy=True)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise bad_type
        out = torch.from_numpy(np.array(value, dtype=np.float64))
    elif isinstance(value, (list, tuple)) or _is_real(value):

        def numbers_only(v: Any) -> bool:
            return _is_real(v) or (isinstance(v, (list, tuple)) and all(numbers_only(e) for e in v))

        if not numbers_only(value):
            raise bad_type
        try:
            out = torch.tensor(value, dtype=torch.float64)
        except (ValueError, TypeError, RuntimeError, OverflowError) as exc:  # ragged lists, huge ints
            raise ValueError(f"{probe}: option {option!r} must be {what}, got {value!r} ({exc})") from None
    else:
        raise bad_type
    allowed = None if ndim is None else tuple(ndim)
    why = (
        f"shape {tuple(out.shape)}"
        if allowed is not None and out.ndim not in allowed
        else "empty"
        if out.numel() == 0
        else "NaN or infinite entries"
        if not bool(torch.isfinite(out).all())
        else None
    )
    if why is not None:
        raise ValueError(f"{probe}: option {option!r} must be {what}, got {value!r} ({why})")
    return out


def floating_dtype(probe: str, option: str, value: Any, *, keywords: tuple[Any, ...] = ()) -> Any:
    """A floating torch dtype or its name (``torch.float64``, ``"float64"``, ``"double"``), or one of ``keywords``.

    Returns:
        The keyword itself, or the ``torch.dtype``.

    Raises:
        TypeError: neither a dtype nor a string.
        ValueError: not a floating dtype (nor a keyword).
    """
    if any(value is k or (isinstance(value, str) and value == k) for k in keywords):
        return value
    what = ", ".join(repr(k) for k in keywords) + (" or " if keywords else "") + "a floating torch dtype (or its name)"
    if not isinstance(value, (str, torch.dtype)):
        raise TypeError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, value, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{probe}: option {option!r} must be {what}, got {value!r}")
    return dtype


def module_types(probe: str, option: str, value: Any) -> tuple[type[nn.Module], ...]:
    """An ``nn.Module`` subclass or a sequence (or set) of them.

    Raises:
        TypeError: anything else (an instance, a name, another class).
    """
    items = (value,) if isinstance(value, type) else value
    if (
        isinstance(items, (str, bytes))
        or not isinstance(items, (Sequence, set, frozenset))
        or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in items)
    ):
        raise TypeError(
            f"{probe}: option {option!r} must be an nn.Module subclass or a sequence of them, got {value!r}"
        )
    return tuple(items)


def ordered(probe: str, low_option: str, low: float, high_option: str, high: float) -> None:
    """``low <= high`` for two options that bound a range.

    Raises:
        ValueError: ``low > high``.
    """
    if low > high:
        raise ValueError(
            f"{probe}: option {low_option!r} must not exceed option {high_option!r}, got {low!r} > {high!r}"
        )


# -- options declared as a dataclass ------------------------------------------------------------------------------

#: ``check(probe, option, value) -> value``: one of the functions above with its bounds bound
Check = Callable[[str, str, Any], Any]


def option(default: Any, check: Callable[..., Any] | None = None, *, doc: str = "", **bounds: Any) -> Any:
    """A field of a probe's ``Options`` dataclass: its default, its check and a line of help.

    Args:
        default: the value when ``attach`` does not give one (a list or dict is copied per probe).
        check: one of this module's functions (``integer``, ``number``, ``choice``, ...), called as
            ``check(probe, option, value, **bounds)`` on a given value; None: any value.
        doc: one line for the docs and ``probes list``.
        bounds: the check's keyword arguments (``minimum=1``, ``allowed=(...)``, ``optional=True``, ...).

    Returns:
        A ``dataclasses.field``.
    """
    bound = functools.partial(check, **bounds) if check is not None else None
    meta = {"check": bound, "doc": doc}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(_copy, default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    return type(value)(value)


def read(probe: str, options: type | None, given: dict[str, Any]) -> Any:
    """The options ``attach`` gave to ``probe``, checked against its ``Options`` dataclass.

    Each given value goes through its field's check (which names the probe and the option); then the dataclass
    is built, so that its ``__post_init__`` checks options against each other.

    Args:
        probe: the probe's name, for messages.
        options: the probe's ``Options`` dataclass, or None (the probe takes no options).
        given: the options given (``every`` already taken by the session).

    Returns:
        An ``Options`` instance (None when ``options`` is None).

    Raises:
        TypeError: an option the probe does not take, or a value of the wrong type.
        ValueError: a value out of range.
    """
    known = [f.name for f in dataclasses.fields(options)] if options is not None else []
    unknown = sorted(set(given) - set(known))
    if unknown:
        takes = ", ".join(known) or "no other options"
        raise TypeError(f"{probe}: unknown option(s) {unknown}; it takes: every, {takes}")
    if options is None:
        return None
    values = {}
    for f in dataclasses.fields(options):
        if f.name in given:
            check = f.metadata.get("check")
            values[f.name] = check(probe, f.name, given[f.name]) if check is not None else given[f.name]
    return options(**values)


def described(options: type | None) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` of each option of an ``Options`` dataclass (none for None), in declaration order.

    Args:
        options: a probe's ``Options`` dataclass, or None.
    """
    if options is None:
        return []
    out = []
    for f in dataclasses.fields(options):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{options.__name__}: option {f.name!r} has no default; every option needs one")
        out.append((f.name, default, f.metadata.get("doc", "")))
    return out


def signature(options: type) -> inspect.Signature:
    """``__init__``'s signature for a probe declaring ``options``: ``(self, *, name=default, ...)``.

    Args:
        options: a probe's ``Options`` dataclass.
    """
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default, _ in described(options)
    ]
    return inspect.Signature(params)
