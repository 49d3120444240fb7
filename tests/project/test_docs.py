"""The documentation: the site builds strictly, its complete examples run, every probe has a page, and the
public API documents its parameters.

Code blocks fenced as ```` ```python ```` in ``docs/`` are complete scripts and run here (the README's run
in ``test_readme.py``); fragments are fenced as ```` ```py ````.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import probes

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"```python\n(.*?)```", flags=re.S)
# blocks that train under a framework take a while: still run in CI, as the slow marker says
SLOW_PAGES = {"integrations.md"}


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        for i, code in enumerate(FENCE.findall(page.read_text())):
            out.append((str(page.relative_to(DOCS)), i, code))
    return out


BLOCKS = _blocks()


def _mkdocs_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return module
    return None


@pytest.mark.skipif(
    _mkdocs_missing() is not None,
    reason="mkdocs, mkdocs-material or mkdocstrings not installed (the docs extra: pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    # the API reference is generated from the docstrings: attach's own Args section is on the page
    api = (site / "api" / "probes" / "index.html").read_text()
    assert "probe_data" in api and "probes.attach" in api
    for name in ("relu_zeros", "ntk", "linear_region"):
        page = (site / "probes" / name / "index.html").read_text()
        assert f"{name}/" in page, f"the {name} page lists no tag"
    assert "linear_region/flip_fraction_eps_" in (site / "changelog" / "index.html").read_text()
    # attach's signature shows the probe batch size's value, not the constant's name (docs/_griffe)
    from probes.engine.spec import DEFAULT_PROBE_BATCH_SIZE

    text = re.sub(r"<[^>]+>", "", api)
    assert f"probe_batch_size: int | None = {DEFAULT_PROBE_BATCH_SIZE}" in text
    assert "DEFAULT_PROBE_BATCH_SIZE" not in api
    # every built-in probe class is in the API reference, with its options in the signature
    builtin = re.sub(r"<[^>]+>", "", (site / "api" / "builtin" / "index.html").read_text())
    for info in probes.available():
        if info.source == "builtin":
            assert f"probes.builtin.{info.name}.{info.cls.__name__}" in builtin, info.name
    assert "top_k: int = 5" in builtin and "memory_budget: int | float = 2 &lt;&lt; 30" in builtin
    # formulas are math typeset by the KaTeX copy shipped with the site, referenced relatively (offline)
    for name in ("relu_zeros", "patterns", "pathgram", "alignment", "ntk", "margin", "linear_region", "particles"):
        page = (site / "probes" / name / "index.html").read_text()
        assert page.count('class="arithmatex"') >= 2, f"the {name} page has no math"
        for script in ("js/katex/katex.min.js", "js/katex/contrib/auto-render.min.js", "js/math.js"):
            assert f'<script src="../../{script}"' in page, (name, script)
        assert 'href="../../js/katex/katex.min.css"' in page
    for shipped in ("js/katex/katex.min.js", "js/katex/LICENSE", "js/katex/fonts/KaTeX_Main-Regular.woff2"):
        assert (site / shipped).is_file(), shipped
    assert not (site / "_griffe").exists()  # build code, not part of the site


def test_every_builtin_probe_has_a_page_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    builtin = sorted(info.name for info in probes.available() if info.source == "builtin")
    assert len(builtin) >= 8
    for name in builtin:
        page = DOCS / "probes" / f"{name}.md"
        assert page.is_file(), f"no page for the built-in probe {name}"
        assert f"probes/{name}.md" in nav, f"{name}'s page is not in mkdocs.yml's nav"
        assert f"::: probes.builtin.{name}" in page.read_text(), f"{name}'s page does not render its module"


def test_the_changelog_starts_with_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    released = [v for v in versions if v.lower() != "unreleased"]
    assert released and released[0] == probes.__version__, (released[:1], probes.__version__)


@pytest.mark.parametrize(
    "page, index, code",
    [
        pytest.param(page, i, code, id=f"{page}:{i}", marks=[pytest.mark.slow] if page in SLOW_PAGES else [])
        for page, i, code in BLOCKS
    ],
)
def test_docs_example_runs(page: str, index: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    registered: list[str] = []  # plugins an example registers are unregistered after it, for the tests that follow

    def register(plugin: object, name: str | None = None) -> str:
        registered.append(probes.plugins.registry.register(plugin, name))
        return registered[-1]

    monkeypatch.setattr(probes.plugins, "register", register)
    try:
        # dont_inherit: the example runs as a user's file would, without this module's ``from __future__`` imports
        exec(compile(code, f"docs/{page} block {index}", "exec", dont_inherit=True), {"__name__": "docs_example"})
    finally:
        for name in registered:
            probes.plugins.registry.unregister(name)


# ---------------------------------------------------------------------------------------------------------
# docstring coverage of the public API

PUBLIC = ["probes", "probes.functional", "probes.schedules", "probes.testing", "probes.integrations"]
SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes):\s*$", flags=re.M)
THRESHOLD = 0.95


def _modules() -> list:
    mods = []
    for root in PUBLIC:
        mod = importlib.import_module(root)
        mods.append(mod)
        if root != "probes" and hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, root + "."):
                if any(part.startswith("_") for part in info.name.split(".")):
                    continue
                try:
                    mods.append(importlib.import_module(info.name))
                except ImportError:  # an optional framework (lightning, transformers) that is not installed
                    continue
    return mods


def _parameters(fn, bound: bool) -> list[str]:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []
    return names[1:] if bound and names else names


def _overrides_foreign(cls: type, name: str) -> bool:
    """A method that overrides a framework's hook (``nn.Module.forward``, a Lightning callback hook) or one of
    ``probes.Probe``'s documented methods takes its contract from there."""
    return any(name in vars(base) for base in cls.__mro__[1:])


