"""CLI commands of the discovery job: discover, classify, explain."""

from __future__ import annotations

import json
from typing import get_args

import click

from ..discovery.config import Criterion, DiscoverConfig, RuleKind, Selection
from ..streaming import CHUNK_ROWS
from .options import (
    NumberList,
    feature_config,
    model_options,
    overwrite_option,
    ray_options,
    recorded_kwargs,
    recorded_model_options,
    user_errors,
)


def _fpr_cap(value: str) -> float | None | str:
    if value.lower() == "auto":
        return "auto"
    if value.lower() in ("none", "off", "0"):
        return None
    try:
        cap = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a share (0-1), 'auto' or 'none'", param_hint="--fpr-cap") from None
    if not 0 < cap <= 1:
        raise click.BadParameter(f"{value} is not in (0, 1]", param_hint="--fpr-cap")
    return cap


@click.command()
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Classifier JSON file to write.")
@click.option("--text-column", default=DiscoverConfig.text_column, show_default=True, help="Column holding the texts.")
@click.option("--label-column", default=DiscoverConfig.label_column, show_default=True,
              help="1/0, true/false, toxic/clean or harmful/benign.")
@click.option("--lang", "langs", multiple=True, help="Keep rows with this `lang` (repeatable).")
@click.option("--split", default=None, help="Keep rows whose `split` column equals this, e.g. discovery.")
@click.option("--kind", type=click.Choice(get_args(RuleKind)), default=DiscoverConfig.kind, show_default=True,
              help="or_rule: any selected feature fires; sparse_linear: L1 logistic over SAE features; linear: L2 "
                   "logistic over every SAE feature and the mean residual.")
@click.option("--max-features", type=int, default=None, help="K [default: chosen from 1,2,5,10 on held-back data; 128 for sparse_linear].")
@click.option("--selection", type=click.Choice(get_args(Selection)), default=DiscoverConfig.selection, show_default=True,
              help="or_rule: add the feature+threshold that most raises F1 (greedy) or keep the top K by delta (the report's rule).")
@click.option("--fpr-cap", default=DiscoverConfig.fpr_cap, show_default=True,
              help="Largest share of clean texts one feature may fire on ('auto': 0.2 greedy, 0.02 delta; "
                   "'none' with delta = threshold 0 for all, as in the report).")
@click.option("--criterion", type=click.Choice(get_args(Criterion)), default=DiscoverConfig.criterion, show_default=True,
              help="or_rule: most recall with a clean firing rate <= --target-fpr on held-out folds, or the best F1 "
                   "(balanced data; flags far too much on mostly clean traffic).")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DiscoverConfig.target_fpr, show_default=True,
              help="Clean firing-rate budget of --criterion recall_at_fpr.")
@click.option("--threshold", type=float, default=DiscoverConfig.threshold, show_default=True, help="Base firing threshold.")
@click.option("--scan-layers", type=NumberList(int, low=-1), default=None,
              help="Comma-separated layers to scan (SAE dir/repo with one SAE per layer); keeps the best.")
@click.option("--per-language", is_flag=True,
              help="One rule per language of the `lang` column, each fitted on its own rows, plus the rule fitted on "
                   "all rows as the fallback for other languages; classify picks each row's rule by its language.")
@click.option("--fallback-kind", type=click.Choice(get_args(RuleKind)), default=None,
              help="With --per-language: the kind of the pooled fallback rule [default: --kind].")
@click.option("--shared-weights", is_flag=True,
              help="With --per-language: one rule fitted on every language's rows (each language weighing the same), "
                   "with only its threshold set per language, at --target-fpr of that language's out-of-fold clean "
                   "scores (discovery/shared_rule.py says why).")
@click.option("--group-column", default=DiscoverConfig.group_column,
              help="A column naming each row's group, e.g. `source`: K / C and the operating point are chosen on "
                   "held-out groups (leave one group out), so settings that only fit one source's style lose.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=DiscoverConfig.seed, show_default=True,
              help="Random seed of the hold-out splits.")
