"""Choose the shipped harmful-request classifier's setting on the `seed` split only, and write it (--ship).

Each named setting (rule kind; weight of the XSTest `safe` seed rows; operating point) is fitted on 4 of 5
stratified folds of the seed rows and scored on the fifth: F1, precision, recall (all rows and English only), and
the flag rate on the held-out XSTest `safe` prompts (harmless prompts that look dangerous: the over-refusal
constraint). Pool rows are never read. Setting names: `wN` = XSTest-safe rows weigh N in the fit (sample_weight);
`hnR` = the threshold at an R % out-of-fold flag rate on the XSTest-safe rows (fpr_rows; "hard negatives")
instead of the logistic operating point.

    python scripts/harmful_request_settings.py ../shared/data/safety/prompts.parquet --seed-other-per-lang 150
    python scripts/harmful_request_settings.py ../shared/data/safety/prompts.parquet --seed-other-per-lang 150 \\
        --only "sparse_linear w5 hn10" --ship safetyscope/assets/harmful-request-smollm2-135m-instruct.json

--extra-benign N (diagnostic, not shipped): N clean comments per language of the toxicity pack's `discovery` split
join the fit as benign rows, because every benign prompt of the safety table is English and a rule can learn
"not English = harmful"; their out-of-fold flag rate is printed per language beside the seed metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
from eval_harmful_request import load_splits
from sklearn.model_selection import StratifiedKFold

from safetyscope.data import data_sha256, parse_labels, read_table
from safetyscope.discovery.detector import Detector
from safetyscope.discovery.rules import OrRuleClassifier, SparseLinearClassifier
from safetyscope.eval.metrics import binary_metrics
from safetyscope.features import FeatureConfig, FeatureExtractor

# name -> kind and its options; `weight`: sample weight of the XSTest-safe rows; `hn`: target flag rate on them
SETTINGS = {
    "or_rule greedy cap0.005": {"kind": "or_rule", "fpr_cap": 0.005},  # the previous shipped file's setting
    "sparse_linear": {"kind": "sparse_linear"},
    "sparse_linear hn10": {"kind": "sparse_linear", "hn": 0.10},
    "sparse_linear w5 hn10": {"kind": "sparse_linear", "weight": 5.0, "hn": 0.10},
    "sparse_linear w5 hn5": {"kind": "sparse_linear", "weight": 5.0, "hn": 0.05},
    "sparse_linear w10 hn10": {"kind": "sparse_linear", "weight": 10.0, "hn": 0.10},
}
TOXICITY_LANGS = "am ar de en es fr he hi hi_latn it ja ru uk zh".split()


def make(setting: dict, seed: int):
    """(estimator, fit(est, X, y, safe) -> est) for one setting; `safe` marks the XSTest-safe rows of X."""
    if setting["kind"] == "or_rule":
        est = OrRuleClassifier(selection="greedy", fpr_cap=setting["fpr_cap"], random_state=seed)
        return est, lambda e, X, y, safe: e.fit(X, y)
    est = SparseLinearClassifier(random_state=seed, target_fpr=setting.get("hn"))

    def fit(e, X, y, safe):
        w = np.where(safe, setting["weight"], 1.0) if "weight" in setting else None
        return e.fit(X, y, sample_weight=w, fpr_rows=safe if "hn" in setting else None)

    return est, fit


def extra_benign(toxicity_dir: Path, per_lang: int, seed: int, split: str = "discovery") -> pl.DataFrame:
    """``per_lang`` random clean rows of each language's toxicity file (``split``), as benign prompts."""
    parts = []
    for lang in TOXICITY_LANGS:
        df = read_table(str(toxicity_dir / f"{lang}.parquet"), columns=["text", "label", "lang", "split"])
        df = df.filter((pl.col("split") == split) & (pl.col("label") == 0)).sample(fraction=1.0, shuffle=True, seed=seed)
        parts.append(df.head(per_lang).select(pl.col("text").alias("prompt"), pl.lit("benign").alias("label"),
                                              pl.col("lang"), pl.lit("toxicity_clean").alias("source")))
    return pl.concat(parts)


