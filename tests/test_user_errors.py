"""Issue 13: every user mistake or fault ends in one `error: ...` line on stderr and exit code 2, never a
traceback; and results do not depend on how texts are batched."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, run_cli

from safetyscope.cli import main

LAYER = SAE_LAYERS[0]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _model(tiny_model_dir, qwen_scope_sae_dir):
    return ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", LAYER, "--dtype", "float32"]


def assert_user_error(res, *words):
    """Exit code 2, a SystemExit (not an exception escaping), one `error:` line that names the problem."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w.lower() in errors[0].lower(), (w, errors[0])
    return errors[0]


def _labelled(tmp_path, n_per_class: int, name="d.parquet"):
    texts = (CORPUS * 10)[: 2 * n_per_class]
    df = pl.DataFrame({"text": texts, "label": [int(any(w in t for w in TOXIC_WORDS)) for t in texts],
                       "lang": ["en"] * len(texts), "split": (["discovery", "discovery", "test", "test"] * len(texts))[: len(texts)]})
    p = tmp_path / name
    df.write_parquet(p)
    return p


# -- inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,body", [("csv", ""), ("jsonl", ""), ("csv", "text\n")])
def test_empty_table(tmp_path, tiny_model_dir, qwen_scope_sae_dir, suffix, body):
    p = tmp_path / f"empty.{suffix}"
    p.write_text(body)
    res = _run("features", p, "-o", tmp_path / "o.parquet", *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res, str(p))


