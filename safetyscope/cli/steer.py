"""`safetyscope steer`: generation with SAE features added, suppressed or clamped."""

from __future__ import annotations

from typing import get_args

import click

from ..errors import SafetyScopeError
from ..steering import Positions
from ..synthesis.generators import Backend, GeneratorConfig
from .options import feature_config, finite, model_options, overwrite_option, user_errors


@click.command()
@click.argument("prompts_path", metavar="PROMPTS")
@click.option("-o", "--output", required=True, help="Output table (.jsonl, .parquet or a directory).")
@click.option("--text-column", default="prompt", show_default=True, help="Prompt column of PROMPTS.")
@click.option("--feature", "adds", multiple=True, metavar="F:ALPHA",
              help="Add ALPHA x feature F's unit decoder direction (negative suppresses); repeatable.")
@click.option("--clamp", "clamps", multiple=True, metavar="F:VALUE",
              help="Set feature F's activation to VALUE (0 removes it where it fires, leaves other text alone); repeatable.")
@click.option("-c", "--classifier", default=None, help="Classifier JSON or shipped name whose features --suppress clamps.")
@click.option("--suppress", is_flag=True, help="Clamp every feature of -c to 0.")
@click.option("--positions", type=click.Choice(get_args(Positions)), default="all", show_default=True,
              help="Edit every position, or only those of generated tokens.")
@click.option("--chat/--raw", default=True, show_default=True, help="Apply the chat template, or continue the raw text.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, callback=finite(low=0), help="0 = greedy.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--plain", is_flag=True, help="Also write the unsteered completion and its activations.")
@click.option("--backend", type=click.Choice(get_args(Backend)), default=GeneratorConfig.backend,
              show_default=True, help="Only transformers can steer (see README).")
@overwrite_option
@model_options
@user_errors
def steer(prompts_path, output, text_column, adds, clamps, classifier, suppress, positions, chat, max_new_tokens,
          temperature, seed, plain, backend, overwrite, **kw):
    """Generation with SAE features added, suppressed or clamped in the residual stream (no weight update)."""
    from ..data import read_table, text_list, write_table
    from ..features import FeatureExtractor
    from ..outputs import check_output
    from ..steering import SteerSpec, classifier_features, run_steer

    if backend != "transformers":
        raise SafetyScopeError(f"--backend {backend} cannot steer: vLLM and OpenAI-compatible servers do not expose the "
                               "residual stream to edit; use --backend transformers (on a GPU: --device cuda)")
    if suppress != bool(classifier):
        raise SafetyScopeError("-c CLASSIFIER and --suppress go together")
    specs = [SteerSpec.parse(a) for a in adds] + [SteerSpec.parse(c, clamp=True) for c in clamps]
    if max_new_tokens < 1:
        raise SafetyScopeError("--max-new-tokens must be >= 1")
    check_output(output, inputs=[prompts_path], overwrite=overwrite)
    prompts = text_list(read_table(prompts_path, columns=[text_column]), text_column, prompts_path)
    empty = [i for i, p in enumerate(prompts) if not p or not p.strip()]
    if not prompts or empty:
        raise SafetyScopeError(f"{prompts_path}: no prompts" if not prompts else
                               f"{prompts_path}: {len(empty)} empty prompt(s) (rows {empty[:10]}); drop them first")
    batch = kw["batch_size"]
    fx = FeatureExtractor.from_config(feature_config(kw))
    if suppress:
        specs += [SteerSpec(f, clamp=0.0) for f in classifier_features(classifier, fx)]
    rows, st = run_steer(fx, prompts, specs, positions=positions, chat=chat, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, batch_size=batch, plain=plain, progress=True)
    import polars as pl

    write_table(pl.DataFrame(rows), output)
    mean = [sum(r["target_acts"][j] for r in rows) / len(rows) for j in range(len(specs))]
    click.echo(f"wrote {len(rows)} rows to {output}; steering {rows[0]['steering']} edited {st['edited_positions']} "
               f"positions (mean edit norm {st['mean_edit_norm']:.2f}); mean target activation in completions: "
               + ", ".join(f"{s.feature} {m:.2f}" for s, m in zip(specs, mean)), err=True)
