"""A griffe extension for the API reference: a parameter whose default is a module constant
(``probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE``) is shown with the constant's value
(``= 256``), which is what a reader of the signature needs; the code keeps its named constant.

Only names in upper case that resolve to a module-level attribute whose value is a literal (a number, a
string, True / False / None) or arithmetic on number literals (``2 << 30``, shown as written) are replaced;
anything else keeps its name.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe

__all__ = ["LiteralDefaults"]


_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)


def _constant(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, (bool, int, float, complex, str, bytes))
    return isinstance(node, _ARITHMETIC) and all(_constant(child) for child in ast.iter_child_nodes(node))


def _literal(value: object) -> str | None:
    """The attribute's value as written when it is a literal or arithmetic on number literals, else None."""
    text = str(value) if value is not None else ""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    return text if text and _constant(tree) else None


class LiteralDefaults(griffe.Extension):
    """Replace constant-name defaults by the constants' literal values once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._walk(pkg, loader, set())

    def _walk(self, obj: griffe.Object, loader: griffe.GriffeLoader, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        for member in obj.members.values():
            if member.is_alias:
                continue
            if isinstance(member, griffe.Function):
                self._replace(member, loader)
            elif isinstance(member, (griffe.Module, griffe.Class)):
                self._walk(member, loader, seen)

    @staticmethod
    def _replace(func: griffe.Function, loader: griffe.GriffeLoader) -> None:
        for param in func.parameters:
            default = param.default
            if not isinstance(default, griffe.ExprName) or not default.name.isupper():
                continue
            try:
                target = loader.modules_collection[default.canonical_path]
                if target.is_alias:
                    target = target.final_target
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            if isinstance(target, griffe.Attribute) and (value := _literal(target.value)) is not None:
                param.default = value