def public_callables() -> dict[str, tuple[list[str], str]]:
    """``qualified name -> (parameters, docstring)`` of every public function, class and public method."""
    found: dict[str, tuple[list[str], str]] = {}
    for mod in _modules():
        names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            home = getattr(obj, "__module__", "") or ""
            if not home.startswith("probes") or (mod.__name__ != "probes" and home != mod.__name__):
                continue  # imported from elsewhere: counted where it is defined
            key = f"{home}.{obj.__qualname__}"
            if inspect.isfunction(obj):
                found[key] = (_parameters(obj, False), obj.__doc__ or "")
                continue
            init = vars(obj).get("__init__")
            if inspect.isfunction(init):
                found[key] = (_parameters(init, True), (obj.__doc__ or "") + "\n" + (init.__doc__ or ""))
            elif "__dataclass_fields__" in vars(obj):
                found[key] = (_parameters(obj, False), obj.__doc__ or "")
            for attr, member in vars(obj).items():
                if attr.startswith("_") or _overrides_foreign(obj, attr):
                    continue
                static = isinstance(member, staticmethod)
                fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                if inspect.isfunction(fn):
                    found[f"{key}.{attr}"] = (_parameters(fn, not static), fn.__doc__ or "")
    return {k: v for k, v in found.items() if v[0]}


def undocumented() -> tuple[list[str], int]:
    items = public_callables()
    missing = sorted(k for k, (_, doc) in items.items() if not SECTION.search(doc))
    return missing, len(items)


_MISSING, _TOTAL = undocumented()
_FRACTION = 1 - len(_MISSING) / max(_TOTAL, 1)


def test_public_api_documents_its_parameters() -> None:
    assert _TOTAL >= 50, f"only {_TOTAL} public callables found: the walk over the public modules is broken"
    listing = "\n  ".join(_MISSING)
    assert _FRACTION >= THRESHOLD, (
        f"{len(_MISSING)} of {_TOTAL} public callables with parameters have no "
        f"Args: section ({_FRACTION:.1%} documented):\n  {listing}"
    )


def _all_docstrings() -> dict[str, str]:
    docs = {}
    for info in pkgutil.walk_packages(probes.__path__, "probes."):
        if info.name.endswith("__main__"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:
            continue
        docs[info.name] = mod.__doc__ or ""
        for name, obj in vars(mod).items():
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == info.name:
                docs[f"{info.name}.{name}"] = obj.__doc__ or ""
                if inspect.isclass(obj):
                    for attr, member in vars(obj).items():
                        if inspect.isfunction(member):
                            docs[f"{info.name}.{name}.{attr}"] = member.__doc__ or ""
    return docs


# a measured time (decimals: "2.01 s", "340 ms") or speed-up ("26x faster"); a threshold such as "2 s" is an option
TIMING = re.compile(r"\b(\d+\.\d+\s?(s|sec|seconds)|\d+(\.\d+)?\s?ms|\d+(\.\d+)?x (faster|slower))\b")


def test_docstrings_quote_no_timings() -> None:
    """Timings belong to the benchmarks page, not to docstrings, where they go stale."""
    offenders = {name: m.group(0).strip() for name, doc in _all_docstrings().items() if (m := TIMING.search(doc))}
    assert not offenders, offenders
