"""Every bad option value and every bad field of a file the tool reads is one `error:` line that names it:
the cases of a bad-input run that gave tracebacks or silently ran (NaN, negative counts, truthy strings in
classifier files, rules that can never or always fire, devices this build cannot run)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, run_cli
from test_user_errors import assert_user_error

LAYER = SAE_LAYERS[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir):
    d = tmp_path_factory.mktemp("bad")
    rows = [{"text": t, "prompt": t, "label": "toxic" if any(w in t for w in TOXIC_WORDS) else "clean", "lang": "en",
             "split": "discovery" if i % 3 else "test"} for i, t in enumerate(CORPUS * 4)]
    data = d / "labelled.parquet"
    pl.DataFrame(rows).write_parquet(data)
    m = ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", LAYER, "--dtype", "float32"]
    clf = d / "clf.json"
    run_cli(["discover", data, "-o", clf, *m, "--max-features", 3])
    targets = d / "targets.json"
    run_cli(["synth", "targets", data, "-o", targets, "--min-delta", "0.05", "--min-precision", "0", "--fdr", "1",
             "--judge-classifier", "none", *m])
    return {"data": data, "clf": clf, "targets": targets, "model": m, "dir": d}


def _cases(f, tmp):
    data, m, o = f["data"], f["model"], tmp / "out.parquet"
    train = ["sae", "train", "--model", m[1], "--layer", LAYER, "--corpus", data, "--width", 16, "--k", 2,
             "--max-tokens", 100, "-o", tmp / "sae"]
    synth = ["synthesize", "--targets", f["targets"], "--seed-data", data, "-o", tmp / "s.jsonl", "--dtype", "float32"]
    return {
        "discover --seed -1": (["discover", data, "-o", tmp / "c.json", *m, "--seed", -1], "--seed"),
        "discover --threshold -1": (["discover", data, "-o", tmp / "c.json", *m, "--threshold", -1], "--threshold"),
        "discover --target-fpr nan": (["discover", data, "-o", tmp / "c.json", *m, "--target-fpr", "nan"], "--target-fpr"),
        "eval --fractions nan": (["eval", data, "-o", tmp / "r", *m, "--fractions", "nan"], "--fractions"),
        "eval --seeds -1": (["eval", data, "-o", tmp / "r", *m, "--seeds", "-1"], "--seeds"),
        "sae train --epochs nan": ([*train, "--epochs", "nan"], "--epochs"),
        "sae train --lr nan": ([*train, "--lr", "nan"], "--lr"),
        "sae train --lr -1": ([*train, "--lr", -1], "--lr"),
        "sae train --max-tokens -5": ([*train[:-4], "--max-tokens", -5, "-o", tmp / "sae"], "--max-tokens"),
        "sae train --auxk-alpha nan": ([*train, "--auxk-alpha", "nan"], "--auxk-alpha"),
        "synth targets --min-delta nan": (["synth", "targets", data, "-o", tmp / "t.json", *m, "--min-delta", "nan"],
                                          "--min-delta"),
        "synth targets --examples -1": (["synth", "targets", data, "-o", tmp / "t.json", *m, "--examples", -1], "--examples"),
        "synthesize --prompt-tokens 0": ([*synth, "--prompt-tokens", 0], "--prompt-tokens"),
        "synthesize --temperature -1": ([*synth, "--temperature", -1], "--temperature"),
        "synthesize --temperature nan": ([*synth, "--temperature", "nan"], "--temperature"),
        "steer --temperature nan": (["steer", data, "--text-column", "prompt", "-o", o, "--feature", "3:1", *m,
                                     "--temperature", "nan"], "--temperature"),
        "steer --temperature -1": (["steer", data, "--text-column", "prompt", "-o", o, "--feature", "3:1", *m,
                                    "--temperature", -1], "--temperature"),
        "explain --limit -1": (["explain", f["clf"], "--input", data, "--limit", -1], "--limit"),
        "explain --limit 0": (["explain", f["clf"], "--input", data, "--limit", 0], "--limit"),
        "features --chunk-rows 1e12": (["features", data, "-o", o, *m, "--chunk-rows", 10**12], "--chunk-rows"),
        "features --batch-size 0": (["features", data, "-o", o, *m, "--batch-size", 0], "--batch-size"),
        "features --device meta": (["features", data, "-o", o, *m, "--device", "meta"], "meta"),
        "features --device mps": (["features", data, "-o", o, *m, "--device", "mps"], "mps"),
        # a fresh bad-input run (scripts/bad_input_run.py): each ran, or named another option, before its fix
        "eval --methods bogus": (["eval", data, "-o", tmp / "r", *m, "--methods", "or_rule,bogus"], "--methods"),
        "synthesize --gen-batch-size 0": ([*synth, "--gen-batch-size", 0], "--gen-batch-size"),
        "steer --feature x:1": (["steer", data, "--text-column", "prompt", "-o", o, "--feature", "x:1", *m], "--feature"),
        "steer --clamp x": (["steer", data, "--text-column", "prompt", "-o", o, "--clamp", "x", *m], "--clamp"),
    }


# the case names, for parametrize (the arguments need the fixture's files, so they are built in the test)
CASES = list(_cases({"data": "", "clf": "", "targets": "", "model": [""] * 6}, Path("/")))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_option_value_is_one_line_naming_it(case, files, tmp_path):
    args, word = _cases(files, tmp_path)[case]
    if case.endswith("--device mps"):
        import torch

        if torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
    res = run_cli(args, ok=False)
    assert_user_error(res, word)
    assert not (tmp_path / "out.parquet").exists()


def _edited(clf_path, tmp_path, edit) -> str:
    d = json.loads(clf_path.read_text())
    edit(d)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d))
    return str(p)


FILE_CASES = {
    "extraction.max_length 'abc'": (lambda d: d["extraction"].update(max_length="abc"), "extraction.max_length"),
    "extraction.skip_first_token 'false'": (lambda d: d["extraction"].update(skip_first_token="false"),
                                            "skip_first_token"),
    "discovery_data a string": (lambda d: d.update(discovery_data="lots of rows"), "discovery_data"),
    "validation.languages 'en'": (lambda d: d.update(validation={"languages": "en"}), "validation.languages"),
    "an OR-rule with no features": (lambda d: d["rule"].update(features=[], k=0), "no features"),
    "sae.k 0": (lambda d: d["sae"].update(k=0), "sae.k"),
    # a fresh bad-input run: these ran with exit 0 before their checks
    "sae.d_sae 999 (the SAE has 256)": (lambda d: d["sae"].update(d_sae=999), "sae.d_sae"),
    "sae.d_sae 'big'": (lambda d: d["sae"].update(d_sae="big"), "sae.d_sae"),
    "discovery_data.per_lang a string": (lambda d: d["discovery_data"].update(per_lang="en"), "discovery_data.per_lang"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_a_bad_classifier_field_is_one_line_naming_it(case, files, tmp_path):
    edit, word = FILE_CASES[case]
    path = _edited(files["clf"], tmp_path, edit)
    res = run_cli(["classify", files["data"], "-o", tmp_path / "o.parquet", "-c", path, "--dtype", "float32"], ok=False)
    assert_user_error(res, word)
    assert not (tmp_path / "o.parquet").exists()


def test_a_sparse_linear_rule_with_no_features_is_refused(files, tmp_path):
    """It would score every text with its intercept: flag all (intercept > 0) or none."""
    import numpy as np
    import scipy.sparse as sp

    from safetyscope.discovery.rules import SparseLinearClassifier, classifier_from_dict
    from safetyscope.errors import SafetyScopeError

    X = sp.csr_matrix(np.random.default_rng(0).random((40, 6)))
    y = np.r_[np.ones(20), np.zeros(20)].astype(int)
    d = SparseLinearClassifier(C=1.0).fit(X, y).to_dict()
    d.update(features=[], k=0, intercept=1.0)
    with pytest.raises(SafetyScopeError, match="no features"):
        classifier_from_dict(d)


def test_tables_are_read_robustly(files, tmp_path):
    """BOM-marked JSON Lines are read; an id column that turns to text after 100 rows keeps every row (the schema
    is inferred over the whole file); an unbalanced quote is named as such; an unknown output format is named."""
    clf = files["clf"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "you are an idiot"}\n{"text": "nice day today"}\n')
    run_cli(["classify", bom, "-o", tmp_path / "bom.parquet", "-c", clf, "--dtype", "float32"])
    assert pl.read_parquet(tmp_path / "bom.parquet").height == 2
    for suffix in ("jsonl", "csv"):
        rows = pl.DataFrame({"id": [str(i) for i in range(110)] + ["x110"], "text": [f"text number {i}" for i in range(111)]})
        p = tmp_path / f"ids.{suffix}"
        rows.write_ndjson(p) if suffix == "jsonl" else rows.write_csv(p)
        if suffix == "jsonl":  # numbers, then a string: what a hand-made file looks like
            p.write_text("".join(f'{{"id": {i}, "text": "text number {i}"}}\n' for i in range(110))
                         + '{"id": "x110", "text": "text number 110"}\n')
        out = tmp_path / f"ids_{suffix}.parquet"
        run_cli(["classify", p, "-o", out, "-c", clf, "--dtype", "float32", "--chunk-rows", 50])
        got = pl.read_parquet(out)
        assert got.height == 111 and got["id"].cast(pl.String).to_list()[-1] == "x110"
    quote = tmp_path / "quote.csv"
    quote.write_text('id,text\n1,"hello there\n2,a fine text\n3,another\n')
    assert_user_error(run_cli(["classify", quote, "-o", tmp_path / "q.parquet", "-c", clf], ok=False), "quote")
    assert_user_error(run_cli(["classify", bom, "-o", tmp_path / "out.txt", "-c", clf], ok=False),
                      "unknown output format '.txt'")


def test_float16_is_named_as_the_difference(files, tmp_path):
    res = run_cli(["classify", files["data"], "-o", tmp_path / "o.parquet", "-c", files["clf"], "--dtype", "float16"],
                  ok=False)
    assert_user_error(res, "float16", "--dtype")


@pytest.mark.parametrize("bad", [-1, 99999, "nan", 1.5, None])
def test_a_bad_target_id_is_one_line(files, tmp_path, bad):
    d = json.loads(files["targets"].read_text())
    d["targets"][0]["id"] = float("nan") if bad == "nan" else bad
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    res = run_cli(["coverage", files["data"], "--targets", p, "--text-column", "prompt"], ok=False)
    assert_user_error(res, "targets[0].id")
    res = run_cli(["synthesize", "--targets", p, "--seed-data", files["data"], "-o", tmp_path / "s.jsonl"], ok=False)
    assert_user_error(res, "targets[0].id")


@pytest.mark.parametrize("field,value,word", [("label", "neutral", "targets[0].label"),
                                              ("label", None, "targets[0].label"),
                                              ("sae.d_sae", "big", "sae.d_sae")])
def test_a_bad_targets_field_is_one_line(files, tmp_path, field, value, word):
    """coverage ran on both (a target's label is read by synthesize; the SAE's width by every check of an id)."""
    d = json.loads(files["targets"].read_text())
    if field == "label":
        d["targets"][0]["label"] = value
    else:
        d["sae"]["d_sae"] = value
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    assert_user_error(run_cli(["coverage", files["data"], "--targets", p, "--text-column", "prompt"], ok=False), word)


@pytest.mark.parametrize("fmt", ["other", "safetyscope-classifier"])
def test_an_sae_config_of_another_format_is_refused(files, tmp_path, fmt):
    from safetyscope.sae import load_sae

    d = tmp_path / "sae"
    load_sae(files["model"][3], layer=LAYER).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["format"] = fmt
    (d / "config.json").write_text(json.dumps(cfg))
    res = run_cli(["features", files["data"], "-o", tmp_path / "o.parquet", "--model", files["model"][1], "--sae", d,
                   "--dtype", "float32", "--no-cache", "--text-column", "prompt"], ok=False)
    assert_user_error(res, "format", fmt)
    del cfg["format"]  # written before the key existed: still read
    (d / "config.json").write_text(json.dumps(cfg))
    run_cli(["features", files["data"], "-o", tmp_path / "o.parquet", "--model", files["model"][1], "--sae", d,
             "--dtype", "float32", "--no-cache", "--text-column", "prompt"])


def test_broken_model_directories_are_one_line(files, tiny_model_dir, tmp_path):
    """An unknown model_type, and a pickled checkpoint (its payload must never run: torch's safe loader refuses)."""
    import shutil

    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_model_dir, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (unknown / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.parquet"
    res = run_cli(["features", files["data"], "-o", out, "--model", unknown, "--sae", files["model"][3],
                   "--layer", LAYER, "--dtype", "float32"], ok=False)
    assert_user_error(res, "cannot load model")

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    res = run_cli(["features", files["data"], "-o", out, "--model", pickled, "--sae", files["model"][3],
                   "--layer", LAYER, "--dtype", "float32"], ok=False)
    assert_user_error(res, "cannot load model")
    assert not marker.exists() and not out.exists()


def test_a_missing_text_column_suggests_text_column(files, tmp_path):
    p = tmp_path / "comments.csv"
    pl.DataFrame({"comment": ["hello there", "you idiot"]}).write_csv(p)
    res = run_cli(["classify", p, "-o", tmp_path / "o.parquet", "-c", files["clf"]], ok=False)
    assert_user_error(res, "missing column(s) ['text']", "--text-column")
    assert "%|" not in res.output  # no progress bar before the error


def test_polars_full_disk_error_becomes_the_full_disk_line(tmp_path, monkeypatch):
    """polars reports ENOSPC as a ComputeError; the part writer turns it back into the OSError the one-line
    full-disk message (and the resume hint) is made from."""
    import errno

    from safetyscope import streaming

    def full(path):
        raise pl.exceptions.ComputeError("failed to write: No space left on device (os error 28)")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", lambda self, p, *a, **k: full(p))
    with pytest.raises(OSError) as e:
        streaming.fsync_write_parquet(pl.DataFrame({"a": [1]}), tmp_path / "part.parquet")
    assert e.value.errno == errno.ENOSPC


def test_an_sae_of_another_model_is_said(files, tiny_model_dir, tmp_path):
    """Same width, another model's residual stream: the codes would mean nothing. A local directory may carry any
    name, so it is a warning on stderr, not a refusal; the same model under a hub owner or a path is not warned."""
    from safetyscope.sae import load_sae

    sae = load_sae(files["model"][3], layer=LAYER)
    for model, warned in (("Qwen/Qwen3-8B", True), (f"someone/{tiny_model_dir.name}", False)):
        sae.cfg.model = model
        d = tmp_path / f"sae-{warned}"
        sae.save_pretrained(d)
        res = run_cli(["features", files["data"], "-o", tmp_path / f"f{warned}.parquet", "--model", tiny_model_dir,
                       "--sae", d, "--dtype", "float32", "--no-cache"])
        assert ("trained on Qwen/Qwen3-8B" in res.stderr) is warned, res.stderr


@pytest.mark.parametrize("command", ["discover", "synth targets"])
def test_a_label_column_of_lists_is_one_line_naming_it(command, files, tmp_path):
    """The last failure of the fresh bad-input run: the label column was cast to text before any check (a traceback)."""
    rows = pl.read_parquet(files["data"])
    data = tmp_path / "lists.parquet"
    rows.with_columns(label=pl.Series([[1]] * rows.height)).write_parquet(data)
    res = run_cli([*command.split(), data, "-o", tmp_path / "x.json", *files["model"]], ok=False)
    assert_user_error(res, "label column 'label'")
