"""Every ```python block of docs/ runs as written (in order, one namespace per file, like a reader pasting them
into one session); a block that cannot run here (weights this repository does not ship) is marked just above its
fence with ``<!-- docs-test: skip (why) -->``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(?:<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def _files() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("md", _files(), ids=lambda p: p.name)
def test_python_blocks_of_docs_run(md, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    text = md.read_text(encoding="utf-8")
    blocks = list(BLOCK.finditer(text))
    assert len(blocks) == text.count("```python"), f"{md.name}: a python block the pattern does not see"
    ns: dict = {"__name__": "__docs__"}
    ran = []
    for i, m in enumerate(blocks):
        if m["why"]:
            continue
        line = text[: m.start("code")].count("\n") + 1
        exec(compile(m["code"], f"{md.name}:{line}", "exec"), ns)  # noqa: S102 - the docs are this repository's own
        ran.append(m["code"])
    assert ran, f"{md.name}: every python block is skipped"
    if md.name == "api.md":
        assert any("with steer(" in code for code in ran)  # the steering snippet is among those run
