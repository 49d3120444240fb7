"""Install hints name the distribution ``torch-probes``: ``probes`` on PyPI is another project.

The package, the docs, the README, the changelog and the examples are searched for hints such as
``pip install 'probes[transformers]'`` or ``pip install probes``; and the missing-extra ``ImportError`` of each
integration is raised for real, in a subprocess where the framework cannot be imported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: ``probes[extra]`` not preceded by a name character, a dot or a dash (``torch-probes[...]``, ``self.probes[...]``
#: and ``session.probes[name]`` are not install hints), or ``pip install probes`` as a whole word
WRONG = re.compile(r"(?<![\w.\-])probes\[|pip install\s+(?:-\S+\s+)*['\"]?probes(?![\w\-./])")


def searched() -> list[Path]:
    files = [p for p in (ROOT / "probes").rglob("*") if p.suffix in (".py", ".md", ".txt")]
    files += [p for p in (ROOT / "docs").rglob("*.md")]
    files += [p for p in (ROOT / "examples").rglob("*") if p.suffix in (".py", ".md", ".toml")]
    files += [ROOT / name for name in ("README.md", "CHANGELOG.md", "pyproject.toml") if (ROOT / name).is_file()]
    return files


def test_no_install_hint_names_the_probes_distribution() -> None:
    for wrong in (
        "pip install 'probes[transformers]'",
        'pip install "probes[lightning]"',
        "pip install probes",
        "(``pip install probes[transformers]``)",
        "pip install -U probes",
    ):
        assert WRONG.search(wrong), wrong
    for right in (
        "pip install 'torch-probes[transformers]'",
        "pip install torch-probes",
        "self.probes[name]",
        "session.probes['alignment']",
        "pip install probes-extra-thing",
        "pip install ./examples/plugin",
    ):
        assert not WRONG.search(right), right
    files = searched()
    assert len(files) > 20
    bad = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if WRONG.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "install hints must name torch-probes:\n" + "\n".join(bad)


def test_the_missing_extra_errors_say_torch_probes() -> None:
    for module, blocked, extra in [
        ("probes.integrations.transformers", ["transformers"], "transformers"),
        ("probes.integrations.lightning", ["lightning", "pytorch_lightning"], "lightning"),
    ]:
        code = (
            "import sys\n"
            f"for name in {blocked!r}:\n"
            "    sys.modules[name] = None\n"
            "try:\n"
            f"    import {module}\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert f"pip install 'torch-probes[{extra}]'" in out.stdout, (module, out.stdout)
