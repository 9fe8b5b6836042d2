"""CLI of the synthesis job: `synth targets`, `synth compare`, `synth sft-eval`, `coverage`, `synthesize`."""

from __future__ import annotations

import json
from typing import get_args

import click

from ..errors import SafetyScopeError
from ..generators import Backend, GeneratorConfig
from ..synthesis.compare import CompareConfig
from ..synthesis.sft_eval import SFTEvalConfig
from ..synthesis.synthesize import SynthConfig
from ..synthesis.targets import FDR, MIN_PRECISION, TargetsConfig
from .options import (
    feature_config,
    field_default,
    model_options,
    overwrite_option,
    recorded_kwargs,
    recorded_model_options,
    report_overwrite_option,
    user_errors,
)


def generator_options(fn):
    for opt in reversed([
        click.option("--backend", type=click.Choice(get_args(Backend)), default=GeneratorConfig.backend,
                     show_default=True, help="Generator backend."),
        click.option("--generator", default=None,
                     help="Generator model (any the backend loads) [default: embedded SmolLM2-135M-Instruct]."),
        click.option("--endpoint", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (--backend openai)."),
        click.option("--gen-batch-size", type=int, default=GeneratorConfig.batch_size, show_default=True,
                     help="Sequences per generate call (transformers)."),
        click.option("--classifier", default="default", show_default=True,
                     help="Toxicity classifier JSON screening responses ('default' = shipped; 'none' = no screening)."),
        click.option("--budget", type=int, default=SynthConfig.budget, show_default=True, help="At most this many pairs."),
        click.option("--max-attempts", type=int, default=SynthConfig.max_attempts, show_default=True, help="Generation rounds per target."),
        click.option("--samples", type=int, default=SynthConfig.samples, show_default=True, help="Generations per target per round."),
        click.option("--temperature", type=float, default=SynthConfig.temperature, show_default=True,
                     help="Sampling temperature of the generator (0 = greedy)."),
        click.option("--prompt-tokens", type=int, default=SynthConfig.prompt_tokens, show_default=True, help="Max new tokens per request."),
        click.option("--response-tokens", type=int, default=SynthConfig.response_tokens, show_default=True,
                     help="Max new tokens per response."),
        click.option("--group-size", type=int, default=SynthConfig.group_size, show_default=True,
                     help="Targets per batch (unit of durable output)."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=SynthConfig.seed, show_default=True,
                     help="Random seed of sampling and of the random arm."),
        click.option("--skip-covered/--no-skip-covered", default=SynthConfig.skip_covered, show_default=True,
                     help="Do not generate for a target that an earlier kept pair already fires."),
        click.option("--judge", "judge_kind", type=click.Choice(["detector", "llm"]), default="detector",
                     show_default=True, help="Who labels each written request: a harmful-request classifier, or the "
                                             "generator asked with a written rubric (for a strong generator)."),
        click.option("--judge-classifier", default="harmful-request", show_default=True,
                     help="Classifier JSON (or shipped name) of --judge detector: flagged = harmful."),
        click.option("--response-retries", type=int, default=SynthConfig.response_retries, show_default=True,
                     help="Regenerate a response that fails its check this many times, then drop the pair."),
        click.option("--no-template", is_flag=True,
                     help="Drop a harmful request without a generated refusal instead of using the template refusal."),
        click.option("--steer/--no-steer", "steer", default=SynthConfig.steer, show_default=True,
                     help="Targets still not fired after the plain attempts get steered attempts (their direction added "
                          "at --steer-schedule x their mean activation; transformers backend on the SAE's model only); a "
                          "request is kept only if it fires the target re-encoded without steering."),
        click.option("--steer-schedule", default=",".join(f"{m:g}" for m in SynthConfig.steer_schedule), show_default=True,
                     help="Multipliers of the steered attempts, one attempt each, in order (comma-separated, > 0)."),
    ]):
        fn = opt(fn)
    return fn


def synth_config(kw: dict):
    return SynthConfig(budget=kw.pop("budget"), max_attempts=kw.pop("max_attempts"), samples=kw.pop("samples"),
                       temperature=kw.pop("temperature"), prompt_tokens=kw.pop("prompt_tokens"),
                       response_tokens=kw.pop("response_tokens"), group_size=kw.pop("group_size"), seed=kw.pop("seed"),
                       skip_covered=kw.pop("skip_covered"), response_retries=kw.pop("response_retries"),
                       no_template=kw.pop("no_template"), steer=kw.pop("steer"),
                       steer_schedule=parse_schedule(kw.pop("steer_schedule")))


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"2,8,16"`` -> (2.0, 8.0, 16.0); anything else (empty, not a number, <= 0, not finite) is a one-line error."""
    try:
        out = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        out = ()
    if not out or not all(0 < m < float("inf") for m in out):
        raise SafetyScopeError(f"--steer-schedule {text!r}: give positive multipliers separated by commas, e.g. 2,8,16")
    return out


def generator_config(kw: dict):
    return GeneratorConfig(backend=kw.pop("backend"), model=kw.pop("generator"), endpoint=kw.pop("endpoint"),
                           batch_size=kw.pop("gen_batch_size"), device=kw.get("device"),
                           dtype=kw.get("dtype") or "auto")


def _classifier_kwargs(kw: dict) -> dict:
    """recorded_kwargs without --model/--sae: here those name the features' model and SAE, while a screening
    classifier is loaded with the model and SAE it records."""
    return {k: v for k, v in recorded_kwargs(kw).items() if k not in ("model", "sae")}


def load_detector(classifier: str | None, kw: dict):
    from ..discovery.detector import Detector

    if classifier in ("none", "off"):
        click.echo("warning: --classifier none: responses are not screened for toxicity", err=True)
        return None
    return Detector.load(classifier, **_classifier_kwargs(kw))


def _audit_judges(kw: dict, near_dup: float):
    """The audit's judges for synthesize / compare, loaded before any generation (a bad classifier fails first): the
    request judge is --judge-classifier (a detector judge) or the shipped harmful-request (an LLM judge)."""
    from ..synthesis.audit import AuditConfig, load_judges

    name = kw["judge_classifier"] if kw["judge_kind"] == "detector" else AuditConfig.request_judge
    return load_judges(AuditConfig(request_judge=name, near_dup=near_dup), **_classifier_kwargs(kw))


def judge_factory(kw: dict):
    """gen -> the judge of --judge / --judge-classifier (a detector judge is loaded before any generation)."""
    from ..synthesis.judge import DetectorJudge, LLMJudge

    kind, name = kw.pop("judge_kind"), kw.pop("judge_classifier")
    if kind == "llm":
        return lambda gen: LLMJudge(gen)
    from ..discovery.detector import Detector

    det = Detector.load(name, **_classifier_kwargs(kw))
    judge = DetectorJudge(det, name)
    return lambda gen: judge


@click.group("synth")
def synth_group():
    """Feature-targeted safety data synthesis: target sets and experiments."""


@synth_group.command("targets")
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Targets JSON file to write.")
@click.option("--text-column", default=TargetsConfig.text_column, show_default=True, help="Column holding the texts.")
@click.option("--label-column", default=TargetsConfig.label_column, show_default=True, help="harmful/benign (or 1/0, toxic/clean).")
@click.option("--split", default=None, help="Keep rows whose `split` column equals this.")
@click.option("--lang", "langs", multiple=True, help="Keep rows with this `lang` (repeatable).")
@click.option("--min-delta", type=float, default=TargetsConfig.min_delta, show_default=True,
              help="|P(fire|harmful) - P(fire|benign)| at least this.")
@click.option("--max-targets", type=int, default=TargetsConfig.max_targets, show_default=True,
              help="Keep at most this many targets, highest delta first.")
@click.option("--harmful-only", is_flag=True, help="Only harmful-specific features (no benign-specific ones).")
@click.option("--min-fires", type=int, default=TargetsConfig.min_fires, show_default=True,
              help="A target fires on at least this many rows.")
@click.option("--max-fire-rate", type=float, default=TargetsConfig.max_fire_rate, show_default=True,
              help="A target fires on at most this share of rows.")
@click.option("--min-precision", type=float, default=MIN_PRECISION, show_default=True,
              help="A target's label holds at least this share of the rows it fires on (P(harmful | fires) for a "
                   "harmful target).")
@click.option("--fdr", type=float, default=FDR, show_default=True,
              help="False discovery rate of the one-sided Fisher tests (Benjamini-Hochberg over every feature that "
                   "passes --min-fires/--max-fire-rate).")
@click.option("--judge-classifier", default="harmful-request", show_default=True,
              help="Request judge of each target's top contexts (most must be judged as its label): a classifier "
                   "JSON or shipped name (flagged = harmful), llm:MODEL / qwen3guard:MODEL / llamaguard:MODEL "
                   "(an LLM judge), or none.")
@click.option("--judge-endpoint", default=None, help="OpenAI-compatible server of an LLM --judge-classifier, "
                                                     "e.g. http://127.0.0.1:8000/v1.")
@click.option("--judge-window", type=int, default=TargetsConfig.judge_window, show_default=True,
              help="Tokens either side of the firing token in the context the judge reads.")
@click.option("--examples", type=int, default=TargetsConfig.n_examples, show_default=True, help="Top-activating contexts kept per target.")
@overwrite_option
@model_options
@user_errors
def targets_cmd(data, output, text_column, label_column, split, langs, min_delta, max_targets, harmful_only, min_fires,
                max_fire_rate, min_precision, fdr, judge_classifier, judge_endpoint, judge_window, examples, overwrite,
                **kw):
    """Find the target set T on a labelled reference set (never the data whose coverage you measure)."""
    from ..discovery.config import DiscoverConfig
    from ..discovery.discover import load_labelled
    from ..features import FeatureExtractor
    from ..outputs import check_output
    from ..provenance import write_document
    from ..synthesis.targets import find_targets, load_request_judge, targets_document

    check_output(output, inputs=data, overwrite=overwrite, kind="targets file", file_only=True)  # before the work
    cfg = TargetsConfig(text_column=text_column, label_column=label_column, min_delta=min_delta,
                        max_targets=max_targets, benign=not harmful_only, min_fires=min_fires, max_fire_rate=max_fire_rate,
                        n_examples=examples, min_precision=min_precision, fdr=fdr, judge_window=judge_window)
    df = load_labelled(list(data), DiscoverConfig(text_column=text_column, label_column=label_column, split=split,
                                                  langs=list(langs) or None))
    # the judge is loaded before the features are: a bad classifier name fails before the long part
    judge = load_request_judge(judge_classifier, endpoint=judge_endpoint, device=kw.get("device"), dtype=kw.get("dtype"),
                               classifier_kwargs=_classifier_kwargs(kw))
    fcfg = feature_config(kw)
    fx = FeatureExtractor.from_config(fcfg)
    found = find_targets(df, cfg, fx, progress=True, source=", ".join(data), judge=judge)
    doc = targets_document(found, fx, fcfg.sae)
    write_document(doc, output)
    t, sel = doc["targets"], doc["selection"]
    click.echo(f"{len(t)} target(s) from {found['reference_data']['rows']} rows "
               f"({sum(x['label'] == 'harmful' for x in t)} harmful-specific, "
               f"{sum(x['label'] == 'benign' for x in t)} benign-specific); {sel['examined']} of {sel['candidates']} "
               f"candidates examined, {sel['rejected']} rejected {sel['rejected_by_reason']}", err=True)
    for x in t[:10]:
        click.echo(f"  feature {x['id']} {x['label']} delta={x['delta']:+.3f} precision={x['precision']:.2f} "
                   f"q={x['q_value']:.1g} lang={x['lang']}: {x['examples'][0]['snippet'][:100]}", err=True)
    click.echo(f"wrote {output}", err=True)


@click.command()
@click.argument("data")
@click.option("--targets", "targets_path", required=True, help="Targets JSON (from `synth targets`).")
@click.option("-o", "--output", default=None, help="Write the report as JSON here.")
@click.option("--text-column", default="prompt", show_default=True, help="Column holding the prompts.")
@overwrite_option
@recorded_model_options("targets file")
@user_errors
def coverage(data, targets_path, output, text_column, overwrite, **kw):
    """Share of the target features that fire on at least one row of DATA."""
    from ..data import read_table, text_list
    from ..outputs import check_output
    from ..provenance import extractor_from_record
    from ..synthesis.coverage import coverage_of_texts, format_coverage
    from ..synthesis.targets import read_targets

    if output:
        check_output(output, inputs=[data, targets_path], overwrite=overwrite, kind="report file", file_only=True)
    doc = read_targets(targets_path)
    texts = [t for t in text_list(read_table(data, columns=[text_column]), text_column, data) if t and t.strip()]
    fx = extractor_from_record(doc, targets_path, **recorded_kwargs(kw))
    rep = coverage_of_texts(fx, texts, [t["id"] for t in doc["targets"]], progress=True)
    click.echo(format_coverage(rep, data))
    if output:
        from pathlib import Path

        Path(output).write_text(json.dumps({"format": "safetyscope-coverage", "data": data, "targets": targets_path, **rep},
                                           indent=2) + "\n")
        click.echo(f"wrote {output}", err=True)


@click.command()
@click.option("--targets", "targets_path", required=True, help="Targets JSON (from `synth targets`).")
@click.option("--seed-data", required=True, help="The existing supervision: its coverage decides what is missing.")
@click.option("-o", "--output", required=True, help="Output: .jsonl, .parquet or a datasets directory.")
@click.option("--text-column", default="prompt", show_default=True, help="Prompt column of --seed-data.")
@click.option("--audit/--no-audit", "audit", default=SynthConfig.audit, show_default=True,
              help="Keep a pair only if `synth audit` keeps it (request judge = --judge-classifier, response judge = "
                   "the shipped refusal classifier); drop reasons are counted as audit_<reason>.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT that this tool did not write.")
@generator_options
@recorded_model_options("targets file")
@user_errors
def synthesize(targets_path, seed_data, output, text_column, audit, overwrite, classifier, **kw):
    """Write verified (prompt, response) pairs for the targets the seed data does not fire; resumable."""
    from ..data import read_table, text_list
    from ..generators import make_generator
    from ..provenance import extractor_from_record
    from ..synthesis.synthesize import check_output
    from ..synthesis.synthesize import synthesize as run
    from ..synthesis.targets import read_targets

    check_output(output, overwrite, inputs=[targets_path, seed_data])  # before any work
    doc = read_targets(targets_path)
    seed_texts = [t for t in text_list(read_table(seed_data, columns=[text_column]), text_column, seed_data)
                  if t and t.strip()]
    from ..synthesis.judge import format_judged_stats

    cfg, gcfg = synth_config(kw), generator_config(kw)
    cfg.audit = audit
    audit_judges = _audit_judges(kw, cfg.near_dup) if audit else None
    make_judge = judge_factory(kw)
    fx = extractor_from_record(doc, targets_path, **recorded_kwargs(kw))
    det = load_detector(classifier, kw)
    gen = make_generator(gcfg)
    s = run(doc, seed_texts, cfg, fx, gen, det, output, judge=make_judge(gen), audit=audit_judges, overwrite=overwrite)
    click.echo(f"seed data covers {s['seed_coverage']['n_covered']}/{s['targets']} targets; "
               f"{s['kept_targets']}/{s['uncovered_targets']} uncovered targets now have a verified pair "
               f"({s['attempted']} attempted), {s['output_coverage']['n_covered']}/{s['uncovered_targets']} fire on "
               f"the output; wrote {s['rows']} rows to {output}"
               + (f" (resumed after {s['resumed_targets']} target(s))" if s["resumed_targets"] else ""), err=True)
    click.echo(f"judge {s['judge']}: {format_judged_stats(s)}; summary in {output}.summary.json", err=True)


@synth_group.command("compare")
@click.argument("data")
@click.option("-o", "--output-dir", required=True, help="Directory for compare.json/.md/.png, targets and arm data.")
@click.option("--seed-lang", "seed_langs", multiple=True, default=field_default(CompareConfig, "seed_langs"), show_default=True,
              help="The existing supervision = `seed` rows with these languages ...")
@click.option("--seed-source", "seed_sources", multiple=True, default=field_default(CompareConfig, "seed_sources"),
              help="... and these sources (repeatable; default all).")
@click.option("--ref-lang", "ref_langs", multiple=True, default=field_default(CompareConfig, "ref_langs"), show_default=True,
              help="Languages of the reference half of `pool` that T is found on.")
@click.option("--max-seed-rows", type=int, default=CompareConfig.max_seed_rows, show_default=True,
              help="Subsample the seed subset (CPU time).")
@click.option("--max-ref-rows", type=int, default=CompareConfig.max_ref_rows, show_default=True,
              help="Subsample the reference rows (CPU time).")
@click.option("--min-delta", type=float, default=CompareConfig.min_delta, show_default=True,
              help="Smallest P(fires | harmful) - P(fires | benign) of a target.")
@click.option("--max-targets", type=int, default=CompareConfig.max_targets, show_default=True,
              help="Keep at most this many targets, highest delta first.")
@click.option("--max-fire-rate", type=float, default=CompareConfig.max_fire_rate, show_default=True,
              help="A target fires on at most this share of reference rows.")
@click.option("--sample-seed", type=int, default=CompareConfig.sample_seed, show_default=True,
              help="Seed of the row subsampling and natural draw.")
@click.option("--min-precision", type=float, default=CompareConfig.min_precision, show_default=True,
              help="A target's P(its label | fires) on the reference rows at least this (as `synth targets`).")
@click.option("--fdr", type=float, default=CompareConfig.fdr, show_default=True,
              help="Benjamini-Hochberg false discovery rate of the targets' Fisher tests (1 = no test).")
@click.option("--judge-targets/--no-judge-targets", default=CompareConfig.judge_targets, show_default=True,
              help="A target's top contexts must be judged its label by --judge / --judge-classifier.")
@click.option("--audit/--no-audit", "audit", default=CompareConfig.audit, show_default=True,
              help="Every arm keeps only the rows `synth audit` keeps; coverage is counted over kept rows.")
@report_overwrite_option
@generator_options
@model_options
@user_errors
def compare_cmd(data, output_dir, classifier, min_precision, fdr, judge_targets, audit, overwrite, **kw):
    """Targeted synthesis (plain, and with steering) vs random safety synthesis vs natural sampling, at a matched budget.

    DATA is the safety prompts table (id, prompt, label, lang, source, category, split seed/pool)."""
    from ..outputs import check_report_dir
    from ..synthesis.compare import run_compare

    check_report_dir(output_dir, inputs=[data], overwrite=overwrite)  # before the judges and models load
    cc = CompareConfig(data=data, output_dir=output_dir, seed_langs=list(kw.pop("seed_langs")),
                       seed_sources=list(kw.pop("seed_sources")), ref_langs=list(kw.pop("ref_langs")),
                       max_seed_rows=kw.pop("max_seed_rows"), max_ref_rows=kw.pop("max_ref_rows"),
                       min_delta=kw.pop("min_delta"), max_targets=kw.pop("max_targets"),
                       max_fire_rate=kw.pop("max_fire_rate"), sample_seed=kw.pop("sample_seed"),
                       min_precision=min_precision, fdr=fdr, judge_targets=judge_targets, audit=audit,
                       overwrite=overwrite)
    cfg, gcfg = synth_config(kw), generator_config(kw)
    audit_judges = _audit_judges(kw, cfg.near_dup) if audit else None
    make_judge = judge_factory(kw)
    det = load_detector(classifier, kw)
    fcfg = feature_config(kw)
    res = run_compare(cc, cfg, gcfg, det, fcfg, make_judge, audit=audit_judges)
    click.echo(res["markdown"])
    click.echo(f"wrote {output_dir}/compare.json, compare.md, compare.png", err=True)


@synth_group.command("sft-eval")
@click.option("--arms-dir", required=True, help="A `synth compare` output directory (targeted/random/natural.jsonl).")
@click.option("--data", required=True, help="The safety prompts table compare ran on (held-out prompts come from it).")
@click.option("-o", "--output-dir", required=True, help="Directory for results.json, report.md, sft_eval.png.")
@click.option("--model", default=None, help="Model to fine-tune [default: embedded SmolLM2-135M-Instruct].")
@click.option("--arm", "arms", multiple=True, default=tuple(field_default(SFTEvalConfig, "arms")), show_default=True,
              help="Arm of the compare run to fine-tune on (repeat for several).")
@click.option("--base-rows", type=int, default=SFTEvalConfig.base_rows, show_default=True, help="Benign seed rows shared by every arm.")
@click.option("--max-arm-rows", type=int, default=None, help="Cap every arm at this many rows [default: the smallest arm's size].")
@click.option("--lora-r", type=int, default=SFTEvalConfig.lora_r, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=int, default=SFTEvalConfig.lora_alpha, show_default=True, help="LoRA scaling alpha.")
@click.option("--max-steps", type=int, default=SFTEvalConfig.max_steps, show_default=True, help="Optimizer steps, the same for every arm.")
@click.option("--train-batch-size", type=int, default=SFTEvalConfig.batch_size, show_default=True,
              help="Examples per fine-tuning step.")
@click.option("--lr", type=float, default=SFTEvalConfig.lr, show_default=True, help="Fine-tuning learning rate.")
@click.option("--max-seq-len", type=int, default=SFTEvalConfig.max_seq_len, show_default=True,
              help="Tokens kept per training example.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=SFTEvalConfig.seed, show_default=True,
              help="Random seed of fine-tuning.")
@click.option("--n-harmful", type=int, default=SFTEvalConfig.n_harmful, show_default=True, help="Held-out harmful prompts.")
@click.option("--n-xstest", type=int, default=SFTEvalConfig.n_xstest, show_default=True, help="Held-out XSTest safe prompts.")
@click.option("--n-benign", type=int, default=SFTEvalConfig.n_benign, show_default=True, help="Held-out benign instructions.")
@click.option("--max-new-tokens", type=int, default=SFTEvalConfig.max_new_tokens, show_default=True,
              help="Per answer (the judgement reads the opening sentence).")
@click.option("--answer-tokens", type=int, default=SFTEvalConfig.answer_tokens, show_default=True,
              help="Untouched model's answers that complete base rows.")
@click.option("--gen-batch-size", type=int, default=SFTEvalConfig.gen_batch_size, show_default=True,
              help="Prompts per generation batch when answering the evaluation sets.")
@click.option("--bootstrap", type=int, default=SFTEvalConfig.bootstrap, show_default=True, help="Bootstrap resamples of each share.")
@click.option("--save-adapters", is_flag=True, default=SFTEvalConfig.save_adapters,
              help="Also write each arm's LoRA adapter under OUTPUT_DIR/adapters/.")
@report_overwrite_option
@user_errors
def sft_eval_cmd(arms_dir, data, output_dir, model, arms, train_batch_size, **kw):
    """LoRA-fine-tune the model on base rows + each arm (and base rows only), then measure refusals on held-out prompts."""
    from ..synthesis.sft_eval import run_sft_eval

    cfg = SFTEvalConfig(arms_dir=arms_dir, data=data, output_dir=output_dir, model=model, arms=list(arms),
                        batch_size=train_batch_size, **kw)
    res = run_sft_eval(cfg, progress=lambda m: click.echo(m, err=True))
    click.echo(res["markdown"])
    click.echo(f"wrote {output_dir}/results.json, report.md, sft_eval.png", err=True)
