"""One output policy for every command that writes: a user's file or directory is never replaced unless the user
said so for that path (--overwrite), a directory the tool wrote never loses a file a user added to it, and the
output is never the input. Each writing command, each case, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, run_cli

from safetyscope.errors import SafetyScopeError
from safetyscope.outputs import MARKER, check_output, foreign_entries, mark


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln[ln.index("error: "):] for ln in res.output.splitlines() if "error: " in ln]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("policy")
    rows = [{"text": t, "label": "toxic" if any(w in t for w in TOXIC_WORDS) else "clean", "prompt": t} for t in CORPUS * 4]
    p = d / "labelled.csv"
    pl.DataFrame(rows).write_csv(p)
    return p


@pytest.fixture(scope="module")
def classifier(labelled, tiny_model_dir, qwen_scope_sae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "clf.json"
    run_cli(["discover", labelled, "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
             "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3])
    return out


def _commands(labelled, classifier, model_args):
    """name -> (args before -o, whether OUTPUT is a directory of the tool, args after -o)."""
    m = [str(a) for a in model_args]
    return {
        "classify": (["classify", labelled, "-c", classifier, "--dtype", "float32", "--no-cache"], []),
        "features": (["features", labelled, *m, "--no-cache"], []),
        "discover": (["discover", labelled, *m, "--max-features", 2], []),
        "steer": (["steer", labelled, "--text-column", "prompt", "--feature", "3:1", "--max-new-tokens", 2, *m], []),
        "sae train": (["sae", "train", "--model", m[1], "--layer", SAE_LAYERS[0], "--corpus", labelled, "--width", 16,
                       "--k", 2, "--max-tokens", 200, "--epochs", 1, "--model-dtype", "float32"], []),
    }


WRITERS = ["classify", "features", "discover", "steer", "sae train"]


@pytest.mark.parametrize("name", WRITERS)
def test_an_existing_user_file_is_never_replaced_without_overwrite(name, labelled, classifier, model_args, tmp_path):
    before, after = _commands(labelled, classifier, model_args)[name]
    mine = tmp_path / ("notes.json" if name == "discover" else "mydata.parquet" if name != "sae train" else "mydir")
    if name == "sae train":
        mine.mkdir()
        (mine / "config.json").write_text('{"mine": true}')
    else:
        mine.write_text('{"mine": true}')
    res = run_cli([*before, "-o", mine, *after], ok=False)
    _one_line_error(res, "already exists")
    if name == "sae train":  # a user's directory: not even with --overwrite
        _one_line_error(run_cli([*before, "-o", mine, "--overwrite", *after], ok=False), "did not write")
    assert (mine / "config.json" if name == "sae train" else mine).read_text() == '{"mine": true}'


@pytest.mark.parametrize("name", WRITERS)
def test_the_input_is_never_the_output(name, labelled, classifier, model_args):
    before, after = _commands(labelled, classifier, model_args)[name]
    size = labelled.stat().st_size
    res = run_cli([*before, "-o", labelled, "--overwrite", *after], ok=False)
    _one_line_error(res, "input")
    assert labelled.stat().st_size == size


@pytest.mark.parametrize("name", ["classify", "features", "sae train"])
def test_a_file_added_to_a_tool_directory_survives_overwrite(name, labelled, classifier, model_args, tmp_path):
    before, after = _commands(labelled, classifier, model_args)[name]
    out = tmp_path / "out_dir"  # no extension: a datasets directory / the SAE directory
    run_cli([*before, "-o", out, *after])
    assert (out / MARKER).is_file()
    (out / "my_notes.txt").write_text("keep me")
    res = run_cli([*before, "-o", out, "--overwrite", *after], ok=False)
    _one_line_error(res, "my_notes.txt", "did not write")
    assert (out / "my_notes.txt").read_text() == "keep me"
    (out / "my_notes.txt").unlink()  # without it, the tool's own directory is replaced as before
    run_cli([*before, "-o", out, "--overwrite", *after])
    assert (out / MARKER).is_file()


def test_a_rerun_replaces_the_tools_own_json_but_not_a_users(labelled, model_args, tmp_path):
    out = tmp_path / "clf.json"
    args = ["discover", labelled, *model_args, "--max-features", 2, "-o", out]
    run_cli(args)
    first = json.loads(out.read_text())
    run_cli(args)  # the tool's own classifier file: a rerun replaces it without --overwrite
    assert json.loads(out.read_text())["format"] == first["format"]
    out.write_text('{"format": "my-notes"}')
    _one_line_error(run_cli(args, ok=False), "already exists")
    run_cli([*args, "--overwrite"])
    assert json.loads(out.read_text())["format"] == first["format"]


def test_the_marker_lists_what_the_tool_wrote(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.parquet").write_text("x")
    mark(d)
    assert foreign_entries(d) == []
    (d / "b.txt").write_text("y")
    assert foreign_entries(d) == ["b.txt"]
    with pytest.raises(SafetyScopeError, match="b.txt"):
        check_output(d, overwrite=True)
    (d / MARKER).write_text("written by safetyscope; --overwrite may replace this directory\n")  # an old marker
    assert foreign_entries(d) == ["a.parquet", "b.txt"]  # no list: nothing in it can be shown to be ours
