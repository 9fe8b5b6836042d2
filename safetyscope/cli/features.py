"""`safetyscope features`: pooled sparse SAE codes per text."""

from __future__ import annotations

import click

from ..streaming import CHUNK_ROWS
from .options import NumberList, feature_config, model_options, overwrite_option, ray_options, user_errors


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output table (.parquet, .csv, .jsonl or a directory).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the texts.")
@click.option("--layers", type=NumberList(int, low=-1), default=None,
              help="Several layers in one forward pass, one SAE each (--sae: a directory or hub repo with layer{n}.sae.pt, "
                   "or one SAE per layer: --sae A,B,C); columns feature_ids_l<n> and feature_acts_l<n> (not streamed).")
@click.option("--chunk-rows", type=int, default=CHUNK_ROWS, show_default=True,
              help="Rows per durable output part: memory holds one chunk; a killed run resumes from the finished parts.")
@click.option("--keep-shards", is_flag=True,
              help="OUTPUT becomes a directory of part-NNNNNN.parquet files (in row order) instead of one table.")
@overwrite_option
@model_options
@ray_options
@user_errors
def features(input_path, output, text_column, layers, chunk_rows, keep_shards, overwrite, engine, address, workers,
             cpus_per_worker, gpus_per_worker, ray_batch_size, **kw):
    """Pooled sparse SAE codes per text: feature_ids and feature_acts (max over tokens); streamed, resumable."""
    cfg = feature_config(kw)
    if layers:
        return _features_layers(input_path, output, text_column, list(layers), cfg, engine, keep_shards, overwrite)
    if engine == "ray":
        from ..ray_engine import run_features_ray

        s = run_features_ray(input_path, output, cfg, text_column=text_column, chunk_rows=chunk_rows,
                             keep_shards=keep_shards, address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                             gpus_per_worker=gpus_per_worker, batch_rows=ray_batch_size, overwrite=overwrite)
        click.echo(f"wrote {s['rows']} rows to {output} (ray, {workers} worker(s)): "
                   f"mean {s['mean_features']:.1f} features per text" + _resumed(s), err=True)
        return
    from ..features_file import features_file

    s = features_file(cfg, input_path, output, text_column=text_column, chunk_rows=chunk_rows, keep_shards=keep_shards,
                      overwrite=overwrite)
    click.echo(f"wrote {s['rows']} rows to {output}: {s['tokens']} tokens, {s['truncated']} text(s) truncated at "
               f"{cfg.max_length} tokens, {s['cached']} from cache, mean {s['mean_features']:.1f} features per text"
               + _resumed(s), err=True)


def _resumed(s: dict) -> str:
    return f" (resumed after {s['resumed_chunks']} chunk(s); counts of tokens are this run's)" if s["resumed_chunks"] else ""


def _features_layers(input_path, output, text_column, layers, cfg, engine, keep_shards, overwrite):
    """`features --layers`: every layer from one forward pass (it stops after the deepest)."""
    from ..errors import SafetyScopeError
    from ..features_file import features_layers_file

    if engine == "ray":
        raise SafetyScopeError("--layers runs with --engine local only; with --engine ray run one --layer at a time")
    if keep_shards:
        raise SafetyScopeError("--keep-shards streams one layer; with --layers OUTPUT is one table")
    s = features_layers_file(cfg, layers, input_path, output, text_column=text_column, overwrite=overwrite)
    click.echo(f"wrote {s['rows']} rows to {output}: layers {', '.join(map(str, layers))}, {s['tokens']} tokens, "
               f"{s['truncated']} text(s) truncated at {cfg.max_length} tokens; mean features per text: "
               + ", ".join(f"l{la} {m:.1f}" for la, m in zip(layers, s["mean_features"])), err=True)
