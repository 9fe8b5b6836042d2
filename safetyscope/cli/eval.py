"""`safetyscope eval`: per-language results beside honest baselines, cross-lingual transfer and data
efficiency, as results.json + report.md + PNG plots + one self-contained report.html."""

from __future__ import annotations

from typing import get_args

import click

from ..eval.config import PERCENTS, SEEDS
from ..features import FeatureConfig, Pool
from .options import NumberList, feature_config, model_options, report_overwrite_option, user_errors


@click.command("eval")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Report directory.")
@click.option("--langs", default=None, help="Comma-separated languages [default: all present].")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the per-language and transfer runs, the random SAE and the controls' bootstrap.")
@click.option("--seeds", type=NumberList(int, low=-1, high=2**32 - 1), default=",".join(map(str, SEEDS)), show_default=True,
              help="Seeds of the data-efficiency subsamples.")
@click.option("--fractions", type=NumberList(float, low=0, high=100), default=",".join(f"{p:g}" for p in PERCENTS),
              show_default=True,
              help="% of discovery data (efficiency).")
@click.option("-c", "--classifier", default=None, help="Also score this classifier file as is ('default' = shipped).")
@click.option("--methods", "only", default=None, help="Comma-separated subset of per-language methods.")
@click.option("--skip", default="", help="Comma-separated analyses to skip: transfer, efficiency, random_sae "
              "(the random-weight SAE control: a second SAE encoding, about doubling the SAE work).")
@click.option("--scan-layers", type=NumberList(int, low=-1), default=None,
              help="Comma-separated layers (an SAE source with one SAE per layer, e.g. a Qwen-Scope directory): "
                   "OR-rule F1 and best single-feature delta per language and layer.")
@click.option("--group-column", default=None,
              help="A column naming each row's group, e.g. `source`: results per group of each language's test rows "
                   "and leave-one-group-out refits (generalization measured, not assumed).")
@report_overwrite_option
@model_options
@user_errors
def eval_command(data, output, langs, seed, seeds, fractions, classifier, only, skip, scan_layers, group_column,
                 overwrite, **kw):
    """Discover per language on `discovery` rows, test on `test` rows, beside baselines on the same split;
    transfer across languages; F1 against the share of discovery data.

    DATA: files with text, label, lang and split columns (e.g. ../shared/data/toxicity/*.parquet;
    ci_sample.parquet is left out when other files are given, since it repeats their rows)."""
    from ..eval.per_language import markdown_table
    from ..eval.run import MAIN_METHODS, run_eval

    rows, out, images = run_eval(data, output, feature_config(kw), langs=langs, seed=seed, seeds=seeds,
                                 fractions=fractions, classifier=classifier, only=only, skip=skip,
                                 scan_layers=scan_layers, group_column=group_column, overwrite=overwrite)
    click.echo(markdown_table(rows, MAIN_METHODS, "f1"))
    click.echo(f"wrote {out}/results.json, report.md, report.html and {len(images)} plot(s)", err=True)


@click.command("overlap")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Report directory (overlap.json, overlap.md, overlap.png).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the texts.")
@click.option("--name", "names", multiple=True, help="Display name per DATA, in order [default: file stems].")
@click.option("--pool", type=click.Choice(get_args(Pool)), default=FeatureConfig.pool, show_default=True,
              help="max: a feature fires anywhere in the text; last: at the last token only.")
@click.option("--min-count", type=click.IntRange(min=1), default=1, show_default=True, help="Texts a feature must fire on to count.")
@report_overwrite_option
@model_options
@user_errors
def overlap_command(data, output, text_column, names, pool, min_count, overwrite, **kw):
    """Footprints (features that fire) of datasets and their pairwise overlap and redundancy."""
    from ..eval.overlap import run_overlap

    cfg = feature_config(kw)
    cfg.pool = pool
    _, md = run_overlap(data, output, cfg, names=names, text_column=text_column, min_count=min_count,
                        overwrite=overwrite)
    click.echo(md)
