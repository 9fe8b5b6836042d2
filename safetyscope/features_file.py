"""`features` over a table file, streamed: chunks of ``chunk_rows`` rows -> durable parts -> OUTPUT.

Memory holds one chunk at a time whatever the input size; a killed run resumes from its finished parts
(see ``streaming``). Each chunk is extracted on its own (texts sorted by length within the chunk), so the
values are those of ``FeatureExtractor.extract`` on that chunk; the Ray engine extracts the same chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import polars as pl

from . import streaming
from .data import count_rows, iter_chunks, table_format, text_list
from .errors import SafetyScopeError
from .features import Extraction, FeatureConfig, FeatureExtractor, codes_frame

# Bump when the parts' content or the manifest's meaning changes: old parts then never mix with new ones.
MANIFEST_VERSION = 1
SCAN_ROWS = 65536  # rows per read of the text-only check before the run (one column: small)


def output_format(out: Path, keep_shards: bool) -> str:
    """OUTPUT's table format; with ``keep_shards`` OUTPUT is a directory of parquet parts."""
    if keep_shards:
        if out.suffix.lower() in (".csv", ".jsonl", ".ndjson", ".json"):
            raise SafetyScopeError(f"--keep-shards writes a directory of parquet parts; {out} names a "
                                   f"{out.suffix} file: name a directory")
        return "parquet"
    return table_format(out, for_writing=True)


def identity(fx: FeatureExtractor) -> dict:
    """Besides the input, what decides the parts' values: model and SAE (full-weight fingerprints) and the
    extraction settings (dtype, device and batching move activations near 0 across the firing threshold)."""
    return {"model": fx.backbone.fingerprint(), "sae": fx.sae.fingerprint(), "layer": fx.layer, "k": fx.sae.cfg.k,
            **fx.run_settings()}


def manifest(input_path: str, ident: dict, text_column: str, chunk_rows: int) -> dict:
    """The parts directory's manifest; a remote input (``s3://``, Ray only) is known by its address alone."""
    p = Path(input_path)
    local = "://" not in input_path and p.exists()
    return {"job": "features", "version": MANIFEST_VERSION, "input": str(p.resolve()) if local else input_path,
            "input_sha256": streaming.content_hash(p) if local else None, "text_column": text_column,
            "chunk_rows": chunk_rows, **ident}


def check_texts(inp: Path, text_column: str) -> int:
    """Before any model loads or part is written: the text column is there, holds text, and no row is null or
    empty (named by their file row numbers, as extract names them). Returns the row count. Reads the text
    column only, in blocks, so a bad row late in a large file costs no extraction and leaves no parts."""
    if count_rows(inp) == 0:
        raise SafetyScopeError(f"{inp}: the table has no rows")
    bad: list[int] = []
    n_bad = n = 0
    for chunk in iter_chunks(inp, SCAN_ROWS, columns=[text_column]):
        for j, t in enumerate(text_list(chunk, text_column, inp)):
            if not isinstance(t, str) or not t.strip():
                n_bad += 1
                if len(bad) < 10:
                    bad.append(n + j)
        n += chunk.height
    if n_bad:
        raise SafetyScopeError(f"{n_bad} text(s) are null or empty (rows {bad}{' ...' if n_bad > 10 else ''}); "
                               "drop them first")
    return n


def features_chunk(fx: FeatureExtractor, df: pl.DataFrame, text_column: str) -> tuple[pl.DataFrame, Extraction]:
    """One chunk's output rows (its ``id`` column first when it has one, feature_ids, feature_acts)."""
    ex = fx.extract(cast(list[str], text_list(df, text_column)))  # nulls and empty texts were refused before any chunk
    return codes_frame(ex.codes, df.get_column("id") if "id" in df.columns else None), ex


def features_file(cfg: FeatureConfig, input_path: str, output: str, *, text_column: str = "text",
                  chunk_rows: int = streaming.CHUNK_ROWS, keep_shards: bool = False, progress: bool = True,
                  extractor: FeatureExtractor | None = None, overwrite: bool = False) -> dict:
    """Pooled SAE codes of every row of INPUT into OUTPUT, streamed and resumable. ``extractor``: one already
    built from ``cfg``. Returns rows, this run's tokens / truncated / cached counts, mean features per text,
    resumed_chunks and seconds."""
    inp, out = Path(input_path), Path(output)
    streaming.check_input(inp, chunk_rows)
    fmt = output_format(out, keep_shards)
    streaming.check_outputs(out, [inp], overwrite=overwrite)
    total = check_texts(inp, text_column)
    fx = extractor or FeatureExtractor.from_config(cfg)
    with streaming.open_parts(out, lambda: manifest(input_path, identity(fx), text_column, chunk_rows)) as parts:
        done = streaming.check_parts(parts, total, chunk_rows)
        counts = {"truncated": 0, "cached": 0}

        def results():
            for i, chunk in enumerate(iter_chunks(inp, chunk_rows, start=done * chunk_rows), start=done):
                frame, ex = features_chunk(fx, chunk, text_column)
                counts["truncated"] += ex.n_truncated
                counts["cached"] += ex.n_cached
                yield i, frame, int(ex.n_tokens.sum())

        ran = streaming.write_chunks(parts, results(), total=total, done_rows=done * chunk_rows, desc="features",
                                     progress=progress)
        files = streaming.finished_parts(parts, total, chunk_rows)
        stats = {"rows": total, "resumed_chunks": done, "tokens": ran["tokens"], "seconds": ran["seconds"],
                 **counts, "mean_features": mean_features(files)}
        streaming.finish(parts, files, out, fmt, keep_shards=keep_shards)
    return stats


def mean_features(files: list[Path]) -> float:
    n = nnz = 0
    for f in files:
        a, b = pl.scan_parquet(f).select(pl.len(), pl.col("feature_ids").list.len().sum()).collect().row(0)
        n, nnz = n + a, nnz + (b or 0)
    return nnz / max(1, n)


def features_layers_file(cfg: FeatureConfig, layers: list[int], input_path: str, output: str, *,
                         text_column: str = "text", overwrite: bool = False) -> dict:
    """`features --layers`: the codes of every layer in ``layers`` from one forward pass, one SAE per layer
    (``cfg.sae`` a per-layer directory/repo, or one SAE per layer comma-separated), written as one table with
    feature_ids_l<n> / feature_acts_l<n> columns. Held in memory, not streamed."""
    from .data import read_table, write_table
    from .features import extract_shared, layer_extractors, layers_frame
    from .outputs import check_output

    if cfg.layer is not None:
        raise SafetyScopeError("--layers and --layer exclude each other: list every layer in --layers")
    check_output(output, inputs=[input_path], overwrite=overwrite)  # before any work, as the streamed path checks
    saes: list[str | None] | None = list(cfg.sae.split(",")) if cfg.sae and "," in cfg.sae else None
    df = read_table(input_path, columns=[text_column])
    texts = text_list(df, text_column, input_path)
    exs = extract_shared(layer_extractors(cfg, layers, saes), cast(list[str], texts), progress=True)
    out = layers_frame(exs, layers, df.get_column("id") if "id" in df.columns else None)
    write_table(out, output)
    return {"rows": out.height, "tokens": int(exs[0].n_tokens.sum()), "truncated": exs[0].n_truncated,
            "mean_features": [e.codes.nnz / max(1, e.codes.shape[0]) for e in exs]}
