"""Delta ranking, K choice, thresholds and the sparse linear rule on hand-built matrices with known answers."""

import numpy as np
import pytest
import scipy.sparse as sp

from safetyscope.discovery.rules import (
    LinearProbeClassifier,
    OrRuleClassifier,
    SparseLinearClassifier,
    classifier_from_dict,
    firing_rates,
    fpr_thresholds,
    greedy_select,
    group_splits,
    rank_features,
    rule_inputs,
)
from safetyscope.errors import SafetyScopeError


def _hand_matrix():
    # 4 toxic rows then 4 clean rows, 5 features.
    # f0 fires on all toxic, no clean: delta 1.   f1 on 2 toxic + 1 clean: delta 0.25.
    # f2 on everything: delta 0.                  f3 on 1 clean only: delta -0.25.  f4 never.
    dense = np.array([
        [1.0, 2.0, 1.0, 0, 0],
        [2.0, 1.0, 1.0, 0, 0],
        [0.5, 0.0, 1.0, 0, 0],
        [3.0, 0.0, 1.0, 0, 0],
        [0.0, 1.0, 1.0, 0, 0],
        [0.0, 0.0, 1.0, 1.0, 0],
        [0.0, 0.0, 1.0, 0, 0],
        [0.0, 0.0, 1.0, 0, 0],
    ])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    return sp.csr_matrix(dense), y


def test_firing_rates_and_delta_ranking():
    X, y = _hand_matrix()
    p_tox, p_clean = firing_rates(X, y)
    np.testing.assert_allclose(p_tox, [1, 0.5, 1, 0, 0])
    np.testing.assert_allclose(p_clean, [0, 0.25, 1, 0.25, 0])
    order, delta, _, _ = rank_features(X, y)
    assert order.tolist() == [0, 1, 2, 4, 3]  # ties (f2, f4 at 0) broken by lower id
    np.testing.assert_allclose(delta, [1, 0.25, 0, -0.25, 0])


def test_threshold_changes_what_fires():
    X, y = _hand_matrix()
    p_tox, _ = firing_rates(X, y, threshold=1.5)
    np.testing.assert_allclose(p_tox, [0.5, 0.25, 0, 0, 0])  # only activations > 1.5 count


def test_or_rule_with_fixed_k_predicts_any_feature():
    X, y = _hand_matrix()
    clf = OrRuleClassifier(max_features=2, selection="delta", fpr_cap=None).fit(X, y)
    assert clf.features_.tolist() == [0, 1]
    # row 4 (clean) fires f1 -> predicted toxic; every toxic row fires f0
    assert clf.predict(X).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    np.testing.assert_allclose(clf.decision_function(X)[:5], [2.0, 2.0, 0.5, 3.0, 1.0])
    assert clf.fired(X)[0] == [0, 1] and clf.fired(X)[6] == []
    assert clf.score(X, y) == pytest.approx(7 / 8)


def test_fpr_cap_raises_threshold_above_clean_activations():
    rng = np.random.default_rng(0)
    n = 200
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    f0 = np.r_[rng.uniform(2, 4, n), rng.uniform(0, 1.5, n)]  # clean texts fire it weakly
    X = sp.csr_matrix(f0[:, None])
    thr = fpr_thresholds(X, y, np.array([0]), 0.0, 0.02)[0]
    clean_fpr = (f0[n:] > thr).mean()
    assert clean_fpr <= 0.02 and thr > 1.0
    assert fpr_thresholds(X, y, np.array([0]), 0.0, None)[0] == 0.0


def test_k_chosen_on_holdout_prefers_the_informative_features():
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    dense = np.zeros((n, 30))
    # three planted features, each firing on a different third of the toxic texts and never on clean
    tox = np.flatnonzero(y == 1)
    for j, part in enumerate(np.array_split(tox, 3)):
        dense[part, j] = 1.0 + rng.random(len(part))
    # noise features fire at random on both classes, less often
    dense[:, 3:] = (rng.random((n, 27)) < 0.05) * rng.random((n, 27))
    clf = OrRuleClassifier(selection="delta", fpr_cap=None, random_state=0).fit(sp.csr_matrix(dense), y)
    # K=1 or 2 misses a third of the toxic texts; K=5 catches all three planted features
    assert clf.k_scores_[5] > clf.k_scores_[2] > clf.k_scores_[1]
    assert len(clf.features_) == 5 and set(clf.features_[:3]) == {0, 1, 2}
    assert clf.k_selection_.startswith("mean F1 on 3 stratified 25% hold-outs")


