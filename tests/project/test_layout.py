"""The floor plan: no import cycle, maths that never imports the engine, a wheel that carries every module,
schedules that measure at exactly the steps they accept."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from torch import nn

import probes
from probes import schedules
from probes.records import Scalar

ROOT = Path(__file__).resolve().parents[2]
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


# ------------------------------------------------------------------------------------------------
# the layers: arrows point down only, checked module by module (no prefix test)
# ------------------------------------------------------------------------------------------------
#: from the bottom up: a module may import its own layer and the layers below it, nothing above
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compat", ("probes._torch",)),  # the one reader of private torch internals: imports nothing of probes
    ("functional", ("probes.functional",)),
    ("autodiff", ("probes.autodiff",)),
    (
        "contract",  # the types every layer above shares; probe.py never imports the engine
        (
            "probes.records",
            "probes.options",
            "probes.schedules",
            "probes.hookspecs",
            "probes.snapshots",
            "probes.probe",
            "probes.sink",
            "probes.legacy",
            "probes.inputs",
            "probes.kernels",
            "probes.data",
        ),
    ),
    ("engine", ("probes.engine",)),
    ("builtin", ("probes.builtin",)),
    ("sinks", ("probes.sinks",)),
    (
        "app",  # what gathers everything: the public face, the plugin registry, the harness, the front ends
        ("probes", "probes.__main__", "probes.plugins", "probes.testing", "probes.app", "probes.integrations"),
    ),
)

#: upward edges allowed for now (none: the engine takes the ``Sink`` contract from ``probes.sink`` and the plugin
#: registry as an argument, ``Catalog``)
KNOWN: set[tuple[str, str]] = set()


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int:
    """The rank of the layer holding ``module``: exact names, or packages followed by a dot (the longest match)."""
    best, rank = -1, None
    for i, (_, names) in enumerate(layers):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    if rank is None:
        raise KeyError(f"{module} is in no layer of tests/project/test_layout.py: place it")
    return rank


def upward_edges(graph: dict[str, set[str]], layers=LAYERS) -> set[tuple[str, str]]:
    """Every import ``a -> b`` with ``b`` in a higher layer than ``a``."""
    return {(a, b) for a, deps in graph.items() for b in deps if layer_of(b, layers) > layer_of(a, layers)}


def test_every_module_is_in_a_layer():
    for name in import_graph():
        layer_of(name)


def test_arrows_point_down_only():
    up = upward_edges(import_graph())
    assert not sorted(up - KNOWN), "upward imports: " + ", ".join(f"{a} -> {b}" for a, b in sorted(up - KNOWN))
    assert not sorted(KNOWN - up), f"KNOWN lists edges that are gone (remove them): {sorted(KNOWN - up)}"


def test_the_layer_check_catches_an_upward_edge():
    graph = {
        "probes.functional.x": {"probes.autodiff.y"},
        "probes.plugins": {"probes.builtin"},
        "probes.builtin": set(),
        "probes.autodiff.y": set(),
        "probes.probe": {"probes.engine"},
        "probes.engine": {"probes.sinks.base"},
        "probes.sinks.base": set(),
    }
    assert upward_edges(graph) == {
        ("probes.functional.x", "probes.autodiff.y"),
        ("probes.probe", "probes.engine"),
        ("probes.engine", "probes.sinks.base"),
    }
    assert layer_of("probes.functional") == layer_of("probes._torch") + 1
    assert layer_of("probes.builtin") == layer_of("probes.builtin.ntk")
    with pytest.raises(KeyError):
        layer_of("probes_other.x")


# ------------------------------------------------------------------------------------------------
# functional/ is pure: no hooks, no collectives, no frames, no files
# ------------------------------------------------------------------------------------------------
HOOK = re.compile(r"^register_\w*hook|^register_module_|_hooks$|^(TorchFunctionMode|TorchDispatchMode)$")
#: frame access beyond ``inspect`` (banned as a module: ``currentframe``, ``stack``, ``getouterframes``, ...)
FRAMES = frozenset({"_getframe", "_current_frames", "f_back", "f_locals", "f_globals", "tb_frame", "settrace"})
FILES = frozenset(
    {"save", "savez", "savez_compressed", "savetxt", "tofile", "load", "loadtxt", "fromfile", "memmap"}
    | {"write_text", "write_bytes", "read_text", "read_bytes", "open", "touch", "mkdir", "makedirs", "unlink"}
    | {"remove", "rmdir", "rename", "symlink_to", "NamedTemporaryFile", "TemporaryDirectory", "mkstemp"}
)
#: names that mean file I/O only on these objects (``list.remove``, ``str.replace`` are fine elsewhere)
FILE_OWNERS = frozenset({"np", "numpy", "torch", "os", "shutil", "io", "tempfile", "Path", "pathlib", "path"})
BANNED_MODULES = ("torch.distributed", "inspect", "io", "shutil", "tempfile", "pickle", "importlib", "ctypes")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return ""


def _attribute_impurity(name: str, owner: str) -> str | None:
    if HOOK.search(name):
        return f"hook ({name})"
    root = owner.split(".")[0].rstrip("()")
    if name in FRAMES or root == "inspect":
        return f"frames ({owner}.{name})"
    if name == "distributed":
        return "torch.distributed"
    if name in FILES and (root in FILE_OWNERS or owner.endswith(("Path()", "path()"))):
        return f"files ({owner}.{name})"
    return None


def impurities(source: str) -> list[str]:
    """What in ``source`` registers a hook, touches ``torch.distributed``, reads call frames or does file I/O."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith(BANNED_MODULES)]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            found += [f"from {mod} import {n}" for n in names if n.startswith(BANNED_MODULES)]
            found += [f"from {mod} import {a.name}" for a in node.names if _attribute_impurity(a.name, mod)]
        elif isinstance(node, ast.Attribute):
            why = _attribute_impurity(node.attr, _dotted(node.value))
            found += [why] if why else []
        elif isinstance(node, ast.Name) and (node.id in ("open", "exec", "eval", "__import__") or HOOK.search(node.id)):
            found.append(f"{node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.startswith(BANNED_MODULES) or (text.isidentifier() and _attribute_impurity(text, "torch")):
                found.append(f"the string {text!r} (getattr or an import by name)")
    return found


def test_nothing_under_functional_registers_hooks_runs_collectives_reads_frames_or_opens_files():
    files = sorted((PACKAGE / "functional").rglob("*.py"))
    assert len(files) > 10
    bad = {str(p.relative_to(ROOT)): impurities(p.read_text()) for p in files}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize(
    "snippet",
    [
        "m.register_forward_hook(f)",
        "m.register_forward_pre_hook(f)",
        "t.register_hook(f)",
        "torch.nn.modules.module.register_module_forward_hook(f)",
        "from torch.nn.modules.module import register_module_forward_pre_hook",
        "m._forward_hooks[0] = f",
        "getattr(m, 'register_full_backward_hook')(f)",
        "from torch.overrides import TorchFunctionMode",
        "import torch.distributed",
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import all_reduce",
        "torch.distributed.all_reduce(t)",
        "d = torch.distributed",
        "getattr(torch, 'distributed')",
        "importlib.import_module('torch.distributed')",
        "sys._getframe(1)",
        "from sys import _getframe",
        "inspect.currentframe()",
        "import inspect",
        "frame.f_back",
        "open('x', 'wb')",
        "np.save('x.npy', a)",
        "np.savez_compressed(f, **arrays)",
        "numpy.savetxt('x', a)",
        "torch.save(t, 'x.pt')",
        "np.load('x.npz')",
        "Path(p).write_text('x')",
        "Path(p).open('w')",
        "path.write_bytes(b)",
        "os.makedirs(d)",
        "os.replace(a, b) or os.remove(a)",
        "from numpy import savez",
        "exec('import os')",
    ],
)
def test_the_purity_check_catches(snippet):
    assert impurities(snippet), snippet


def test_the_purity_check_passes_plain_maths():
    clean = (
        "import torch\nimport numpy as np\nfrom torch import nn\n"
        "def f(x, xs, s):\n    y = torch.linalg.eigh(x @ x.T)\n    xs.remove(1)\n"
        "    s = s.replace('a', 'b')\n    return np.unique(y[0].numpy()), nn.Linear(2, 2)\n"
    )
    assert impurities(clean) == []


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


#: the folders of ``tests/`` besides the package's own subpackages: runs across processes and devices, and the
#: checks of the repository itself (docs, layout, release, benchmarks, examples); ``helpers`` is shared code
TEST_FOLDERS_BEYOND_THE_PACKAGE = {"distributed", "project", "helpers"}


def test_the_tests_mirror_the_package():
    """``tests/`` mirrors ``probes/``: no test module directly in ``tests/``, each folder one of the package's
    subpackages (or the few above), one level deep, and every test module's basename unique (pytest's default
    import mode, no ``__init__.py`` in the test folders)."""
    tests = ROOT / "tests"
    assert not sorted(p.name for p in tests.glob("test_*.py")), "a test module directly in tests/: place it"
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders <= subpackages | TEST_FOLDERS_BEYOND_THE_PACKAGE, folders - subpackages
    modules = sorted(tests.rglob("test_*.py"))
    assert all(p.parent.parent == tests for p in modules), [str(p) for p in modules if p.parent.parent != tests]
    names = [p.name for p in modules]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    inits = {str(p.relative_to(tests)) for p in tests.rglob("__init__.py")} - {"helpers/__init__.py"}
    assert not inits, inits
