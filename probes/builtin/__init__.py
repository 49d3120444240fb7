"""Built-in probes, one module each. They register through the same hook as third parties."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from probes.plugins import hookimpl
from probes.probe import Probe


def _probe_classes() -> list[type[Probe]]:
    found: list[type[Probe]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Probe) and obj.__module__ == module.__name__ and obj.name:
                found.append(obj)
    return found


@hookimpl
def probes_add_probes() -> list[type[Probe]]:
    return _probe_classes()
