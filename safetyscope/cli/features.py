"""`safetyscope features`: pooled sparse SAE codes per text."""

from __future__ import annotations

import click

from .options import feature_config, model_options, ray_options, user_errors


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output table (.parquet, .csv, .jsonl or a directory).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--chunk-rows", type=int, default=1024, show_default=True,
              help="Rows per durable output part: memory holds one chunk; a killed run resumes from the finished parts.")
@click.option("--keep-shards", is_flag=True,
              help="OUTPUT becomes a directory of part-NNNNNN.parquet files (in row order) instead of one table.")
@model_options
@ray_options
@user_errors
def features(input_path, output, text_column, chunk_rows, keep_shards, engine, address, workers, cpus_per_worker,
             gpus_per_worker, ray_batch_size, **kw):
    """Pooled sparse SAE codes per text: feature_ids and feature_acts (max over tokens); streamed, resumable."""
    cfg = feature_config(kw)
    if engine == "ray":
        from ..ray_engine import run_features_ray

        s = run_features_ray(input_path, output, cfg, text_column=text_column, chunk_rows=chunk_rows,
                             keep_shards=keep_shards, address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                             gpus_per_worker=gpus_per_worker, batch_rows=ray_batch_size)
        click.echo(f"wrote {s['rows']} rows to {output} (ray, {workers} worker(s)): "
                   f"mean {s['mean_features']:.1f} features per text" + _resumed(s), err=True)
        return
    from ..features_file import features_file

    s = features_file(cfg, input_path, output, text_column=text_column, chunk_rows=chunk_rows, keep_shards=keep_shards)
    click.echo(f"wrote {s['rows']} rows to {output}: {s['tokens']} tokens, {s['truncated']} text(s) truncated at "
               f"{cfg.max_length} tokens, {s['cached']} from cache, mean {s['mean_features']:.1f} features per text"
               + _resumed(s), err=True)


def _resumed(s: dict) -> str:
    return f" (resumed after {s['resumed_chunks']} chunk(s); counts of tokens are this run's)" if s["resumed_chunks"] else ""
