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
    rows = [{"id": f"r{i}", "text": t, "label": "toxic" if any(w in t for w in TOXIC_WORDS) else "clean", "prompt": t,
             "completion": "I'm sorry, I can't help with that.", "lang": "en", "split": "test" if i % 4 == 0 else "discovery",
             "source": "s", "category": "c"} for i, t in enumerate(CORPUS * 4)]
    p = d / "labelled.csv"
    pl.DataFrame(rows).write_csv(p)
    pl.DataFrame(rows).write_ndjson(p.with_suffix(".jsonl"))  # synthesize writes no CSV: its seed data as JSON Lines
    return p


@pytest.fixture(scope="module")
def classifier(labelled, tiny_model_dir, qwen_scope_sae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "clf.json"
    run_cli(["discover", labelled, "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
             "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3])
    return out


@pytest.fixture(scope="module")
def targets(labelled, tiny_model_dir, qwen_scope_sae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("targets") / "targets.json"
    run_cli(["synth", "targets", labelled, "-o", out, "--label-column", "label", "--min-delta", "0.05",
             "--min-precision", "0", "--fdr", "1", "--judge-classifier", "none", "--model", tiny_model_dir,
             "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32"])
    return out


# what each writing command writes: a table (a file, or a datasets directory), one JSON document (a directory is a
# mistake), the SAE directory, or a report directory (reused: only its own named files are written)
KIND = {"classify": "table", "features": "table", "steer": "table", "synthesize": "table", "synth audit": "table",
        "discover": "document", "synth targets": "document", "coverage": "document", "sae train": "sae",
        "eval": "report", "overlap": "report", "synth compare": "report", "synth sft-eval": "report"}
WRITERS = list(KIND)


def _commands(labelled, classifier, targets, model_args):
    """name -> (args before -o, args after -o, the inputs -o must never be)."""
    m = [str(a) for a in model_args]
    none = ["--judge-classifier", "none"]
    return {
        "classify": (["classify", labelled, "-c", classifier, "--dtype", "float32", "--no-cache"], [], [labelled]),
        "features": (["features", labelled, *m, "--no-cache"], [], [labelled]),
        "discover": (["discover", labelled, *m, "--max-features", 2], [], [labelled]),
        "steer": (["steer", labelled, "--text-column", "prompt", "--feature", "3:1", "--max-new-tokens", 2, *m], [],
                  [labelled]),
        "sae train": (["sae", "train", "--model", m[1], "--layer", SAE_LAYERS[0], "--corpus", labelled, "--width", 16,
                       "--k", 2, "--max-tokens", 200, "--epochs", 1, "--model-dtype", "float32"], [], [labelled]),
        "synthesize": (["synthesize", "--targets", targets, "--seed-data", labelled.with_suffix(".jsonl"), "--dtype",
                        "float32", "--no-audit", "--classifier", "none", *none], [], [labelled.with_suffix(".jsonl")]),
        "synth audit": (["synth", "audit", labelled, "--judge", classifier, "--response-judge", classifier,
                         "--request-form", "none", "--label-column", "none", "--dtype", "float32"], [], [labelled]),
        "synth targets": (["synth", "targets", labelled, "--label-column", "label", "--min-delta", "0.05",
                           "--min-precision", "0", "--fdr", "1", *none, *m], [], [labelled]),
        "coverage": (["coverage", labelled, "--targets", targets, "--dtype", "float32"], [], [labelled, targets]),
        "eval": (["eval", labelled, *m, "--skip", "transfer,efficiency,random_sae", "--methods", "or_rule"], [],
                 [labelled]),
        "overlap": (["overlap", labelled, *m], [], [labelled]),
        "synth compare": (["synth", "compare", labelled, "--no-audit", "--classifier", "none", "--budget", 1,
                           "--judge-classifier", classifier, *m], [],
                          [labelled]),
        "synth sft-eval": (["synth", "sft-eval", "--arms-dir", labelled.parent, "--data", labelled], [],
                           [labelled.parent]),
    }


def _write_mine(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    (path / "config.json").write_text('{"mine": true}')


@pytest.mark.parametrize("name", WRITERS)
def test_an_existing_user_file_is_never_replaced_without_overwrite(name, labelled, classifier, targets, model_args,
                                                                     tmp_path):
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
    mine = tmp_path / ("notes.json" if KIND[name] == "document" else "mydata.jsonl")
    mine.write_text('{"mine": true}')
    res = run_cli([*before, "-o", mine, *after], ok=False)
    _one_line_error(res, "not a directory" if KIND[name] == "report" else "already exists")
    assert mine.read_text() == '{"mine": true}'


@pytest.mark.parametrize("name", WRITERS)
def test_a_user_directory_is_never_written_over(name, labelled, classifier, targets, model_args, tmp_path):
    """Not without --overwrite; with it a table or the SAE directory still is not (safetyscope did not write it),
    a document's output is never a directory, and a report goes into it only with --overwrite."""
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
    mine = tmp_path / "mydir"
    _write_mine(mine)
    kind = KIND[name]
    want = {"table": "already exists", "sae": "already exists", "document": "is a directory",
            "report": "did not write"}[kind]
    _one_line_error(run_cli([*before, "-o", mine, *after], ok=False), want)
    if kind != "report":
        _one_line_error(run_cli([*before, "-o", mine, "--overwrite", *after], ok=False),
                        "is a directory" if kind == "document" else "did not write")
    assert sorted(e.name for e in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "config.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("name", WRITERS)
def test_the_input_is_never_the_output(name, labelled, classifier, targets, model_args):
    before, after, inputs = _commands(labelled, classifier, targets, model_args)[name]
    for inp in inputs:
        size = sorted((p.name, p.stat().st_size) for p in inp.parent.iterdir()) if inp.is_dir() else inp.stat().st_size
        res = run_cli([*before, "-o", inp, "--overwrite", *after], ok=False)
        _one_line_error(res, "input")
        assert (sorted((p.name, p.stat().st_size) for p in inp.parent.iterdir()) if inp.is_dir()
                else inp.stat().st_size) == size


@pytest.mark.parametrize("name", [n for n, k in KIND.items() if k == "table"])
def test_a_classifier_or_targets_file_is_never_replaced_by_a_table(name, labelled, classifier, targets, model_args,
                                                                    tmp_path):
    """`classify -o clf.json --overwrite -c clf.json` replaced the classifier with JSON Lines (.json reads as JSON
    Lines): a safetyscope document is never an output table, --overwrite or not."""
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
    for src in (classifier, targets):  # copies: synthesize refuses its own --targets as an input first
        doc = tmp_path / src.name
        doc.write_bytes(data := src.read_bytes())
        res = run_cli([*before, "-o", doc, "--overwrite", *after], ok=False)
        _one_line_error(res, "not a table")
        assert doc.read_bytes() == data


def test_a_rerun_replaces_only_a_document_of_its_own_kind(labelled, targets, model_args, tmp_path):
    """discover replaces its own classifier file on a rerun, but not a targets file without --overwrite."""
    t = tmp_path / "t.json"
    t.write_bytes(targets.read_bytes())
    _one_line_error(run_cli(["discover", labelled, *model_args, "--max-features", 2, "-o", t], ok=False),
                    "already exists")
    assert t.read_bytes() == targets.read_bytes()


@pytest.mark.parametrize("name", ["classify", "features", "sae train"])
def test_a_file_added_to_a_tool_directory_survives_overwrite(name, labelled, classifier, targets, model_args, tmp_path):
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
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


def _tool_dir_with_a_user_file(out: Path) -> None:
    """What a datasets directory the tool wrote looks like, then a file the user put into it."""
    out.mkdir()
    pl.DataFrame({"prompt": ["a"]}).write_parquet(out / "data-00000.parquet")
    mark(out)
    (out / "my_notes.txt").write_text("keep me")


@pytest.mark.parametrize("name", ["steer", "synthesize", "synth audit", "discover", "synth targets", "coverage"])
def test_a_tool_directory_with_a_user_file_is_not_replaced(name, labelled, classifier, targets, model_args, tmp_path):
    """The commands whose run would take long (generation) or that write one document: the tool directory is made
    as the tool makes it; --overwrite names the user's file (a document's output is never a directory)."""
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
    out = tmp_path / "out_dir"
    _tool_dir_with_a_user_file(out)
    res = run_cli([*before, "-o", out, "--overwrite", *after], ok=False)
    _one_line_error(res, "is a directory" if KIND[name] == "document" else "my_notes.txt")
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "data-00000.parquet").is_file()


@pytest.mark.parametrize("name", ["eval", "overlap"])
def test_a_report_directory_keeps_a_users_file_and_a_users_directory_takes_a_report_only_when_asked(
        name, labelled, classifier, targets, model_args, tmp_path):
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
    out = tmp_path / "report"
    run_cli([*before, "-o", out, *after])
    assert (out / MARKER).is_file()
    written = sorted(e.name for e in out.iterdir())
    (out / "my_notes.txt").write_text("keep me")
    run_cli([*before, "-o", out, *after])  # the tool's own directory: a rerun rewrites its files, nothing else
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert sorted(e.name for e in out.iterdir()) == sorted([*written, "my_notes.txt"])
    mine = tmp_path / "mydir"
    _write_mine(mine)
    run_cli([*before, "-o", mine, "--overwrite", *after])  # asked: the report goes in, the user's files stay
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "config.json").read_text() == '{"mine": true}'
    assert not (mine / MARKER).exists()  # not marked: it stays the user's directory
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli([*before, "-o", empty, *after])  # an empty directory holds nothing to lose


@pytest.mark.parametrize("name", ["synth compare", "synth sft-eval"])
def test_a_marked_report_directory_is_reused_with_the_users_file(name, labelled, classifier, targets, model_args,
                                                                 tmp_path):
    """compare and sft-eval runs take minutes: the output check passes on a report directory the tool made (the
    run then stops on the data, after the check, as it needs other columns) and the user's file stays."""
    before, after, _ = _commands(labelled, classifier, targets, model_args)[name]
    out = tmp_path / "report"
    out.mkdir()
    mark(out)
    (out / "my_notes.txt").write_text("keep me")
    bad = tmp_path / "bad.csv"
    bad.write_text("nothing\n1\n")
    args = [bad if a == labelled else a for a in before]
    res = run_cli([*args, "-o", out, *after], ok=False)
    msg = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert res.exit_code == 2 and len(msg) == 1 and str(out) not in msg[0], res.output
    assert (out / "my_notes.txt").read_text() == "keep me"


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