def _redundant_matrix(seed=3, n=400):
    """f0 and f1 fire on the same 60% of toxic texts (delta 0.6 each); f2 fires on the other 40% and on
    10% of clean texts (delta 0.3). f3 fires on every toxic text strongly and on 30% of clean ones weakly."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    tox, clean = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    head, tail = tox[: int(0.6 * len(tox))], tox[int(0.6 * len(tox)):]
    dense = np.zeros((n, 4))
    dense[head, 0] = 1 + rng.random(len(head))
    dense[head, 1] = 1 + rng.random(len(head))
    dense[tail, 2] = 1 + rng.random(len(tail))
    dense[clean[: len(clean) // 10], 2] = 1 + rng.random(len(clean) // 10)
    return y, dense


def test_greedy_picks_the_feature_that_covers_what_the_first_misses():
    y, dense = _redundant_matrix()
    X = sp.csr_matrix(dense[:, :3])
    delta = OrRuleClassifier(max_features=2, selection="delta", fpr_cap=None).fit(X, y)
    greedy = OrRuleClassifier(max_features=2, selection="greedy", fpr_cap=None).fit(X, y)
    assert delta.features_.tolist() == [0, 1]  # the top two by delta fire on the same texts
    assert sorted(greedy.features_.tolist()) in ([0, 2], [1, 2])
    assert delta.score(X, y) == pytest.approx(0.8)  # 40% of toxic missed
    assert greedy.score(X, y) == pytest.approx(0.95)  # every toxic text caught, 10% of clean flagged
    from sklearn.metrics import f1_score
    assert f1_score(y, greedy.predict(X)) > f1_score(y, delta.predict(X))


def test_greedy_threshold_separates_strong_toxic_from_weak_clean_firing():
    rng = np.random.default_rng(4)
    n = 400
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    f = np.zeros(n)
    f[: n // 2] = 3 + rng.random(n // 2)
    f[n // 2: n // 2 + 60] = rng.random(60)  # 30% of clean texts, weakly
    X = sp.csr_matrix(f[:, None])
    clf = OrRuleClassifier(max_features=1).fit(X, y)
    assert f[n // 2:].max() <= clf.thresholds_[0] < 3.0
    assert clf.score(X, y) == 1.0
    # with the cap at 0.5%, the only thresholds allowed are still above every clean activation
    feats, thr = greedy_select(X, y, 1, 0.0, 0.005)
    assert feats.tolist() == [0] and thr[0] >= f[n // 2:].max() - 1e-9


def test_greedy_selection_prefixes_are_the_smaller_rules():
    rng = np.random.default_rng(5)
    n = 300
    y = rng.integers(0, 2, n)
    dense = (rng.random((n, 40)) < 0.2) * rng.random((n, 40))
    dense[y == 1, :5] += (rng.random(((y == 1).sum(), 5)) < 0.3) * 2
    X = sp.csr_matrix(dense)
    f5, t5 = greedy_select(X, y, 5, 0.0, 0.2)
    f2, t2 = greedy_select(X, y, 2, 0.0, 0.2)
    assert f5[:2].tolist() == f2.tolist() and np.allclose(t5[:2], t2)
    assert len(set(f5.tolist())) == 5  # no feature twice
    # the training F1 of the OR of the first k never drops as k grows (each step takes the best)
    f1s = []
    from sklearn.metrics import f1_score
    for k in range(1, 6):
        pred = (dense[:, f5[:k]] > t5[:k]).any(axis=1)
        f1s.append(f1_score(y, pred))
    assert all(b >= a - 1e-12 for a, b in zip(f1s, f1s[1:]))


def test_unknown_selection_is_a_clear_error():
    X, y = _hand_matrix()
    with pytest.raises(SafetyScopeError, match="selection"):
        OrRuleClassifier(selection="best").fit(X, y)


def test_or_rule_round_trips_through_dict():
    X, y = _hand_matrix()
    clf = OrRuleClassifier(fpr_cap=0.25, max_features=3).fit(X, y)
    clone = classifier_from_dict(clf.to_dict())
    np.testing.assert_array_equal(clone.decision_function(X), clf.decision_function(X))
    assert clone.get_params() == clf.get_params()
    # a file written before `selection` existed was a delta-ranked rule
    old = clf.to_dict()
    del old["params"]["selection"], old["params"]["max_candidates"]
    assert classifier_from_dict(old).selection == "delta"


def test_sparse_linear_keeps_few_weights_and_separates():
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 2, n)
    dense = (rng.random((n, 200)) < 0.1) * rng.random((n, 200))
    dense[y == 1, 7] += 2.0
    dense[y == 1, 11] += rng.random((y == 1).sum()) * 2
    clf = SparseLinearClassifier(max_features=10, random_state=0).fit(sp.csr_matrix(dense), y)
    assert 1 <= len(clf.features_) <= 10
    assert 7 in clf.features_.tolist()
    assert clf.score(sp.csr_matrix(dense), y) > 0.9
    proba = clf.predict_proba(sp.csr_matrix(dense))
    np.testing.assert_allclose(proba.sum(1), 1.0)
    clone = classifier_from_dict(clf.to_dict())
    np.testing.assert_allclose(clone.decision_function(sp.csr_matrix(dense)), clf.decision_function(sp.csr_matrix(dense)))


def test_fit_needs_both_classes_and_matching_rows():
    X, y = _hand_matrix()
    with pytest.raises(SafetyScopeError, match="both"):
        OrRuleClassifier().fit(X, np.ones(8))
    with pytest.raises(SafetyScopeError, match="labels"):
        OrRuleClassifier().fit(X, y[:5])


# -- malformed classifier files: one-line errors naming the key ----------------------------------

def _or_dict():
    X, y = _hand_matrix()
    return OrRuleClassifier(fpr_cap=0.25, max_features=3).fit(X, y).to_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["features"][0].update(id=-1), r"features\[0\]\.id -1 is out of range 0\.\.4"),
    (lambda d: d["features"][0].update(id=5), r"features\[0\]\.id 5 is out of range 0\.\.4"),
    (lambda d: d["features"][0].update(id=1.9), r"features\[0\]\.id must be a finite integer; got 1\.9"),
    (lambda d: d["features"][0].update(id="1"), r"features\[0\]\.id must be a finite integer"),
    (lambda d: d["features"][0].update(threshold=float("nan")), r"features\[0\]\.threshold must be a finite number"),
    (lambda d: d["features"][0].update(threshold=float("inf")), r"features\[0\]\.threshold must be a finite number"),
    (lambda d: d["features"][0].pop("threshold"), r"features\[0\] is missing key 'threshold'"),
    (lambda d: d.pop("n_features_in"), r"missing key 'n_features_in'"),
    (lambda d: d.update(n_features_in="5"), r"'n_features_in' must be a int"),
    (lambda d: d.update(features={"id": 0}), r"'features' must be a list"),
    (lambda d: d["params"].update(bogus=1), r"params do not fit OrRuleClassifier"),
])
def test_or_rule_dict_malformed_values(edit, message):
    d = _or_dict()
    edit(d)
    with pytest.raises(SafetyScopeError, match=message):
        classifier_from_dict(d)


def test_or_rule_dict_integral_float_id_is_accepted():
    d = _or_dict()
    d["features"][0]["id"] = float(d["features"][0]["id"])  # 3.0 is the integer 3
    assert classifier_from_dict(d).features_.dtype == np.int64


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["features"][0].update(weight=float("nan")), r"features\[0\]\.weight must be a finite number"),
    (lambda d: d.update(intercept=None), r"intercept must be a finite number"),
    (lambda d: d.pop("C"), r"missing key 'C'"),
])
def test_sparse_linear_dict_malformed_values(edit, message):
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 30)
    dense = rng.random((60, 20)) * (rng.random((60, 20)) < 0.3)
    dense[y == 1, 2] += 2
    d = SparseLinearClassifier(max_features=5, C=1.0).fit(sp.csr_matrix(dense), y).to_dict()
    edit(d)
    with pytest.raises(SafetyScopeError, match=message):
        classifier_from_dict(d)


def _planted_overlap(seed=0, n=1200):
    """Planted features whose clean firing rates are known: f0 catches 70 % of toxic rows but also 10 % of
    clean ones at activation 1 (toxic at 3), so only a high threshold keeps it under a 2 % budget;
    f1..f4 each catch their own 10 % of toxic rows and 1 % of clean; the rest is noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(int)
    dense = (rng.random((n, 40)) < 0.05) * rng.random((n, 40))
    tox, clean = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    dense[rng.choice(tox, int(0.7 * len(tox)), replace=False), 0] = 3.0 + rng.random(int(0.7 * len(tox)))
    hit = rng.choice(clean, int(0.1 * len(clean)), replace=False)
    dense[hit, 0] = 1.0 + 2.5 * rng.random(len(hit))  # some clean texts reach toxic levels
    for f in range(1, 5):
        dense[rng.choice(tox, int(0.1 * len(tox)), replace=False), f] = 2.0
        dense[rng.choice(clean, int(0.01 * len(clean)), replace=False), f] = 2.0
    return sp.csr_matrix(dense), y


