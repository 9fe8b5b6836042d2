"""discover / classify / explain end to end on the tiny Qwen3 model and a Qwen-Scope SAE."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import CORPUS, SAE_LAYERS, run_cli

from safetyscope.discovery import Detector

TOXIC_WORDS = ("stupid", "idiot", "hate", "worthless", "garbage", "shut", "bomb", "awful")


def _labelled(tmp_path, label_style="word"):
    rows = []
    for i, t in enumerate(CORPUS * 4):
        tox = any(w in t for w in TOXIC_WORDS)
        label = ("toxic" if tox else "clean") if label_style == "word" else int(tox)
        rows.append({"id": f"r{i}", "text": t, "label": label, "lang": "en" if i % 2 else "xx"})
    path = tmp_path / "labelled.csv"
    pl.DataFrame(rows).write_csv(path)
    return path


@pytest.fixture
def classifier(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    out = tmp_path / "clf.json"
    run_cli(["discover", _labelled(tmp_path), "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
          "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3])
    return out


def test_discover_writes_a_complete_classifier_file(classifier, tiny_backbone, tiny_sae):
    d = json.loads(classifier.read_text())
    assert d["format"] == "safetyscope-classifier"
    assert d["model"]["fingerprint"] == tiny_backbone.fingerprint()
    assert d["sae"]["fingerprint"] == tiny_sae.fingerprint() and d["sae"]["k"] == 8
    assert d["layer"] == SAE_LAYERS[0]
    assert d["rule"]["kind"] == "or_rule" and d["rule"]["k"] == 3 and d["rule"]["k_selection"] == "fixed"
    f = d["rule"]["features"]
    assert d["settings"]["selection"] == "greedy" and len({x["id"] for x in f}) == 3
    for x in f:
        assert x["delta"] == pytest.approx(x["p_fire_toxic"] - x["p_fire_clean"])
    n_tox = sum(any(w in t for w in TOXIC_WORDS) for t in CORPUS) * 4
    data = d["discovery_data"]
    assert data["toxic"] == n_tox and data["clean"] == len(CORPUS) * 4 - n_tox
    assert set(data["per_lang"]) == {"en", "xx"} and len(data["sha256"]) == 64
    assert "text" not in json.dumps(d["rule"])  # statistics only, no data


def test_discover_with_delta_selection_keeps_the_top_features_by_delta(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    out = tmp_path / "delta.json"
    run_cli(["discover", _labelled(tmp_path), "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
          "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3, "--selection", "delta",
          "--fpr-cap", "none"])
    d = json.loads(out.read_text())
    f = d["rule"]["features"]
    assert d["settings"]["selection"] == "delta" and d["rule"]["params"]["fpr_cap"] is None
    assert [x["delta"] for x in f] == sorted((x["delta"] for x in f), reverse=True)
    assert all(x["threshold"] == 0.0 for x in f)
    bad = run_cli(["discover", _labelled(tmp_path), "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
                "--layer", SAE_LAYERS[0], "--fpr-cap", "lots"], ok=False)
    assert bad.exit_code == 2 and "--fpr-cap" in bad.output and "Traceback" not in bad.output


def test_layer_scan_keeps_the_best_layer_and_scores_the_multi_layer_variant(tmp_path, tiny_model_dir,
                                                                           qwen_scope_sae_dir, tiny_backbone):
    import numpy as np

    from safetyscope.discovery.rules import rank_features
    from safetyscope.features import FeatureExtractor
    from safetyscope.sae import load_sae

    out = tmp_path / "scan.json"
    res = run_cli(["discover", _labelled(tmp_path), "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
                "--scan-layers", ",".join(map(str, SAE_LAYERS)), "--dtype", "float32", "--no-cache"])
    d = json.loads(out.read_text())
    scan = d["layer_scan"]
    # recompute each layer's best single-feature delta directly
    texts = [t for t in CORPUS * 4]
    y = np.array([int(any(w in t for w in TOXIC_WORDS)) for t in texts])
    best = {}
    for layer in SAE_LAYERS:
        fx = FeatureExtractor(tiny_backbone, load_sae(str(qwen_scope_sae_dir), layer=layer), layer, cache=False)
        order, delta, _, _ = rank_features(fx.transform(texts, progress=False), y)
        best[layer] = float(delta[order[0]])
        assert scan["layers"][str(layer)]["best_feature"] == int(order[0])
        assert scan["layers"][str(layer)]["best_delta"] == pytest.approx(best[layer])
    assert d["layer"] == scan["chosen"] == max(best, key=lambda la: (best[la], -la))
    multi = scan["multi_layer"]
    assert [m["m"] for m in multi] == list(range(1, len(SAE_LAYERS) + 1))
    assert [f[0] for f in multi[-1]["features"]] == sorted(best, key=lambda la: (-best[la], la))
    assert all(0 <= m["holdout_f1"] <= 1 for m in multi)
    assert "multi-layer variant" in res.output


def test_lang_filter_and_numeric_labels(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    out = tmp_path / "en.json"
    run_cli(["discover", _labelled(tmp_path, "int"), "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
          "--layer", SAE_LAYERS[0], "--lang", "en", "--kind", "sparse_linear", "--max-features", 5])
    d = json.loads(out.read_text())
    assert set(d["discovery_data"]["per_lang"]) == {"en"} and d["discovery_data"]["rows"] == len(CORPUS) * 2
    assert d["rule"]["kind"] == "sparse_linear" and 1 <= d["rule"]["k"] <= 5


def test_classifier_round_trip_gives_the_same_predictions(classifier, tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    det = Detector.load(classifier, dtype="float32")
    toxic, score, fired = det.predict(CORPUS)
    det.save(tmp_path / "again.json")
    det2 = Detector.load(tmp_path / "again.json", dtype="float32")
    toxic2, score2, fired2 = det2.predict(CORPUS)
    assert toxic.tolist() == toxic2.tolist() and fired == fired2
    assert score.tolist() == pytest.approx(score2.tolist())
    # predictions agree with the rule applied to the extractor's codes
    codes = det.extractor.transform(CORPUS)
    assert det.rule.predict(codes).astype(bool).tolist() == toxic.tolist()


def test_classifier_refuses_another_sae_or_model(classifier, tmp_path, qwen_scope_sae_dir):
    # the other layer's SAE has the same shape but other weights, and records another layer
    res = run_cli(["classify", _labelled(tmp_path), "-o", tmp_path / "o.parquet", "-c", classifier,
                "--sae", qwen_scope_sae_dir / f"layer{SAE_LAYERS[1]}.sae.pt"], ok=False)
    assert res.exit_code == 2 and f"reads layer {SAE_LAYERS[1]}" in res.output and "Traceback" not in res.output
    # the same weights under a name that records no layer: the fingerprint refuses them
    renamed = tmp_path / "renamed.pt"
    renamed.write_bytes((qwen_scope_sae_dir / f"layer{SAE_LAYERS[1]}.sae.pt").read_bytes())
    res = run_cli(["classify", _labelled(tmp_path), "-o", tmp_path / "o.parquet", "-c", classifier,
                "--sae", renamed], ok=False)
    assert res.exit_code == 2 and "fingerprint" in res.output and "Traceback" not in res.output
    d = json.loads(classifier.read_text())
    d["model"]["fingerprint"] = "0" * 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    res = run_cli(["explain", other, "hello"], ok=False)
    assert res.exit_code == 2 and "made with model" in res.output


def test_old_16_hex_fingerprints_still_load(classifier, tmp_path, tiny_backbone, tiny_sae):
    d = json.loads(classifier.read_text())
    assert d["model"]["fingerprint"].startswith("sha256:") and d["sae"]["fingerprint"].startswith("sha256:")
    d["model"]["fingerprint"], d["sae"]["fingerprint"] = tiny_backbone.legacy_fingerprint(), tiny_sae.legacy_fingerprint()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    assert Detector.load(old, dtype="float32").predict(["hello"])[1].shape == (1,)
    d["sae"]["fingerprint"] = "0" * 16
    old.write_text(json.dumps(d))
    res = run_cli(["explain", old, "hello"], ok=False)
    assert res.exit_code == 2 and "made with SAE" in res.output


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(layer=SAE_LAYERS[1]), f"the SAE .* reads layer {SAE_LAYERS[0]}"),
    (lambda d: d.update(layer="1"), "key 'layer' must be a non-negative integer"),
    (lambda d: d.pop("sae"), "key 'sae' must be an object"),
    (lambda d: d["model"].pop("fingerprint"), "key model.fingerprint must be a string"),
    (lambda d: d["rule"]["features"][0].update(id=-1), r"features\[0\]\.id -1 is out of range"),
    (lambda d: d["rule"]["features"][0].update(threshold=float("nan")), r"features\[0\]\.threshold must be a finite"),
    (lambda d: d["rule"].update(n_features_in=10**6), "rule n_features_in 1000000 is not the SAE's d_sae"),
])
def test_malformed_classifier_files_are_one_line_errors(classifier, tmp_path, edit, message, qwen_scope_sae_dir):
    d = json.loads(classifier.read_text())
    d["sae"]["id"] = str(qwen_scope_sae_dir / f"layer{SAE_LAYERS[0]}.sae.pt")  # an SAE file that records its layer
    edit(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))  # NaN is written as the JSON extension NaN, which json.loads reads back
    res = run_cli(["explain", bad, "hello"], ok=False)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert re.search(message, res.output), res.output
    assert res.output.strip().count("\n") == 0 and res.output.startswith("error: ")


def test_classify_keeps_columns_and_reports_null_texts(classifier, tmp_path):
    inp = tmp_path / "in.jsonl"
    pl.DataFrame({"id": ["a", "b", "c", "d"], "text": ["you are a stupid idiot", None, "  ", "thank you"],
                  "extra": [1, 2, 3, 4]}).write_ndjson(inp)
    out = tmp_path / "out.parquet"
    run_cli(["classify", inp, "-o", out, "-c", classifier])
    df = pl.read_parquet(out)
    # no lang column in the input: each row's language is identified and written to `lang`
    assert df.columns == ["id", "text", "extra", "lang", "toxic", "score", "evidence_features", "status"]
    assert df["id"].to_list() == ["a", "b", "c", "d"] and df["extra"].to_list() == [1, 2, 3, 4]
    assert df["lang"].to_list() == ["en", "und", "und", "und"]  # "thank you" is too short to be sure of
    # discovered on en + xx rows: English is validated, an undetermined language is not
    assert df["status"].to_list() == ["ok", "null text", "empty text", "unvalidated language"]
    assert df["toxic"][3] is not None  # still given a verdict
    assert df["toxic"][1] is None and df["toxic"][0] is not None
    det = Detector.load(classifier)
    toxic, score, fired = det.predict(["you are a stupid idiot", "thank you"])
    assert [df["toxic"][0], df["toxic"][3]] == toxic.tolist()
    # evidence: the fired features of a toxic row; none on a clean one
    want = [f if t else [] for t, f in zip(toxic.tolist(), fired)]
    assert [df["evidence_features"][0].to_list(), df["evidence_features"][3].to_list()] == want
    # every output format round-trips the same rows
    for name in ("out.csv", "out.jsonl", "out_hf"):
        run_cli(["classify", inp, "-o", tmp_path / name, "-c", classifier])
    assert pl.read_ndjson(tmp_path / "out.jsonl")["toxic"].to_list() == df["toxic"].to_list()
    assert pl.read_csv(tmp_path / "out.csv")["status"].to_list() == df["status"].to_list()
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "out_hf"))["id"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("content, message", [
    ("text,label\nhello,maybe\nbye,1\n", "found ['maybe']"),
    ("text,tag\nhello,1\n", "missing column(s) ['label']"),
    ("text,label\n", "no rows"),
    ("text,label\nhello,1\nworld,1\n", "only one class"),
])
def test_discover_bad_inputs_are_one_line_errors(tmp_path, content, message, tiny_model_dir, qwen_scope_sae_dir):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    res = run_cli(["discover", p, "-o", tmp_path / "x.json", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
                "--layer", SAE_LAYERS[0]], ok=False)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_classify_bad_inputs(classifier, tmp_path):
    empty = tmp_path / "empty.parquet"
    pl.DataFrame({"text": []}, schema={"text": pl.String}).write_parquet(empty)
    res = run_cli(["classify", empty, "-o", tmp_path / "o.parquet", "-c", classifier], ok=False)
    assert res.exit_code == 2 and "no rows" in res.output
    notext = tmp_path / "notext.csv"
    notext.write_text("body\nhello\n")
    res = run_cli(["classify", notext, "-o", tmp_path / "o2.parquet", "-c", classifier], ok=False)
    assert res.exit_code == 2 and "missing column(s) ['text']" in res.output
    res = run_cli(["classify", tmp_path / "nope.csv", "-o", tmp_path / "o3.parquet", "-c", classifier], ok=False)
    assert res.exit_code == 2 and "no such file" in res.output


def test_explain_names_tokens_of_fired_features(classifier):
    res = run_cli(["explain", classifier, "you are a stupid idiot", "--json"])
    e = json.loads(res.output.strip().splitlines()[0])
    det = Detector.load(classifier)
    toxic, score, fired = det.predict(["you are a stupid idiot"])
    assert e["toxic"] == bool(toxic[0]) and e["score"] == pytest.approx(float(score[0]), abs=1e-4)
    assert sorted(f["id"] for f in e["features"] if f["fired"]) == sorted(fired[0])
    assert e["evidence_features"] == (fired[0] if toxic[0] else [])
    # an OR-rule is checkable by hand: every feature's activation - threshold; the score is the largest of them
    assert sorted(f["id"] for f in e["features"]) == sorted(det.rule.features_.tolist())
    assert e["score"] == pytest.approx(max(f["max_act"] - f["threshold"] for f in e["features"]), abs=1e-4)
    for f in e["features"]:
        assert f["fired"] == (f["max_act"] > f["threshold"]) and f["margin"] == pytest.approx(f["max_act"] - f["threshold"])
        assert all(t["act"] > 0 for t in f["tokens"])
        if f["max_act"] > 0:
            assert max(t["act"] for t in f["tokens"]) == pytest.approx(f["max_act"], abs=1e-4)


def test_explain_gives_each_text_the_language_and_status_classify_gives(classifier, tmp_path):
    texts = ["you are a stupid idiot", "thank you", "  "]
    inp = tmp_path / "in.csv"
    pl.DataFrame({"text": texts}).write_csv(inp)
    run_cli(["classify", inp, "-o", tmp_path / "out.parquet", "-c", classifier])
    got = pl.read_parquet(tmp_path / "out.parquet")
    for i, t in enumerate(texts):
        e = json.loads(run_cli(["explain", classifier, t, "--json"]).stdout)
        assert (e["lang"], e["status"], e["toxic"]) == (got["lang"][i], got["status"][i], got["toxic"][i])
        assert e["evidence_features"] == (got["evidence_features"][i].to_list() if got["toxic"][i] is not None else [])
    assert got["status"].to_list() == ["ok", "unvalidated language", "empty text"]  # "thank you": undetermined
    plain = run_cli(["explain", classifier, "thank you"]).stdout
    assert "lang=und unvalidated language]" in plain.splitlines()[0]


def test_discover_names_every_feature_and_explain_prints_the_names(classifier, tmp_path):
    d = json.loads(classifier.read_text())
    names = d["feature_names"]["features"]
    assert set(names) <= {str(f["id"]) for f in d["rule"]["features"]} and names
    for n in names.values():  # the example shows the strongest token in «»; it is the first top token
        assert n["tokens"] and f"«{n['tokens'][0]}»" in n["example"]
    det = Detector.load(classifier)
    codes = det.extractor.transform(CORPUS)[:, det.rule.features_].toarray()
    text = CORPUS[int(codes.max(1).argmax())]  # a text on which a feature of the rule is active
    e = json.loads(run_cli(["explain", classifier, text, "--json"]).stdout)
    assert all(f["name"] == names.get(str(f["id"])) for f in e["features"])
    plain = run_cli(["explain", classifier, text]).stdout
    shown = [f for f in e["features"] if f["max_act"] > 0 and str(f["id"]) in names]
    assert shown and all(names[str(f["id"])]["example"] in plain for f in shown)
    # a file without names (written before them) still loads and explains; the script adds the same names back
    del d["feature_names"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    assert "(unnamed)" in run_cli(["explain", old, text]).stdout
    data = tmp_path / "texts.csv"
    pl.read_csv(_labelled(tmp_path)).write_csv(data)
    subprocess.run([sys.executable, "scripts/name_features.py", str(old), "--data", str(data), "--dtype", "float32"],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    again = json.loads(old.read_text())
    assert again["feature_names"]["features"] == names and again["rule"] == d["rule"]


def test_explain_of_a_sparse_linear_rule_adds_up(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    out = tmp_path / "sparse.json"
    run_cli(["discover", _labelled(tmp_path), "-o", out, "--kind", "sparse_linear", "--criterion", "f1",
             "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32"])
    det = Detector.load(out, dtype="float32")
    for text in ("you are a stupid idiot", "my cat sleeps on the sofa every afternoon"):
        e = json.loads(run_cli(["explain", out, text, "--json", "--dtype", "float32"]).stdout)
        toxic, score, fired = det.predict([text])
        p = e["score_parts"]
        assert e["score"] == pytest.approx(float(score[0]), abs=1e-4) and p["intercept"] == pytest.approx(det.rule.intercept_)
        assert p["intercept"] + sum(f["contribution"] for f in e["features"]) == pytest.approx(e["score"], abs=1e-4)
        for f in e["features"]:
            assert f["contribution"] == pytest.approx(f["weight"] * np.log1p(f["max_act"]))
        assert e["evidence_features"] == (fired[0] if toxic[0] else [])
        plain = run_cli(["explain", out, text, "--dtype", "float32"]).stdout
        assert f"= intercept {p['intercept']:+.3f} + SAE features {p['sae_features']:+.3f}" in plain


def _classify_cmd(inp, out, classifier):
    return [sys.executable, "-m", "safetyscope", "classify", str(inp), "-o", str(out), "-c", str(classifier),
            "--chunk-rows", "3", "--no-cache"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_classify_resumes_after_interruption(classifier, tmp_path, sig):
    inp = tmp_path / "big.parquet"
    texts = [f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(1200)]
    pl.DataFrame({"id": list(range(1200)), "text": texts}).write_parquet(inp)
    env = dict(os.environ)
    ref = tmp_path / "ref.parquet"
    subprocess.run(_classify_cmd(inp, ref, classifier), check=True, env=env, capture_output=True)

    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    proc = subprocess.Popen(_classify_cmd(inp, out, classifier), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (parts / "part-000005.parquet").exists():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists(), f"interrupted run must not leave a final output: {err.decode()[-2000:]}"
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert 6 <= n_parts < 400
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"rerun the same command to resume" in err, err.decode()[-2000:]
    res = subprocess.run(_classify_cmd(inp, out, classifier), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed after" in res.stderr
    assert not parts.exists()
    a, b = pl.read_parquet(out), pl.read_parquet(ref)
    assert a["id"].to_list() == list(range(1200))  # every row once, in order
    assert a.equals(b)


def test_classify_marks_and_counts_rows_outside_the_validated_languages(classifier, tmp_path):
    d = json.loads(classifier.read_text())
    assert d["validation"]["languages"] == ["en", "xx"]
    for lang in ("en", "xx"):
        v = d["validation"]["per_lang"][lang]
        assert 0 <= v["holdout_recall"] <= 1 and 0 <= v["holdout_fpr"] <= 1 and v["toxic"] + v["clean"] > 0
    inp = tmp_path / "mixed.csv"
    pl.DataFrame({"text": ["you are a stupid idiot", "you are a stupid idiot", "du bist dumm", "have a nice day"],
                  "language": ["en", "de", "de", "xx"]}).write_csv(inp)
    out = tmp_path / "mixed.parquet"
    res = run_cli(["classify", inp, "-o", out, "-c", classifier, "--lang-column", "language"])
    df = pl.read_parquet(out)
    assert "lang" not in df.columns  # the user's own column is used, not a new one
    assert df["status"].to_list() == ["ok", "unvalidated language", "unvalidated language", "ok"]
    assert df["toxic"].null_count() == 0 and df["toxic"][0] == df["toxic"][1]  # same text, same verdict
    assert "2 of 4 rows are outside the classifier's validated languages (en, xx)" in res.output
    only_en = tmp_path / "en.csv"
    pl.DataFrame({"text": ["you are a stupid idiot", "have a nice day"], "language": ["en", "xx"]}).write_csv(only_en)
    res = run_cli(["classify", only_en, "-o", tmp_path / "en.parquet", "-c", classifier, "--lang-column", "language"])
    assert "outside the classifier's validated languages" not in res.output  # no "0 of 2 rows are outside"
    bad = run_cli(["classify", inp, "-o", tmp_path / "x.parquet", "-c", classifier, "--lang-column", "nope"], ok=False)
    assert bad.exit_code == 2 and "--lang-column 'nope'" in bad.output and "Traceback" not in bad.output


def test_old_classifier_files_without_validation_use_their_discovery_languages(classifier, tmp_path):
    d = json.loads(classifier.read_text())
    del d["validation"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    assert Detector.load(old).validated_languages() == ["en", "xx"]
    del d["discovery_data"]["per_lang"]
    old.write_text(json.dumps(d))
    assert Detector.load(old).validated_languages() == []  # nothing recorded: nothing validated


def test_discover_records_the_operating_point_per_hold_out(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    out = tmp_path / "op.json"
    res = run_cli(["discover", _labelled(tmp_path), "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
                "--layer", SAE_LAYERS[0], "--dtype", "float32", "--target-fpr", "0.1"])
    d = json.loads(out.read_text())
    assert d["settings"]["criterion"] == "recall_at_fpr" and d["rule"]["params"]["target_fpr"] == 0.1
    assert len(d["rule"]["holdout"]) == 3 and "hold-out 1: recall" in res.output
    assert set(d["rule"]["k_folds"]) == {"1", "2", "5", "10"}
    bad = run_cli(["discover", _labelled(tmp_path), "-o", out, "--target-fpr", "2"], ok=False)
    assert bad.exit_code == 2 and "--target-fpr" in bad.output
