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
from ..reports import write_json
from ..sae import SAE
from . import by_source, report
from . import controls as ctl
from .config import PERCENTS, SEEDS
from .per_language import evaluate_languages, layer_sweep, split_indices
from .report import MAIN_METHODS  # noqa: F401  (the CLI prints its table with them)
from .transfer import efficiency_curves, transfer_matrix

SKIPPABLE = ("transfer", "efficiency", "random_sae")


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

    images = report.write_report(out, results)
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
