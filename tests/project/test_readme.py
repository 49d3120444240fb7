"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    if index == 0:
        session = namespace["session"]
        assert session.failures == {}
        assert any((tmp_path / "runs" / "quickstart").iterdir())
    if index == 1:  # a probe of one's own measures at attach, at its cadence, and at close
        steps = [step for step, _ in namespace["session"].memory.scalars()["output_norm/mean"]]
        assert steps == [0, 10, 20]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 150
