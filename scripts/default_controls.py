"""Random controls beside the shipped default toxicity classifier, per language of the pack: is the trained SAE
doing the work? Each language's shipped rule (trained SAE codes + mean residual) is set beside the same rule kind
and setting fitted on the same discovery rows with (a) the codes of a random-weight SAE of the same shapes
(`SAE.random_like`) + the mean residual, and (b) the mean residual alone (no SAE at all). All on the language's
`test` split at each rule's own 5 % out-of-fold operating point; the ROC-AUC difference (trained minus control)
gets a 95 % paired-bootstrap interval over the test rows.

    python scripts/default_controls.py -o reports/default-controls
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
from safetyscope.features import FeatureExtractor, extract_shared
from safetyscope.sae import SAE

DATA = Path("../shared/data")
LANGS = "en am ar de es fr he hi hi_latn it ja ru uk zh".split()
PREVALENCES = (0.01, 0.05, 0.10)


def rates(y, score) -> dict:
    y, fired = np.asarray(y).astype(int), np.asarray(score) > 0
    tpr, fpr = float(fired[y == 1].mean()), float(fired[y == 0].mean())
    tp, fp, fn = int(fired[y == 1].sum()), int(fired[y == 0].sum()), int((~fired[y == 1]).sum())
    out = {"recall": tpr, "fpr": fpr, "f1": 2 * tp / max(2 * tp + fp + fn, 1), "roc_auc": float(roc_auc_score(y, score))}
    for p in PREVALENCES:
        out[f"precision_at_{p:g}"] = precision_at_prevalence(tpr, fpr, p) if tpr + fpr > 0 else None
    return out


def auc_diff_interval(y, a, b, seed: int = 0, n: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    y, diffs = np.asarray(y), []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="reports/default-controls")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    det = Detector.load("default")
    fx = det.extractor
    rnd = FeatureExtractor(fx.backbone, SAE.random_like(fx.sae, args.seed), fx.layer, batch_size=fx.batch_size,
                           batch_tokens=fx.batch_tokens, max_length=fx.max_length, skip_first_token=fx.skip_first_token,
                           pool=fx.pool, cache=True)
    frames = [pl.read_parquet(DATA / f"toxicity/{la}.parquet").select("text", "label", "lang", "split") for la in LANGS]
    frames.append(pl.read_parquet(DATA / "toxicity-implicit/en.parquet").filter(pl.col("split") == "discovery")
                  .select("text", "label", pl.lit("en").alias("lang"), "split"))  # as the shipped English rule
    df = pl.concat(frames)
    trained, random_ = extract_shared([fx, rnd], df["text"].to_list(), progress=True)
    d_sae = trained.codes.shape[1]
    y = df["label"].to_numpy().astype(int)
    lang, split = df["lang"].to_numpy(), df["split"].to_numpy()
    results, lines = {}, ["| language | classifier | recall | FPR | F1 | precision at 1 / 5 / 10 % prevalence | ROC-AUC | "
                          "AUC trained - control (95 % CI) |", "|---|---|---|---|---|---|---|---|"]
    for la in LANGS:
        fit, test = (lang == la) & (split == "discovery"), (lang == la) & (split == "test")
        rule = det.rule_for(la)
        s_tr = rule.decision_function(rule_inputs(rule, trained.codes[test], trained.mean_acts[test]))
        scores = {"shipped (trained SAE codes + mean)": s_tr}
        for name, codes, nc in (("random-weight SAE codes + mean", random_.codes, d_sae),
                                ("mean residual alone", random_.codes[:, :0], 0)):
            X = rule_inputs(LinearProbeClassifier(), codes, trained.mean_acts)
            clf = LinearProbeClassifier(n_codes=nc, C=rule.C, target_fpr=0.05, random_state=args.seed).fit(X[fit], y[fit])
            scores[name] = clf.decision_function(X[test])
        for name, s in scores.items():
            r = rates(y[test], s)
            if not name.startswith("shipped"):
                r["auc_diff_ci"] = auc_diff_interval(y[test], s_tr, s, args.seed)
            results[f"{la} | {name}"] = r
            pr = " / ".join("-" if r[f"precision_at_{p:g}"] is None else f"{r[f'precision_at_{p:g}']:.2f}" for p in PREVALENCES)
            ci = f"{r['auc_diff_ci'][0]:+.3f} to {r['auc_diff_ci'][1]:+.3f}" if "auc_diff_ci" in r else ""
            lines.append(f"| {la} | {name} | {r['recall']:.3f} | {r['fpr']:.3f} | {r['f1']:.3f} | {pr} | {r['roc_auc']:.3f} | {ci} |")
        print("\n".join(lines[-3:]), flush=True)
    beats = {c: sum(results[f"{la} | {c}"]["auc_diff_ci"][0] > 0 for la in LANGS)
             for c in ("random-weight SAE codes + mean", "mean residual alone")}
    macro = {name: float(np.mean([results[f"{la} | {name}"]["f1"] for la in LANGS])) for name in
             ("shipped (trained SAE codes + mean)", "random-weight SAE codes + mean", "mean residual alone")}
    lines += ["", "Macro F1 over the 14 languages: " + ", ".join(f"{k} {v:.3f}" for k, v in macro.items()) + ".",
              "Languages where the trained SAE's ROC-AUC is above the control's (whole 95 % interval above 0): "
              + ", ".join(f"{k} {v} of {len(LANGS)}" for k, v in beats.items()) + "."]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, "macro_f1": macro, "beats": beats,
                                                  "random_sae": rnd.sae.fingerprint(), "seed": args.seed}, indent=1) + "\n")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-3:]))


if __name__ == "__main__":
    main()