@pytest.mark.parametrize("selection", ["greedy", "delta"])
def test_recall_at_fpr_meets_the_clean_budget_on_held_out_data(selection):
    X, y = _planted_overlap(0)
    Xt, yt = _planted_overlap(1)  # fresh draw of the same process: a test split
    target = 0.02
    clf = OrRuleClassifier(selection=selection, criterion="recall_at_fpr", target_fpr=target).fit(X, y)
    assert len(clf.holdout_) == 3  # every hold-out's achieved recall and FPR is kept
    assert np.mean([f["fpr"] for f in clf.holdout_]) <= target
    pred = clf.predict(X)
    if selection == "greedy":  # greedy keeps the OR itself within budget on the fitting rows
        assert pred[y == 0].mean() <= target
    test_fpr = clf.predict(Xt)[yt == 0].mean()
    assert test_fpr <= 2 * target  # held-out noise, not an uncapped rule (F1 rule: ~0.1, below)
    f1_rule = OrRuleClassifier(selection=selection, criterion="f1").fit(X, y)
    assert f1_rule.predict(Xt)[yt == 0].mean() > 2 * target
    # the recall it buys is real: well above a single feature at the same budget
    assert clf.predict(Xt)[yt == 1].mean() > 0.5


def test_recall_at_fpr_greedy_stops_when_nothing_fits_the_budget():
    X, y = _hand_matrix()
    # f0 alone catches every toxic row with no clean firing; nothing else adds recall
    feats, thr = greedy_select(X, y, 5, 0.0, 0.25, target_fpr=0.25)
    assert feats.tolist() == [0]


