"""The `eval` job: per-language results beside honest baselines, cross-lingual transfer and data efficiency,
written as results.json + report.md + PNG plots + one self-contained report.html."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from ..data import data_sha256, parse_labels, read_table, require_text
from ..discovery.detector import read_classifier, read_rules
from ..discovery.rules import MIN_PER_CLASS
from ..errors import SafetyScopeError
from ..features import FeatureConfig, FeatureExtractor, extract_shared, layer_extractors
from ..outputs import check_report_dir
from ..provenance import check_compatible
from ..reports import html_table, markdown_grid, write_html, write_json, write_text
from ..sae import SAE
from . import by_source, report
from . import controls as ctl
from .config import PERCENTS, SEEDS
from .per_language import evaluate_languages, layer_sweep, markdown_table, methods, split_indices
from .transfer import efficiency_curves, transfer_matrix

MAIN_METHODS = ["shipped", "or_rule_fpr2", "or_rule", "or_rule_delta", "or_rule_report", "sparse_linear", "sparse_linear_fpr2",
                "logreg_sae", "probe_raw", "majority"]


SKIPPABLE = ("transfer", "efficiency", "random_sae")
LEAD_METRICS = ("recall_at_1pct_fpr", "recall_at_5pct_fpr", "fpr", "precision_at_5pct", "precision_at_10pct",
                "average_precision", "roc_auc", "balanced_accuracy", "f1", "precision", "recall")


def run_eval(data, output, cfg: FeatureConfig, *, langs: str | None = None, seed: int = 0, seeds=SEEDS,
             fractions=PERCENTS, classifier: str | None = None, only: str | None = None,
             skip: str = "", scan_layers=None, group_column: str | None = None,
             overwrite: bool = False) -> tuple[list[dict], Path, list[Path]]:
    """Evaluate ``data`` (text, label, lang, split) into the report directory ``output``; returns the
    per-language rows, the directory and the plots written. Arguments as the `eval` options."""
    out = check_report_dir(output, inputs=data, overwrite=overwrite)  # before any work: a bad -o must not cost the whole run
    skip = {s.strip() for s in skip.split(",") if s.strip()}
    if skip - set(SKIPPABLE):
        raise SafetyScopeError(f"--skip {sorted(skip - set(SKIPPABLE))}: unknown; use any of {', '.join(SKIPPABLE)}")
    paths = [p for p in data if not Path(p).name.startswith("ci_sample")] or list(data)
    cols = ["text", "label", "lang", "split"] + ([group_column] if group_column else [])
    df = pl.concat([require_text(read_table(p, columns=cols), "text", p).select(cols)
                    .with_columns(pl.col("label").cast(pl.String),
                                  *([pl.col(group_column).cast(pl.String).fill_null("(none)")] if group_column else []))
                    for p in paths])
    df = df.filter(pl.col("split").is_in(["discovery", "test"]) & pl.col("text").is_not_null()
                   & (pl.col("text").str.strip_chars() != ""))
    present = sorted(set(df.get_column("lang").to_list()))
    lang_list = langs.split(",") if langs else present
    unknown = sorted(set(lang_list) - set(present))
    if unknown:
        raise SafetyScopeError(f"--langs {unknown} not in the data (present: {present})")
    df = df.filter(pl.col("lang").is_in(lang_list))
    y = parse_labels(df.get_column("label"), "evaluation data")
    _check_enough_rows(df, y, lang_list)

    scan = sorted(set(scan_layers or ()))
    fx = FeatureExtractor.from_config(cfg)
    # the sweep's extractors share the loaded model; built now so that a bad layer or a missing SAE fails early
    extra = [la for la in scan if la != fx.layer]
    scan_fx = dict(zip(extra, layer_extractors(cfg, extra, backbone=fx.backbone))) if extra else {}
    shipped = None
    if classifier:
        d = read_classifier(classifier)
        check_compatible(d, fx, classifier)
        fallback, by_lang = read_rules(d, classifier, fx.sae.cfg.d_sae)
        # a per-language file scores each language with its own rule (others: its fallback), as classify does
        shipped = lambda lang: by_lang.get(lang, fallback)  # noqa: E731
    only = only.split(",") if only else None
    extractors = [fx]
    if "random_sae" not in skip and (only is None or {"random_sae_or_rule", "random_sae_sparse_linear"} & set(only)):
        # same model, layer and tokens, random feature directions; its own fingerprint keys its own cache
        extractors.append(FeatureExtractor(fx.backbone, SAE.random_like(fx.sae, seed), fx.layer,
                                           batch_size=fx.batch_size, batch_tokens=fx.batch_tokens, max_length=fx.max_length,
                                           skip_first_token=fx.skip_first_token, pool=fx.pool, cache=cfg.cache))
    t0 = time.perf_counter()
    # once, every analysis reuses it; one forward pass per batch serves both SAEs
    n_main = len(extractors)  # then the sweep's layers: every layer comes out of the same forward passes
    ex, *others = extract_shared(extractors + list(scan_fx.values()), df.get_column("text").to_list(), progress=True)
    random_ex, scan_ex = others[: n_main - 1], others[n_main - 1 :]
    t_feat = time.perf_counter() - t0
    outputs = {}
    rows = evaluate_languages(df, ex, langs=lang_list, seed=seed, shipped=shipped, only=only,
                              random_ex=random_ex[0] if random_ex else None, outputs=outputs)
    controls = ctl.compare_controls(outputs, lang_list, seed=seed)
    grouped = None
    if group_column:
        groups = df.get_column(group_column).to_numpy()
        shown = {k: v for k, v in outputs.items() if k[1] in by_source.PER_SOURCE_METHODS}
        grouped = {"column": group_column, "per_group": by_source.per_source(df, groups, shown),
                   "out_of_group": by_source.out_of_source(df, y, groups, ex, lang_list, seed=seed)}
    transfer = None if "transfer" in skip else transfer_matrix(df, y, ex.codes, lang_list, seed=seed)
    eff = None if "efficiency" in skip else efficiency_curves(
        df, y, ex.codes, lang_list, fractions=tuple(f / 100 for f in fractions), seeds=seeds)

    sweep = None
    if scan:
        codes = {fx.layer: ex.codes, **{layer: e.codes for layer, e in zip(scan_fx, scan_ex)}}
        sweep = layer_sweep(df, codes, langs=lang_list, seed=seed)

    k_sweep = [m for m in methods(seed) if m.startswith("or_rule_K")]
    config = {"data": [str(p) for p in paths], "langs": lang_list, "seed": seed, "seeds": ",".join(map(str, seeds)),
              "fractions": ",".join(f"{f:g}" for f in fractions),
              "model": fx.backbone.model_id, "model_fingerprint": fx.backbone.fingerprint(), "sae": cfg.sae or "default",
              "sae_fingerprint": fx.sae.fingerprint(), "layer": fx.layer, "classifier": classifier,
              "max_length": cfg.max_length, "dtype": cfg.dtype, "texts": df.height,
              "data_sha256": data_sha256(*df.get_columns()),
              "random_sae_fingerprint": extractors[1].sae.fingerprint() if random_ex else None}
    results = {"config": config, "feature_seconds": t_feat, "per_language": rows, "random_controls": controls,
               "transfer": transfer, "efficiency": eff, "layer_sweep": sweep, "by_group": grouped}
    write_json(out / "results.json", results)

    images = [out / "per_language_f1.png"]
    report.plot_method_bars(rows, MAIN_METHODS, images[0])
    md = [f"# safetyscope evaluation: {fx.backbone.model_id}, layer {fx.layer}", "",
          f"{df.height} texts, {len(lang_list)} language(s). Every method is fitted on a language's discovery split "
          "and measured on its test split. OR-rules: `or_rule` (greedy selection of feature + threshold pairs), "
          "`or_rule_delta` (top K by delta, each feature capped at a 2% clean firing rate), `or_rule_report` "
          "(the Qwen-Scope report's rule: top K by delta, threshold 0); K from 1, 2, 5, 10 by mean F1 on 3 hold-outs "
          "of the discovery split. `sparse_linear`: L1 logistic rule over <= 128 SAE features. "
          "Baselines: `logreg_sae` (L1 logistic regression on all SAE features), "
          "`probe_raw` (logistic probe on mean-pooled raw activations), `majority`.", ""]
    sections = []
    md += ["Tables lead with what a user picks a detector by on real traffic, where toxic texts are a few per cent: "
           "`recall_at_1pct_fpr` / `recall_at_5pct_fpr` (best recall of any threshold on the method's score with at most "
           "1 % / 5 % of clean test texts flagged), then at the method's own operating point its clean firing rate `fpr` "
           "and `precision_at_5pct` / `precision_at_10pct` (the precision its test TPR and FPR give at 5 % / 10 % toxic "
           "prevalence: p*TPR / (p*TPR + (1-p)*FPR)). F1 on these balanced splits comes last: flagging everything "
           "already scores 0.667 there. `or_rule_fpr2` is greedy selection at `--criterion recall_at_fpr --target-fpr "
           "0.02` (the `discover` default); `sparse_linear_fpr2` is `sparse_linear` with its threshold at a 2 % clean "
           "firing rate of out-of-fold discovery scores (`discover --kind sparse_linear`'s default).", ""]
    for metric in LEAD_METRICS:
        md += [f"## Per language: {metric}", "", markdown_table(rows, MAIN_METHODS, metric), ""]
    md += ["## OR-rule K sweep (F1)", "", markdown_table(rows, k_sweep, "f1"), ""]
    sections.append(("Per language (recall at 1% clean FPR)",
                     _html_from_rows(rows, MAIN_METHODS, "recall_at_1pct_fpr", lang_list)))
    sections.append(("Per language (precision at 5% prevalence)",
                     _html_from_rows(rows, MAIN_METHODS, "precision_at_5pct", lang_list)))
    sections.append(("Per language (F1)", _html_from_rows(rows, MAIN_METHODS, "f1", lang_list)))
    sections.append(("Per language (ROC-AUC)", _html_from_rows(rows, MAIN_METHODS, "roc_auc", lang_list)))
    sections.append(("OR-rule K sweep (F1)", _html_from_rows(rows, k_sweep, "f1", lang_list)))
    if controls["langs"]:
        md += ctl.markdown(rows, controls)
        sections.append(("Random controls (is the SAE doing the work?)", ctl.html(
            rows, controls, lang_list, lambda r, m, metric, g: _html_from_rows(r, m, metric, g))))
    if grouped:
        md += by_source.markdown(grouped["per_group"], grouped["out_of_group"], group_column)
    if transfer:
        images.append(out / "transfer_f1.png")
        report.plot_heatmap(transfer["f1"], lang_list, lang_list, "F1: discover on row, test on column", images[-1],
                            xlabel="test language", ylabel="discovery language")
        images.append(out / "transfer_jaccard_top10.png")
        report.plot_heatmap(transfer["jaccard_top10"], lang_list, lang_list, "Jaccard overlap of top-10 features",
                            images[-1], cmap="magma")
        header = ["discover \\ test"] + lang_list
        body = [[a] + [float(v) for v in r] for a, r in zip(lang_list, transfer["f1"])]
        md += ["## Cross-lingual transfer (F1, discover on row, test on column)", "", markdown_grid(header, body), ""]
        sections.append(("Cross-lingual transfer (F1)", html_table(header, body)))
    if eff:
        images.append(out / "efficiency.png")
        report.plot_efficiency(eff, images[-1])
        header = ["lang", "K", "full F1"] + [f"{f * 100:g}%" for f in eff["fractions"]] + ["smallest for 99%"]
        body = [[la, v["k"], v["full_f1"], *v["mean_f1"], _pct(v["smallest_fraction_99pct"])]
                for la, v in eff["langs"].items()]
        body.append(["macro", "", eff["macro"]["full_f1"], *eff["macro"]["mean_f1"],
                     _pct(eff["macro"]["smallest_fraction_99pct"])])
        md += ["## Data efficiency (mean test F1 over seeds)", "", markdown_grid(header, body), ""]
        sections.append(("Data efficiency (mean F1 over seeds)", html_table(header, body)))
    if sweep and sweep["f1"]:
        header = ["lang"] + [f"layer {la}: F1 (best delta)" for la in sweep["layers"]] + ["chosen by delta"]
        body = [[g] + [f"{sweep['f1'][g][la]:.3f} ({sweep['best_delta'][g][la]:.3f})" for la in sweep["layers"]]
                + [sweep["chosen"][g]] for g in sweep["f1"]]
        body.append(["macro F1"] + [sweep["macro_f1"][la] for la in sweep["layers"]] + [sweep["macro_f1_chosen"]])
        md += [f"## Layer sweep (OR-rule test F1; best single-feature delta on discovery; main analyses use layer "
               f"{fx.layer})", "", markdown_grid(header, body), ""]
        sections.append(("Layer sweep (OR-rule F1, best delta)", html_table(header, body)))
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_html(out / "report.html", f"safetyscope evaluation: {fx.backbone.model_id}, layer {fx.layer}",
               sections, images)
    return rows, out, images


def _check_enough_rows(df, y, langs) -> None:
    """Every language needs enough discovery rows of each class to fit on and test rows to score, checked
    before the extraction (a language short of them would otherwise vanish from the report or crash a fit)."""
    short = []
    for lang in langs:
        d_idx, t_idx = split_indices(df, lang)
        n_toxic = int(y[d_idx].sum())
        if min(n_toxic, len(d_idx) - n_toxic) < MIN_PER_CLASS or len(t_idx) == 0:
            short.append(f"{lang} ({n_toxic} toxic / {len(d_idx) - n_toxic} clean discovery, {len(t_idx)} test)")
    if short:
        raise SafetyScopeError(f"too few rows to evaluate: each language needs >= {MIN_PER_CLASS} toxic and "
                               f"{MIN_PER_CLASS} clean discovery rows and some test rows; short: {', '.join(short)} "
                               "(leave them out with --langs)")


def _pct(f):
    return None if f is None else f"{f * 100:g}%"


def _html_from_rows(rows, methods, metric, langs) -> str:
    look = {(r["lang"], r["method"]): r.get(metric) for r in rows}
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    body = [[la] + [look.get((la, m)) for m in present] for la in langs]
    return html_table(["lang"] + present, body)
