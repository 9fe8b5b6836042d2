"""`safetyscope steer`: generation with SAE features added, suppressed or clamped; one prompt side by side;
`--calibrate`, the strength sweep; `steer export`, the edit as a file vLLM (hotwire-vllm) or llama.cpp loads.

Why `export` is a word of PROMPTS and not a click sub-command: `steer` takes a prompt or a file as its argument,
and a group with a default command would make `steer -h` describe the group instead of the options; an export
needs nothing but options `steer` already has (features, strengths, model, SAE, -o), so the same parse resolves the
same strengths into the same alphas that `steer` would add. The one prompt that cannot be steered is the bare
word "export"."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from ..errors import SafetyScopeError
from ..generators import Backend, GeneratorConfig
from ..steering import Positions, SteerConfig
from .options import NumberList, feature_config, finite, model_options, overwrite_option, user_errors

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
UNIT_HELP = ("1.0 = the feature's own typical size: its decoder vector at its mean activation where it fires on the "
             "shipped reference texts (--abs: raw residual length / activation instead)")


@click.command()
@click.argument("prompts_path", metavar="PROMPTS")
@click.option("-o", "--output", default=None,
              help="Output table (.jsonl, .parquet or a directory); --calibrate: a report directory; export: a .pt "
                   "(vLLM hotwire plugin) or .gguf (llama.cpp control vector). Optional for one prompt.")
@click.option("--text-column", default="prompt", show_default=True, help="Prompt column of PROMPTS.")
@click.option("--feature", "adds", multiple=True, metavar="F:S",
              help=f"Add S x feature F along its unit decoder direction (negative suppresses); {UNIT_HELP}. Repeatable.")
@click.option("--clamp", "clamps", multiple=True, metavar="F:S",
              help="Set feature F's activation to S x its typical activation (0 removes it where it fires, leaves "
                   "other text alone); repeatable.")
@click.option("--abs", "--alpha-abs", "absolute", is_flag=True,
              help="Read --feature as the absolute residual length added and --clamp as the absolute activation.")
@click.option("-c", "--classifier", default=None, help="Classifier JSON or shipped name whose features --suppress clamps.")
@click.option("--suppress", is_flag=True, help="Clamp every feature of -c to 0.")
@click.option("--calibrate", is_flag=True,
              help="Sweep each --feature's strength over --strengths on PROMPTS: re-encoded activation, perplexity "
                   "under the unsteered model, degeneration; marks the largest fluent strength that raises the "
                   "feature; writes calibration.{json,md,png} and completions.jsonl into -o.")
@click.option("--strengths", type=NumberList(float, low=0), default=None, metavar="S1,S2,...",
              help="--calibrate's schedule, in the feature's units [default: 0.5,1,2,3,4,6,8,16].")
# the generation settings and their defaults are SteerConfig's (steering.py), checked there
@click.option("--positions", type=click.Choice(get_args(Positions)), default=SteerConfig.positions, show_default=True,
              help="Edit every position, or only those of generated tokens.")
@click.option("--chat/--raw", default=SteerConfig.chat, show_default=True,
              help="Apply the chat template, or continue the raw text.")
@click.option("--max-new-tokens", type=int, default=SteerConfig.max_new_tokens, show_default=True,
              help="Tokens generated per prompt.")
@click.option("--temperature", type=float, default=SteerConfig.temperature, show_default=True, callback=finite(low=0),
              help="0 = greedy.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=SteerConfig.seed, show_default=True,
              help="Random seed of sampling (with --temperature > 0).")
@click.option("--plain", is_flag=True, help="Also write the unsteered completion and its activations.")
@click.option("--backend", type=click.Choice(get_args(Backend)), default=GeneratorConfig.backend,
              show_default=True, help="Only transformers can steer (see README).")
@overwrite_option
@model_options
@user_errors
def steer(prompts_path, output, text_column, adds, clamps, absolute, classifier, suppress, calibrate, strengths,
          positions, chat, max_new_tokens, temperature, seed, plain, backend, overwrite, **kw):
    """Generation with SAE features added, suppressed or clamped in the residual stream (no weight update).

    PROMPTS is a table of prompts, one prompt in quotes (plain and steered completions printed side by side), or
    the word `export` (write the --feature edit for a serving engine to -o)."""
    from ..steer_dose import Dose

    if backend != "transformers":
        raise SafetyScopeError(f"--backend {backend} cannot steer: vLLM and OpenAI-compatible servers do not expose the "
                               "residual stream to edit; use --backend transformers (on a GPU: --device cuda), or "
                               "`steer export` for the vLLM hotwire plugin")
    if suppress != bool(classifier):
        raise SafetyScopeError("-c CLASSIFIER and --suppress go together")
    gen = SteerConfig(positions=positions, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                      batch_size=kw["batch_size"])
    if strengths and not calibrate:
        raise SafetyScopeError("--strengths is the --calibrate schedule; with one strength use --feature F:S")
    doses = [Dose.parse(a, absolute=absolute, value_required=not calibrate) for a in adds]
    doses += [Dose.parse(c, kind="clamp", absolute=absolute) for c in clamps]
    if prompts_path == "export":
        return _export(doses, output, overwrite, classifier, calibrate, plain, positions, kw)
    if calibrate:
        return _calibrate(prompts_path, text_column, doses, output, classifier, absolute, strengths, gen, kw)
    from ..outputs import check_output

    one = _one_prompt(prompts_path)
    if output is None and not one:
        raise SafetyScopeError("-o OUTPUT is needed for a prompts file (one prompt in quotes prints to the terminal)")
    if output is not None:
        check_output(output, inputs=[] if one else [prompts_path], overwrite=overwrite)
    prompts = [prompts_path] if one else _read_prompts(prompts_path, text_column)
    fx, scales = _load(kw, need_scales=True)
    if suppress:
        from ..steering import classifier_features

        doses += [Dose(f, 0.0, "clamp", absolute=True) for f in classifier_features(classifier, fx)]
    resolved = _resolve(doses, scales, fx)
    from ..steering import run_steer

    rows, st = run_steer(fx, prompts, [r.spec for r in resolved], gen, plain=plain or one, progress=not one,
                         strengths=[r.strength for r in resolved])
    if output is not None:
        import polars as pl

        from ..data import write_table

        write_table(pl.DataFrame(rows), output)
    if one:
        _side_by_side(rows[0], resolved)
    mean = [sum(r["target_acts"][j] for r in rows) / len(rows) for j in range(len(resolved))]
    where = f"wrote {len(rows)} rows to {output}; " if output is not None else ""
    click.echo(f"{where}steering {rows[0]['steering']} ({_doses_text(resolved)}) edited {st['edited_positions']} "
               f"positions (mean edit norm {st['mean_edit_norm']:.2f}); mean target activation in completions: "
               + ", ".join(f"{r.spec.feature} {m:.2f}" for r, m in zip(resolved, mean)), err=True)


def _one_prompt(arg: str) -> bool:
    """A path that exists is the batch path; anything else is one prompt, unless it names a table that is missing."""
    p = Path(arg)
    if p.exists():
        return False
    if "\n" not in arg and p.suffix.lower() in TABLE_SUFFIXES and " " not in arg:
        raise SafetyScopeError(f"{arg}: no such file (to steer that text as a prompt, add a word)")
    if not arg.strip():
        raise SafetyScopeError("the prompt is empty")
    return True


def _read_prompts(path: str, column: str) -> list[str]:
    from ..data import read_table, text_list

    prompts = text_list(read_table(path, columns=[column]), column, path)
    empty = [i for i, p in enumerate(prompts) if not p or not p.strip()]
    if not prompts or empty:
        raise SafetyScopeError(f"{path}: no prompts" if not prompts else
                               f"{path}: {len(empty)} empty prompt(s) (rows {empty[:10]}); drop them first")
    return [str(p) for p in prompts]


def _load(kw: dict, *, need_scales: bool):
    """The model in the dtype ``auto`` picks for generation (steer's work is mostly decoding), its SAE and,
    when asked, every feature's typical activation (steer_dose.py; cached)."""
    from ..backbone import Backbone
    from ..features import FeatureExtractor
    from ..steer_dose import feature_scales

    cfg = feature_config(kw)
    bb = Backbone.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype, purpose="generate")
    fx = FeatureExtractor.from_config(cfg, backbone=bb)
    return fx, (feature_scales(fx) if need_scales else None)


