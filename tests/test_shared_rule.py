"""`discover --per-language --shared-weights` (discovery/shared_rule.py): one rule fitted on every language's rows,
each language weighing the same, and only its threshold set per language."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import run_cli
from sklearn.metrics import roc_auc_score
from test_per_language import _model_args

from safetyscope.discovery.config import DiscoverConfig
from safetyscope.discovery.rules import LinearProbeClassifier, rule_inputs
from safetyscope.discovery.shared_rule import fit_shared, language_balanced_weights
from safetyscope.errors import SafetyScopeError

D_SAE = 8  # columns: 0 = the concept (fires more on toxic rows in every language), 1..5 = one source word per
# language, 6..7 noise; the residual part is 3 noise columns


def _rows(rng, lang_id: int, n: int, shortcut: bool):
    """n rows of one language. With ``shortcut``, that language's source word fires on 90 % of its toxic rows and
    10 % of its clean ones (the style of one training source); without, it fires at random (the same language
    from another source)."""
    y = rng.integers(0, 2, n)
    codes = np.zeros((n, D_SAE))
    codes[:, 0] = np.where(rng.random(n) < np.where(y == 1, 0.7, 0.2), rng.uniform(1, 3, n), 0)
    word = rng.random(n) < (np.where(y == 1, 0.9, 0.1) if shortcut else 0.5)
    codes[:, 1 + lang_id] = np.where(word, rng.uniform(1, 3, n), 0)
    codes[:, 6:] = np.where(rng.random((n, 2)) < 0.3, rng.uniform(1, 3, (n, 2)), 0)
    mean = rng.normal(size=(n, 3))
    return sp.csr_matrix(codes), mean, y


def _data(seed=0, n_small=80, n_big=600):
    """Language "aa" is small and its one source has a shortcut word; four larger ones have none."""
    rng = np.random.default_rng(seed)
    parts = [(*_rows(rng, 0, n_small, True), "aa")] + [(*_rows(rng, i, n_big, False), la)
                                                       for i, la in enumerate(["bb", "cc", "dd", "ee"], 1)]
    codes = sp.vstack([p[0] for p in parts]).tocsr()
    mean = np.vstack([p[1] for p in parts])
    y = np.concatenate([p[2] for p in parts])
    langs = np.concatenate([[p[3]] * len(p[2]) for p in parts])
    return codes, mean, y, langs


def test_every_language_shares_the_weights_and_meets_its_own_operating_point():
    codes, mean, y, langs = _data()
    X = rule_inputs(LinearProbeClassifier(), codes, mean)
    fallback, by_lang, val = fit_shared(LinearProbeClassifier(n_codes=D_SAE, C=0.01), X, y, langs, 0.1)
    assert sorted(by_lang) == ["aa", "bb", "cc", "dd", "ee"] == val["languages"]
    for r in [fallback, *by_lang.values()]:
        np.testing.assert_array_equal(r.weights_, fallback.weights_)
        assert r.operating_point_["oof_fpr"] <= 0.1 and r.target_fpr == 0.1
    assert len({round(r.intercept_, 9) for r in by_lang.values()}) == 5  # a threshold of its own per language
    for lang, r in by_lang.items():  # in sample, each language's clean rows are flagged near its budget
        m = langs == lang
        flagged = r.predict(X[m & (y == 0)]).mean()
        assert flagged <= 0.2, (lang, flagged)
        assert val["per_lang"][lang]["holdout_fpr"] == r.operating_point_["oof_fpr"]


def test_shared_weights_carry_over_where_a_languages_own_rule_learnt_its_source():
    """Out of source (aa's shortcut word now fires at random), aa's own rule has learnt the word; the shared rule,
    which saw the concept in every language with aa weighing no more than the others, still ranks aa's rows."""
    codes, mean, y, langs = _data()
    X = rule_inputs(LinearProbeClassifier(), codes, mean)
    _, by_lang, _ = fit_shared(LinearProbeClassifier(n_codes=D_SAE, C=0.01), X, y, langs, 0.1)
    own = LinearProbeClassifier(n_codes=D_SAE, C=0.01, target_fpr=0.1).fit(X[langs == "aa"], y[langs == "aa"])
    tc, tm, ty = _rows(np.random.default_rng(1), 0, 2000, shortcut=False)
    Xt = rule_inputs(own, tc, tm)
    auc_own = roc_auc_score(ty, own.decision_function(Xt))
    auc_shared = roc_auc_score(ty, by_lang["aa"].decision_function(Xt))
    assert auc_shared > auc_own + 0.05, (auc_shared, auc_own)
    assert by_lang["aa"].weights_[0] > by_lang["aa"].weights_[1]  # the concept weighs more than aa's source word


def test_language_balanced_weights_give_each_language_and_class_the_same_total():
    langs = np.array(["aa"] * 10 + ["bb"] * 90)
    y = np.array([1] * 3 + [0] * 7 + [1] * 45 + [0] * 45)
    w = language_balanced_weights(langs, y)
    assert w.mean() == pytest.approx(1.0)
    totals = [w[(langs == la) & (y == c)].sum() for la in ("aa", "bb") for c in (0, 1)]
    assert totals == pytest.approx([totals[0]] * 4)


@pytest.mark.parametrize("kw, message", [
    ({"shared_weights": True}, "it needs --per-language"),
    ({"shared_weights": True, "per_language": True}, "needs a weighted rule"),
    ({"shared_weights": True, "per_language": True, "kind": "linear", "group_column": "source"}, "drop --group-column"),
])
def test_shared_weights_settings_that_cannot_work_are_refused(kw, message):
    with pytest.raises(SafetyScopeError, match=message):
        DiscoverConfig(**kw)


def test_discover_shared_weights_writes_one_weight_vector_with_a_threshold_per_language(
        tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    from test_per_language import planted_rows

    data = tmp_path / "planted.parquet"
    planted_rows().write_parquet(data)
    out = tmp_path / "shared.json"
    res = run_cli(["discover", data, "-o", out, "--split", "discovery", "--per-language", "--shared-weights",
                   "--kind", "linear", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    assert "the same weights, threshold on every language's clean rows" in res.output
    d = json.loads(out.read_text())
    assert d["settings"]["shared_weights"] is True and sorted(d["rules_by_lang"]) == ["aa", "bb"]
    weights = [d["rule"]["weights"], *(r["weights"] for r in d["rules_by_lang"].values())]
    assert all(w == weights[0] for w in weights)
    assert "threshold on the clean rows of aa" in d["rules_by_lang"]["aa"]["operating_point"]["method"]
