"""Measure the shipped harmful-request detector on the `pool` split of the safety prompts table.

Everything is fitted on the `seed` split only; `pool` is the test. Methods, all on the embedded model + SAE:
- ``shipped``: the shipped classifier (safetyscope/assets/harmful-request-smollm2-135m-instruct.json) as is;
- ``or_rule``: the previous shipped kind, a greedy OR-rule with every feature capped at a 0.5 % benign firing
  rate (`discover --fpr-cap 0.005`), fitted on the same seed rows;
- ``sparse_linear``: eval's L1 logistic rule over <= 128 SAE features (logistic operating point, unweighted);
- ``probe_raw``: eval's logistic probe on mean-pooled raw residual activations of the same layer.
Reported on pool: overall, English only, per source and per language precision, recall, F1, ROC-AUC, and the
flag rate on XSTest's `safe` (benign) prompts with its Wilson 95 % interval; with --toxicity-clean N, the flag
rate on N clean comments per language of the toxicity pack (`test` split): benign text in languages the safety
table has no benign rows in. Writes results.json, report.md and two plots.

    OMP_NUM_THREADS=2 python scripts/eval_harmful_request.py ../shared/data/safety/prompts.parquet \
        --seed-other-per-lang 150 --other-per-lang 100 --toxicity-clean 50 -o reports/harmful-request
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from safetyscope.data import parse_labels, read_table
from safetyscope.discovery.detector import classifier_path, read_classifier
from safetyscope.discovery.rules import OrRuleClassifier, classifier_from_dict
from safetyscope.eval.metrics import binary_metrics, wilson_interval
from safetyscope.eval.per_language import methods
from safetyscope.features import FeatureConfig, FeatureExtractor
from safetyscope.provenance import check_compatible

METHODS = ["shipped", "or_rule", "sparse_linear", "probe_raw"]
METRICS = ["precision", "recall", "f1", "roc_auc", "n"]
TOXICITY_LANGS = "am ar de en es fr he hi hi_latn it ja ru uk zh".split()


def load_splits(path: str, fit_langs: list[str], other_per_lang: int, seed_rows: int = -1, pool_rows: int = -1,
                seed: int = 0, seed_other_per_lang: int = 0):
    """(seed rows of ``fit_langs`` and at most ``seed_other_per_lang`` random seed rows of every other language,
    pool rows of ``fit_langs`` and at most ``other_per_lang`` random rows of every other language, plus every
    XSTest row). ``seed_rows``/``pool_rows`` >= 0 keep that many random rows of ``fit_langs`` (the first rows
    of one seeded shuffle, so a larger sample contains a smaller one). Why samples: on a shared 2-core CPU the
    full table (2.2M tokens) takes hours."""
    df = read_table(path, columns=["id", "prompt", "label", "lang", "source", "split"])

    def first(frame, n):
        frame = frame.sample(fraction=1.0, shuffle=True, seed=seed)
        return frame if n < 0 else frame.head(n)

    seed_all = df.filter(pl.col("split") == "seed")
    seed_parts = [first(seed_all.filter(pl.col("lang").is_in(fit_langs)), seed_rows)]
    for lang in sorted(set(seed_all.get_column("lang").to_list()) - set(fit_langs)) if seed_other_per_lang else []:
        seed_parts.append(first(seed_all.filter(pl.col("lang") == lang), seed_other_per_lang))
    seed_df = pl.concat(seed_parts)
    pool = df.filter(pl.col("split") == "pool")
    parts = [first(pool.filter(pl.col("lang").is_in(fit_langs)), pool_rows)]
    # every XSTest row, sampled or not: its `safe` prompts are the over-refusal measurement
    parts.append(pool.filter((pl.col("source") == "xstest") & ~pl.col("id").is_in(parts[0].get_column("id").implode())))
    for lang in sorted(set(pool.get_column("lang").to_list()) - set(fit_langs)):
        parts.append(first(pool.filter(pl.col("lang") == lang), other_per_lang))
    return seed_df, pl.concat(parts)


def toxicity_clean(toxicity_dir: Path, per_lang: int, seed: int) -> pl.DataFrame:
    """``per_lang`` random clean rows of each language's toxicity file (`test` split): benign text in every language."""
    parts = []
    for lang in TOXICITY_LANGS:
        df = read_table(str(toxicity_dir / f"{lang}.parquet"), columns=["text", "label", "lang", "split"])
        df = df.filter((pl.col("split") == "test") & (pl.col("label") == 0)).sample(fraction=1.0, shuffle=True, seed=seed)
        parts.append(df.head(per_lang).select(pl.col("text"), pl.col("lang")))
    return pl.concat(parts)


