"""What every rule shares: input validation for fit and predict, the ``_ScoreRule`` base (``predict``, ``fired``,
the start of ``from_dict``), the dense-block reader, the classifier-file field readers and writers, and
``rule_inputs``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ...errors import SafetyScopeError

# Fewest rows of each class a classifier is fitted on: 3 stratified hold-outs / CV folds need a few of each.
MIN_PER_CLASS = 5


def _check_Xy(X, y=None):
    """X as CSR (dense input as float32, as before validation existed), y as given; no estimator state."""
    if not sp.issparse(X):
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X = X.tocsr()
    if y is None:
        return X, None
    y = np.asarray(y)
    if X.shape[0] != len(y):
        raise SafetyScopeError(f"{X.shape[0]} rows of features but {len(y)} labels")
    return X, y


def _n_rows(X) -> int | None:
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape):
        return int(shape[0])
    try:
        return len(X)
    except TypeError:
        return None


def _validate_fit(est, X, y):
    """Validated (CSR X, y encoded 0/1); sets ``classes_`` (any two labels; classes_[1] is the one rules detect)
    and ``n_features_in_``. Labels 0/1 (every file written so far) map to themselves."""
    n_x, n_y = _n_rows(X), _n_rows(y)
    if n_x is not None and n_y is not None and n_x != n_y:
        raise SafetyScopeError(f"{n_x} rows of features but {n_y} labels")
    X, y = validate_data(est, X, y, accept_sparse="csr", dtype="numeric")
    check_classification_targets(y)
    classes, y01 = np.unique(y, return_inverse=True)
    if len(classes) != 2:
        if len(classes) == 1:
            raise SafetyScopeError(f"fitting needs both toxic and clean examples; got one class ({classes[0]!r})")
        raise SafetyScopeError(f"Only binary classification is supported (toxic vs clean); got {len(classes)} classes")
    est.classes_ = classes
    return _check_Xy(X, y01)


def _binary_sparse_tags(tags):
    """scikit-learn tags of both rule kinds: sparse input welcome, exactly two classes."""
    tags.input_tags.sparse = True
    tags.classifier_tags.multi_class = False
    return tags


def _validate_predict(est, X):
    """CSR X with the fitted number of columns; NotFittedError before fit."""
    check_is_fitted(est, "features_")
    X = validate_data(est, X, accept_sparse="csr", dtype="numeric", reset=False)
    return _check_Xy(X)[0]


def _check_enough_for_holdouts(y: np.ndarray, what: str) -> None:
    n_toxic, n_clean = int(y.sum()), int(len(y) - y.sum())
    if min(n_toxic, n_clean) < MIN_PER_CLASS:
        raise SafetyScopeError(f"choosing {what} on stratified hold-outs needs at least {MIN_PER_CLASS} toxic and "
                               f"{MIN_PER_CLASS} clean examples; got {n_toxic} toxic, {n_clean} clean")


# Dense (rows x selected features) blocks are built this many values at a time: a classifier over 10^6
# features must not allocate rows x 10^6 floats at once.
DENSE_BLOCK = 1 << 22


def _dense_blocks(X: sp.csr_matrix, features: np.ndarray):
    """(row slice, dense X[rows, features]) in row blocks of at most DENSE_BLOCK values."""
    step = max(1, DENSE_BLOCK // max(1, len(features)))
    sub = X[:, features]  # still sparse: one column selection, densified a block of rows at a time
    for start in range(0, X.shape[0], step):
        rows = slice(start, min(start + step, X.shape[0]))
        yield rows, sub[rows].toarray()



def _rows(sw: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if sw is None else sw[idx]



class _ScoreRule:
    """What every rule derives from its ``decision_function`` (> 0 exactly when the rule flags a text), the
    ``fired`` loop over dense blocks of the selected features, and the start of every ``from_dict``."""

    # set by each rule (fit / from_dict), declared here for the type checker only
    classes_: np.ndarray
    features_: np.ndarray
    decision_function: Callable[..., np.ndarray]

    def predict(self, X) -> np.ndarray:
        """classes_[1] where decision_function > 0, else classes_[0] (0/1 for every rule fitted on 0/1 labels)."""
        fires = self.decision_function(X) > 0  # checks fitted first
        return self.classes_[fires.astype(int)]

    def _fires(self, sub: np.ndarray) -> np.ndarray:
        """Which of the selected features (columns of a dense block ``sub``) each row names in ``fired``."""
        raise NotImplementedError

    def fired(self, X) -> list[list[int]]:
        """Per row, the selected features named as evidence (``_fires``)."""
        X = _validate_predict(self, X)
        out: list[list[int]] = []
        for _, sub in _dense_blocks(X, self.features_):
            out += [self.features_[row].tolist() for row in self._fires(sub)]
        return out

    @classmethod
    def _from_params(cls, d: dict, params: dict):
        """A rule built from a file's ``params`` with its ``classes`` read; the fitted attributes are the caller's."""
        clf = _construct(cls, params)
        clf.classes_ = _read_classes(d)
        return clf


class _LogisticScoreRule(_ScoreRule):
    """A rule whose score is a logistic regression's log-odds (threshold folded into the intercept)."""

    def predict_proba(self, X) -> np.ndarray:
        p = 1 / (1 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)



