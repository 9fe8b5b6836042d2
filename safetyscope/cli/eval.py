"""`safetyscope eval`: per-language results beside honest baselines, cross-lingual transfer and data
efficiency, as results.json + report.md + PNG plots + one self-contained report.html."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import get_args

import click

from ..features import FeatureConfig, Pool
from .options import NumberList, feature_config, model_options, user_errors

MAIN_METHODS = ["shipped", "or_rule_fpr2", "or_rule", "or_rule_delta", "or_rule_report", "sparse_linear", "logreg_sae", "probe_raw",
                "majority"]


SKIPPABLE = ("transfer", "efficiency", "random_sae")
LEAD_METRICS = ("recall_at_1pct_fpr", "recall_at_5pct_fpr", "fpr", "precision_at_5pct", "precision_at_10pct",
                "average_precision", "roc_auc", "balanced_accuracy", "f1", "precision", "recall")


@click.command("eval")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Report directory.")
@click.option("--langs", default=None, help="Comma-separated languages [default: all present].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the per-language and transfer runs, the random SAE and the controls' bootstrap.")
@click.option("--seeds", type=NumberList(int), default="0,1,2", show_default=True, help="Seeds of the data-efficiency subsamples.")
@click.option("--fractions", type=NumberList(float, low=0, high=100), default="1,2,5,10,25,50,100", show_default=True,
              help="% of discovery data (efficiency).")
@click.option("-c", "--classifier", default=None, help="Also score this classifier file as is ('default' = shipped).")
@click.option("--methods", "only", default=None, help="Comma-separated subset of per-language methods.")
@click.option("--skip", default="", help="Comma-separated analyses to skip: transfer, efficiency, random_sae "
              "(the random-weight SAE control: a second SAE encoding, about doubling the SAE work).")
@click.option("--scan-layers", type=NumberList(int, low=-1), default=None,
              help="Comma-separated layers (an SAE source with one SAE per layer, e.g. a Qwen-Scope directory): "
                   "OR-rule F1 and best single-feature delta per language and layer.")
@model_options
@user_errors
def eval_command(data, output, langs, seed, seeds, fractions, classifier, only, skip, scan_layers, **kw):
    """Discover per language on `discovery` rows, test on `test` rows, beside baselines on the same split;
    transfer across languages; F1 against the share of discovery data.

    DATA: files with text, label, lang and split columns (e.g. ../shared/data/toxicity/*.parquet;
    ci_sample.parquet is left out when other files are given, since it repeats their rows)."""
    import polars as pl

    from ..data import frame_hash, parse_labels, read_table, require_text
    from ..errors import SafetyScopeError
    from ..eval import controls as ctl
    from ..eval import report
    from ..eval.per_language import evaluate_languages, layer_sweep, markdown_table, methods
    from ..eval.transfer import efficiency_curves, transfer_matrix
    from ..features import FeatureExtractor, extract_shared
    from ..outputs import check_report_dir
    from ..sae import SAE

    out = check_report_dir(output, inputs=data)  # before any work: a bad -o must not cost the whole run
    skip = {s.strip() for s in skip.split(",") if s.strip()}
    if skip - set(SKIPPABLE):
        raise SafetyScopeError(f"--skip {sorted(skip - set(SKIPPABLE))}: unknown; use any of {', '.join(SKIPPABLE)}")
    cfg = feature_config(kw)
    paths = [p for p in data if not Path(p).name.startswith("ci_sample")] or list(data)
    df = pl.concat([require_text(read_table(p, columns=["text", "label", "lang", "split"]), "text", p)
                    .select("text", "label", "lang", "split").with_columns(pl.col("label").cast(pl.String)) for p in paths])
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
    scan_fx = {la: FeatureExtractor.from_config(replace(cfg, layer=la), backbone=fx.backbone)
               for la in scan if la != fx.layer}
    shipped = None
    if classifier:
        from ..discovery.detector import read_classifier, read_rules
        from ..provenance import check_compatible

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
                                           batch_size=fx.batch_size, max_length=fx.max_length,
                                           skip_first_token=fx.skip_first_token, pool=fx.pool, cache=cfg.cache))
    t0 = time.perf_counter()
    # once, every analysis reuses it; one forward pass per batch serves both SAEs
    ex, *random_ex = extract_shared(extractors, df.get_column("text").to_list(), progress=True)
    t_feat = time.perf_counter() - t0
    outputs = {}
    rows = evaluate_languages(df, ex, langs=lang_list, seed=seed, shipped=shipped, only=only,
                              random_ex=random_ex[0] if random_ex else None, outputs=outputs)
    controls = ctl.compare_controls(outputs, lang_list, seed=seed)
    transfer = None if "transfer" in skip else transfer_matrix(df, y, ex.codes, lang_list, seed=seed)
    eff = None if "efficiency" in skip else efficiency_curves(
        df, y, ex.codes, lang_list, fractions=tuple(f / 100 for f in fractions), seeds=seeds)

    sweep = None
    if scan:
        codes = {fx.layer: ex.codes}
        for layer, sfx in scan_fx.items():  # one extraction per extra layer, cached like the main one
            codes[layer] = sfx.extract(df.get_column("text").to_list(), progress=True).codes
        sweep = layer_sweep(df, codes, langs=lang_list, seed=seed)

    k_sweep = [m for m in methods(seed) if m.startswith("or_rule_K")]
    config = {"data": [str(p) for p in paths], "langs": lang_list, "seed": seed, "seeds": ",".join(map(str, seeds)),
              "fractions": ",".join(f"{f:g}" for f in fractions),
              "model": fx.backbone.model_id, "model_fingerprint": fx.backbone.fingerprint(), "sae": cfg.sae or "default",
              "sae_fingerprint": fx.sae.fingerprint(), "layer": fx.layer, "classifier": classifier,
              "max_length": cfg.max_length, "dtype": cfg.dtype, "texts": df.height,
              "data_sha256": frame_hash(df),
              "random_sae_fingerprint": extractors[1].sae.fingerprint() if random_ex else None}
    results = {"config": config, "feature_seconds": t_feat, "per_language": rows, "random_controls": controls,
               "transfer": transfer, "efficiency": eff, "layer_sweep": sweep}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

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
           "0.02` (the `discover` default).", ""]
    for metric in LEAD_METRICS:
        md += [f"## Per language: {metric}", "", markdown_table(rows, MAIN_METHODS, metric), ""]
    md += ["## OR-rule K sweep (F1)", "", markdown_table(rows, k_sweep, "f1"), ""]
    sections.append(("Per language (recall at 1% clean FPR)",
                     _html_from_rows(rows, MAIN_METHODS, "recall_at_1pct_fpr", lang_list, report)))
    sections.append(("Per language (precision at 5% prevalence)",
                     _html_from_rows(rows, MAIN_METHODS, "precision_at_5pct", lang_list, report)))
    sections.append(("Per language (F1)", _html_from_rows(rows, MAIN_METHODS, "f1", lang_list, report)))
    sections.append(("Per language (ROC-AUC)", _html_from_rows(rows, MAIN_METHODS, "roc_auc", lang_list, report)))
    sections.append(("OR-rule K sweep (F1)", _html_from_rows(rows, k_sweep, "f1", lang_list, report)))
    if controls["langs"]:
        md += ctl.markdown(rows, controls)
        sections.append(("Random controls (is the SAE doing the work?)", ctl.html(
            rows, controls, lang_list, lambda r, m, metric, g: _html_from_rows(r, m, metric, g, report))))
    if transfer:
        images.append(out / "transfer_f1.png")
        report.plot_heatmap(transfer["f1"], lang_list, lang_list, "F1: discover on row, test on column", images[-1],
                            xlabel="test language", ylabel="discovery language")
        images.append(out / "transfer_jaccard_top10.png")
        report.plot_heatmap(transfer["jaccard_top10"], lang_list, lang_list, "Jaccard overlap of top-10 features",
                            images[-1], cmap="magma")
        header = ["discover \\ test"] + lang_list
        body = [[a] + [float(v) for v in r] for a, r in zip(lang_list, transfer["f1"])]
        md += ["## Cross-lingual transfer (F1, discover on row, test on column)", "", _md(header, body), ""]
        sections.append(("Cross-lingual transfer (F1)", report.html_table(header, body)))
    if eff:
        images.append(out / "efficiency.png")
        report.plot_efficiency(eff, images[-1])
        header = ["lang", "K", "full F1"] + [f"{f * 100:g}%" for f in eff["fractions"]] + ["smallest for 99%"]
        body = [[la, v["k"], v["full_f1"], *v["mean_f1"], _pct(v["smallest_fraction_99pct"])]
                for la, v in eff["langs"].items()]
        body.append(["macro", "", eff["macro"]["full_f1"], *eff["macro"]["mean_f1"],
                     _pct(eff["macro"]["smallest_fraction_99pct"])])
        md += ["## Data efficiency (mean test F1 over seeds)", "", _md(header, body), ""]
        sections.append(("Data efficiency (mean F1 over seeds)", report.html_table(header, body)))
    if sweep and sweep["f1"]:
        header = ["lang"] + [f"layer {la}: F1 (best delta)" for la in sweep["layers"]] + ["chosen by delta"]
        body = [[g] + [f"{sweep['f1'][g][la]:.3f} ({sweep['best_delta'][g][la]:.3f})" for la in sweep["layers"]]
                + [sweep["chosen"][g]] for g in sweep["f1"]]
        body.append(["macro F1"] + [sweep["macro_f1"][la] for la in sweep["layers"]] + [sweep["macro_f1_chosen"]])
        md += [f"## Layer sweep (OR-rule test F1; best single-feature delta on discovery; main analyses use layer "
               f"{fx.layer})", "", _md(header, body), ""]
        sections.append(("Layer sweep (OR-rule F1, best delta)", report.html_table(header, body)))
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(md) + "\n")
    report.write_html(out / "report.html", f"safetyscope evaluation: {fx.backbone.model_id}, layer {fx.layer}",
                      sections, images)
    click.echo(markdown_table(rows, MAIN_METHODS, "f1"))
    click.echo(f"wrote {out}/results.json, report.md, report.html and {len(images)} plot(s)", err=True)


def _check_enough_rows(df, y, langs) -> None:
    """Every language needs enough discovery rows of each class to fit on and test rows to score, checked
    before the extraction (a language short of them would otherwise vanish from the report or crash a fit)."""
    from ..discovery.rules import MIN_PER_CLASS
    from ..errors import SafetyScopeError
    from ..eval.per_language import split_indices

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


def _md(header, body) -> str:
    from ..eval.report import _fmt

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _html_from_rows(rows, methods, metric, langs, report) -> str:
    look = {(r["lang"], r["method"]): r.get(metric) for r in rows}
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    body = [[la] + [look.get((la, m)) for m in present] for la in langs]
    return report.html_table(["lang"] + present, body)


@click.command("overlap")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Report directory (overlap.json, overlap.md, overlap.png).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--name", "names", multiple=True, help="Display name per DATA, in order [default: file stems].")
@click.option("--pool", type=click.Choice(get_args(Pool)), default=FeatureConfig.pool, show_default=True,
              help="max: a feature fires anywhere in the text; last: at the last token only.")
@click.option("--min-count", type=click.IntRange(min=1), default=1, show_default=True, help="Texts a feature must fire on to count.")
@model_options
@user_errors
def overlap_command(data, output, text_column, names, pool, min_count, **kw):
    """Footprints (features that fire) of datasets and their pairwise overlap and redundancy."""
    from ..data import read_table, text_list
    from ..errors import SafetyScopeError
    from ..eval import report
    from ..eval.overlap import footprint, overlap_matrices, redundancy
    from ..features import FeatureExtractor
    from ..outputs import check_report_dir

    if names and len(names) != len(data):
        raise SafetyScopeError(f"{len(names)} --name for {len(data)} dataset(s)")
    names = list(names) or [Path(p).stem if Path(p).suffix else Path(p).name for p in data]
    out = check_report_dir(output, inputs=data)
    cfg = feature_config(kw)
    cfg.pool = pool
    fx = FeatureExtractor.from_config(cfg)
    prints, red = {}, {}
    for name, path in zip(names, data):
        texts = [t for t in text_list(read_table(path, columns=[text_column]), text_column, path)
                 if t is not None and t.strip()]
        if not texts:
            raise SafetyScopeError(f"{path}: no non-empty texts")
        codes = fx.transform(texts, progress=True)
        prints[name] = footprint(codes, min_count)
        red[name] = redundancy(codes)
    res = overlap_matrices(prints)
    res.update({"pool": pool, "min_count": min_count, "redundancy": red, "data": list(data),
                "model": fx.backbone.model_id, "sae": cfg.sae or "default", "layer": fx.layer})
    (out / "overlap.json").write_text(json.dumps(res, indent=2) + "\n")
    header = ["A \\ B"] + names
    body = [[a] + [float(v) for v in r] for a, r in zip(names, res["overlap"])]
    md = [f"# Footprint overlap (pool={pool}, min_count={min_count})", "",
          "overlap(A, B) = |F_A ∩ F_B| / |F_A|: the share of A's features that B also fires.", "", _md(header, body), "",
          "| dataset | footprint size | redundancy |", "|---|---|---|"]
    md += [f"| {n} | {s} | {red[n]['redundancy']:.3f} |" for n, s in zip(names, res["sizes"])]
    (out / "overlap.md").write_text("\n".join(md) + "\n")
    report.plot_heatmap(res["overlap"], names, names, "overlap(A=row, B=column)", out / "overlap.png",
                        xlabel="B", ylabel="A")
    click.echo("\n".join(md))
