"""The discovery job: labelled texts -> features that fire more on toxic texts -> a Detector."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ..data import data_sha256, parse_labels, read_table, require_columns, require_text, text_list
from ..errors import SafetyScopeError
from ..features import FeatureConfig, FeatureExtractor, extract_shared, layer_extractors
from .config import DiscoverConfig
from .detector import Detector
from .rules import (
    LinearProbeClassifier,
    OrRuleClassifier,
    SparseLinearClassifier,
    _check_enough_for_holdouts,
    best_layer,
    rank_features,
    rule_inputs,
)


def load_labelled(paths: list[str], cfg: DiscoverConfig) -> pl.DataFrame:
    frames = []
    for p in paths:
        needed = [cfg.text_column, cfg.label_column] + ([cfg.group_column] if cfg.group_column else [])
        df = require_text(read_table(p, columns=needed), cfg.text_column, p)
        if cfg.split is not None:
            require_columns(df, ["split"], p)
            df = df.filter(pl.col("split") == cfg.split)
        if cfg.langs:
            require_columns(df, ["lang"], p)
            df = df.filter(pl.col("lang").is_in(cfg.langs))
        keep = [c for c in (cfg.text_column, cfg.label_column, "lang", cfg.group_column) if c and c in df.columns]
        text = pl.col(cfg.text_column)
        df = df.select(list(dict.fromkeys(keep))).filter(text.is_not_null() & (text.str.strip_chars() != ""))
        # labels parsed per file, so a bad value (or a column of lists) is named with the file that holds it
        df = df.with_columns(pl.Series(cfg.label_column, parse_labels(df.get_column(cfg.label_column), str(p)),
                                       dtype=pl.Int8))
        if cfg.group_column:
            missing = df.get_column(cfg.group_column).null_count()
            if missing:
                raise SafetyScopeError(f"{p}: {missing} row(s) have no {cfg.group_column!r} (--group-column)")
            df = df.with_columns(pl.col(cfg.group_column).cast(pl.String))
        frames.append(df)
    df = pl.concat(frames, how="diagonal")
    if df.height == 0:
        raise SafetyScopeError(f"no rows left in {paths} after filtering (split={cfg.split}, langs={cfg.langs})")
    return df


def data_summary(df: pl.DataFrame, y: np.ndarray, cfg: DiscoverConfig, paths: list[str]) -> dict:
    out = {"files": [str(p) for p in paths], "rows": int(len(y)), "toxic": int(y.sum()), "clean": int(len(y) - y.sum()),
           "split": cfg.split, "sha256": data_sha256(y, df.get_column(cfg.text_column))}
    if "lang" in df.columns:
        langs = df.with_columns(pl.Series("_y", y)).group_by("lang").agg(
            pl.col("_y").sum().alias("toxic"), (1 - pl.col("_y")).sum().alias("clean")).sort("lang")
        out["per_lang"] = {r["lang"]: {"toxic": r["toxic"], "clean": r["clean"]} for r in langs.iter_rows(named=True)}
    return out


def make_rule(cfg: DiscoverConfig, d_sae: int = 0):
    if cfg.kind == "or_rule":
        return OrRuleClassifier(max_features=cfg.max_features, selection=cfg.selection, threshold=cfg.threshold,
                                fpr_cap=cfg.fpr_cap, random_state=cfg.seed, criterion=cfg.criterion,
                                target_fpr=cfg.target_fpr)
    if cfg.kind == "sparse_linear":
        return SparseLinearClassifier(max_features=cfg.max_features or 128, random_state=cfg.seed,
                                      target_fpr=cfg.target_fpr if cfg.criterion == "recall_at_fpr" else None)
    if cfg.kind == "linear":
        return LinearProbeClassifier(n_codes=d_sae, random_state=cfg.seed,
                                     target_fpr=cfg.target_fpr if cfg.criterion == "recall_at_fpr" else None)
    raise SafetyScopeError(f"unknown classifier kind {cfg.kind!r}; use or_rule, sparse_linear or linear")


def discover(paths: list[str], cfg: DiscoverConfig, fcfg: FeatureConfig, *, progress: bool = True) -> Detector:
    df = load_labelled(paths, cfg)
    y = df.get_column(cfg.label_column).to_numpy().astype(int)  # parsed per file by load_labelled
    if len(set(y.tolist())) < 2:
        raise SafetyScopeError("discovery needs both toxic and clean rows; found only one class")
    if cfg.per_language:
        check_per_language(df, y)  # before the feature extraction, the expensive part
    texts = text_list(df, cfg.text_column)
    layers = cfg.layers or ([fcfg.layer] if fcfg.layer is not None else [])
    if len(layers) <= 1:
        fx = FeatureExtractor.from_config(fcfg)
        ex = fx.extract(texts, progress=progress)
        codes, means = ex.codes, ex.mean_acts
        scan = None
    else:  # one SAE per layer, all layers from one forward pass; keep the layer whose best feature separates most
        fxs = layer_extractors(fcfg, list(dict.fromkeys(layers)))
        scan, by_layer, means_by_layer = {}, {}, {}
        for fx_l, ex_l in zip(fxs, extract_shared(fxs, texts, progress=progress)):
            order, delta, _, _ = rank_features(ex_l.codes, y, cfg.threshold)
            scan[fx_l.layer] = {"best_feature": int(order[0]), "best_delta": float(delta[order[0]])}
            by_layer[fx_l.layer] = ex_l.codes
            means_by_layer[fx_l.layer] = ex_l.mean_acts
        chosen = best_layer({la: v["best_delta"] for la, v in scan.items()})
        fx, codes, means = next(f for f in fxs if f.layer == chosen), by_layer[chosen], means_by_layer[chosen]
    pooled_cfg = replace(cfg, kind=cfg.fallback_kind) if cfg.per_language and cfg.fallback_kind else cfg
    groups = df.get_column(cfg.group_column).to_numpy() if cfg.group_column else None
    d_sae = fx.sae.cfg.d_sae
    built: dict[str, object] = {}

    def inputs_of(rule):  # the matrix a rule reads (rule_inputs), built once per kind of input
        key = getattr(rule, "reads", "codes")
        if key not in built:
            built[key] = rule_inputs(rule, codes, means)
        return built[key]

    if "lang" in df.columns:
        langs = [str(v) for v in df.get_column("lang").to_list()]
    else:  # the languages the rule is validated on must be known: identify them as classify would
        from ..langid import identify

        langs = identify(texts)
    rules_by_lang = {}
    if cfg.shared_weights:  # one rule on every language's rows, each language its own threshold
        from .shared_rule import fit_shared

        rule = make_rule(cfg, d_sae)
        rule, rules_by_lang, validation = fit_shared(rule, inputs_of(rule), y, langs, cfg.target_fpr, seed=cfg.seed)
    else:
        # fitting can take longer than extraction (a linear rule over a wide SAE, validated on 3 hold-outs): a bar
        # with one step for the pooled rule and one per language rule
        n_rules = 1 + (len(set(langs)) if cfg.per_language else 0)
        # (closed on an error too, so a user error prints on its own line after the bar)
        with tqdm(total=n_rules, desc="fitting rules", unit="rule", disable=not progress) as bar:
            bar.set_postfix_str("all languages pooled")
            rule = make_rule(pooled_cfg, d_sae)
            rule.fit(inputs_of(rule), y, groups=groups)
            validation = language_validation(rule, inputs_of(rule), y, langs, cfg.seed)
            bar.update()
            if cfg.per_language:
                rules_by_lang, own = fit_per_language(inputs_of(make_rule(cfg, d_sae)), y, langs, cfg, groups, d_sae,
                                                      bar=bar)
                validation = {**own, "fallback": validation}  # the pooled rule's hold-out numbers, for comparison
    meta = {"sae_id": fcfg.sae or "default", "discovery_data": data_summary(df, y, cfg, paths),
            "validation": validation,
            "settings": {"kind": cfg.kind, "selection": cfg.selection, "threshold": cfg.threshold, "fpr_cap": cfg.fpr_cap, "seed": cfg.seed,
                         "criterion": cfg.criterion, "target_fpr": cfg.target_fpr, "per_language": cfg.per_language,
                         "fallback_kind": pooled_cfg.kind, "group_column": cfg.group_column,
                         "shared_weights": cfg.shared_weights}}
    if scan:
        meta["layer_scan"] = {"layers": scan, "chosen": fx.layer,
                              "multi_layer": multi_layer_scan(by_layer, y, scan, cfg.threshold, cfg.seed)}
    for name, r in [("the rule", rule), *((f"the {la!r} rule", r) for la, r in rules_by_lang.items())]:
        if len(r.features_) == 0:  # it would flag no text (or, with a positive intercept, every text)
            raise SafetyScopeError(f"{name} found no SAE feature that tells toxic from clean rows on this data; check "
                                   "the labels, add rows, or try --kind linear")
    det = Detector(fx, rule, meta, rules_by_lang)
    from .naming import names_record

    where = ", ".join(map(str, paths)) + (f" (split {cfg.split})" if cfg.split else "")
    det.meta["feature_names"] = names_record(det, texts, codes, f"{where}: the {len(texts)} discovery rows",
                                             progress=progress)
    return det


def check_per_language(df: pl.DataFrame, y: np.ndarray) -> None:
    """--per-language needs each row's language and, per language, enough toxic and clean rows for the
    hold-outs that choose and validate its rule."""
    if "lang" not in df.columns:
        raise SafetyScopeError("--per-language needs a `lang` column naming each row's language")
    langs = df.get_column("lang")
    if langs.null_count():
        raise SafetyScopeError(f"--per-language: {langs.null_count()} row(s) have no `lang`")
    langs = langs.cast(pl.String).to_numpy()
    for lang in sorted(set(langs.tolist())):
        try:
            _check_enough_for_holdouts(y[langs == lang], "its rule")
        except SafetyScopeError as e:
            raise SafetyScopeError(f"--per-language: language {lang!r}: {e}; add rows or leave it out with --lang") from None


def fit_per_language(codes, y: np.ndarray, langs: list[str], cfg: DiscoverConfig,
                     groups=None, d_sae: int = 0, bar=None) -> tuple[dict, dict]:
    """({language: rule fitted on that language's rows only}, the validation record): same kind, K choice and
    criterion as the pooled rule; per language, the hold-out recall and clean FPR of its own rule. With
    ``groups``, a language of two or more groups chooses on held-out groups; one of a single group as before."""
    langs = np.asarray(langs, dtype=object)
    rules, per_lang = {}, {}
    for lang in sorted(set(langs.tolist())):
        if bar is not None:
            bar.set_postfix_str(lang)
        rows = np.flatnonzero(langs == lang)
        g = None if groups is None else np.asarray(groups, dtype=object)[rows]
        if g is not None and len(set(g.tolist())) < 2:
            g = None
        rules[lang] = make_rule(cfg, d_sae).fit(codes[rows], y[rows], groups=g)
        v = language_validation(rules[lang], codes[rows], y[rows], [lang] * len(rows), cfg.seed)
        per_lang[lang] = {**v["per_lang"][lang], "k": len(rules[lang].features_), "method": v["method"]}
        if bar is not None:
            bar.update()
    return rules, {"languages": sorted(rules), "per_lang": per_lang,
                   "method": "each language's own rule, fitted and validated on that language's rows only "
                             "(per_lang.*.method); `fallback`: the rule fitted on all languages pooled"}


def language_validation(rule, codes, y: np.ndarray, langs: list[str], seed: int, n_splits: int = 3,
                        holdout: float = 0.25) -> dict:
    """Per language of the discovery data, the recall and clean FPR the rule reaches on held-out rows:
    the rule (same settings, K fixed to the fitted one) is refitted on each of ``n_splits`` stratified
    hold-out splits and its predictions on the held-out rows are pooled. ``languages`` are those with
    toxic and clean discovery rows: `classify` marks rows in any other language "unvalidated language"."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedShuffleSplit

    langs = np.asarray(langs, dtype=object)
    k = max(1, len(rule.features_))
    pred = np.zeros((n_splits, len(y)), dtype=int)
    seen = np.zeros((n_splits, len(y)), dtype=bool)
    splits = StratifiedShuffleSplit(n_splits, test_size=holdout, random_state=seed)
    for i, (idx_fit, idx_val) in enumerate(splits.split(np.zeros(len(y)), y)):
        est = clone(rule)
        if "max_features" in est.get_params():
            est.set_params(max_features=k)
        est.fit(codes[idx_fit], y[idx_fit])
        pred[i, idx_val], seen[i, idx_val] = est.predict(codes[idx_val]), True
    per_lang = {}
    for lang in sorted(set(langs.tolist())):
        m = (langs == lang)[None, :] & seen
        tox, clean = m & (y == 1)[None, :], m & (y == 0)[None, :]
        per_lang[lang] = {"toxic": int((langs == lang)[y == 1].sum()), "clean": int((langs == lang)[y == 0].sum()),
                          "holdout_recall": float(pred[tox].mean()) if tox.any() else None,
                          "holdout_fpr": float(pred[clean].mean()) if clean.any() else None}
    validated = [la for la, v in per_lang.items() if v["toxic"] and v["clean"]]
    return {"languages": validated, "per_lang": per_lang,
            "method": f"K={k} rule refitted on {n_splits} stratified {holdout:.0%} hold-outs (seed {seed}), pooled"}


def multi_layer_scan(codes_by_layer: dict, y: np.ndarray, scan: dict, threshold: float, seed: int,
                     holdout: float = 0.25) -> list[dict]:
    """The report's multi-layer variant: the best single feature of each of the top-m layers (by best
    delta), OR-ed. Features are ranked on the fitting part and F1 is measured on a stratified hold-out
    of the discovery data, for m = 1 .. number of layers, so it can be set beside the single-layer rule."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    idx_fit, idx_val = train_test_split(np.arange(len(y)), test_size=holdout, stratify=y, random_state=seed)
    ranked = sorted(scan, key=lambda layer: (-scan[layer]["best_delta"], layer))
    fires, feats, out = np.zeros(len(idx_val), dtype=bool), [], []
    for layer in ranked:
        X = codes_by_layer[layer]
        order, _, _, _ = rank_features(X[idx_fit], y[idx_fit], threshold)
        f = int(order[0])
        feats.append([int(layer), f])
        fires |= np.asarray((X[idx_val][:, f] > threshold).todense()).ravel()
        out.append({"m": len(feats), "features": list(feats),
                    "holdout_f1": float(f1_score(y[idx_val], fires.astype(int), zero_division=0))})
    return out