def _number(v, key: str, *, integer: bool = False):
    """A finite JSON number (an integer where ``integer``; 161.0 counts, 161.9 does not); else a named error."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    if ok and integer and float(v) != int(v):
        ok = False
    if not ok:
        raise SafetyScopeError(f"classifier {key} must be a finite {'integer' if integer else 'number'}; got {v!r}")
    return int(v) if integer else float(v)


def _read_features(d: dict, fields: tuple[str, ...]) -> tuple[int, dict[str, np.ndarray]]:
    """(n_features_in, {"id": ids, field: values}) from a rule dict, every key checked: a malformed id would
    index another feature (-1 wraps to the last), a NaN threshold silently never fires."""
    for key, kind in (("n_features_in", int), ("features", list), ("params", dict)):
        if key not in d:
            raise SafetyScopeError(f"classifier rule is missing key {key!r}")
        if not isinstance(d[key], kind) or isinstance(d[key], bool):
            raise SafetyScopeError(f"classifier rule key {key!r} must be a {kind.__name__}; got {d[key]!r:.80}")
    n = _number(d["n_features_in"], "n_features_in", integer=True)
    if n < 1:
        raise SafetyScopeError(f"classifier n_features_in must be positive; got {n}")
    cols: dict[str, list] = {name: [] for name in ("id", *fields)}
    for i, f in enumerate(d["features"]):
        if not isinstance(f, dict):
            raise SafetyScopeError(f"classifier features[{i}] must be an object; got {f!r:.80}")
        for name in cols:
            if name not in f:
                raise SafetyScopeError(f"classifier features[{i}] is missing key {name!r}")
            cols[name].append(_number(f[name], f"features[{i}].{name}", integer=name == "id"))
        if not 0 <= cols["id"][-1] < n:
            raise SafetyScopeError(f"classifier features[{i}].id {cols['id'][-1]} is out of range 0..{n - 1}")
    return n, {"id": np.array(cols["id"], dtype=np.int64),
               **{name: np.array(cols[name], dtype=np.float64) for name in fields}}


def _write_classes(clf, out: dict) -> None:
    """Labels other than 0/1 go into the file as "classes"; 0/1 rules (every file so far) are written as before."""
    classes = clf.classes_.tolist()
    if classes != [0, 1]:
        out["classes"] = classes


def _read_classes(d: dict) -> np.ndarray:
    classes = d.get("classes", [0, 1])
    if not isinstance(classes, list) or len(classes) != 2 or classes[0] == classes[1]:
        raise SafetyScopeError(f"classifier classes must be a list of two different labels; got {classes!r:.80}")
    return np.array(classes)


def _construct(cls, params: dict):
    try:
        return cls(**params)
    except TypeError as e:  # an unknown or missing parameter name
        raise SafetyScopeError(f"classifier params do not fit {cls.__name__} ({e})") from None



def rule_inputs(rule, codes, mean_acts=None):
    """The matrix a rule reads: SAE codes, or ``hstack([codes, mean_acts])`` for a rule that ``reads`` both."""
    if getattr(rule, "reads", "codes") != "codes+mean":
        return codes
    if mean_acts is None:
        raise SafetyScopeError("this classifier reads the mean residual beside the SAE codes; none was given")
    return sp.hstack([sp.csr_matrix(codes), sp.csr_matrix(np.asarray(mean_acts, dtype=np.float32))], format="csr")

