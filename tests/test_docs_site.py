"""The docs site (mkdocs.yml, docs/): every CLI command has a page carrying its option-table marker, the Results
pages match the committed report files (`python scripts/docs_results.py`), and `mkdocs build --strict` passes
(skipped where mkdocs is not installed; the `test` extra installs it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_command_has_a_page_with_its_options_marker():
    hooks = _hooks()
    cmds = hooks.commands()
    assert {"classify", "synth audit", "sae train", "steer"} <= set(cmds)  # the walk sees group subcommands
    pages = {p: p.read_text(encoding="utf-8") for p in (DOCS / "commands").glob("*.md")}
    missing = [c for c in cmds if not any(f"<!-- options: {c} -->" in t for t in pages.values())]
    assert missing == [], f"commands without a docs/commands page carrying <!-- options: NAME -->: {missing}"


def test_options_table_comes_from_the_cli():
    table = _hooks().options_table("classify")
    assert "| `-c`, `--classifier` |" in table and "| `--chunk-rows` | integer | `1024` |" in table
    with pytest.raises(KeyError):
        _hooks().options_table("no-such-command")


def test_results_pages_match_the_committed_reports():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_results.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[test]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[test]')")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "commands" / "classify" / "index.html").is_file()


def test_every_option_has_help_text():
    """The option tables of the docs are built from the CLI: an option without help would be an empty row."""
    import click

    from safetyscope.cli import main

    missing = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            missing.extend(f"{' '.join(path)} {p.opts[0]}" for p in cmd.params
                           if isinstance(p, click.Option) and not p.hidden and not p.help)

    walk(main, [])
    assert missing == []