def test_criterion_f1_is_the_default_and_old_files_load_as_f1():
    X, y = _planted_overlap(2, n=400)
    default = OrRuleClassifier(random_state=0).fit(X, y)
    explicit = OrRuleClassifier(random_state=0, criterion="f1").fit(X, y)
    assert default.features_.tolist() == explicit.features_.tolist()
    np.testing.assert_array_equal(default.thresholds_, explicit.thresholds_)
    old = default.to_dict()
    del old["params"]["criterion"], old["params"]["target_fpr"], old["k_folds"], old["holdout"]
    clone = classifier_from_dict(old)
    assert clone.criterion == "f1" and clone.holdout_ == []
    np.testing.assert_array_equal(clone.decision_function(X), default.decision_function(X))
    with pytest.raises(SafetyScopeError, match="criterion"):
        OrRuleClassifier(criterion="auc").fit(X, y)


def test_shipped_toxicity_classifier_files_load():
    from safetyscope.discovery.detector import read_classifier

    clf = classifier_from_dict(read_classifier("toxicity-or-rule")["rule"])  # the OR-rule, written before criterion
    assert len(clf.features_) == len(clf.thresholds_) >= 1 and clf.criterion in ("f1", "recall_at_fpr")
    sparse = classifier_from_dict(read_classifier("toxicity-sparse")["rule"])  # the sparse rule at its 2 % point
    op = sparse.operating_point_
    assert isinstance(sparse, SparseLinearClassifier) and sparse.target_fpr == op["target_fpr"] == 0.02
    assert op["oof_fpr"] <= 0.02 and len(sparse.features_) == len(sparse.weights_) >= 1
    default = classifier_from_dict(read_classifier(None)["rule"])  # the linear fallback at its 5 % point
    assert isinstance(default, LinearProbeClassifier) and default.operating_point_["oof_fpr"] <= 0.05


