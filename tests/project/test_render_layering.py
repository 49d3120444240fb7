"""Probes return picture data and draw nothing: ``probes/builtin`` imports neither matplotlib nor ``probes.app``,
and ``probes/sinks`` imports ``probes.app`` only where a picture is drawn, never when the sink module loads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "probes"


def _imports(path: Path, module_level_only: bool) -> list[str]:
    """The modules ``path`` imports (every import, or only those run when the module loads)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _under(names: list[str], prefix: str) -> list[str]:
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


@pytest.mark.parametrize("path", sorted((PACKAGE / "builtin").glob("*.py")), ids=lambda p: p.name)
def test_builtin_probes_import_no_matplotlib_and_no_app(path):
    names = _imports(path, module_level_only=False)
    assert not _under(names, "matplotlib") and not _under(names, "probes.app"), path


@pytest.mark.parametrize("path", sorted((PACKAGE / "sinks").glob("*.py")), ids=lambda p: p.name)
def test_sinks_import_no_app_when_they_load(path):
    names = _imports(path, module_level_only=True)
    assert not _under(names, "probes.app") and not _under(names, "matplotlib"), path


def test_the_figures_package_is_gone():
    assert not (PACKAGE / "figures").exists()


def test_the_renderer_exports_no_private_name():
    import probes.app.render as render

    assert render.__all__ and not [n for n in render.__all__ if n.startswith("_")]
    assert not [n for n in vars(render) if n.startswith("_") and not n.startswith("__")]
