"""Evaluation: metrics on hand-built predictions, transfer/efficiency on planted signals, report files, overlap."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from conftest import CORPUS, SAE_LAYERS

from safetyscope.cli import main
from safetyscope.eval.metrics import binary_metrics, precision_at_prevalence, recall_at_fpr, wilson_interval
from safetyscope.eval.overlap import footprint, overlap, overlap_matrices, overlap_min, redundancy
from safetyscope.eval.per_language import evaluate_languages
from safetyscope.eval.transfer import efficiency_curves, transfer_matrix
from safetyscope.features import Extraction


def test_binary_metrics_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 1, 0, 1, 0, 0, 0, 0]  # tp=2 fp=1 fn=2 tn=3
    m = binary_metrics(y, p, score=[0.9, 0.8, 0.3, 0.7, 0.1, 0.2, 0.05, 0.4])
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["accuracy"] == pytest.approx(5 / 8)
    # AUC: of the 16 (toxic, clean) pairs, the toxic score is higher in 14
    assert m["roc_auc"] == pytest.approx(14 / 16)
    # TPR 2/4, FPR 1/4: balanced accuracy (0.5 + 0.75) / 2; at 5 % prevalence precision is
    # 0.05*0.5 / (0.05*0.5 + 0.95*0.25) = 0.025 / 0.2625, at 10 %: 0.05 / (0.05 + 0.225)
    assert m["fpr"] == pytest.approx(0.25) and m["balanced_accuracy"] == pytest.approx(0.625)
    assert m["precision_at_5pct"] == pytest.approx(0.025 / 0.2625)
    assert m["precision_at_10pct"] == pytest.approx(0.05 / 0.275)
    # ranked: T T C T T C C C -> precision at each toxic hit 1, 1, 3/4, 4/5
    assert m["average_precision"] == pytest.approx((1 + 1 + 0.75 + 0.8) / 4)
    # no clean row may score above the threshold at 1 % or 5 % of 4 clean rows: the top two toxic only
    assert m["recall_at_1pct_fpr"] == pytest.approx(0.5) and m["recall_at_5pct_fpr"] == pytest.approx(0.5)
    assert recall_at_fpr(y, [0.9, 0.8, 0.3, 0.7, 0.1, 0.2, 0.05, 0.4], 0.25) == pytest.approx(1.0)


def test_wilson_interval_by_hand():
    # 16 of 125: the textbook formula gives 0.0803..0.1980 (z = 1.96)
    lo, hi = wilson_interval(16, 125)
    assert lo == pytest.approx(0.0803, abs=5e-4) and hi == pytest.approx(0.1980, abs=5e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0.1 < wilson_interval(0, 20)[1] < 0.2  # not the degenerate [0, 0]
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


def test_precision_at_prevalence_by_hand():
    # a perfect rule keeps precision 1 at any prevalence; flagging everything gives precision = prevalence
    assert precision_at_prevalence(0.9, 0.0, 0.05) == pytest.approx(1.0)
    assert precision_at_prevalence(1.0, 1.0, 0.05) == pytest.approx(0.05)
    # the example: recall 0.90 at 14 % FPR, 5 % prevalence -> 0.045 / (0.045 + 0.133) = 0.253
    assert precision_at_prevalence(0.9, 0.14, 0.05) == pytest.approx(0.045 / (0.045 + 0.95 * 0.14))
    assert round(precision_at_prevalence(0.9, 0.14, 0.05), 2) == 0.25
    assert precision_at_prevalence(0.0, 0.0, 0.05) == 0.0  # flags nothing


def _planted(n_per=120, seed=0):
    """Languages a, b share toxic feature 0; language c's toxicity shows only in feature 1."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for lang, signal in (("a", 0), ("b", 0), ("c", 1)):
        for split in ("discovery", "test"):
            for i in range(n_per):
                label = i % 2
                dense = (rng.random(20) < 0.08) * rng.random(20)
                dense[:2] = 0
                if label and rng.random() < 0.95:
                    dense[signal] = 1 + rng.random()
                rows.append({"text": f"{lang}{split}{i}", "label": label, "lang": lang, "split": split})
                feats.append(dense)
    df = pl.DataFrame(rows)
    return df, df["label"].to_numpy(), sp.csr_matrix(np.array(feats))


