"""Private torch internals are read in one module, ``probes/_torch.py``; no other module of the package names them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "probes"
COMPAT = PACKAGE / "_torch.py"

#: private attributes of torch objects (FSDP2 state, torch.compile's wrapper, SummaryWriter, convolutions)
PRIVATE_ATTRIBUTES = frozenset(
    {
        "_get_fsdp_state",
        "_fsdp_param_groups",
        "_fsdp_param_group",
        "_orig_mod",
        "_get_file_writer",
        "_reversed_padding_repeated_twice",
    }
)
#: a private torch module named as a string (``sys.modules.get("torch._dynamo")``)
PRIVATE_MODULE = re.compile(r"torch(\.\w+)*\._\w+(\.\w+)*")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _torch_chain(attribute: ast.Attribute) -> list[str] | None:
    """``torch._C._foo`` -> ["torch", "_C", "_foo"]; None when the chain does not start at the name ``torch``."""
    parts = []
    node: ast.expr = attribute
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "torch":
        return ["torch", *reversed(parts)]
    return None


def internals_used(source: str) -> list[tuple[int, str]]:
    """(line, what) for every private torch internal that ``source`` names in code (not in docstrings or messages)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("torch") and "._" in a.name]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            module = node.module or ""
            if "._" in module:
                found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute):
            chain = _torch_chain(node)
            if chain and any(_private(p) for p in chain):
                found.append((node.lineno, ".".join(chain)))
            elif node.attr in PRIVATE_ATTRIBUTES:
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in PRIVATE_ATTRIBUTES - {"_orig_mod"} or PRIVATE_MODULE.fullmatch(node.value):
                found.append((node.lineno, node.value))
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch._C._current_graph_task_id()",
        "from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack",
        "from torch.utils._python_dispatch import _disable_current_modes",
        "from torch.overrides import _get_current_function_mode_stack",
        "import sys\nsys.modules.get('torch._dynamo')",
        "unit._get_fsdp_state()",
        "getattr(state, '_fsdp_param_groups', None)",
        "model._orig_mod",
        "w._get_file_writer()",
        "list(m._reversed_padding_repeated_twice)",
    ],
)
def test_the_scanner_sees_each_kind_of_internal(snippet):
    assert internals_used(snippet)


def test_the_scanner_ignores_public_names_and_prose():
    source = (
        '"""Calls torch._dynamo.reset() when needed."""\n'
        "import torch\n"
        "from torch.nn.modules import module as _hooks\n"
        "torch.compiler.reset()\n"
        "raise RuntimeError('torch._dynamo.config.skip_nnmodule_hook_guards = False was set')\n"
    )
    assert internals_used(source) == []


def test_only_the_compatibility_module_reads_private_torch_internals():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == COMPAT:
            continue
        used = internals_used(path.read_text())
        if used:
            offenders[str(path.relative_to(PACKAGE.parent))] = used
    assert not offenders, f"read these through probes/_torch.py: {offenders}"


def test_the_compatibility_module_is_where_they_are_read():
    names = {what for _, what in internals_used(COMPAT.read_text())}
    assert {"torch._C._current_graph_task_id", "_get_fsdp_state", "_get_file_writer", "torch._dynamo"} <= names