def test_broken_jsonl_line(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "hello there"}\n{"text": "oops\n{"text": "fine"}\n')
    res = _run("features", p, "-o", tmp_path / "o.parquet", *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res, str(p), "jsonl")


def test_integer_text_column(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    p = tmp_path / "ints.csv"
    p.write_text("text\n1\n2\n3\n")
    res = _run("features", p, "-o", tmp_path / "o.parquet", *_model(tiny_model_dir, qwen_scope_sae_dir))
    msg = assert_user_error(res, "text", "int64", "not text")
    assert "null or empty" not in msg


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir):
    d = tmp_path_factory.mktemp("clf")
    data = _labelled(d, 40)
    res = _run("discover", data, "-o", d / "clf.json", *_model(tiny_model_dir, qwen_scope_sae_dir), "--max-features", 3)
    assert res.exit_code == 0, res.output
    return d / "clf.json"


BAD_TABLES = {  # file name: (content, words the one error line must hold)
    "empty.csv": ("", ["cannot read as csv"]),
    "header-only.csv": ("text,label,lang,split\n", ["no rows"]),
    "empty.jsonl": ("", ["cannot read as jsonl"]),
    "broken.jsonl": ('{"text": "hello there", "label": "toxic", "lang": "en", "split": "test"}\n{"text": "oops\n',
                     ["cannot read as jsonl"]),
    "ints.csv": ("text,label,lang,split\n1,toxic,en,test\n2,clean,en,test\n", ["column 'text' holds Int64, not text"]),
}


@pytest.mark.parametrize("name", BAD_TABLES)
def test_every_command_names_a_bad_input_table(tmp_path, classifier, tiny_model_dir, qwen_scope_sae_dir, name):
    """Each command that reads a table (classify streams it in chunks, the others read it whole) stops with
    one line naming the file and the problem."""
    body, words = BAD_TABLES[name]
    p = tmp_path / name
    p.write_text(body)
    model = _model(tiny_model_dir, qwen_scope_sae_dir)
    for cmd in (["features", p, "-o", tmp_path / "f.parquet", *model],
                ["classify", p, "-o", tmp_path / "c.parquet", "-c", classifier],
                ["explain", classifier, "--input", p],
                ["discover", p, "-o", tmp_path / "d.json", *model],
                ["eval", p, "-o", tmp_path / "rep", *model],
                ["overlap", p, "-o", tmp_path / "ov", *model],
                ["synth", "targets", p, "-o", tmp_path / "t.json", "--text-column", "text", *model]):
        msg = assert_user_error(_run(*cmd), str(p), *words)
        assert "null or empty" not in msg, (cmd[0], msg)
    assert not (tmp_path / "c.parquet.parts").exists()


def test_device_foo(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    p = tmp_path / "in.csv"
    p.write_text("text\nhello there\n")
    res = _run("features", p, "-o", tmp_path / "o.parquet", *_model(tiny_model_dir, qwen_scope_sae_dir), "--device", "foo")
    assert_user_error(res, "device", "foo")


# -- option values -----------------------------------------------------------------------------------
def test_discover_scan_layers_unparsable(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    p = _labelled(tmp_path, 30)
    res = _run("discover", p, "-o", tmp_path / "c.json", "--scan-layers", "1,x", *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res, "--scan-layers", "1,x")


@pytest.mark.parametrize("opt,value", [("--scan-layers", "a,b"), ("--fractions", "1,two"), ("--seeds", "0,x"),
                                       ("--fractions", "0,150"), ("--seeds", "")])
def test_eval_unparsable_lists(tmp_path, tiny_model_dir, qwen_scope_sae_dir, opt, value):
    p = _labelled(tmp_path, 30)
    res = _run("eval", p, "-o", tmp_path / "rep", opt, value, *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res, opt)


def test_overlap_min_count_zero(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    p = tmp_path / "a.csv"
    p.write_text("text\nhello there\n")
    res = _run("overlap", p, "-o", tmp_path / "rep", "--min-count", "0", *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res, "--min-count")


# -- too little data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_discover_on_a_handful_of_rows(tmp_path, tiny_model_dir, qwen_scope_sae_dir, n):
    p = _labelled(tmp_path, n)
    res = _run("discover", p, "-o", tmp_path / "c.json", *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("n", [1, 3])
def test_eval_on_a_handful_of_rows(tmp_path, tiny_model_dir, qwen_scope_sae_dir, n):
    p = _labelled(tmp_path, n)
    res = _run("eval", p, "-o", tmp_path / "rep", "--skip", "transfer,efficiency", *_model(tiny_model_dir, qwen_scope_sae_dir))
    assert_user_error(res)


# -- click usage errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,word", [(["nosuchcommand"], "nosuchcommand"), (["features"], "INPUT"),
                                       (["features", "x.csv", "-o", "y.parquet", "--batch-size", "abc"], "--batch-size"),
                                       (["discover", "x", "-o", "y", "--kind", "bogus"], "--kind"),
                                       (["features", "x.csv", "--no-such-option"], "--no-such-option")])
def test_click_usage_errors_are_one_line(args, word):
    res = _run(*args)
    assert_user_error(res, word)
    assert "Usage:" not in res.output


def test_help_still_works():
    res = _run("-h")
    assert res.exit_code == 0 and "Usage:" in res.output
    res = _run("features", "--help")
    assert res.exit_code == 0 and "--batch-size" in res.output


# -- the feature cache -------------------------------------------------------------------------------
def _features_twice(tmp_path, tiny_model_dir, qwen_scope_sae_dir, spoil):
    """Run `features` once (fills the cache), spoil the cache, run again: same output, one warning line."""
    p = tmp_path / "in.csv"
    pl.DataFrame({"text": CORPUS[:5]}).write_csv(p)
    args = ["features", p, "-o", tmp_path / "o1.parquet", *_model(tiny_model_dir, qwen_scope_sae_dir)]
    assert _run(*args).exit_code == 0
    first = pl.read_parquet(tmp_path / "o1.parquet")
    (db,) = (tmp_path / "cache" / "features").glob("*.sqlite")
    spoil(db)
    args[3] = tmp_path / "o2.parquet"
    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert pl.read_parquet(tmp_path / "o2.parquet").equals(first)
    return res, db


def test_corrupt_feature_cache_is_rebuilt(tmp_path, monkeypatch, tiny_model_dir, qwen_scope_sae_dir):
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))
    res, db = _features_twice(tmp_path, tiny_model_dir, qwen_scope_sae_dir, lambda db: db.write_bytes(os.urandom(4096)))
    warn = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and "corrupt" in warn[0], res.output
    assert db.with_name(db.name + ".corrupt").exists()
    n = sqlite3.connect(db).execute("SELECT count(*) FROM codes").fetchone()[0]
    assert n == 5  # the new cache holds this run's texts


def test_unwritable_feature_cache_runs_without_it(tmp_path, monkeypatch, tiny_model_dir, qwen_scope_sae_dir):
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))

    def make_unwritable(db):  # a directory where the cache file should be: cannot be opened (even as root)
        db.unlink()
        db.mkdir()

    res, _ = _features_twice(tmp_path, tiny_model_dir, qwen_scope_sae_dir, make_unwritable)
    warn = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and "without it" in warn[0], res.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_feature_cache_runs_without_it(tmp_path, monkeypatch, tiny_model_dir, qwen_scope_sae_dir):
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))

    def read_only(db):  # emptied then made read-only: the second run must write and cannot
        sqlite3.connect(db).execute("DELETE FROM codes").connection.commit()
        db.chmod(0o444)

    res, _ = _features_twice(tmp_path, tiny_model_dir, qwen_scope_sae_dir, read_only)
    assert [ln for ln in res.output.splitlines() if ln.startswith("warning: ")], res.output