@overwrite_option
@model_options
@user_errors
def discover(data, output, text_column, label_column, langs, split, kind, max_features, selection, fpr_cap, criterion,
             target_fpr, threshold, scan_layers, per_language, shared_weights, fallback_kind, group_column, seed, overwrite,
             **kw):
    """Find the SAE features that fire more on toxic than clean texts and write a classifier."""
    from ..discovery.discover import discover as run
    from ..outputs import check_output

    # a classifier file this tool wrote is replaced by a rerun; any other file needs --overwrite
    check_output(output, inputs=data, overwrite=overwrite, kind="classifier file", file_only=True)  # before the work
    layers = list(scan_layers or ())
    cfg = DiscoverConfig(text_column=text_column, label_column=label_column, langs=list(langs) or None, split=split,
                         kind=kind, selection=selection, max_features=max_features, threshold=threshold, fpr_cap=_fpr_cap(fpr_cap),
                         criterion=criterion, target_fpr=target_fpr, seed=seed, layers=layers, per_language=per_language,
                         fallback_kind=fallback_kind, group_column=group_column, shared_weights=shared_weights)
    det = run(list(data), cfg, feature_config(kw))
    det.save(output)
    r = det.rule.to_dict()
    d = det.meta["discovery_data"]
    if det.rules_by_lang:
        per_lang = det.meta["validation"]["per_lang"]
        for lang, rule in det.rules_by_lang.items():
            v = per_lang[lang]
            click.echo(f"{lang}: {kind} with {len(rule.features_)} feature(s) from {v['toxic']} toxic / {v['clean']} "
                       f"clean rows; hold-out recall {v['holdout_recall']:.3f}, clean FPR {v['holdout_fpr']:.3f}", err=True)
        click.echo("fallback for other languages (" + ("the same weights, threshold on every language's clean rows"
                                                       if shared_weights else "fitted on all rows pooled") + "):", err=True)
    click.echo(f"{r['kind']}: {r['k']} feature(s) at layer {det.extractor.layer} from {d['rows']} rows "
               f"({d['toxic']} toxic / {d['clean']} clean); K: {r['k_selection']}", err=True)
    for i, fold in enumerate(r.get("holdout", [])):
        click.echo(f"  hold-out {i + 1}: recall {fold['recall']:.3f}, clean FPR {fold['fpr']:.3f}, F1 {fold['f1']:.3f}", err=True)
    for f in r.get("features", [])[:10]:
        click.echo("  feature " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in f.items()), err=True)
    scan = det.meta.get("layer_scan")
    if scan:
        click.echo("layer scan (best single-feature delta): " + ", ".join(
            f"{la}: {v['best_delta']:.3f}" for la, v in scan["layers"].items()) + f"; kept layer {scan['chosen']}", err=True)
        click.echo("multi-layer variant (best feature of each of the top m layers, OR-ed; hold-out F1): " + ", ".join(
            f"m={v['m']}: {v['holdout_f1']:.3f}" for v in scan["multi_layer"]), err=True)
    click.echo(f"wrote {output}", err=True)


def _detector(classifier, kw):
    from ..discovery.detector import Detector

    return Detector.load(classifier, **recorded_kwargs(kw))


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output table (.parquet, .csv, .jsonl or a directory).")
@click.option("-c", "--classifier", default=None, help="Classifier JSON [default: the shipped toxicity classifier].")
@click.option("--text-column", default="text", show_default=True, help="Column holding the texts.")
@click.option("--chunk-rows", type=int, default=CHUNK_ROWS, show_default=True, help="Rows per durable output chunk.")
@click.option("--lang-column", default=None,
              help="Column holding each row's language [default: `lang` if present, else identified offline].")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@recorded_model_options("classifier")
@ray_options
@user_errors
def classify(input_path, output, classifier, text_column, chunk_rows, lang_column, overwrite, engine, address, workers,
             cpus_per_worker, gpus_per_worker, ray_batch_size, **kw):
    """Add toxic, score, evidence_features and status columns to every row; resumable.

    evidence_features: on a toxic row, the features that pushed it towards toxic (OR-rule: those above their
    threshold; sparse linear: active features of positive weight; linear: the active SAE features of largest
    positive contribution, at most 10); empty on a clean row. `explain` shows each one's share of the score."""
    from ..discovery.classify import classify_file

    if engine == "ray":
        from ..ray_engine import run_classify_ray

        s = run_classify_ray(input_path, output, classifier=classifier, **recorded_kwargs(kw), text_column=text_column,
                             chunk_rows=chunk_rows, overwrite=overwrite, address=address, workers=workers,
                             lang_column=lang_column,
                             cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, batch_rows=ray_batch_size)
    else:
        det = _detector(classifier, kw)
        s = classify_file(det, input_path, output, text_column=text_column, chunk_rows=chunk_rows, overwrite=overwrite,
                          lang_column=lang_column)
    click.echo(f"wrote {s['rows']} rows to {output}: {s['toxic']} toxic, {s['skipped']} without text"
               + (f" (resumed after {s['resumed_chunks']} chunk(s))" if s["resumed_chunks"] else ""), err=True)
    if s.get("unvalidated"):  # nothing to say when every row is in a validated language
        if engine == "ray":
            det = _detector(classifier, kw)
        langs = ", ".join(det.validated_languages()) or "none recorded"
        click.echo(f"{s['unvalidated']} of {s['rows']} rows are outside the classifier's validated languages "
                   f"({langs}): status 'unvalidated language', verdict given but unchecked"
                   + (" (scored by its fallback rule)" if det.rules_by_lang else ""), err=True)


