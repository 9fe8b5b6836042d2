"""`synth targets` keeps only safety-relevant features: specific to their label (precision), significant (one-sided
Fisher test, Benjamini-Hochberg over the tested features) and with top contexts the request judge reads as their
label; every rejected candidate is listed with its reasons (tiny model)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, FixedAnswerServer, run_cli
from scipy.stats import fisher_exact
from test_user_errors import assert_user_error

from safetyscope.features import FeatureExtractor
from safetyscope.synthesis.judge import Verdict
from safetyscope.synthesis.targets import (
    TargetsConfig,
    bh_qvalues,
    find_targets,
    fisher_greater,
    plain_context,
    read_targets,
)

HARMFUL = [t for t in CORPUS if any(w in t for w in TOXIC_WORDS)]
BENIGN = [t for t in CORPUS if not any(w in t for w in TOXIC_WORDS)]


class FixedJudge:
    """Every request gets the same label; remembers what it was asked."""

    def __init__(self, label: str | None):
        self.label, self.name, self.seen = label, f"fixed:{label}", []

    def judge(self, requests):
        self.seen += list(requests)
        return [Verdict(self.label, 1.0 if self.label == "harmful" else 0.0) for _ in requests]


def test_bh_qvalues_match_a_hand_computation():
    # sorted: 0.005 0.01 0.03 0.04 0.2; p*m/rank = 0.025 0.025 0.05 0.05 0.2; running min from the top is the same
    q = bh_qvalues(np.array([0.01, 0.04, 0.03, 0.005, 0.2]))
    assert q == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])
    # the step-up: 0.01 * 3 / 1 = 0.03 is lowered to the next rank's 0.011 * 3 / 2 = 0.0165; capped at 1
    assert bh_qvalues(np.array([0.01, 0.011, 0.5])) == pytest.approx([0.0165, 0.0165, 0.5])
    assert bh_qvalues(np.array([0.9, 0.8])) == pytest.approx([0.9, 0.9])
    assert bh_qvalues(np.array([])).shape == (0,)


def test_fisher_tail_is_the_one_sided_exact_test():
    # 10 rows, 5 harmful, a feature firing on 3 rows, all harmful: C(5,3) / C(10,3) = 10 / 120
    assert fisher_greater(np.array([3]), 10, 5, np.array([3]))[0] == pytest.approx(1 / 12)
    for k, n_f in [(6, 11), (12, 12), (3, 3), (0, 4), (2, 9)]:
        table = [[k, n_f - k], [20 - k, 20 - (n_f - k)]]
        assert fisher_greater(np.array([k]), 40, 20, np.array([n_f]))[0] == pytest.approx(
            fisher_exact(table, alternative="greater")[1])


@pytest.fixture
def designed(tiny_backbone, tiny_sae, monkeypatch):
    """20 harmful and 20 benign rows and a FeatureExtractor whose pooled codes are set by hand (its per-token codes,
    which the snippets come from, stay the tiny model's): feature 5 fires on 12 harmful rows only, 7 on 6 harmful
    and 5 benign rows (about equally on both labels), 9 on 3 harmful rows only (precise but too rare to be
    significant), 11 on 12 benign rows only."""
    texts = [f"{HARMFUL[i % len(HARMFUL)]} {i}" for i in range(20)] + [f"{BENIGN[i % len(BENIGN)]} {i}" for i in range(20)]
    df = pl.DataFrame({"prompt": texts, "label": ["harmful"] * 20 + ["benign"] * 20, "lang": ["en"] * 40})
    dense = np.zeros((40, tiny_sae.cfg.d_sae), dtype=np.float32)
    dense[:12, 5] = np.linspace(3, 1, 12)
    dense[[0, 2, 4, 6, 8, 10, 20, 22, 24, 26, 28], 7] = 1.0
    dense[[1, 3, 5], 9] = 2.0
    dense[20:32, 11] = np.linspace(2, 1, 12)
    fx = FeatureExtractor(tiny_backbone, tiny_sae, SAE_LAYERS[0], cache=False)
    monkeypatch.setattr(fx, "transform", lambda t, progress=False: sp.csr_matrix(dense))
    return df, fx, dense


def _by_id(found):
    return {t["id"]: t for t in found["targets"]}, {t["id"]: t for t in found["rejected"]}


def test_a_feature_firing_on_both_labels_is_rejected_and_the_numbers_are_recorded(designed):
    df, fx, dense = designed
    cfg = TargetsConfig(min_delta=0.01, max_targets=10, min_precision=0.8, fdr=0.05)
    found = find_targets(df, cfg, fx)
    kept, rejected = _by_id(found)
    assert set(kept) == {5, 11} and set(rejected) == {7, 9}
    assert rejected[7]["reasons"] == ["low_precision", "not_significant"]
    assert rejected[7]["precision"] == pytest.approx(6 / 11) and rejected[7]["n_fires"] == 11
    assert rejected[9]["reasons"] == ["not_significant"] and rejected[9]["precision"] == 1.0
    assert kept[11]["label"] == "benign" and kept[11]["precision"] == 1.0 and kept[11]["n_fires_label"] == 12
    # the family is the 4 features firing on >= 3 rows, one per direction: q = BH of their Fisher p-values
    fires = dense > 0
    y = np.array([1] * 20 + [0] * 20)
    p_h = [fisher_exact([[int((fires[:, f] & (y == 1)).sum()), int((fires[:, f] & (y == 0)).sum())],
                         [int(((~fires[:, f]) & (y == 1)).sum()), int(((~fires[:, f]) & (y == 0)).sum())]],
                        alternative="greater")[1] for f in (5, 7, 9, 11)]
    q_h = bh_qvalues(np.array(p_h))
    for f, p, q in zip((5, 7, 9), p_h, q_h):
        t = kept.get(f) or rejected[f]
        assert t["p_value"] == pytest.approx(p) and t["q_value"] == pytest.approx(q)
    assert kept[5]["q_value"] <= 0.05 < rejected[9]["q_value"]
    assert found["selection"] == {"tested_features": 4, "candidates": 4, "examined": 4, "judged": 0, "kept": 2, "rejected": 2,
                                  "rejected_listed": 2, "rejected_by_reason": {"low_precision": 1, "not_significant": 2},
                                  "judge": None}
    for t in found["targets"]:
        assert "reasons" not in t and t["why"].startswith("precision 1.00") and t["judge_votes"] is None
        assert t["examples"] and all("«" in e["snippet"] for e in t["examples"])
    assert rejected[7]["why"].startswith("rejected: low_precision, not_significant; precision 0.55")
    # a rejected candidate's examples are short: its snippets and numbers, not the full reference texts
    assert rejected[7]["examples"] and all(set(e) == {"snippet", "activation", "label"} for e in rejected[7]["examples"])
    # TargetsConfig's defaults leave the bars off (library callers select by the contrast alone, as before): the
    # rejections above come from the bars
    loose = find_targets(df, TargetsConfig(min_delta=0.01, max_targets=10), fx)
    assert set(_by_id(loose)[0]) == {5, 7, 9, 11} and not loose["rejected"]


def test_the_judge_vetoes_targets_whose_contexts_it_does_not_read_as_their_label(designed):
    df, fx, _ = designed
    cfg = TargetsConfig(min_delta=0.01, max_targets=10, n_examples=3, judge_window=2, min_precision=0.8, fdr=0.05)
    judge = FixedJudge("benign")
    kept, rejected = _by_id(find_targets(df, cfg, fx, judge=judge))
    assert set(kept) == {11} and kept[11]["judge_votes"] == {"harmful": 0, "benign": 3, "unjudged": 0}
    assert kept[11]["judged_share"] == 1.0 and "3/3 contexts judged benign" in kept[11]["why"]
    assert judge.seen and len(set(judge.seen)) == len(judge.seen)  # each distinct context is judged once
    assert rejected[5]["reasons"] == ["contexts_not_harmful"] and rejected[5]["judged_share"] == 0.0
    assert rejected[9]["reasons"] == ["not_significant", "contexts_not_harmful"]
    # the judge reads the short window around the firing token, without marks; the file keeps both
    ex = rejected[5]["examples"][0]
    assert ex["judged_context"] in judge.seen and "«" not in ex["judged_context"] and ex["judged"] == "benign"
    assert ex["judged_context"] in plain_context(ex["snippet"]) and len(ex["judged_context"]) < len(plain_context(ex["snippet"]))
    # the mirror: a judge that reads everything as harmful keeps the harmful target and vetoes the benign one
    kept, rejected = _by_id(find_targets(df, cfg, fx, judge=FixedJudge("harmful")))
    assert set(kept) == {5} and rejected[11]["reasons"] == ["contexts_not_benign"]
    # no usable verdict is no agreement
    kept, rejected = _by_id(find_targets(df, cfg, fx, judge=FixedJudge(None)))
    assert not kept and rejected[5]["judge_votes"]["unjudged"] == 3


def test_candidates_are_examined_until_max_targets_are_kept_and_the_rejected_list_is_capped(designed):
    df, fx, _ = designed
    # by |delta|: 5 (0.6), 11 (0.6), 7 (0.05), 9 (0.15) -> 5, 11, 9, 7; one target: only 5 is examined
    found = find_targets(df, TargetsConfig(min_delta=0.01, max_targets=1, min_precision=0.8, fdr=0.05), fx)
    assert [t["id"] for t in found["targets"]] == [5] and found["selection"]["examined"] == 1
    found = find_targets(df, TargetsConfig(min_delta=0.01, max_targets=10, max_rejected=1, min_precision=0.8, fdr=0.05), fx)
    assert [t["id"] for t in found["rejected"]] == [9] and found["selection"]["rejected"] == 2
    assert found["selection"]["rejected_listed"] == 1
    # nothing passes and nothing is listed: no context is encoded or judged at all
    judge = FixedJudge("harmful")
    found = find_targets(df, TargetsConfig(min_delta=0.01, fdr=1e-12, max_rejected=0), fx, judge=judge)
    assert not found["targets"] and not found["rejected"] and found["selection"]["rejected"] == 4 and not judge.seen
    assert found["selection"]["judged"] == 0


@pytest.fixture
def labelled(tmp_path):
    rows = [{"prompt": f"{t} {i // len(CORPUS)}", "label": "harmful" if any(w in t for w in TOXIC_WORDS) else "benign",
             "lang": "en"} for i, t in enumerate(CORPUS * 4)]
    p = tmp_path / "ref.parquet"
    pl.DataFrame(rows).write_parquet(p)
    return p


def test_cli_writes_why_and_rejected_readable_by_the_readers(tmp_path, labelled, model_args):
    out = tmp_path / "t.json"
    res = run_cli(["synth", "targets", labelled, "-o", out, "--min-delta", "0.05", "--min-precision", "0.7",
                   "--fdr", "0.2", "--judge-classifier", "none", *model_args])
    assert "not checked" in res.output and "candidates examined" in res.output
    d = json.loads(out.read_text())
    assert d["settings"]["min_precision"] == 0.7 and d["settings"]["fdr"] == 0.2 and d["selection"]["judge"] is None
    assert d["targets"] and d["selection"]["kept"] == len(d["targets"])
    for t in d["targets"]:
        assert t["precision"] >= 0.7 and t["q_value"] <= 0.2 and t["n_fires"] >= 3 and t["why"]
    for t in d["rejected"]:
        assert t["reasons"] and ("low_precision" in t["reasons"]) == (t["precision"] < 0.7)
        assert ("not_significant" in t["reasons"]) == (t["q_value"] > 0.2)
    assert sum(d["selection"]["rejected_by_reason"].values()) >= len(d["rejected"])
    doc = read_targets(out)
    assert [t["id"] for t in doc["targets"]] == [t["id"] for t in d["targets"]]
    # the coverage reader takes the new file as it took the old ones
    run_cli(["coverage", labelled, "--targets", out])


def test_a_file_with_every_candidate_rejected_says_where_to_look(tmp_path, labelled, model_args):
    out = tmp_path / "t.json"
    run_cli(["synth", "targets", labelled, "-o", out, "--min-delta", "0.05", "--min-precision", "1", "--fdr", "1e-12",
             "--judge-classifier", "none", *model_args])
    d = json.loads(out.read_text())
    assert not d["targets"] and d["rejected"]
    res = run_cli(["coverage", labelled, "--targets", out], ok=False)
    assert_user_error(res, "no targets", "rejected")


def test_an_llm_judge_over_a_served_model(tmp_path, labelled, model_args):
    out = tmp_path / "t.json"
    with FixedAnswerServer(lambda messages: "Request: BENIGN") as srv:
        run_cli(["synth", "targets", labelled, "-o", out, "--min-delta", "0.05", "--judge-classifier", "llm:judge-model",
                 "--judge-endpoint", srv.endpoint, *model_args])
    d = json.loads(out.read_text())
    assert d["settings"]["min_precision"] == 0.8 and d["settings"]["fdr"] == 0.05  # the command's bars by default
    assert d["selection"]["judge"] == "llm:judge-model" and srv.requests
    assert all(r["model"] == "judge-model" for r in srv.requests)
    # every context is benign to this judge: no harmful target survives, each says why
    assert all(t["label"] == "benign" for t in d["targets"])
    vetoed = [t for t in d["rejected"] if "contexts_not_harmful" in t["reasons"]]
    assert vetoed and all(t["judge_votes"]["benign"] == len(t["examples"]) for t in vetoed)


@pytest.mark.parametrize("args, name", [
    (["--min-precision", "1.5"], "--min-precision"), (["--min-precision", "nan"], "--min-precision"),
    (["--fdr", "0"], "--fdr"), (["--fdr", "2"], "--fdr"), (["--judge-window", "-1"], "--judge-window"),
    (["--judge-classifier", "no-such-classifier.json"], "no-such-classifier"),
    (["--judge-classifier", "llm:"], "--judge"),
    (["--judge-classifier", "none", "--judge-endpoint", "http://127.0.0.1:9/v1"], "--judge-endpoint"),
])
def test_bad_values_are_one_line_errors(tmp_path, labelled, model_args, args, name):
    res = run_cli(["synth", "targets", labelled, "-o", tmp_path / "t.json", *args, *model_args], ok=False)
    assert_user_error(res, name)
    assert not (tmp_path / "t.json").exists()