# -- a classifier over 10^6 features: memory bounded, results right ------------------------------------
def test_million_feature_classifier_memory_is_bounded():
    import tracemalloc

    from safetyscope.discovery.rules import OrRuleClassifier, SparseLinearClassifier

    d, n = 1_000_000, 60
    X = sp.random(n, d, density=2e-5, format="csr", random_state=0, dtype=np.float64)  # ~20 active per row
    X.data *= 2
    feats = np.arange(d, dtype=np.int64)
    rule = OrRuleClassifier()
    rule.features_, rule.thresholds_ = feats, np.full(d, 0.5)
    lin = SparseLinearClassifier()
    lin.features_, lin.weights_, lin.intercept_ = feats, np.where(feats % 2 == 0, 1.0, -1.0), -0.25
    tracemalloc.start()
    score, fired = rule.decision_function(X), rule.fired(X)
    lin_score, lin_fired = lin.decision_function(X), lin.fired(X)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB (a dense block would be {n * d * 8 / 1e9:.1f} GB)"
    for i in range(n):
        row = X.getrow(i)
        vals, ids = row.data, row.indices
        assert score[i] == pytest.approx(max(vals.max(initial=0.0), 0.0) - 0.5)
        assert fired[i] == sorted(ids[vals > 0.5].tolist())
        assert lin_score[i] == pytest.approx(float(np.log1p(vals) @ np.where(ids % 2 == 0, 1.0, -1.0)) - 0.25)
        assert lin_fired[i] == sorted(ids[(vals > 0) & (ids % 2 == 0)].tolist())


# -- batch composition -----------------------------------------------------------------------------------
def test_float32_codes_do_not_depend_on_batching(tiny_backbone, tiny_sae):
    from safetyscope import FeatureExtractor

    texts = CORPUS + ["hello", "the cat sleeps"]
    codes = {bs: FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=bs, cache=False).transform(texts)
             for bs in (1, 7, 32)}
    for bs in (1, 7):
        assert (codes[bs] != codes[32]).nnz == 0 or np.abs((codes[bs] - codes[32]).toarray()).max() < 1e-4
        assert ((codes[bs] > 0) != (codes[32] > 0)).nnz == 0  # the same features fire
    keys = {FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=bs, cache=False).cache_key() for bs in (1, 32)}
    assert len(keys) == 1  # float32: one cache for every batch size


def test_half_precision_cache_is_keyed_by_batch_size(tiny_model_dir, tiny_sae, tiny_backbone):
    tiny_backbone_f32 = tiny_backbone
    from safetyscope import Backbone, FeatureExtractor

    bb = Backbone.from_pretrained(str(tiny_model_dir), dtype="bfloat16")
    keys = [FeatureExtractor(bb, tiny_sae, LAYER, batch_size=bs, cache=False).cache_key() for bs in (1, 7, 32, 32)]
    assert len(set(keys[:3])) == 3 and keys[2] == keys[3]
    by_tokens = [FeatureExtractor(bb, tiny_sae, LAYER, batch_tokens=bt, cache=False).cache_key() for bt in (64, 4096, None)]
    assert len(set(by_tokens)) == 3 and by_tokens[1] == keys[2]  # 4096 is the default
    keys32 = {FeatureExtractor(tiny_backbone_f32, tiny_sae, LAYER, batch_tokens=bt, cache=False).cache_key() for bt in (64, None)}
    assert len(keys32) == 1  # float32: one cache for every batching


# -- features --layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,word", [(["--layer", 1], "--layers and --layer"), (["--engine", "ray"], "--engine local only")])
def test_features_layers_refuses_layer_and_ray(tmp_path, tiny_model_dir, qwen_scope_sae_dir, extra, word):
    inp = tmp_path / "in.csv"
    inp.write_text("text\nhello\n")
    res = run_cli(["features", inp, "-o", tmp_path / "o.parquet", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
                   "--layers", "1,3", *extra], ok=False)
    assert res.exit_code == 2 and res.output.strip().splitlines() == [res.output.strip()] and word in res.output
    assert "Traceback" not in res.output


def test_an_error_inside_a_progress_bar_starts_its_own_line():
    """A user error raised while a bar is drawing (a long fit, a context check) is still one `error:` line, not text
    glued to the end of the bar."""
    import click
    from tqdm.auto import tqdm

    from safetyscope.cli.options import user_errors
    from safetyscope.errors import SafetyScopeError

    @click.command()
    @user_errors
    def work():
        bar = tqdm(total=3, desc="fitting rules")
        bar.update()
        raise SafetyScopeError("too few rows")

    res = CliRunner().invoke(work, [])
    assert_user_error(res, "too few rows")
    assert res.output.rstrip("\n").splitlines()[-1] == "error: too few rows", res.output