@click.command()
@click.argument("classifier")
@click.argument("texts", nargs=-1)
@click.option("--input", "input_path", default=None, help="Read texts from a table instead.")
@click.option("--text-column", default="text", show_default=True, help="Column holding the texts.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many texts from --input.")
@click.option("--lang", default=None,
              help="The texts' language: picks a per-language classifier's rule and sets the status [default: "
                   "identified offline, as classify does].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of text.")
@recorded_model_options("classifier")
@user_errors
def explain(classifier, texts, input_path, text_column, limit, lang, as_json, **kw):
    """Per text: the verdict and the sum that gives it, each feature's share (OR-rule: activation against its
    threshold; linear kinds: weight x log1p(activation)), its readable name and the tokens where it fires.
    Language and status as `classify` gives them.

    CLASSIFIER is a classifier JSON file or a shipped classifier's name (see `classify -c`)."""
    from ..data import read_table, text_list
    from ..discovery.explain import explain_text
    from ..errors import SafetyScopeError

    texts = list(texts)
    if input_path:
        texts += text_list(read_table(input_path, columns=[text_column]), text_column, input_path)[:limit]
    if not texts:
        raise SafetyScopeError("give texts as arguments or --input FILE")
    det = _detector(classifier, kw)
    for t in texts:
        e = explain_text(det, t, lang)
        click.echo(json.dumps(e, ensure_ascii=False) if as_json else format_explanation(e))


def format_explanation(e: dict) -> str:
    """The explanation as lines a person can check: the verdict, the sum that gives the score, one line per feature
    (its share, its name, the tokens where it fires)."""
    from ..discovery.naming import short_name

    where = "".join(f" {k}={e[k]}" for k in ("lang", "rule") if e.get(k) is not None)
    status = "" if e["status"] == "ok" else f" {e['status']}"
    if e["toxic"] is None:
        return f"[skipped: {e['status']}{where}] {e['text']!r}\n"
    lines = [f"[{'TOXIC' if e['toxic'] else 'clean'} score={e['score']:+.3f}{where}{status}] {e['text']}"]
    feats, p = e["features"], e.get("score_parts", {})
    if e["kind"] == "or_rule":
        crossed = [f["id"] for f in feats if f["fired"]]
        lines.append(f"  OR-rule of {len(feats)} features: toxic when any activation is above its threshold; score = "
                     f"max(activation - threshold) = {e['score']:+.3f}; above: {', '.join(map(str, crossed)) or 'none'}")
    else:
        sae = f"SAE features {p['sae_features']:+.3f}"
        if "mean_residual" in p:  # linear: the shown features, then the rest of the active ones, then the residual
            sae += (f" (the {len(feats)} below: {p['shown_features']:+.3f}; {p['other_active']} other active: "
                    f"{p['other_features']:+.3f}) + mean residual {p['mean_residual']:+.3f}")
        lines.append(f"  score {e['score']:+.3f} = intercept {p['intercept']:+.3f} + {sae}; toxic when > 0; "
                     "each feature: weight x log1p(activation)")
    quiet = [f for f in feats if e["kind"] == "or_rule" and f["max_act"] <= 0]  # an OR-rule's inactive features
    for f in (f for f in feats if f not in quiet):
        if e["kind"] == "or_rule":
            share = (f"{f['max_act']:.2f} - threshold {f['threshold']:.2f} = {f['margin']:+.2f}"
                     + (" ABOVE" if f["fired"] else ""))
        else:
            share = f"{f['weight']:+.3f} x log1p({f['max_act']:.2f}) = {f['contribution']:+.3f}"
        toks = ", ".join(f"{t['token']!r}@{t['position']}={t['act']:.2f}" for t in f["tokens"][:5])
        lines.append(f"  feature {f['id']}: {share}  {short_name(f['name'])}" + (f"  at {toks}" if toks else ""))
    if quiet:
        lines.append("  not active (activation 0): " + ", ".join(f"{f['id']} (threshold {f['threshold']:.2f})" for f in quiet))
    if not feats:
        lines.append("  no feature of the rule is active")
    return "\n".join(lines) + "\n"
