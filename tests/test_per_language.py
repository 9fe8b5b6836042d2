"""Per-language classifiers (`discover --per-language`): one rule per language, each row scored by its own
language's rule, other languages by the pooled fallback rule, on the tiny Qwen3 model and a Qwen-Scope SAE.

The planted data: in language "aa" a text is toxic when it starts with "stupid" and clean when it starts with
"idiot"; in "bb" the other way round. The rest of each text is two clean CORPUS sentences. Pooled, the first
word says nothing about the label, so no single rule can beat chance; per language it decides the label."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import polars as pl
import pytest
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, run_cli
from sklearn.metrics import f1_score

from safetyscope.discovery.detector import UNVALIDATED, Detector, read_classifier, read_rules
from safetyscope.errors import SafetyScopeError

MARKERS = {"aa": ("stupid", "idiot"), "bb": ("idiot", "stupid")}  # language -> (toxic first word, clean first word)
CLEAN = [t for t in CORPUS if not any(w in t for w in TOXIC_WORDS)]
BASES = [f"{a} {b}" for a, b in itertools.permutations(CLEAN, 2)]


def planted_rows(langs=("aa", "bb")) -> pl.DataFrame:
    rows = []
    for lang in langs:
        toxic_word, clean_word = MARKERS[lang]
        for i, base in enumerate(BASES):
            tox = i % 2
            rows.append({"text": f"{toxic_word if tox else clean_word} {base}", "label": tox, "lang": lang,
                         "split": "test" if i % 5 == 0 else "discovery"})
    return pl.DataFrame(rows)


def _model_args(tiny_model_dir, qwen_scope_sae_dir):
    return ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "planted.parquet"
    planted_rows().write_parquet(path)
    return path


@pytest.fixture(scope="module")
def per_lang_file(planted, tiny_model_dir, qwen_scope_sae_dir):
    out = planted.parent / "per_lang.json"
    res = run_cli(["discover", planted, "-o", out, "--split", "discovery", "--per-language",
                   *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    assert "aa: or_rule with" in res.output and "fallback for other languages" in res.output
    return out


@pytest.fixture(scope="module")
def pooled_file(planted, tiny_model_dir, qwen_scope_sae_dir):
    out = planted.parent / "pooled.json"
    run_cli(["discover", planted, "-o", out, "--split", "discovery", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    return out


@pytest.fixture(scope="module")
def det(per_lang_file):
    return Detector.load(per_lang_file, dtype="float32")


def test_each_language_rule_is_fitted_on_that_languages_rows_only(det, per_lang_file):
    from safetyscope.discovery.rules import OrRuleClassifier

    d = json.loads(per_lang_file.read_text())
    assert set(d["rules_by_lang"]) == {"aa", "bb"} and d["settings"]["per_language"] is True
    df = planted_rows().filter(pl.col("split") == "discovery")
    codes = det.extractor.transform(df.get_column("text").to_list())
    y, langs = df.get_column("label").to_numpy(), df.get_column("lang").to_numpy()
    for lang in ("aa", "bb"):
        rows = np.flatnonzero(langs == lang)
        direct = OrRuleClassifier(criterion="recall_at_fpr", target_fpr=0.02).fit(codes[rows], y[rows])
        assert det.rules_by_lang[lang].features_.tolist() == direct.features_.tolist()
        np.testing.assert_allclose(det.rules_by_lang[lang].thresholds_, direct.thresholds_)
    pooled = OrRuleClassifier(criterion="recall_at_fpr", target_fpr=0.02).fit(codes, y)  # the fallback: all languages' rows
    assert det.rule.features_.tolist() == pooled.features_.tolist()
    # validated: the languages with their own rule; per language its own rule's hold-out numbers
    v = d["validation"]
    assert v["languages"] == ["aa", "bb"] == det.validated_languages()
    for lang in ("aa", "bb"):
        own = v["per_lang"][lang]
        assert own["toxic"] == own["clean"] == 36 and own["k"] == len(det.rules_by_lang[lang].features_)
        assert 0 <= own["holdout_recall"] <= 1 and 0 <= own["holdout_fpr"] <= 1
        assert set(v["fallback"]["per_lang"][lang]) >= {"holdout_recall", "holdout_fpr"}


def test_per_language_rules_beat_one_pooled_rule_on_test_rows(det, pooled_file):
    pooled = Detector.load(pooled_file, dtype="float32")
    assert pooled.rules_by_lang == {}
    test = planted_rows().filter(pl.col("split") == "test")
    texts, y, langs = test.get_column("text").to_list(), test.get_column("label").to_numpy(), test.get_column("lang").to_list()
    own, _, _ = det.predict(texts, langs=langs)
    one, _, _ = pooled.predict(texts, langs=langs)
    f1_own = {la: f1_score(y[np.array(langs) == la], own[np.array(langs) == la]) for la in MARKERS}
    f1_one = {la: f1_score(y[np.array(langs) == la], one[np.array(langs) == la]) for la in MARKERS}
    assert min(f1_own.values()) >= 0.9, f1_own
    # pooled, the first word carries no label information: no rule beats flagging everything (F1 2/3) by much
    assert max(f1_one.values()) < 0.75 and np.mean(list(f1_own.values())) - np.mean(list(f1_one.values())) >= 0.25


def test_classify_scores_each_row_with_its_languages_rule(det, per_lang_file, tmp_path):
    texts = [f"stupid {BASES[1]}", f"stupid {BASES[1]}", f"stupid {BASES[1]}", f"idiot {BASES[3]}",
             f"idiot {BASES[3]}", f"idiot {BASES[3]}", None]
    langs = ["aa", "bb", "cc", "aa", "bb", None, "aa"]
    inp = tmp_path / "mixed.parquet"
    pl.DataFrame({"id": list(range(len(texts))), "text": texts, "lang": langs}).write_parquet(inp)
    out = tmp_path / "out.parquet"
    res = run_cli(["classify", inp, "-o", out, "-c", per_lang_file, "--dtype", "float32"])
    got = pl.read_parquet(out)
    assert got.get_column("status").to_list() == ["ok", "ok", UNVALIDATED, "ok", "ok", UNVALIDATED, "null text"]
    assert "2 of 7 rows are outside the classifier's validated languages (aa, bb)" in res.output
    assert "fallback rule" in res.output
    codes = det.extractor.transform(texts[:6])
    for i, lang in enumerate(langs[:6]):
        rule = det.rules_by_lang[lang] if lang in ("aa", "bb") else det.rule  # cc and no language: the fallback
        row = codes[[i]]
        assert got["toxic"][i] == bool(rule.predict(row)[0]), (i, lang)
        assert got["score"][i] == pytest.approx(float(rule.decision_function(row)[0]), abs=1e-5)
        assert got["evidence_features"][i].to_list() == (rule.fired(row)[0] if got["toxic"][i] else [])
    # the same text gets its language's verdict: "stupid ..." is toxic in aa, clean in bb (and vice versa)
    assert got["toxic"].to_list()[:2] == [True, False] and got["toxic"].to_list()[3:5] == [False, True]


def test_round_trip_keeps_every_rule_and_prediction(det, tmp_path):
    det.save(tmp_path / "again.json")
    again = Detector.load(tmp_path / "again.json", dtype="float32")
    assert again.to_dict() == det.to_dict()
    texts = [f"stupid {b}" for b in BASES[:6]] + [f"idiot {b}" for b in BASES[:6]]
    langs = ["aa", "bb", "cc"] * 4
    for a, b in zip(det.predict(texts, langs=langs), again.predict(texts, langs=langs)):
        assert np.asarray(a, dtype=object).tolist() == np.asarray(b, dtype=object).tolist()


def test_without_languages_predict_identifies_them(det):
    from safetyscope.langid import identify

    texts = [f"stupid {BASES[0]}", f"idiot {BASES[5]}"]
    identified = identify(texts)
    assert det.predict(texts)[1].tolist() == det.predict(texts, langs=identified)[1].tolist()


def test_explain_uses_the_rule_of_the_given_or_identified_language(det, per_lang_file):
    from safetyscope.langid import identify

    text = f"stupid {BASES[1]}"
    seen = {}
    for lang in ("aa", "bb", "cc"):
        e = json.loads(run_cli(["explain", per_lang_file, text, "--lang", lang, "--json", "--dtype", "float32"]).stdout)
        toxic, score, fired = det.predict([text], langs=[lang])
        assert e["lang"] == lang and e["rule"] == (lang if lang != "cc" else "fallback")
        assert e["status"] == ("ok" if lang != "cc" else UNVALIDATED)
        assert e["toxic"] == bool(toxic[0]) and e["score"] == pytest.approx(float(score[0]), abs=1e-4)
        assert sorted(f["id"] for f in e["features"] if f["fired"]) == sorted(fired[0])
        seen[lang] = e["toxic"]
    assert seen["aa"] and not seen["bb"]
    e = json.loads(run_cli(["explain", per_lang_file, text, "--json", "--dtype", "float32"]).stdout)
    assert e["lang"] == identify([text])[0] and e["rule"] == "fallback"  # no rule of its own for that language
    plain = run_cli(["explain", per_lang_file, text, "--lang", "bb", "--dtype", "float32"]).stdout
    assert plain.startswith("[clean score=") and "lang=bb rule=bb]" in plain.splitlines()[0]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["rules_by_lang"]["bb"]["features"][0].update(id=-1),
     r"rules_by_lang\['bb'\]: classifier features\[0\]\.id -1 is out of range"),
    (lambda d: d["rules_by_lang"]["bb"]["features"][0].update(threshold=float("nan")),
     r"rules_by_lang\['bb'\]: classifier features\[0\]\.threshold must be a finite number"),
    (lambda d: d["rules_by_lang"]["aa"].update(kind="magic"), r"rules_by_lang\['aa'\]: unknown classifier kind 'magic'"),
    (lambda d: d["rules_by_lang"]["aa"].pop("params"), r"rules_by_lang\['aa'\]: classifier rule is missing key 'params'"),
    (lambda d: d["rules_by_lang"]["aa"].update(n_features_in=10**6),
     r"rules_by_lang\['aa'\]: rule n_features_in 1000000 is not the SAE's d_sae"),
    (lambda d: d["rules_by_lang"].update(bb="oops"), r"rules_by_lang\['bb'\]: classifier rule must be an object"),
    (lambda d: d["rules_by_lang"].update({" ": d["rules_by_lang"]["aa"]}), "rules_by_lang has a rule under an empty"),
    (lambda d: d.update(rules_by_lang=[1]), "key 'rules_by_lang' must be a non-empty object"),
    (lambda d: d.update(rules_by_lang={}), "key 'rules_by_lang' must be a non-empty object"),
])
def test_malformed_rules_by_lang_is_a_one_line_error_naming_the_language(per_lang_file, tmp_path, edit, message):
    d = json.loads(per_lang_file.read_text())
    edit(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    res = run_cli(["explain", bad, "hello", "--lang", "aa"], ok=False)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert re.search(message, res.output), res.output
    assert res.output.strip().count("\n") == 0 and res.output.startswith(f"error: {bad}: ")


def test_single_rule_files_load_unchanged_and_ignore_languages(pooled_file, tmp_path):
    d = json.loads(pooled_file.read_text())
    assert "rules_by_lang" not in d
    pooled = Detector.load(pooled_file, dtype="float32")
    pooled.save(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert "rules_by_lang" not in again and again["rule"] == d["rule"] and again["validation"] == d["validation"]
    texts = [f"stupid {BASES[2]}", f"idiot {BASES[2]}"]
    assert pooled.predict(texts, langs=["aa", "zz"])[1].tolist() == pooled.predict(texts)[1].tolist()
    for name in ("toxicity-sparse", "harmful-request"):  # the shipped single-rule files
        rule, by_lang = read_rules(read_classifier(name), name)
        assert by_lang == {} and len(rule.features_) >= 1


def test_per_language_discovery_input_errors(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    args = _model_args(tiny_model_dir, qwen_scope_sae_dir)
    nolang = tmp_path / "nolang.parquet"
    planted_rows().drop("lang").write_parquet(nolang)
    res = run_cli(["discover", nolang, "-o", tmp_path / "x.json", "--per-language", *args], ok=False)
    assert res.exit_code == 2 and "--per-language needs a `lang` column" in res.output
    # a third language with 3 toxic rows: named, with the existing too-few-rows message
    few = planted_rows().vstack(planted_rows(["aa"]).head(6).with_columns(pl.lit("cc").alias("lang")))
    p = tmp_path / "few.parquet"
    few.write_parquet(p)
    res = run_cli(["discover", p, "-o", tmp_path / "x.json", "--per-language", *args], ok=False)
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
    assert ("--per-language: language 'cc': choosing its rule on stratified hold-outs needs at least 5 toxic and 5 "
            "clean examples; got 3 toxic, 3 clean") in res.output


def test_eval_scores_a_per_language_file_with_each_languages_rule(planted, per_lang_file, det, tmp_path,
                                                                   tiny_model_dir, qwen_scope_sae_dir):
    from safetyscope.eval.metrics import binary_metrics

    out = tmp_path / "report"
    run_cli(["eval", planted, "-o", out, "-c", per_lang_file, "--methods", "or_rule", "--skip", "transfer,efficiency",
             *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    rows = {(r["lang"], r["method"]): r for r in json.loads((out / "results.json").read_text())["per_language"]}
    test = planted_rows().filter(pl.col("split") == "test")
    for lang in ("aa", "bb"):
        part = test.filter(pl.col("lang") == lang)
        score = det.rules_by_lang[lang].decision_function(det.extractor.transform(part.get_column("text").to_list()))
        want = binary_metrics(part.get_column("label").to_numpy(), score > 0, score)
        assert rows[(lang, "shipped")]["f1"] == pytest.approx(want["f1"])
        assert rows[(lang, "shipped")]["roc_auc"] == pytest.approx(want["roc_auc"])
        assert rows[(lang, "shipped")]["f1"] >= 0.9


def test_shipped_multilingual_name_is_a_one_line_error_until_its_file_exists(tmp_path, monkeypatch):
    from safetyscope.discovery import detector

    monkeypatch.setattr(detector, "ASSETS", tmp_path)  # an installation without the asset
    with pytest.raises(SafetyScopeError, match="shipped classifier 'multilingual' is missing from this installation"):
        detector.classifier_path("multilingual")
    (tmp_path / "in.csv").write_text("text\nhello\n")
    res = run_cli(["classify", tmp_path / "in.csv", "-o", tmp_path / "o.parquet", "-c", "multilingual"], ok=False)
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert res.output.startswith("error: shipped classifier 'multilingual' is missing")


def test_a_gemma_classifier_without_the_gemma_extra_is_one_line_naming_it(per_lang_file, tmp_path, monkeypatch):
    from safetyscope import backbone
    from safetyscope.discovery import detector

    d = json.loads(per_lang_file.read_text())
    d["model"]["id"] = backbone.GEMMA_ALIAS  # what `discover --model gemma3-270m` records
    (tmp_path / detector.CLASSIFIERS["multilingual"]).write_text(json.dumps(d))
    monkeypatch.setattr(detector, "ASSETS", tmp_path)
    monkeypatch.setattr(backbone, "GEMMA_PACKAGE", "no_such_gemma_package_installed")  # the extra is absent
    for cmd in (["explain", "multilingual", "hallo"], ["classify", tmp_path / "in.csv", "-o", tmp_path / "o.parquet",
                                                          "-c", "multilingual"]):
        (tmp_path / "in.csv").write_text("text\nhello\n")
        res = run_cli(cmd, ok=False)
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
        assert "pip install 'safetyscope[gemma]'" in res.output and "Traceback" not in res.output


def test_the_shipped_gemma_sae_loads_by_name():
    from safetyscope.sae import SHIPPED_SAES, load_sae

    by_name = load_sae("gemma3-270m")
    assert by_name.cfg.model == "gemma3-270m" and by_name.cfg.d_sae == 10240
    assert by_name.fingerprint() == load_sae(str(SHIPPED_SAES["gemma3-270m"])).fingerprint()


def test_fallback_kind_sets_only_the_pooled_rule(planted, tiny_model_dir, qwen_scope_sae_dir, per_lang_file):
    out = planted.parent / "sparse_per_lang.json"
    run_cli(["discover", planted, "-o", out, "--split", "discovery", "--per-language", "--kind", "sparse_linear",
             "--fallback-kind", "or_rule", "--criterion", "f1", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    d = json.loads(out.read_text())
    assert {r["kind"] for r in d["rules_by_lang"].values()} == {"sparse_linear"}
    assert d["rule"]["kind"] == "or_rule" and d["settings"]["fallback_kind"] == "or_rule"
    # the pooled OR-rule is the one a plain --per-language run (or_rule everywhere, same criterion) fits
    same = run_cli(["discover", planted, "-o", planted.parent / "or_f1.json", "--split", "discovery", "--per-language",
                    "--criterion", "f1", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    assert same.exit_code == 0
    assert json.loads((planted.parent / "or_f1.json").read_text())["rule"] == d["rule"]


def test_suppress_takes_every_languages_rule_features(per_lang_file, det):
    from safetyscope.steering import classifier_features

    got = classifier_features(per_lang_file, det.extractor)
    want = list(dict.fromkeys([int(f) for r in (det.rule, *det.rules_by_lang.values()) for f in r.features_]))
    assert got == want and set(det.rules_by_lang["aa"].features_) <= set(got)
    assert set(got) > set(det.rule.features_.tolist())  # the per-language rules add features the fallback lacks


def test_linear_kind_per_language_discovers_classifies_and_explains_alike(planted, tiny_model_dir, qwen_scope_sae_dir):
    """`discover --kind linear`: every rule reads the SAE codes and the mean residual; explain scores a text as
    predict does, and each language's test rows are separated by its own rule."""
    out = planted.parent / "linear_per_lang.json"
    run_cli(["discover", planted, "-o", out, "--split", "discovery", "--per-language", "--kind", "linear",
             *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    d = json.loads(out.read_text())
    assert d["rule"]["kind"] == "linear" and {r["kind"] for r in d["rules_by_lang"].values()} == {"linear"}
    lin = Detector.load(out, dtype="float32")
    rows = planted_rows().filter(pl.col("split") == "test")
    toxic, score, _ = lin.predict(rows["text"].to_list(), langs=rows["lang"].to_list())
    assert f1_score(rows["label"].to_numpy(), toxic) > 0.8
    text = f"stupid {BASES[1]}"
    e = json.loads(run_cli(["explain", out, text, "--lang", "aa", "--json", "--dtype", "float32"]).stdout)
    _, s, fired = lin.predict([text], langs=["aa"])
    assert e["score"] == pytest.approx(float(s[0]), abs=1e-4)
    assert sorted(f["id"] for f in e["features"] if f["fired"]) == sorted(fired[0])
    # the score can be checked by hand: its parts add up to it, and the shown features are part of the SAE share
    p = e["score_parts"]
    assert p["intercept"] + p["sae_features"] + p["mean_residual"] == pytest.approx(e["score"], abs=1e-4)
    assert p["intercept"] == pytest.approx(lin.rule_for("aa").intercept_)
    plain = run_cli(["explain", out, text, "--lang", "aa", "--dtype", "float32"]).stdout
    assert f"= intercept {p['intercept']:+.3f} + SAE features {p['sae_features']:+.3f}" in plain
    assert p["shown_features"] + p["other_features"] == pytest.approx(p["sae_features"])
    # a rule over every feature: only each rule's 100 of largest |weight| are named, and the file says so
    names = d["feature_names"]
    assert "100 SAE features of largest |weight|" in names["named"] and 0 < len(names["features"]) <= 256
    assert all(f["name"] == names["features"].get(str(f["id"])) for f in e["features"])
