"""Measures how a toxicity rule's training design carries over (docs/results/generalization.md, "Rules per language or
one rule for all"): per-language linear rules on their own rows, the same with the other languages' rows added at a
lower weight, and one rule for every language with a threshold per language (`discover --shared-weights`), beside a
shipped classifier; all on the same stratified subsample of every language's discovery rows, scored on subsampled
test splits and the out-of-source sets of scripts/generalization_eval.py. The functional HOLDOUT half is scored only
with --final.

    python scripts/shared_weights_eval.py -o reports/shared-weights/smollm2-135m
    python scripts/shared_weights_eval.py --model gemma3-270m --sae gemma3-270m --classifier multilingual \\
        -o reports/shared-weights/gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization_eval import DATA, LANGS, eval_sets, rates  # noqa: E402

from safetyscope.discovery.detector import read_classifier  # noqa: E402
from safetyscope.discovery.rules import LinearProbeClassifier, classifier_from_dict, rule_inputs  # noqa: E402
from safetyscope.discovery.shared_rule import fit_shared, language_balanced_weights  # noqa: E402
from safetyscope.features import FeatureConfig, FeatureExtractor  # noqa: E402


def subsample(d: pl.DataFrame, n: int, seed: int = 0) -> pl.DataFrame:
    """At most n rows of every (language, label), drawn with a fixed seed."""
    return pl.concat([g.sample(min(n, g.height), seed=seed) for _, g in d.group_by(["lang", "label"], maintain_order=True)])


def datasets(per_class: int, test_per_class: int, final: bool) -> dict[str, pl.DataFrame]:
    disc = pl.concat([pl.read_parquet(DATA / f"toxicity/{la}.parquet").filter(pl.col("split") == "discovery")
                      .select("text", pl.col("label").cast(pl.Int8), "lang", "source") for la in LANGS])
    imp = (pl.read_parquet(DATA / "toxicity-implicit/en.parquet").filter(pl.col("split") == "discovery")
           .select("text", pl.col("label").cast(pl.Int8), pl.lit("en").alias("lang"), "source"))
    sets = {k: (subsample(v, test_per_class) if k.endswith(" test") else v) for k, v in eval_sets().items()
            if final or "HOLDOUT" not in k}
    return {"discovery": pl.concat([subsample(disc, per_class), imp]), **sets}


def score(rules: dict, fallback, feats, d: pl.DataFrame) -> np.ndarray:
    codes, means = feats
    langs = d["lang"].to_numpy()
    s = np.empty(d.height)
    for la in set(langs.tolist()):
        i = np.flatnonzero(langs == la)
        r = rules.get(la, fallback)
        s[i] = r.decision_function(rule_inputs(r, codes[i], means[i]))
    return s


def per_language(X, y, langs, d_sae: int, alpha: float, C: float, target_fpr: float) -> dict:
    """Each language's rule on its own rows plus every other language's rows at ``alpha`` of its own total weight;
    its threshold at target_fpr of its own out-of-fold clean scores."""
    w0 = language_balanced_weights(langs, y)
    rules = {}
    for la in sorted(set(langs.tolist())):
        own = langs == la
        w = w0.copy()
        w[~own] *= alpha * w[own].sum() / max(w[~own].sum(), 1e-12)
        keep = w > 0
        rules[la] = LinearProbeClassifier(n_codes=d_sae, C=C, target_fpr=target_fpr).fit(
            X[keep], y[keep], sample_weight=w[keep], fpr_rows=(own & (y == 0))[keep])
    return rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--classifier", default="default", help="shipped classifier shown beside (its own training rows)")
    ap.add_argument("--per-class", type=int, default=300, help="discovery rows per language and label")
    ap.add_argument("--test-per-class", type=int, default=120, help="test rows per language and label")
    ap.add_argument("--alphas", default="0,0.3")
    ap.add_argument("--C", type=float, default=0.01)
    ap.add_argument("--target-fpr", type=float, default=0.05)
    ap.add_argument("--final", action="store_true", help="also score the functional HOLDOUT half")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    sets = datasets(args.per_class, args.test_per_class, args.final)
    fx = FeatureExtractor.from_config(FeatureConfig(model=args.model, sae=args.sae))
    feats = {}
    for k, d in sets.items():
        ex = fx.extract(d["text"].to_list(), progress=True)
        feats[k] = (ex.codes, ex.mean_acts)
    disc = sets.pop("discovery")
    dc, dm = feats.pop("discovery")
    y, langs, d_sae = disc["label"].to_numpy().astype(int), disc["lang"].to_numpy(), dc.shape[1]
    X = rule_inputs(LinearProbeClassifier(), dc, dm)
    variants: dict[str, tuple[dict, object, float]] = {}
    doc = read_classifier(args.classifier)
    fb = classifier_from_dict(doc["rule"])
    variants[f"shipped {args.classifier} (its own training rows)"] = (
        {la: classifier_from_dict(r) for la, r in doc.get("rules_by_lang", {}).items()}, fb, 0.0)
    for a in [float(v) for v in args.alphas.split(",")]:
        t = time.time()
        rules = per_language(X, y, langs, d_sae, a, args.C, args.target_fpr)
        variants[f"per language, other languages at weight {a:g}"] = (rules, rules["en"], time.time() - t)
    t = time.time()
    fallback, rules, _ = fit_shared(LinearProbeClassifier(n_codes=d_sae, C=args.C), X, y, langs, args.target_fpr)
    variants["one rule for all languages, threshold per language (--shared-weights)"] = (rules, fallback, time.time() - t)
    results = {}
    for name, (rules, fallback, secs) in variants.items():
        per_set = {k: rates(d["label"].to_numpy().astype(int), score(rules, fallback, feats[k], d)) for k, d in sets.items()}
        tests = [per_set[f"{la} test"] for la in LANGS]
        per_set["14-language test, macro"] = {"f1": float(np.mean([r["f1"] for r in tests])),
                                              "roc_auc": float(np.mean([r["roc_auc"] for r in tests]))}
        results[name] = {"fit_seconds": round(secs), "sets": per_set}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model or "default", "sae": args.sae or "default", "discovery_rows": disc.height,
            "per_class": args.per_class, "test_per_class": args.test_per_class, "C": args.C,
            "target_fpr": args.target_fpr, "final": args.final}
    (out / "results.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    names = list(results)
    lines = [f"Model {meta['model']}, SAE {meta['sae']}; {disc.height} discovery rows ({args.per_class} per language "
             f"and label, plus the implicit-hate discovery rows); test splits {args.test_per_class} per language and "
             f"label. Cells: F1 / ROC-AUC (README example and MHC rows: toxic flagged of toxic, clean flagged).", "",
             "| set | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in [*sets, "14-language test, macro"]:
        cells = []
        for n in names:
            r = results[n]["sets"][k]
            c = f"{r['f1']:.3f} / {r['roc_auc']:.3f}" if r.get("roc_auc") is not None else f"{r['f1']:.3f}"
            if "toxic_flagged" in r and (k == "README example" or "mhc" in k):
                c += f" ({r['toxic_flagged']}/{r['toxic']}, {r['clean_flagged']})"
            cells.append(c)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