def _resolve(doses, scales, fx):
    from ..steer_dose import resolve
    from ..steering import check_specs

    resolved = resolve(doses, scales)
    check_specs([r.spec for r in resolved], fx.sae)
    return resolved


def _doses_text(resolved) -> str:
    return ", ".join(f"{r.spec.feature}: {r.strength:+.3g}x = {r.strength_abs:+.3g} abs" for r in resolved)


def _side_by_side(row: dict, resolved) -> None:
    import shutil
    import textwrap
    from itertools import zip_longest

    col = max(24, (shutil.get_terminal_size((100, 24)).columns - 3) // 2)
    left = textwrap.wrap(row["plain_completion"], col) or ["(empty)"]
    right = textwrap.wrap(row["completion"], col) or ["(empty)"]
    acts = lambda a: ", ".join(f"{r.spec.feature}={v:.2f}" for r, v in zip(resolved, a))  # noqa: E731
    click.echo(f"{'plain':<{col}} | steered {row['steering']}")
    click.echo(f"{'-' * col}-+-{'-' * col}")
    for a, b in zip_longest(left, right, fillvalue=""):
        click.echo(f"{a:<{col}} | {b}")
    click.echo(f"{'-' * col}-+-{'-' * col}")
    click.echo(f"{'activation: ' + acts(row['plain_acts']):<{col}} | activation: {acts(row['target_acts'])}")


def _calibrate(prompts_path, text_column, doses, output, classifier, absolute, strengths, gen: SteerConfig, kw):
    from dataclasses import asdict

    from ..outputs import check_report_dir
    from ..steer_calibrate import DEFAULT_STRENGTHS, CalibrationConfig, calibrate, write_report
    from ..steer_dose import Dose

    if classifier or any(d.kind == "clamp" for d in doses) or absolute:
        raise SafetyScopeError("--calibrate sweeps --feature strengths in the feature's units: drop --clamp, -c/--suppress "
                               "and --abs")
    if not doses:
        raise SafetyScopeError("--calibrate needs the features to sweep: --feature F (repeatable)")
    if output is None:
        raise SafetyScopeError("--calibrate needs -o REPORT_DIR")
    one = _one_prompt(prompts_path)
    out = check_report_dir(output, inputs=[] if one else [prompts_path])
    prompts = [prompts_path] if one else _read_prompts(prompts_path, text_column)
    fx, scales = _load(kw, need_scales=True)
    _resolve([d if d.value is not None else Dose(d.feature, 1.0) for d in doses], scales, fx)  # ids checked up front
    feats = list(dict.fromkeys(d.feature for d in doses))
    extra: dict[int, list[float]] = {}
    for d in doses:
        if d.value is not None:
            extra.setdefault(d.feature, []).append(d.value)
    cfg = CalibrationConfig(**asdict(gen), strengths=tuple(strengths or DEFAULT_STRENGTHS),
                            extra={"model": fx.backbone.model_id, "sae": fx.sae.fingerprint(), "layer": fx.layer,
                                   "prompts": prompts_path, "dtype": str(next(fx.backbone.model.parameters()).dtype)})
    doc = calibrate(fx, prompts, feats, scales, cfg, extra_strengths=extra, progress=True)
    write_report(doc, out)
    for f in doc["features"]:
        best = f["calibrated_strength"]
        click.echo(f"feature {f['feature']}: calibrated strength {best if best is not None else 'none'} "
                   f"(unit {f['unit_abs']:.3g} abs)", err=True)
    click.echo(f"wrote {out}/calibration.json, calibration.md, calibration.png, completions.jsonl", err=True)


def _export(doses, output, overwrite, classifier, calibrate, plain, positions, kw):
    import json

    from ..outputs import check_output
    from ..steer_export import steering_vector, write_control_vector, write_hotwire

    if classifier or calibrate or plain or any(d.kind == "clamp" for d in doses):
        raise SafetyScopeError("steer export writes --feature F:S edits only (no --clamp, -c/--suppress, --calibrate, "
                               "--plain): serving engines add a fixed vector")
    if positions != "all":
        raise SafetyScopeError("steer export: serving engines add the vector at every position; drop --positions")
    if not doses:
        raise SafetyScopeError("nothing to export: pass --feature F:S")
    suffix = Path(output or "").suffix.lower()
    if suffix not in (".pt", ".gguf"):
        raise SafetyScopeError("steer export needs -o FILE.pt (vLLM hotwire plugin) or -o FILE.gguf (llama.cpp)")
    check_output(output, overwrite=overwrite, file_only=True)
    fx, scales = _load(kw, need_scales=True)
    resolved = _resolve(doses, scales, fx)
    vec = steering_vector(fx.sae, [r.spec for r in resolved])
    what = _doses_text(resolved)
    if suffix == ".pt":
        request = write_hotwire(output, vec, fx.layer, fx.backbone.n_layers)
        click.echo(f"wrote {output}: ({fx.backbone.n_layers}, {fx.backbone.d_model}) float32, row {fx.layer} = {what}\n"
                   f"serve: HOTWIRE_VECTORS={Path(output).parent} vllm serve MODEL; per request: "
                   f"extra_args={{\"hotwire\": {json.dumps(request)}}} (scale multiplies the strengths)")
    else:
        hint = str(getattr(fx.backbone.model.config.get_text_config(), "model_type", ""))
        write_control_vector(output, vec, fx.layer, hint, {
            "features": json.dumps([r.spec.feature for r in resolved]),
            "strengths": json.dumps([r.strength for r in resolved]),
            "strengths_abs": json.dumps([r.strength_abs for r in resolved]),
            "model": fx.backbone.model_id, "sae_fingerprint": fx.sae.fingerprint(), "layer": str(fx.layer)})
        click.echo(f"wrote {output}: direction.{fx.layer} (output of block {fx.layer}) = {what}\n"
                   f"serve: llama-server -m MODEL.gguf --control-vector-scaled {output} 1.0 "
                   f"--control-vector-layer-range {fx.layer} {fx.layer}")
