"""`safetyscope eval`: per-language results beside honest baselines, as results.json + report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..cli import feature_config, model_options, user_errors


@click.command("eval")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Report directory.")
@click.option("--langs", default=None, help="Comma-separated languages [default: all present].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-c", "--classifier", default=None, help="Also score this classifier file as is ('default' = shipped).")
@click.option("--methods", "only", default=None, help="Comma-separated subset of methods to run.")
@model_options
@user_errors
def eval_command(data, output, langs, seed, classifier, only, **kw):
    """Discover per language on `discovery` rows, test on `test` rows, beside baselines on the same split.

    DATA: files with text, label, lang and split columns (e.g. ../shared/data/toxicity/*.parquet)."""
    import polars as pl

    from ..data import read_table
    from ..features import FeatureExtractor
    from .per_language import evaluate_languages, markdown_table, methods

    cfg = feature_config(kw)
    paths = [p for p in data if not Path(p).name.startswith("ci_sample")] or list(data)
    df = pl.concat([read_table(p, columns=["text", "label", "lang", "split"]).select("text", "label", "lang", "split")
                    .with_columns(pl.col("label").cast(pl.String)) for p in paths])
    df = df.filter(pl.col("split").is_in(["discovery", "test"]))
    fx = FeatureExtractor.from_config(cfg)
    shipped = None
    if classifier:
        from ..discovery.detector import Detector, check_compatible, read_classifier
        from ..discovery.rules import classifier_from_dict

        d = read_classifier(None if classifier == "default" else classifier)
        check_compatible(d, fx, classifier)
        shipped = classifier_from_dict(d["rule"])
    t0 = time.perf_counter()
    ex = fx.extract(df.get_column("text").to_list(), progress=True)
    t_feat = time.perf_counter() - t0
    rows = evaluate_languages(df, ex, langs=langs.split(",") if langs else None, seed=seed, shipped=shipped,
                              only=only.split(",") if only else None)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    order = ["shipped", "or_rule", "or_rule_report", "sparse_linear", "logreg_sae", "probe_raw", "majority"]
    order += [m for m in methods(seed) if m.startswith("or_rule_K")]
    results = {"config": {"data": paths, "seed": seed, "model": fx.backbone.model_id,
                          "model_fingerprint": fx.backbone.fingerprint(), "sae": cfg.sae or "default",
                          "sae_fingerprint": fx.sae.fingerprint(), "layer": fx.layer, "classifier": classifier},
               "feature_seconds": t_feat, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# Per-language toxicity detection ({fx.backbone.model_id}, layer {fx.layer})", "",
          "Discovery split -> test split of each language; every method on the same test rows.", ""]
    for metric in ("f1", "precision", "recall", "roc_auc"):
        md += [f"## {metric}", "", markdown_table(rows, order, metric), ""]
    (out / "report.md").write_text("\n".join(md))
    click.echo(markdown_table(rows, order[:7], "f1"))
    click.echo(f"wrote {out / 'results.json'} and {out / 'report.md'}", err=True)