def test_random_matched_control_is_seeded_matches_clean_rates_and_loses_to_selection():
    from safetyscope.discovery.rules import RandomMatchedOrRule

    X, y = _planted_overlap(3, n=800)
    real = OrRuleClassifier(random_state=0).fit(X, y)
    a = RandomMatchedOrRule(random_state=0).fit(X, y)
    b = RandomMatchedOrRule(random_state=0).fit(X, y)
    c = RandomMatchedOrRule(random_state=1).fit(X, y)
    assert a.features_.tolist() == b.features_.tolist() and a.features_.tolist() != c.features_.tolist()
    assert len(a.features_) == len(real.features_) and not set(a.features_) & set(real.features_)
    assert np.all(a.p_clean_ <= np.maximum(real.p_clean_, 1 / (y == 0).sum()) + 1e-9)  # clean rates matched
    assert real.score(X, y) > a.score(X, y) + 0.2  # the planted features do the work, random ones do not


def test_sparse_linear_operating_point_meets_the_clean_budget_out_of_fold_and_on_new_data():
    X, y = _planted_overlap(0)
    Xt, yt = _planted_overlap(1)  # fresh draw of the same process: a test split
    plain = SparseLinearClassifier(max_features=8).fit(X, y)
    clf = SparseLinearClassifier(max_features=8, target_fpr=0.02).fit(X, y)
    op = clf.operating_point_
    assert op["target_fpr"] == 0.02 and op["oof_fpr"] <= 0.02 and 0 < op["oof_recall"] < 1
    # same weights, only the threshold moved: the intercept carries it
    np.testing.assert_array_equal(clf.features_, plain.features_)
    np.testing.assert_allclose(clf.intercept_, plain.intercept_ - op["threshold"])
    assert plain.predict(Xt)[yt == 0].mean() > 0.04  # the logistic operating point flags f0's clean texts
    assert clf.predict(Xt)[yt == 0].mean() <= 2 * 0.02  # held-out noise, not an uncapped rule
    assert clf.predict(Xt)[yt == 1].mean() > 0.5
    again = SparseLinearClassifier.from_dict(clf.to_dict())  # the file keeps the operating point
    assert again.operating_point_ == op and again.target_fpr == 0.02
    np.testing.assert_array_equal(again.decision_function(Xt), clf.decision_function(Xt))
    with pytest.raises(SafetyScopeError, match="target_fpr"):
        SparseLinearClassifier(target_fpr=1.5).fit(X, y)