def cross_validate(name: str, X, y, safe, extra, en, folds, seed: int) -> tuple[dict, np.ndarray]:
    """Out-of-fold metrics of one setting on the seed rows (``extra`` rows, if any, are fitted on and scored
    out-of-fold but left out of the seed metrics), and the out-of-fold flags."""
    pred = np.zeros(len(y), dtype=bool)
    ks = []
    for fit, test in folds:
        est, fit_fn = make(SETTINGS[name], seed)
        rule = fit_fn(est, X[fit], y[fit], safe[fit])
        pred[test] = rule.predict(X[test]).astype(bool)
        ks.append(len(rule.features_))
    seed_rows = ~extra
    m = binary_metrics(y[seed_rows], pred[seed_rows])
    m_en = binary_metrics(y[seed_rows & en], pred[seed_rows & en])
    out = {"setting": name, "f1": m["f1"], "precision": m["precision"], "recall": m["recall"], "f1_en": m_en["f1"],
           "xstest_safe_flag_rate": float(pred[safe].mean()), "xstest_safe_flagged": int(pred[safe].sum()),
           "xstest_safe_n": int(safe.sum()), "k_folds": ks}
    if extra.any():
        out["extra_benign_flag_rate"] = float(pred[extra].mean())
    return out, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts")
    ap.add_argument("--langs", default="en", help="languages whose seed rows are all used")
    ap.add_argument("--seed-other-per-lang", type=int, default=0,
                    help="random seed rows of every other language (all harmful: the table's benign rows are English)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-rows", type=int, default=-1, help="random seed rows of --langs to use (-1: all)")
    ap.add_argument("--only", action="append", choices=sorted(SETTINGS), help="run only these settings (repeatable)")
    ap.add_argument("--extra-benign", type=int, default=0, metavar="N",
                    help="diagnostic: add N clean toxicity comments per language (toxicity/<lang>.parquet discovery "
                         "split, next to the prompts' folder) as benign rows")
    ap.add_argument("--ship", default=None, metavar="PATH",
                    help="fit the one --only setting on all seed rows and write the classifier file here")
    ap.add_argument("--json", default=None, help="also write the CV table as JSON here")
    args = ap.parse_args()
    names = args.only or list(SETTINGS)
    if args.ship and (len(names) != 1 or args.extra_benign):
        sys.exit("--ship needs exactly one --only setting and no --extra-benign")

    df, _ = load_splits(args.prompts, args.langs.split(","), 0, args.seed_rows, seed=args.seed,
                        seed_other_per_lang=args.seed_other_per_lang)
    df = df.select("prompt", "label", "lang", "source")
    n_seed = df.height
    if args.extra_benign:
        df = pl.concat([df, extra_benign(Path(args.prompts).parent.parent / "toxicity", args.extra_benign, args.seed)])
    extra = np.arange(df.height) >= n_seed
    y = parse_labels(df.get_column("label"), args.prompts)
    safe = ((df.get_column("source") == "xstest") & (df.get_column("label") == "benign")).to_numpy()
    en = (df.get_column("lang") == "en").to_numpy()
    fx = FeatureExtractor.from_config(FeatureConfig())
    X = fx.transform(df.get_column("prompt").to_list(), progress=True)
    strata = 2 * y + safe + 4 * extra  # every fold gets its share of XSTest-safe (and extra benign) rows
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(y)), strata))
    print(f"{n_seed} seed rows ({int(y[~extra].sum())} harmful, {int((1 - y[~extra]).sum())} benign, {safe.sum()} "
          f"XSTest safe; {int(en[~extra].sum())} English)" + (f" + {extra.sum()} extra benign" if extra.any() else "")
          + f"; {args.folds}-fold CV")
    head = "| setting | K per fold | CV F1 | CV precision | CV recall | CV F1 (en) | CV XSTest safe flag rate |"
    print(head + (" extra benign flag rate |" if extra.any() else ""))
    print("|---" * (head.count("|") - 1 + int(extra.any())) + "|")
    rows = []
    for name in names:
        r, pred = cross_validate(name, X, y, safe, extra, en, folds, args.seed)
        rows.append(r)
        line = (f"| {name} | {min(r['k_folds'])}-{max(r['k_folds'])} | {r['f1']:.3f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['f1_en']:.3f} | {r['xstest_safe_flag_rate']:.3f} "
                f"({r['xstest_safe_flagged']}/{r['xstest_safe_n']}) |")
        if extra.any():
            line += f" {r['extra_benign_flag_rate']:.3f} |"
            langs = df.get_column("lang").to_numpy()
            r["extra_benign_per_lang"] = {la: float(pred[extra & (langs == la)].mean()) for la in TOXICITY_LANGS}
        print(line, flush=True)
        if extra.any():
            print("  extra benign flag rate per language: "
                  + ", ".join(f"{la} {v:.2f}" for la, v in r["extra_benign_per_lang"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cv": rows}, indent=2) + "\n")
    if args.ship:
        ship(args, names[0], df, X, y, safe, fx, rows[0])


def ship(args, name: str, df: pl.DataFrame, X, y, safe, fx, cv: dict) -> None:
    """Fit ``name`` on all seed rows and write the classifier file: feature ids, weights and thresholds, the model
    and SAE fingerprints, a summary of the seed rows (counts and a sha256, no texts) and this setting's CV."""
    est, fit_fn = make(SETTINGS[name], args.seed)
    rule = fit_fn(est, X, y, safe)
    langs = df.with_columns(pl.Series("_y", y)).group_by("lang").agg(
        pl.col("_y").sum().alias("toxic"), (1 - pl.col("_y")).sum().alias("clean")).sort("lang")
    data = {"files": [args.prompts], "rows": int(len(y)), "toxic": int(y.sum()), "clean": int(len(y) - y.sum()),
            "split": "seed", "sha256": data_sha256(y, df.get_column("prompt")),
            "per_lang": {r["lang"]: {"toxic": r["toxic"], "clean": r["clean"]} for r in langs.iter_rows(named=True)},
            "sample": f"all seed rows of {args.langs}; {args.seed_other_per_lang} random seed rows of every other "
                      f"language (seed {args.seed})", "xstest_safe_rows": int(safe.sum())}
    setting = SETTINGS[name]
    meta = {"sae_id": "default", "discovery_data": data,
            # benign rows exist only in English: the other languages' rows are harmful-only, so nothing about false
            # positives there was checked (README, caveats): only English counts as validated
            "validation": {"languages": ["en"], "method": f"{args.folds}-fold CV on the seed rows "
                           "(scripts/harmful_request_settings.py); benign rows are English only", "cv": cv},
            "settings": {"kind": setting["kind"], "name": name, "seed": args.seed,
                         "xstest_safe_weight": setting.get("weight", 1.0),
                         "target_fpr": setting.get("hn"),
                         "fpr_rows": "XSTest safe seed rows" if "hn" in setting else None}}
    Detector(fx, rule, meta).save(args.ship)
    print(f"wrote {args.ship}: {name}, {len(rule.features_)} features"
          + (f", operating point {rule.operating_point_}" if getattr(rule, "operating_point_", None) else ""))


if __name__ == "__main__":
    main()
