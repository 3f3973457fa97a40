"""The README's Python snippets, run as written (in order, sharing one namespace) on the embedded
model, in a scratch folder holding a copy of specs/: documentation that cannot go stale."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and "apply(EditJob" in blocks[0] and "regs=" in blocks[0]
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert re.search(r"\d+/12 facts changed; wrote checkpoints/facts-memit-", out), out
    result = namespace["result"]
    assert result["changed"] >= 8 and "ES" in result["metrics"]["counterfact"]
    assert (tmp_path / result["diff"]).is_file()