def _lookalikes(seed=0, n=1200, n_look=150):
    """Toxic rows fire f0 (and often f1); a group of clean "lookalike" rows (like XSTest's harmless prompts
    that read as harmful) fires f0 as strongly but never f1; ordinary clean rows fire neither. Returns
    X, y and the lookalike mask."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(int)
    dense = (rng.random((n, 30)) < 0.05) * rng.random((n, 30))
    tox, clean = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    dense[tox, 0] = 2.0 + rng.random(len(tox))
    dense[rng.choice(tox, int(0.6 * len(tox)), replace=False), 1] = 2.0 + rng.random(int(0.6 * len(tox)))
    look = np.zeros(n, dtype=bool)
    look[rng.choice(clean, n_look, replace=False)] = True
    dense[look, 0] = 2.0 + rng.random(n_look)
    return sp.csr_matrix(dense), y, look


def test_sparse_linear_sample_weight_changes_the_fit_and_unit_weights_do_not():
    X, y, look = _lookalikes(0)
    plain = SparseLinearClassifier(max_features=8, C=1.0).fit(X, y)
    ones = SparseLinearClassifier(max_features=8, C=1.0).fit(X, y, sample_weight=np.ones(len(y)))
    np.testing.assert_array_equal(ones.features_, plain.features_)
    np.testing.assert_allclose(ones.weights_, plain.weights_)
    w = np.where(look, 5.0, 1.0)  # the lookalikes count five times
    heavy = SparseLinearClassifier(max_features=8, C=1.0).fit(X, y, sample_weight=w)
    # unweighted, f0 alone flags the lookalikes; weighted, the fit leans on f1 and flags far fewer of them
    coef = lambda clf, f: dict(zip(clf.features_.tolist(), clf.weights_))[f]  # noqa: E731
    assert coef(heavy, 0) < coef(plain, 0) and coef(heavy, 1) > coef(plain, 1)
    assert heavy.predict(X)[look].mean() < plain.predict(X)[look].mean() - 0.3
    # C chosen by CV: the weights enter the C search too (weighted F1), and the fit is still valid
    auto = SparseLinearClassifier(max_features=8).fit(X, y, sample_weight=w)
    assert auto.C_scores_ and auto.predict(X)[look].mean() < plain.predict(X)[look].mean()


def test_sparse_linear_fpr_rows_sets_the_operating_point_on_those_rows():
    X, y, look = _lookalikes(0)
    Xt, yt, look_t = _lookalikes(1)  # a fresh draw: the test split
    all_clean = SparseLinearClassifier(max_features=8, C=1.0, target_fpr=0.1).fit(X, y)
    on_look = SparseLinearClassifier(max_features=8, C=1.0, target_fpr=0.1).fit(X, y, fpr_rows=look)
    np.testing.assert_array_equal(on_look.weights_, all_clean.weights_)  # same fit; only the threshold moves
    op = on_look.operating_point_
    assert op["fpr_rows"] == look.sum() and op["oof_fpr"] <= 0.1 and op["oof_fpr"] > 0.05  # measured on them
    assert op["oof_fpr_all_clean"] < op["oof_fpr"]  # ordinary clean rows are easy: their rate is lower
    # on all clean rows, 10 % fits the lookalikes (a quarter of clean rows) comfortably: a lower threshold that
    # flags many of them
    assert all_clean.operating_point_["threshold"] < op["threshold"]
    assert all_clean.predict(Xt)[look_t].mean() > 0.2
    assert on_look.predict(Xt)[look_t].mean() <= 2 * 0.1
    assert on_look.predict(Xt)[yt == 1].mean() > 0.4
    again = SparseLinearClassifier.from_dict(on_look.to_dict())
    assert again.operating_point_ == op
    np.testing.assert_array_equal(again.decision_function(Xt), on_look.decision_function(Xt))


def test_sparse_linear_weighted_operating_point_counts_weight_not_rows():
    from safetyscope.discovery.rules import _rate_thresholds, _weighted_rate_threshold

    rng = np.random.default_rng(0)
    for n in (1, 3, 30, 101):  # unit weights: exactly the unweighted rule's threshold
        for rate in (0.01, 0.1, 0.3, 0.99):
            s = np.round(rng.normal(size=n), 1)  # ties included
            assert _weighted_rate_threshold(s, np.ones(n), rate) == _rate_thresholds(s[:, None], -np.inf, rate)[0]
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert _weighted_rate_threshold(s, np.ones(5), 0.2) == 4.0  # one of five rows may fire
    assert _weighted_rate_threshold(s, np.array([2.0, 1, 1, 1, 1]), 0.2) == 5.0  # the top row is 1/3 of the weight


@pytest.mark.parametrize("kwargs, mask, message", [
    ({}, "look", "needs target_fpr"),
    ({"target_fpr": 0.1}, "toxic", "clean rows only"),
    ({"target_fpr": 0.1}, "short", "boolean mask"),
    ({"target_fpr": 0.1}, "ints", "boolean mask"),
    ({"target_fpr": 0.1}, "two", "at least"),
])
def test_sparse_linear_fpr_rows_errors_name_the_problem(kwargs, mask, message):
    X, y, look = _lookalikes(0, n=200, n_look=20)
    masks = {"look": look, "toxic": look | (y == 1), "short": look[:-1], "ints": look.astype(int),
             "two": np.isin(np.arange(len(y)), np.flatnonzero(look)[:2])}
    with pytest.raises(SafetyScopeError, match=message):
        SparseLinearClassifier(C=1.0, **kwargs).fit(X, y, fpr_rows=masks[mask])


def _two_sources(seed=0, n=600):
    """Source "a": toxic rows fire f0 (a style marker, like profanity in tweets) and weakly f1 (the concept);
    source "b": toxic rows fire f1 only and clean rows fire f0 half the time (profanity that is not toxic)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(int)
    src = np.where(np.arange(n) < n // 2, "a", "b")
    dense = (rng.random((n, 20)) < 0.05) * rng.random((n, 20))
    a_tox, b_tox = (src == "a") & (y == 1), (src == "b") & (y == 1)
    dense[a_tox, 0] = 3.0
    dense[a_tox, 1] = 0.5 * rng.random(a_tox.sum()) + 0.3
    dense[b_tox, 1] = 1.0 + rng.random(b_tox.sum())
    b_clean = np.flatnonzero((src == "b") & (y == 0))
    dense[rng.choice(b_clean, len(b_clean) // 2, replace=False), 0] = 3.0
    return sp.csr_matrix(dense), y, src


def test_group_splits_hold_out_whole_groups_and_need_two():
    y = np.array([0, 1] * 6)
    groups = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 4)
    splits = group_splits(y, groups)
    assert len(splits) == 3
    for fit, held in splits:
        assert set(groups[fit]).isdisjoint(groups[held]) and len(set(groups[held])) == 1
    assert sorted(np.concatenate([h for _, h in splits]).tolist()) == list(range(12))
    with pytest.raises(SafetyScopeError, match="at least 2 groups"):
        group_splits(y, np.array(["a"] * 12))
    with pytest.raises(SafetyScopeError, match="group labels"):
        group_splits(y, groups[:5])


def test_grouped_operating_point_is_measured_on_held_out_sources():
    X, y, src = _two_sources()
    clf = SparseLinearClassifier(max_features=8, target_fpr=0.05).fit(X, y, groups=src)
    op = clf.operating_point_
    assert op["method"].startswith("out-of-group scores (2 groups")
    assert set(op["by_group"]) == {"a", "b"}
    assert op["by_group"]["a"]["toxic"] == (y[src == "a"] == 1).sum()
    assert op["oof_fpr"] <= 0.05
    # fitted on "a" alone, a rule leans on the style marker f0, which fires on half of b's clean rows: the
    # out-of-group numbers show that cost, which stratified folds over the pooled rows hide
    pooled = SparseLinearClassifier(max_features=8, target_fpr=0.05).fit(X, y)
    assert op["oof_recall"] < pooled.operating_point_["oof_recall"]
    again = SparseLinearClassifier.from_dict(clf.to_dict())
    assert again.operating_point_["by_group"] == op["by_group"]
    rule = OrRuleClassifier(criterion="recall_at_fpr", target_fpr=0.05).fit(X, y, groups=src)
    assert "held-out groups" in rule.k_selection_


def test_linear_probe_reads_codes_and_mean_residual_and_round_trips():
    """Toxic rows differ from clean ones only in the mean residual (no SAE feature tells them apart), as for
    statements without a swear word: a rule on the codes alone is at chance, the linear probe separates them."""
    rng = np.random.default_rng(0)
    n, d_sae, d_model = 400, 30, 8
    y = (np.arange(n) % 2).astype(int)
    codes = sp.csr_matrix((rng.random((n, d_sae)) < 0.1) * rng.random((n, d_sae)))
    mean = rng.normal(size=(n, d_model)) * 5.0 + 100.0  # large offset and scale: standardised inside the fit
    mean[:, 3] += 20.0 * y
    X = rule_inputs(LinearProbeClassifier(), codes, mean)
    assert X.shape == (n, d_sae + d_model)
    clf = LinearProbeClassifier(n_codes=d_sae, C=1.0, target_fpr=0.05).fit(X[:300], y[:300])
    s = clf.decision_function(X[300:])
    assert ((s > 0) == y[300:]).mean() > 0.8
    assert clf.operating_point_["oof_fpr"] <= 0.05
    codes_only = SparseLinearClassifier(max_features=8, C=1.0).fit(codes[:300], y[:300])
    assert ((codes_only.predict(codes[300:]) == y[300:]).mean()) < 0.65
    again = classifier_from_dict(clf.to_dict())
    np.testing.assert_allclose(again.decision_function(X[300:]), s)
    assert again.fired(X[300:]) == clf.fired(X[300:])
    bad = clf.to_dict()
    bad["weights"] = bad["weights"][:-1]
    with pytest.raises(SafetyScopeError, match="weights"):
        classifier_from_dict(bad)
    with pytest.raises(SafetyScopeError, match="mean residual"):
        rule_inputs(clf, codes)


def test_linear_probe_hard_negatives_weigh_more_and_set_the_operating_point():
    """Harmless rows that look like the positives (a shifted residual halfway to toxic: XSTest's idea) are few;
    weighting them and measuring the FPR on them alone lowers how many of them are flagged, at the price of recall."""
    rng = np.random.default_rng(1)
    n_pos, n_neg, n_hard, d_sae, d_model = 300, 300, 60, 10, 6
    y = np.r_[np.ones(n_pos), np.zeros(n_neg + n_hard)].astype(int)
    shift = np.r_[np.full(n_pos, 2.0), np.zeros(n_neg), np.full(n_hard, 1.3)]
    mean = rng.normal(size=(len(y), d_model))
    mean[:, 0] += shift
    codes = sp.csr_matrix((len(y), d_sae))
    X = rule_inputs(LinearProbeClassifier(), codes, mean)
    hard = np.r_[np.zeros(n_pos + n_neg, bool), np.ones(n_hard, bool)]
    plain = LinearProbeClassifier(n_codes=d_sae, C=1.0, target_fpr=0.10).fit(X, y)
    tuned = LinearProbeClassifier(n_codes=d_sae, C=1.0, target_fpr=0.10).fit(
        X, y, sample_weight=np.where(hard, 5.0, 1.0), fpr_rows=hard)
    flagged = lambda clf, rows: (clf.decision_function(X[rows]) > 0).mean()  # noqa: E731
    assert flagged(tuned, hard) < flagged(plain, hard) - 0.2
    assert tuned.operating_point_["fpr_rows"] == n_hard and tuned.operating_point_["sample_weight"]
    assert tuned.operating_point_["oof_fpr"] <= 0.10 + 1e-9
    with pytest.raises(SafetyScopeError, match="clean rows only"):
        LinearProbeClassifier(n_codes=d_sae, target_fpr=0.1).fit(X, y, fpr_rows=y == 1)


def test_every_shipped_rule_round_trips_to_the_same_json():
    """The classifier file format is the rules' to_dict: every rule of every shipped classifier file, loaded and written
    again, gives the same JSON text, key order included. A file written before a parameter existed (params without
    ``criterion``/``target_fpr``) is written back with that parameter's default beside the ones it has."""
    import json
    from pathlib import Path

    from safetyscope.discovery.rules import KINDS

    files = sorted((Path(__file__).parent.parent / "safetyscope" / "assets").glob("*.json"))
    seen = 0
    for path in files:
        doc = json.loads(path.read_text())
        if "rule" not in doc:
            continue
        for rule in [doc["rule"], *(doc.get("rules_by_lang") or {}).values()]:
            expected = {**rule, "params": {**KINDS[rule["kind"]]().get_params(), **rule["params"]}}
            assert json.dumps(classifier_from_dict(rule).to_dict()) == json.dumps(expected), path.name
            seen += 1
    assert seen >= 8
