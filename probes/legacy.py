"""The old probe contract, adapted to the new one: a probe written against the flags keeps working.

Before ``Needs``, a probe declared what it needs in separate class flags; ``adapt`` (run for every ``Probe``
subclass) builds the class's ``needs`` from them, so the engine reads one declaration only:

=====================================  ==========================================================
old                                    new
=====================================  ==========================================================
``needs_sites = True``, ``site_values``  ``needs = Needs(sites=...)`` (empty ``sites``: no sites)
``site_types``                         ``Needs(site_types=...)``
``needs_probe_data``                   ``Needs(probe_data=...)``
``supports_sharding``, ``sharding``    ``Needs(sharding=...)`` (None: not on a sharded model)
``wants_site(site)``                   ``wants(site)`` (one filter, passive and active)
``setup(context)``, ``validate(batch)``  ``check(batch)``
=====================================  ==========================================================

The old hooks keep being called where a probe defines them (``setup`` before the at-attach pass with a
``probes.Context``, ``validate`` on the at-attach batch). A class that mixes both contracts gets an error at attach
that says what to change (``contract_error``).
"""

from __future__ import annotations

from typing import Any

#: the name of the class attribute that marks the root of the contract (``probes.probe.Probe``); this module never
#: imports ``probes.probe`` (which calls ``adapt`` for each new subclass), so it finds the root through the marker
ROOT_MARK = "_contract_root"

#: the old contract's flags, with the defaults the base class gave them
FLAGS: dict[str, Any] = {
    "needs_sites": False,
    "site_values": frozenset({"pre", "post"}),
    "site_types": (),
    "needs_probe_data": True,
    "supports_sharding": True,
    "sharding": "activations",
}


def _root(cls: type) -> type:
    """``Probe``, the base class that carries the contract's defaults."""
    return next(k for k in cls.__mro__ if ROOT_MARK in k.__dict__)


def _below_root(cls: type) -> list[type]:
    """The classes between ``Probe`` (excluded) and ``cls`` (included)."""
    return [k for k in cls.__mro__ if ROOT_MARK not in k.__dict__ and hasattr(k, ROOT_MARK)]


def _declares(cls: type, name: str) -> bool:
    """Whether a class between ``Probe`` and ``cls`` (included) declares ``name``."""
    return any(name in k.__dict__ for k in _below_root(cls))


def declares_needs(cls: type) -> bool:
    """Whether ``cls`` or a base below ``Probe`` declares ``needs`` itself (not built from its old flags here).

    Args:
        cls: a probe class.
    """
    return any("needs" in k.__dict__ and not k.__dict__.get("_needs_from_flags", False) for k in _below_root(cls))


def old_flags(cls: type) -> list[str]:
    """The old flags that ``cls`` or a base below ``Probe`` declares.

    Args:
        cls: a probe class.
    """
    return [f for f in FLAGS if _declares(cls, f)]


def adapt(cls: type) -> None:
    """Give a class written against the old flags its ``needs`` (see the module docstring); a new-style class
    keeps its own. Mixing both is recorded for ``contract_error``, not raised here (at import).

    Args:
        cls: a new ``Probe`` subclass.
    """
    if declares_needs(cls):
        return
    flag = {f: getattr(cls, f, default) for f, default in FLAGS.items()}
    passive = bool(getattr(cls, "passive", False))
    sites = frozenset(flag["site_values"]) if passive or flag["needs_sites"] else frozenset()
    sharding = flag["sharding"] if flag["supports_sharding"] else None
    # ``cls`` and its root ``Probe``, typed loosely: this module never imports ``probes.probe`` (see ROOT_MARK)
    probe_cls: Any = cls
    root: Any = _root(cls)
    try:
        needs_type = type(root.needs)  # ``probes.probe.Needs``
        probe_cls.needs = needs_type(
            sites=sites,
            site_types=tuple(flag["site_types"]),
            probe_data=bool(flag["needs_probe_data"]),
            sharding=sharding,
        )
        probe_cls._needs_from_flags = True
    except (TypeError, ValueError) as exc:
        probe_cls._contract_problem = f"its old flags do not make a valid Needs ({exc})"


def contract_error(cls: type, name: str) -> TypeError | None:
    """An error saying exactly what to change, for a class that mixes the old and the new contract (else None).

    Args:
        cls: a probe class.
        name: the name it is attached under, for the message.
    """
    problem = getattr(cls, "_contract_problem", None)
    flags = old_flags(cls)
    if problem is None and flags and declares_needs(cls):
        problem = (
            f"it declares needs = Needs(...) and the old flags {flags} as well; keep needs and delete the flags "
            "(needs_sites/site_values -> Needs(sites=...), needs_probe_data -> Needs(probe_data=...), "
            "supports_sharding/sharding -> Needs(sharding=...), site_types -> Needs(site_types=...))"
        )
    if problem is None and declares_needs(cls) and _overrides(cls, "wants_site"):
        problem = "it declares needs = Needs(...) but filters sites with wants_site; rename wants_site to wants"
    if problem is None and _overrides(cls, "check") and (_overrides(cls, "setup") or _overrides(cls, "validate")):
        problem = "it defines check and the old setup/validate as well; move their checks into check(batch)"
    return None if problem is None else TypeError(f"probe {name!r} ({cls.__qualname__}): {problem}")


def _overrides(cls: type, method: str) -> bool:
    return getattr(cls, method) is not getattr(_root(cls), method)


def site_filter(probe: Any) -> Any:
    """``site -> bool``: the probe's ``wants``, or the old ``wants_site`` where an active probe defines it.

    Args:
        probe: a probe.
    """
    if not probe.passive and _overrides(type(probe), "wants_site"):
        return probe.wants_site
    return probe.wants


def uses_setup(probe: Any) -> bool:
    """Whether the probe defines the old ``setup(context)``.

    Args:
        probe: a probe.
    """
    return _overrides(type(probe), "setup")


def uses_validate(probe: Any) -> bool:
    """Whether the probe defines the old ``validate(batch)``.

    Args:
        probe: a probe.
    """
    return _overrides(type(probe), "validate")