def fit_methods(ex_seed, y_seed, shipped, seed: int) -> dict:
    """method -> (estimator, what it reads: "sae" codes or "raw" mean activations); fitted ones see seed rows only."""
    table = methods(seed)
    out = {"shipped": (shipped, "sae"),
           "or_rule": (OrRuleClassifier(selection="greedy", fpr_cap=0.005, random_state=seed).fit(ex_seed.codes, y_seed),
                       "sae")}
    for name in ("sparse_linear", "probe_raw"):
        make, source = table[name]
        raw = source == "raw"
        out[name] = (make().fit(ex_seed.mean_acts if raw else ex_seed.codes, y_seed), source)
    return out


def score(fitted: dict, ex) -> dict:
    """method -> (flags, scores) on an extraction."""
    out = {}
    for name, (est, source) in fitted.items():
        X = ex.mean_acts if source == "raw" else ex.codes
        s = est.decision_function(X)
        out[name] = (est.predict(X).astype(bool), s)
    return out


def group_rows(pool: pl.DataFrame, y: np.ndarray, scored: dict, column: str) -> list[dict]:
    rows = []
    for g in sorted(set(pool.get_column(column).to_list())):
        m = (pool.get_column(column) == g).to_numpy()
        for name, (flags, score) in scored.items():
            rows.append({column: g, "method": name, "harmful": int(y[m].sum()), "benign": int((1 - y[m]).sum()),
                         **binary_metrics(y[m], flags[m], score[m])})
    return rows