def test_transfer_matrix_follows_the_planted_signal():
    df, y, codes = _planted()
    t = transfer_matrix(df, y, codes, ["a", "b", "c"], progress=False)
    f1 = np.array(t["f1"])
    assert f1[0, 0] > 0.9 and f1[0, 1] > 0.9  # a's feature works for b
    assert f1[0, 2] < 0.5 and f1[2, 0] < 0.5  # but not for c, nor c's for a
    assert f1[2, 2] > 0.9
    jac = np.array(t["jaccard_top10"])
    np.testing.assert_allclose(np.diag(jac), 1.0)
    assert jac[0, 1] == jac[1, 0]


def test_efficiency_curve_reaches_full_f1_with_little_data():
    df, y, codes = _planted(n_per=200)
    eff = efficiency_curves(df, y, codes, ["a", "c"], fractions=(0.05, 0.25, 1.0), seeds=(0, 1), progress=False)
    for lang in ("a", "c"):
        v = eff["langs"][lang]
        assert v["mean_f1"][-1] == pytest.approx(v["full_f1"])
        assert v["mean_f1"][0] > 0.8  # the planted feature is found even from 10 texts
        assert v["smallest_fraction_99pct"] in (0.05, 0.25, 1.0)
    assert eff["macro"]["full_f1"] == pytest.approx(np.mean([eff["langs"][la]["full_f1"] for la in ("a", "c")]))


def test_layer_sweep_picks_the_layer_that_carries_the_signal():
    from safetyscope.eval.per_language import layer_sweep

    df, y, X = _planted()
    noise = sp.csr_matrix((np.random.default_rng(1).random(X.shape) < 0.08).astype(float))
    sweep = layer_sweep(df, {4: noise, 9: X}, langs=["a", "b", "c"])
    assert sweep["layers"] == [4, 9] and sweep["chosen"] == {"a": 9, "b": 9, "c": 9}
    for lang in "abc":
        assert sweep["best_delta"][lang][9] > 0.8 > 0.3 > sweep["best_delta"][lang][4]
        assert sweep["f1"][lang][9] > 0.9 and sweep["f1"][lang][4] < sweep["f1"][lang][9]
    assert sweep["macro_f1_chosen"] == pytest.approx(sweep["macro_f1"][9])


def test_per_language_rows_include_baselines_on_the_same_split():
    df, y, codes = _planted()
    means = codes.toarray().astype(np.float32)  # stands in for raw activations
    ex = Extraction(codes, means, np.ones(len(y), int), 0, 0)
    rows = evaluate_languages(df.with_columns(pl.col("label").cast(pl.String)), ex, seed=0, progress=False)
    methods = {r["method"] for r in rows}
    assert {"or_rule", "or_rule_report", "sparse_linear", "logreg_sae", "probe_raw", "majority"} <= methods
    for r in rows:
        assert r["n"] == 120  # every method scored on the same test rows
    f1 = {(r["lang"], r["method"]): r["f1"] for r in rows}
    assert f1[("a", "or_rule")] > 0.9 and f1[("c", "logreg_sae")] > 0.9
    assert f1[("a", "majority")] == pytest.approx(2 / 3)  # balanced data: "all toxic"


def test_overlap_on_hand_built_footprints():
    a, b = {1, 2, 3, 4}, {3, 4, 5}
    assert overlap(a, b) == 0.5 and overlap(b, a) == pytest.approx(2 / 3)
    assert overlap_min(a, b) == pytest.approx(2 / 3) == overlap_min(b, a)
    m = overlap_matrices({"A": a, "B": b})
    assert m["sizes"] == [4, 3] and m["overlap"][0][1] == 0.5
    codes = sp.csr_matrix(np.array([[1, 0, 0], [0, 2, 0], [0, 0, 0.0]]))
    assert footprint(codes) == {0, 1} and footprint(codes, min_count=2) == set()


def test_redundancy_is_high_for_repeated_rows_and_lower_for_distinct_ones():
    repeated = sp.csr_matrix(np.tile([[1.0, 1.0, 0, 0]], (100, 1)))
    distinct = sp.csr_matrix(np.eye(100))
    r_rep, r_dist = redundancy(repeated)["redundancy"], redundancy(distinct)["redundancy"]
    assert r_rep > 0.95  # one row already shows the whole footprint
    assert r_dist == pytest.approx(0.5, abs=0.05)  # coverage grows linearly with the subset


