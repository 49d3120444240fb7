"""The floor plan: no import cycle, maths that never imports the engine, a wheel that carries every module,
schedules that measure at exactly the steps they accept."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from torch import nn

import probes
from probes import schedules
from probes.records import Scalar

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "probes"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_functional_maths_never_imports_the_engine():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("probes.functional"):
            outside = {d for d in deps if not d.startswith("probes.functional")}
            assert not outside, f"{name} imports {outside}"


def test_arrows_point_down_app_builtin_engine():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("probes.builtin"):
            assert not {d for d in deps if d.startswith(("probes.app", "probes.integrations"))}, name
        if not name.startswith(("probes.app", "probes.builtin", "probes.integrations")) and name not in (
            "probes",
            "probes.__main__",
        ):
            up = {d for d in deps if d.startswith(("probes.app", "probes.builtin."))}
            assert not up, f"engine module {name} imports {up}"


@pytest.mark.slow
def test_a_wheel_built_from_the_repository_carries_every_module(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("torch_probes-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")} | {"probes/_data/digits.npz"}
    assert expected <= names, sorted(expected - names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import probes, probes.autodiff.ntk, probes.integrations.lightning, probes.app.cli, probes.testing;"
        "print(probes.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert str(target) in out.stdout


def test_old_import_paths_keep_working():
    from probes.kernels import cka, empirical_ntk, spectrum

    assert callable(cka) and callable(empirical_ntk) and callable(spectrum)


class Ticks(probes.Probe):
    name = "ticks"
    needs_probe_data = False

    def __init__(self) -> None:
        self.steps: list[int] = []

    def measure(self, batch):
        self.steps.append(batch.step)
        return [Scalar("ticks/step", float(batch.step))]


@pytest.mark.parametrize(
    "schedule", [schedules.every(4), schedules.log(3), schedules.at([2, 3, 17, 40]), lambda s: s % 7 == 1]
)
def test_a_schedule_measures_at_exactly_the_steps_it_accepts(schedule):
    s = probes.attach(nn.Linear(2, 2), {Ticks: {"every": schedule}})
    probe2 = s.probes["ticks"]
    s.step(30)
    s.close()
    accepted = [k for k in range(1, 31) if schedule(k)]
    last = [] if (accepted and accepted[-1] == 30) else [30]
    assert probe2.steps == [0] + accepted + last  # plus the documented at-attach and at-close points


def test_log_schedule_is_dense_early_and_sparse_late():
    s = schedules.log()
    accepted = [k for k in range(1, 10_001) if s(k)]
    assert accepted[:6] == [1, 2, 3, 4, 6, 10]
    assert len(accepted) <= 21 and accepted[-1] == 10_000


def test_set_step_is_a_pure_jump_both_ways():
    s = probes.attach(nn.Linear(2, 2), {Ticks: {"every": 2}})
    probe = s.probes["ticks"]
    s.set_step(10)
    s.set_step(3)
    s.step()
    s.close()
    assert probe.steps == [0, 4]  # nothing replayed between 0 and 10, nor from 10 back to 3