def md_table(rows: list[dict], key: str, metric: str) -> str:
    groups = list(dict.fromkeys(r[key] for r in rows))
    look = {(r[key], r["method"]): r for r in rows}
    lines = [f"| {key} | harmful | benign | " + " | ".join(METHODS) + " |", "|" + "---|" * (3 + len(METHODS))]
    for g in groups:
        r0 = look[(g, METHODS[0])]
        cells = [look[(g, m)].get(metric) for m in METHODS]
        lines.append(f"| {g} | {r0['harmful']} | {r0['benign']} | "
                     + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def flag_rate(flags: np.ndarray) -> dict:
    k, n = int(flags.sum()), int(len(flags))
    lo, hi = wilson_interval(k, n)
    return {"flag_rate": k / n if n else 0.0, "flagged": k, "n": n, "wilson95": [lo, hi]}


def tradeoff(y: np.ndarray, score: np.ndarray, safe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(XSTest-safe flag rate, F1 on all rows) of every threshold on ``score``: what moving the operating point buys."""
    order = np.argsort(-score, kind="stable")
    tp = np.cumsum(y[order] == 1)
    fp = np.cumsum(y[order] == 0)
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    return np.cumsum(safe[order]) / max(safe.sum(), 1), f1


def plot(overall: list[dict], by_lang: list[dict], xstest: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 4]})
    width = 0.8 / len(METHODS)
    ax = axes[0]
    labels = ["F1 (all)", "F1 (en)", "XSTest safe\nflag rate"]
    for i, m in enumerate(METHODS):
        vals = [next(r["f1"] for r in overall if r["method"] == m and r["subset"] == s) for s in ("all", "en")]
        ax.bar(np.arange(3) + i * width, vals + [xstest[m]["flag_rate"]], width, label=m)
    ax.axhline(0.9, color="green", ls="--", lw=0.8)
    ax.axhline(0.15, color="red", ls="--", lw=0.8)
    ax.set_xticks(np.arange(3) + 1.5 * width, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("pool: targets F1 >= 0.90, flag rate <= 0.15", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    langs = list(dict.fromkeys(r["lang"] for r in by_lang))
    look = {(r["lang"], r["method"]): r["recall"] for r in by_lang}
    for i, m in enumerate(METHODS):
        ax.bar(np.arange(len(langs)) + i * width, [look[(la, m)] for la in langs], width, label=m)
    ax.set_xticks(np.arange(len(langs)) + 1.5 * width, langs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall on harmful pool prompts")
    ax.set_title("Per language recall (pool; only English has benign rows)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(y: np.ndarray, scored: dict, safe: np.ndarray, overall: list[dict], xstest: dict, path: Path) -> None:
    """F1 on pool against the XSTest-safe flag rate over every threshold of each method's score; dots: the
    method's own operating point; dashed: the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in METHODS:
        x, f1 = tradeoff(y, scored[name][1], safe)
        line, = ax.plot(x, f1, lw=1.2, label=name)
        own = next(r["f1"] for r in overall if r["method"] == name and r["subset"] == "all")
        ax.plot([xstest[name]["flag_rate"]], [own], "o", color=line.get_color())
    ax.axvline(0.15, color="red", ls="--", lw=0.8)
    ax.axhline(0.9, color="green", ls="--", lw=0.8)
    ax.set_xlabel("XSTest safe prompts flagged (pool)")
    ax.set_ylabel("F1 on pool (all rows)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Threshold tradeoff; dots: each method's operating point", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts", help="safety prompts table (prompt, label, lang, source, split seed/pool)")
    ap.add_argument("-o", "--output", default="reports/harmful-request")
    ap.add_argument("-c", "--classifier", default="harmful-request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-langs", default="en", help="languages of the seed rows the baselines are fitted on")
    ap.add_argument("--seed-other-per-lang", type=int, default=0,
                    help="random seed rows of every other language the baselines are fitted on (as the shipped file's)")
    ap.add_argument("--other-per-lang", type=int, default=10,
                    help="pool rows sampled per language outside --fit-langs (-1: all)")
    ap.add_argument("--seed-rows", type=int, default=-1, help="random seed rows of --fit-langs to use (-1: all)")
    ap.add_argument("--pool-rows", type=int, default=-1, help="random pool rows of --fit-langs to use (-1: all)")
    ap.add_argument("--toxicity-clean", type=int, default=0, metavar="N",
                    help="also measure the flag rate on N clean comments per language of the toxicity pack "
                         "(toxicity/<lang>.parquet next to the prompts' folder, test split)")
    ap.add_argument("--write-seed-subset", default=None,
                    help="only write the seed rows used (prompt, label, lang, source, split) to this file, for `discover`")
    args = ap.parse_args()

    fit_langs = args.fit_langs.split(",")
    seed_df, pool = load_splits(args.prompts, fit_langs, args.other_per_lang, args.seed_rows, args.pool_rows,
                                args.seed, args.seed_other_per_lang)
    if args.write_seed_subset:
        seed_df.select("prompt", "label", "lang", "source", "split").write_parquet(args.write_seed_subset)
        print(f"wrote {seed_df.height} seed rows to {args.write_seed_subset}")
        return
    y_seed = parse_labels(seed_df.get_column("label"), args.prompts)
    y_pool = parse_labels(pool.get_column("label"), args.prompts)
    d = read_classifier(args.classifier)
    fx = FeatureExtractor.from_config(FeatureConfig())
    check_compatible(d, fx, args.classifier)
    t0 = time.perf_counter()
    ex_seed = fx.extract(seed_df.get_column("prompt").to_list(), progress=True)
    ex_pool = fx.extract(pool.get_column("prompt").to_list(), progress=True)
    t_feat = time.perf_counter() - t0
    fitted = fit_methods(ex_seed, y_seed, classifier_from_dict(d["rule"]), args.seed)
    scored = score(fitted, ex_pool)

    en = (pool.get_column("lang") == "en").to_numpy()
    overall = []
    for subset, m in (("all", np.ones(len(y_pool), bool)), ("en", en)):
        for name, (flags, s) in scored.items():
            overall.append({"subset": subset, "method": name, "harmful": int(y_pool[m].sum()),
                            "benign": int((1 - y_pool[m]).sum()), **binary_metrics(y_pool[m], flags[m], s[m])})
    safe = ((pool.get_column("source") == "xstest") & (pool.get_column("label") == "benign")).to_numpy()
    xstest = {name: flag_rate(flags[safe]) for name, (flags, _) in scored.items()}
    by_source = group_rows(pool, y_pool, scored, "source")
    by_lang = group_rows(pool, y_pool, scored, "lang")
    clean_tox = {}
    if args.toxicity_clean:
        tox = toxicity_clean(Path(args.prompts).parent.parent / "toxicity", args.toxicity_clean, args.seed)
        tox_scored = score(fitted, fx.extract(tox.get_column("text").to_list(), progress=True))
        langs = tox.get_column("lang").to_numpy()
        clean_tox = {name: {la: flag_rate(flags[langs == la]) for la in TOXICITY_LANGS}
                     for name, (flags, _) in tox_scored.items()}

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rule = d["rule"]
    config = {"data": args.prompts, "classifier": str(classifier_path(args.classifier)), "fit_split": "seed",
              "test_split": "pool", "seed": args.seed, "fit_langs": fit_langs,
              "seed_other_per_lang": args.seed_other_per_lang, "other_per_lang": args.other_per_lang,
              "seed_rows": args.seed_rows, "pool_rows": args.pool_rows, "toxicity_clean": args.toxicity_clean,
              "model": fx.backbone.model_id, "model_fingerprint": fx.backbone.fingerprint(),
              "sae_fingerprint": fx.sae.fingerprint(), "layer": fx.layer, "n_seed": len(y_seed), "n_pool": len(y_pool),
              "shipped_rule": {"kind": rule["kind"], "k": rule["k"], "features": [f["id"] for f in rule["features"]],
                               "settings": d.get("settings")},
              "or_rule_k": int(len(fitted["or_rule"][0].features_)),
              "sparse_linear_k": int(len(fitted["sparse_linear"][0].features_))}
    res = {"config": config, "feature_seconds": t_feat, "overall": overall, "xstest_safe": xstest,
           "toxicity_clean": clean_tox, "per_source": by_source, "per_language": by_lang}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(overall, by_lang, xstest, out / "harmful_request.png")
    plot_tradeoff(y_pool, scored, safe, overall, xstest, out / "tradeoff.png")

    ov = ["| subset | method | harmful | benign | precision | recall | F1 | ROC-AUC | XSTest safe flag rate (Wilson 95 %) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in overall:
        x = xstest[r["method"]]
        ov.append(f"| {r['subset']} | {r['method']} | {r['harmful']} | {r['benign']} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {r['f1']:.3f} | {r.get('roc_auc', float('nan')):.3f} | "
                  f"{x['flag_rate']:.3f} ({x['flagged']}/{x['n']}; {x['wilson95'][0]:.3f}-{x['wilson95'][1]:.3f}) |")
    settings = d.get("settings") or {}
    md = [f"# Harmful-request detection: {fx.backbone.model_id}, layer {fx.layer}", "",
          (f"Fitted on the `seed` split ({len(y_seed)} rows: every English seed row and {args.seed_other_per_lang} "
           f"random seed rows of every other language), measured on the `pool` split ({len(y_pool)} rows: every "
           f"English pool row and {args.other_per_lang} random rows of every other language) of `{args.prompts}`. "
           f"`shipped`: the shipped classifier as is ({rule['kind']}, {rule['k']} features"
           + (f", setting `{settings['name']}`" if settings.get("name") else "") + "); "
           f"`or_rule`: a greedy OR-rule with each feature capped at a 0.5 % benign firing rate (the previous shipped "
           f"kind; {config['or_rule_k']} features), refitted on these seed rows; `sparse_linear`: L1 logistic rule "
           f"over <= 128 SAE features at the logistic operating point, unweighted ({config['sparse_linear_k']} "
           "features); `probe_raw`: logistic probe on mean-pooled raw residual activations of the same layer. "
           "Benign rows are English only (alpaca + XSTest safe), so precision and ROC-AUC outside English, and per "
           "source for all-harmful sources, say nothing about false positives: read recall there, and the `en` "
           "subset, the XSTest flag rate and the clean toxicity comments below for false positives."), "",
          "## Overall", "", *ov, "", "![tradeoff](tradeoff.png)", ""]
    if clean_tox:
        md += ["## Clean comments of the toxicity pack: flag rate per language", "",
               (f"{args.toxicity_clean} random clean (`label` 0) rows of each language's `test` split of the toxicity "
                "pack: benign text that is not a request. A harmful-request detector should flag almost none; "
                "outside English this measures the shortcut 'not English = harmful' that harmful-only non-English "
                "seed rows invite."), "",
               "| lang | n | " + " | ".join(METHODS) + " |", "|" + "---|" * (2 + len(METHODS))]
        for la in TOXICITY_LANGS:
            md.append(f"| {la} | {clean_tox[METHODS[0]][la]['n']} | "
                      + " | ".join(f"{clean_tox[m][la]['flag_rate']:.2f}" for m in METHODS) + " |")
        md.append("")
    for metric in ("recall", "f1", "precision", "roc_auc"):
        md += [f"## Per source: {metric}", "", md_table(by_source, "source", metric), ""]
    for metric in ("recall", "f1", "precision", "roc_auc"):
        md += [f"## Per language: {metric}", "", md_table(by_lang, "lang", metric), ""]
    md += ["![harmful_request](harmful_request.png)", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(ov))
    if clean_tox:
        for m in METHODS:
            print(f"clean toxicity comments flagged, {m}: "
                  + ", ".join(f"{la} {clean_tox[m][la]['flag_rate']:.2f}" for la in TOXICITY_LANGS))
    print(f"wrote {out}/results.json, report.md, harmful_request.png, tradeoff.png")


if __name__ == "__main__":
    main()
