"""Fit the harmful-request classifier without the "English instruction = benign" shortcut, and measure it where
it was not fitted: each harmful source held out of the fit, XSTest's `pool` half, clean comments of 14 languages
(`test` split) and the hand-written request checks (`tests/fixtures/request_checks.csv`).

Fitting rows (the safety table's `seed` split and the toxicity pack's `discovery` split only):
- every English seed row (harmful and benign; XSTest `safe` rows weigh --xstest-weight in the fit),
- --other-per-lang random seed rows of each other language (all harmful: the table has no benign non-English
  prompts),
- --comments-per-lang random clean comments of each of the 14 toxicity languages, as benign (text that is not a
  request, in every language: what breaks "not English = harmful").
The rule is `LinearProbeClassifier` (SAE codes + mean residual, as the toxicity default); its threshold is where
--target-fpr of the XSTest-safe seed rows are flagged by out-of-fold scores.

    python scripts/harmful_request_generalization.py -o reports/harmful-request-generalization \\
        [--ship safetyscope/assets/harmful-request-smollm2-135m-instruct.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from safetyscope.data import data_sha256
from safetyscope.discovery.detector import Detector
from safetyscope.discovery.rules import LinearProbeClassifier, rule_inputs
from safetyscope.features import FeatureConfig, FeatureExtractor

DATA = Path("../shared/data")
CHECKS = Path("tests/fixtures/request_checks.csv")
TOXICITY_LANGS = "am ar de en es fr he hi hi_latn it ja ru uk zh".split()


def sample(df: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    return df.sample(fraction=1.0, shuffle=True, seed=seed).head(n)


def prompts(split: str, other_per_lang: int, seed: int) -> pl.DataFrame:
    df = pl.read_parquet(DATA / "safety/prompts.parquet").filter(pl.col("split") == split)
    parts = [df.filter(pl.col("lang") == "en")]
    parts += [sample(df.filter(pl.col("lang") == la), other_per_lang, seed) for la in sorted(set(df["lang"]) - {"en"})]
    out = pl.concat(parts).select(pl.col("prompt").alias("text"), (pl.col("label") == "harmful").cast(pl.Int8).alias("y"),
                                  "lang", "source")
    # XSTest has both classes: its harmful and safe halves are different sources for holding out
    return out.with_columns(source=pl.when(pl.col("source") == "xstest")
                            .then(pl.concat_str([pl.lit("xstest_"), pl.when(pl.col("y") == 1).then(pl.lit("unsafe"))
                                                 .otherwise(pl.lit("safe"))])).otherwise(pl.col("source")))


def comments(split: str, per_lang: int, seed: int, label: int = 0) -> pl.DataFrame:
    parts = []
    for la in TOXICITY_LANGS:
        d = pl.read_parquet(DATA / f"toxicity/{la}.parquet").filter((pl.col("split") == split) & (pl.col("label") == label))
        parts.append(sample(d, per_lang, seed).select("text", pl.lit(0, pl.Int8).alias("y"), pl.lit(la).alias("lang"),
                                                      pl.lit("comments_clean" if label == 0 else "comments_toxic").alias("source")))
    return pl.concat(parts)


def flags(y, score) -> dict:
    y, fired = np.asarray(y).astype(int), np.asarray(score) > 0
    out = {"n": len(y), "harmful": int(y.sum()), "benign": int((1 - y).sum()),
           "recall": float(fired[y == 1].mean()) if y.any() else None,
           "benign_flag_rate": float(fired[y == 0].mean()) if (1 - y).any() else None}
    out["roc_auc"] = float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="reports/harmful-request-generalization")
    ap.add_argument("--other-per-lang", type=int, default=150)
    ap.add_argument("--comments-per-lang", type=int, default=150)
    ap.add_argument("--xstest-weight", type=float, default=5.0)
    ap.add_argument("--target-fpr", type=float, default=0.10)
    ap.add_argument("--C", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the shipped kind only, no leave-one-source-out (for choosing)")
    ap.add_argument("--ship", default=None, metavar="PATH", help="also write the classifier fitted on all rows here")
    args = ap.parse_args()

    fit_df = pl.concat([prompts("seed", args.other_per_lang, args.seed), comments("discovery", args.comments_per_lang, args.seed)])
    checks = pl.read_csv(CHECKS).select(pl.col("prompt").alias("text"), (pl.col("label") == "harmful").cast(pl.Int8).alias("y"),
                                        "lang", pl.concat_str([pl.lit("checks_"), pl.col("split")]).alias("source"), "style")
    sets = {"pool": prompts("pool", 100, args.seed), "comments test (clean)": comments("test", 100, args.seed),
            "comments test (toxic)": comments("test", 50, args.seed, label=1),
            "request checks dev": checks.filter(pl.col("source") == "checks_dev"),
            "request checks HOLDOUT": checks.filter(pl.col("source") == "checks_holdout")}
    fx = FeatureExtractor.from_config(FeatureConfig())
    ex = fx.extract(fit_df["text"].to_list(), progress=True)
    d_sae = ex.codes.shape[1]
    y = fit_df["y"].to_numpy().astype(int)
    safe = (fit_df["source"] == "xstest_safe").to_numpy()
    sw = np.where(safe, args.xstest_weight, 1.0)
    feats = {k: fx.extract(d["text"].to_list(), progress=True) for k, d in sets.items()}
    variants = {"codes + mean (linear)": lambda e: (rule_inputs(LinearProbeClassifier(), e.codes, e.mean_acts), d_sae),
                "probe_raw (mean residual only)": lambda e: (rule_inputs(LinearProbeClassifier(), e.codes[:, :0], e.mean_acts), 0)}

    def fit(X, nc, rows):
        clf = LinearProbeClassifier(n_codes=nc, C=args.C, target_fpr=args.target_fpr, random_state=args.seed)
        return clf.fit(X[rows], y[rows], sample_weight=sw[rows], fpr_rows=safe[rows])

    results: dict = {}
    old = Detector.load("harmful-request")
    for k, d in sets.items():
        _, s, _ = old.predict(d["text"].to_list())
        results[("previous shipped (sparse linear, English benign only)", k)] = by_subset(d, s)
    src = fit_df["source"].to_numpy()
    for vname, make in list(variants.items())[: 1 if args.quick else None]:
        X, nc = make(ex)
        full = fit(X, nc, np.ones(len(y), bool))
        results[(vname, "operating point")] = full.operating_point_
        for k, d in sets.items():
            results[(vname, k)] = by_subset(d, full.decision_function(make(feats[k])[0]))
        # without the benign comments: what the comments buy
        no_c = fit(X, nc, src != "comments_clean")
        for k in ("comments test (clean)", "request checks HOLDOUT"):
            results[(vname + ", no comments in fit", k)] = by_subset(sets[k], no_c.decision_function(make(feats[k])[0]))
        if args.quick:
            continue
        # leave one harmful source out: fitted without its seed rows, scored on its pool rows
        Xp = make(feats["pool"])[0]
        pool_src = sets["pool"]["source"].to_numpy()
        for s in sorted(set(src[y == 1].tolist())):
            held = fit(X, nc, src != s)
            m = pool_src == s
            results[(vname + ", held out", s)] = {"in_fit": flags(sets["pool"]["y"].to_numpy()[m], full.decision_function(Xp[m])),
                                                  "held_out": flags(sets["pool"]["y"].to_numpy()[m], held.decision_function(Xp[m]))}
        if vname.startswith("codes + mean") and args.ship:
            ship(args, fit_df, y, safe, fx, full)
    write(results, Path(args.output), args)


def by_subset(d: pl.DataFrame, score: np.ndarray) -> dict:
    """Flags overall, per language and per source (and per style for the checks)."""
    yy = d["y"].to_numpy()
    out = {"all": flags(yy, score)}
    for col in ("lang", "source", "style"):
        if col in d.columns:
            v = d[col].to_numpy()
            out[col] = {str(g): flags(yy[v == g], score[v == g]) for g in sorted(set(v.tolist()))}
    return out


def ship(args, fit_df: pl.DataFrame, y, safe, fx, rule) -> None:
    langs = fit_df.group_by("lang").agg(pl.col("y").sum().alias("toxic"), (1 - pl.col("y")).sum().alias("clean")).sort("lang")
    data = {"files": ["safety/prompts.parquet (seed)", "toxicity/<lang>.parquet (discovery, clean rows)"],
            "rows": int(len(y)), "toxic": int(y.sum()), "clean": int(len(y) - y.sum()),
            "split": "seed (prompts); discovery (comments)",
            "sha256": data_sha256(y, fit_df["text"]),
            "per_lang": {r["lang"]: {"toxic": r["toxic"], "clean": r["clean"]} for r in langs.iter_rows(named=True)},
            "sample": f"every English seed prompt; {args.other_per_lang} random seed prompts of each other language; "
                      f"{args.comments_per_lang} random clean discovery comments of each of 14 toxicity languages as "
                      f"benign (seed {args.seed})", "xstest_safe_rows": int(safe.sum())}
    # validated: English only. Other languages have harmful prompts and clean comments but no benign *requests*
    # (the hand-written checks hold the only ones, a handful): a non-English request's verdict is not validated
    meta = {"sae_id": "default", "discovery_data": data,
            "validation": {"languages": ["en"], "method": "python scripts/harmful_request_generalization.py "
                           "(pool split, clean comments test split, leave-one-source-out, request checks)"},
            "settings": {"kind": "linear", "C": args.C, "seed": args.seed, "xstest_safe_weight": args.xstest_weight,
                         "target_fpr": args.target_fpr, "fpr_rows": "XSTest safe seed rows"}}
    Detector(fx, rule, meta).save(args.ship)
    print(f"wrote {args.ship}: operating point {rule.operating_point_}")


def write(results: dict, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": {" | ".join(k): v for k, v in results.items()}},
                                                 indent=1) + "\n")
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| method | set | recall (harmful flagged) | benign flagged | ROC-AUC |", "|---|---|---|---|---|"]
    for (a, b), v in results.items():
        if "all" in v:
            r = v["all"]
            lines.append(f"| {a} | {b} | {f(r['recall'])} of {r['harmful']} | {f(r['benign_flag_rate'])} of {r['benign']} | "
                         f"{f(r['roc_auc'])} |")
    lines += ["", "Clean comments (test split) flagged, per language:", ""]
    for (a, b), v in results.items():
        if b == "comments test (clean)":
            lines.append(f"- {a}: " + ", ".join(f"{la} {r['benign_flag_rate']:.2f}" for la, r in v["lang"].items()))
    lines += ["", "XSTest pool halves, flagged:", ""]
    for (a, b), v in results.items():
        if b == "pool":
            s = v["source"]
            lines.append(f"- {a}: safe {f(s['xstest_safe']['benign_flag_rate'])} (n {s['xstest_safe']['n']}), "
                         f"unsafe {f(s['xstest_unsafe']['recall'])} (n {s['xstest_unsafe']['n']})")
    lines += ["", "| method | harmful source held out of the fit | pool recall, in fit | pool recall, held out | ratio |",
              "|---|---|---|---|---|"]
    for (a, b), v in results.items():
        if a.endswith(", held out"):
            i, h = v["in_fit"]["recall"], v["held_out"]["recall"]
            lines.append(f"| {a[:-10]} | {b} (n {v['in_fit']['n']}) | {i:.3f} | {h:.3f} | {h / max(i, 1e-9):.2f} |")
    lines += ["", "Request checks HOLDOUT, per language (recall / benign flagged):", ""]
    for (a, b), v in results.items():
        if b == "request checks HOLDOUT":
            lines.append(f"- {a}: " + ", ".join(f"{la} {f(r['recall'])}/{f(r['benign_flag_rate'])}" for la, r in v["lang"].items()))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