def test_eval_command_writes_reports_with_embedded_images(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    rows = []
    for i, t in enumerate(CORPUS * 8):
        rows.append({"text": f"{t} {i}", "label": int(any(w in t for w in ("stupid", "hate", "garbage", "shut", "bomb"))),
                     "lang": "en" if i % 3 else "de", "split": "test" if i % 4 == 0 else "discovery"})
    data = tmp_path / "tox.parquet"
    pl.DataFrame(rows).write_parquet(data)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["eval", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--sae",
                                    str(qwen_scope_sae_dir), "--layer", str(SAE_LAYERS[0]), "--seeds", "0,1",
                                    "--fractions", "10,50,100", "--scan-layers", ",".join(map(str, SAE_LAYERS))])
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["langs"] == ["de", "en"] and results["transfer"]["langs"] == ["de", "en"]
    assert results["efficiency"]["fractions"] == [0.1, 0.5, 1.0]
    assert {r["method"] for r in results["per_language"]} >= {"or_rule", "probe_raw", "logreg_sae", "majority"}
    html = (out / "report.html").read_text()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 4
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in html and "probe_raw" in html
    md = (out / "report.md").read_text()
    assert "Cross-lingual transfer" in md and "Data efficiency" in md and "Layer sweep" in md
    sweep = results["layer_sweep"]  # JSON keys are strings
    assert sweep["layers"] == list(SAE_LAYERS) and set(sweep["f1"]) == {"de", "en"}
    or_rule = {r["lang"]: r["f1"] for r in results["per_language"] if r["method"] == "or_rule"}
    for lang, by_layer in sweep["f1"].items():  # the sweep at the main layer is the per-language OR-rule
        assert by_layer[str(SAE_LAYERS[0])] == pytest.approx(or_rule[lang])
        deltas = sweep["best_delta"][lang]
        assert sweep["chosen"][lang] == int(max(deltas, key=lambda la: (deltas[la], -int(la))))
    for png in ("per_language_f1.png", "transfer_f1.png", "efficiency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_overlap_command_on_tiny_model(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    pl.DataFrame({"text": CORPUS[:8]}).write_csv(a)
    pl.DataFrame({"text": CORPUS[:8] + CORPUS[8:]}).write_csv(b)
    args = ["overlap", str(a), str(b), "-o", str(tmp_path / "ov"), "--model", str(tiny_model_dir), "--sae",
            str(qwen_scope_sae_dir), "--layer", str(SAE_LAYERS[0])]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    o = json.loads((tmp_path / "ov" / "overlap.json").read_text())
    # b contains every text of a, so b covers all of a's footprint
    assert o["overlap"][0][1] == 1.0 and o["sizes"][1] >= o["sizes"][0]
    res = CliRunner().invoke(main, args[:-6] + ["--pool", "last"] + args[-6:])
    assert res.exit_code == 0, res.output
    o_last = json.loads((tmp_path / "ov" / "overlap.json").read_text())
    assert o_last["pool"] == "last" and o_last["sizes"][0] < o["sizes"][0]  # one token fires fewer features


# -- random controls -------------------------------------------------------------------------------

def test_recall_at_fpr_keeps_collinear_thresholds():
    # each score level holds one clean and one toxic text: the ROC curve is one straight diagonal, whose inner
    # points roc_curve drops by default; 3 of 10 clean texts (30 %) flagged allow 3 of 10 toxic ones
    y, s = np.array([1, 0] * 10), np.repeat(np.arange(10, 0, -1), 2).astype(float)
    assert recall_at_fpr(y, s, 0.35) == pytest.approx(0.3)


def test_resampled_metrics_match_binary_metrics_on_each_resample():
    from safetyscope.eval.controls import resampled_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.round(y * 0.8 + rng.normal(0, 1, 300), 1)  # rounded: many ties within and across classes
    pred = score > 0.4
    idx = np.vstack([np.arange(300), rng.integers(0, 300, (20, 300))])
    got = resampled_metrics(y, pred, score, idx)
    for b in range(len(idx)):
        want = binary_metrics(y[idx[b]], pred[idx[b]], score[idx[b]])
        for m in ("f1", "recall_at_5pct_fpr", "roc_auc"):
            assert got[m][b] == pytest.approx(want[m]), (m, b)
    assert len(set(got["f1"].round(6))) > 5  # the resamples really differ


def _outputs(seed=0, n=200):
    """Three languages: a trained rule far better than its control (a), equal to it (b), worse (c)."""
    rng = np.random.default_rng(seed)
    out = {}
    for lang in "abc":
        y = np.arange(n) % 2
        good, noise = y + rng.normal(0, 0.3, n), rng.normal(0, 1, n)
        pairs = {"a": (good, noise), "b": (good, good), "c": (noise, good)}[lang]
        for method, s in zip(("or_rule", "control_random_features"), pairs):
            out[(lang, method)] = (y, s > 0.5, s)
    return out


def test_compare_controls_verdicts_follow_the_planted_gaps():
    from safetyscope.eval.controls import compare_controls, sentences

    c = compare_controls(_outputs(), ["a", "b", "c"], seed=0, n_boot=300)
    v = {g: c["langs"][g]["control_random_features"] for g in "abc"}
    assert (v["a"]["verdict"], v["b"]["verdict"], v["c"]["verdict"]) == ("beats", "does not clearly beat", "loses to")
    assert v["a"]["f1"]["ci95"][0] > 0.3 and v["c"]["f1"]["ci95"][1] < -0.3
    assert v["b"]["roc_auc"]["diff"] == 0 and v["b"]["f1"]["ci95"] == [0.0, 0.0]  # paired: same rows, no noise
    f1 = {g: binary_metrics(*_outputs()[(g, "or_rule")])["f1"] for g in "abc"}
    assert v["a"]["f1"]["trained"] == pytest.approx(f1["a"])
    macro = c["macro"]["control_random_features"]["f1"]
    assert macro["trained"] == pytest.approx(np.mean(list(f1.values())))
    assert macro["diff"] == pytest.approx(np.mean([v[g]["f1"]["diff"] for g in "abc"]))
    assert set(c["langs"]["a"]) == {"control_random_features"}  # no random-SAE rows, no such comparison
    lines = sentences(c)
    assert [s.split(":")[0] for s in lines] == ["a", "b", "c", "macro"]
    assert "the trained SAE beats random features" in lines[0] and "loses to" in lines[2]
    assert compare_controls(_outputs(), ["a", "b", "c"], seed=0, n_boot=300) == c  # seeded


def _labelled_table(path):
    rows = [{"text": f"{t} {i}", "label": int(any(w in t for w in ("stupid", "hate", "garbage", "shut", "bomb"))),
             "lang": "en" if i % 3 else "de", "split": "test" if i % 4 == 0 else "discovery"}
            for i, t in enumerate(CORPUS * 8)]
    pl.DataFrame(rows).write_parquet(path)
    return pl.DataFrame(rows)


def test_eval_random_controls_and_skip(tmp_path, tiny_model_dir, qwen_scope_sae_dir, tiny_backbone, tiny_sae):
    from conftest import run_cli

    from safetyscope import SAE, FeatureExtractor

    df = _labelled_table(tmp_path / "tox.parquet")
    base = ["eval", tmp_path / "tox.parquet", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer",
            SAE_LAYERS[0], "--dtype", "float32"]
    run_cli(base + ["-o", tmp_path / "r", "--skip", "transfer,efficiency", "--seed", "3"])
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    rand = SAE.random_like(tiny_sae, 3)
    assert res["config"]["random_sae_fingerprint"] == rand.fingerprint() != res["config"]["sae_fingerprint"]
    # the control rows are the same rules fitted on the random SAE's codes of the same split
    texts = df["text"].to_list()
    ex = FeatureExtractor(tiny_backbone, tiny_sae, SAE_LAYERS[0], cache=False).extract(texts)
    rex = FeatureExtractor(tiny_backbone, rand, SAE_LAYERS[0], cache=False).extract(texts)
    want = evaluate_languages(df.with_columns(pl.col("label").cast(pl.String)), ex, seed=3, random_ex=rex,
                              only=["random_sae_or_rule", "random_sae_sparse_linear"], progress=False)
    got = {(r["lang"], r["method"]): r for r in res["per_language"]}
    want = [r for r in want if r["method"] != "majority"]
    assert len(want) == 2 * 2  # two languages x two control rules
    for r in want:
        for m in ("f1", "roc_auc", "recall_at_5pct_fpr", "n"):
            assert got[(r["lang"], r["method"])][m] == pytest.approx(r[m])
    # and they are not the trained SAE's rows under another name
    assert any(got[(r["lang"], r["method"])][m] != got[(r["lang"], r["method"][len("random_sae_"):])][m]
               for r in want for m in ("roc_auc", "recall_at_5pct_fpr"))
    ctl = res["random_controls"]
    assert set(ctl["langs"]) == {"de", "en"} and set(ctl["macro"]) == set(ctl["langs"]["en"]) == {
        "random_sae_or_rule", "control_random_features", "random_sae_sparse_linear"}
    for lang in ("de", "en"):
        e = ctl["langs"][lang]["random_sae_sparse_linear"]["f1"]
        assert e["trained"] == pytest.approx(got[(lang, "sparse_linear")]["f1"])
        assert e["control"] == pytest.approx(got[(lang, "random_sae_sparse_linear")]["f1"])
    md = (tmp_path / "r" / "report.md").read_text()
    section = md[md.index("## Random controls"):md.index("## Plots")]
    for where in ("de", "en", "macro"):
        line = next(ln for ln in section.splitlines() if ln.startswith(f"- {where}: the trained SAE "))
        assert "the random-weight SAE's OR-rule" in line and "random features" in line and "sparse linear" in line
    assert section.count("| lang | or_rule | random_sae_or_rule | control_random_features | sparse_linear | "
                         "random_sae_sparse_linear |") == 3  # F1, recall at 5 % FPR, ROC-AUC
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<h2>Random controls (is the SAE doing the work?)</h2>" in html and html.count("<li>de: the trained SAE") == 1
    assert "<code>control_random_features</code>" in html and "<em>beats</em>" in html

    run_cli(base + ["-o", tmp_path / "s", "--skip", "random_sae,transfer,efficiency"])
    res = json.loads((tmp_path / "s" / "results.json").read_text())
    assert res["config"]["random_sae_fingerprint"] is None
    assert not [r for r in res["per_language"] if r["method"].startswith("random_sae")]
    assert set(res["random_controls"]["langs"]["en"]) == {"control_random_features"}  # the other control stays
    md = (tmp_path / "s" / "report.md").read_text()
    assert "random-weight SAE's" not in md and "- en: the trained SAE" in md
    bad = run_cli(base + ["-o", tmp_path / "t", "--skip", "random"], ok=False)
    assert bad.exit_code == 2 and "error: --skip ['random']: unknown" in bad.output


def test_eval_group_column_reports_per_source_and_leave_one_source_out(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    """Two sources whose toxic rows use different words: a rule fitted without one source has never seen its
    words, so its recall there falls; the per-source table adds up to the language's numbers."""
    rng = np.random.default_rng(0)
    words = {"s1": ["stupid", "idiot", "moron"], "s2": ["garbage", "trash", "filth"]}
    clean = ["the weather is nice", "we met for lunch", "the train was late", "a book about birds", "my garden grows"]
    rows = []
    for source, ws in words.items():
        for i in range(120):
            toxic = i % 2 == 0
            lead = "you are a" if source == "s1" else "what a pile of"  # each source's own phrasing
            text = f"{lead} {ws[i % 3]} {rng.integers(1000)}" if toxic else f"{clean[i % 5]} {rng.integers(1000)}"
            rows.append({"text": text, "label": int(toxic), "lang": "en", "split": "test" if i % 4 == 1 or i % 4 == 2 else
                         "discovery", "source": source})
    data = tmp_path / "tox.parquet"
    pl.DataFrame(rows).write_parquet(data)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["eval", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--sae",
                                    str(qwen_scope_sae_dir), "--layer", str(SAE_LAYERS[0]), "--skip",
                                    "transfer,efficiency,random_sae", "--group-column", "source", "--dtype", "float32"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads((out / "results.json").read_text())
    per, oos = r["by_group"]["per_group"], r["by_group"]["out_of_group"]
    overall = {x["method"]: x for x in r["per_language"] if x["lang"] == "en"}
    for method in ("or_rule", "probe_raw"):
        parts = [x for x in per if x["method"] == method and not x["source"].startswith("worst")]
        assert {x["source"] for x in parts} == {"s1", "s2"}
        flagged = sum(x["recall"] * x["toxic"] for x in parts)
        assert flagged / sum(x["toxic"] for x in parts) == pytest.approx(overall[method]["recall"])
        worst = next(x for x in per if x["method"] == method and x["source"].startswith("worst"))
        assert worst["recall"] == min(x["recall"] for x in parts)
    assert {(x["method"], x["held_out"]) for x in oos} >= {("or_rule_fpr2", "s1"), ("or_rule_fpr2", "s2")}
    assert min(x["recall_held_out"] for x in oos if x["method"] == "or_rule_fpr2") < \
        min(x["recall_in_source"] for x in oos if x["method"] == "or_rule_fpr2")
    md = (out / "report.md").read_text()
    assert "## Per source" in md and "## Leave one source out" in md
