"""`features` and `classify` on a Ray cluster through Ray Data (``--engine ray``; ``pip install 'safetyscope[ray]'``).

The input is read as a Ray dataset, given a row index 0..n-1 in file order (per-block offsets), cut into
blocks of exactly ``batch_rows`` rows (whole ``--chunk-rows`` chunks) and mapped by a pool of actors, each of
which loads the model, SAE and classifier once and runs the local engine's own code on each chunk
(``features_chunk``, ``classify_chunk``): the model sees the same batches as in the local engine and the values
are the same. Results stream back to the driver in row order (``preserve_order``) and the driver checks the
index is exactly 0..n-1 (a restarted actor can neither lose nor duplicate rows unnoticed). ``features`` writes
each chunk as a durable part as it arrives, as the local engine does (one chunk in the driver's memory; a
killed run resumes, see ``streaming``); ``classify`` writes shards and assembles OUTPUT with the local writer.

Long because: the driver, the actor classes and the two jobs' chunk functions must agree on row order and part
names; kept in one file until the one chunk-job runner (local and Ray executors) replaces both engines' loops.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .data import TABLE_SUFFIXES
from .errors import SafetyScopeError
from .features import FeatureConfig
from .streaming import CHUNK_ROWS, check_chunk_rows

ROW = "__safetyscope_row"
LEN = "__safetyscope_tokens"  # features: tokens per text the actor used (progress in tokens/s)
# Ray Data's reader per table format of data.TABLE_SUFFIXES (the one list of suffixes)
READERS = {suffix: {"parquet": "read_parquet", "csv": "read_csv", "jsonl": "read_json"}[fmt]
           for suffix, fmt in TABLE_SUFFIXES.items()}
MAX_RESTARTS = 4  # per actor: a dead actor is restarted and its batch retried, this many times
CRASH_ONCE_ENV = "SAFETYSCOPE_RAY_CRASH_ONCE"  # tests: path of a marker file; the first batch to create it kills its actor


@dataclass
class RayConfig:
    """Where and how wide `--engine ray` runs (the defaults of the command's Ray options)."""

    address: str | None = None  # None: start or join a local Ray
    workers: int = 1  # actors, each holding one model copy
    cpus_per_worker: float = 1.0  # also the actor's torch threads
    gpus_per_worker: float = 0.0
    batch_rows: int | None = None  # rows per Ray batch, whole chunks; None: one chunk


# -- driver ----------------------------------------------------------------------------------------
def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SafetyScopeError("--engine ray needs Ray: pip install 'safetyscope[ray]'") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join the given/running Ray or start a local one; True when we started it (and must shut it down)."""
    _check_reachable(address)
    if ray.is_initialized():
        return False
    import logging

    kw = {"include_dashboard": False} if address in (None, "local") else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **kw)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError ... depending on the address form
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SafetyScopeError(f"cannot reach Ray at {address or 'a local instance'}: {msg}") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True


def _check_reachable(address: str | None) -> None:
    """Fail fast on host:port / ray://host:port that nothing listens on (ray.init would retry for minutes)."""
    if not address or address in ("auto", "local"):
        return
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise SafetyScopeError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def _env() -> dict:
    """Settings the actors must share with the driver (cache location, offline hub ...)."""
    keys = [k for k in os.environ if k.startswith(("SAFETYSCOPE_", "HF_"))] + ["TRANSFORMERS_OFFLINE"]
    env = {k: os.environ[k] for k in keys if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _read(ray, path: str, text_column: str):
    suffix = Path(path).suffix.lower()
    if suffix not in READERS and "://" not in path and Path(path).is_dir() and any(Path(path).glob("*.parquet")):
        suffix = ".parquet"  # a directory of parquet files
    elif not suffix and "://" in path:
        suffix = ".parquet"  # a remote prefix (s3://bucket/data/): read as parquet files
    if suffix not in READERS:
        raise SafetyScopeError(f"{path}: --engine ray reads .parquet, .csv and .jsonl files (or a directory of parquet files)")
    if "://" not in path and not Path(path).exists():
        raise SafetyScopeError(f"{path}: no such file or directory")
    try:
        ds = getattr(ray.data, READERS[suffix])(path)
        names = ds.schema().names
    except Exception as e:
        raise SafetyScopeError(f"{path}: Ray cannot read it: {str(e).strip().splitlines()[0]}") from None
    if text_column not in names:
        raise SafetyScopeError(f"{path}: missing column(s) {[text_column]}; columns present: {names}")
    if ROW in names or LEN in names:
        raise SafetyScopeError(f"{path}: columns {ROW!r} and {LEN!r} are reserved by --engine ray")
    return ds


def _read_all(ray, ds) -> tuple[list, list[int]]:
    """Every input block into the object store, with its row count. Read before the actors start: they hold a
    CPU each, and read tasks queued behind them on a small cluster would wait forever. The texts sit in the
    object store (spilled to disk if large), not in the driver's memory."""
    try:
        return _refs_and_counts(ray, ds)
    except Exception as e:
        raise SafetyScopeError(f"Ray cannot read the input: {str(e).strip().splitlines()[0]}") from None


def _mapped(ray, refs: list, counts: list[int], actor, ctor_kwargs: dict, *, batch_rows: int, workers: int,
            cpus: float, gpus: float, start: int = 0):
    """Rows ``start``.. cut into blocks of exactly ``batch_rows`` rows holding ROW, mapped by the actor pool;
    yields the result tables in row order (an actor error as a one-line SafetyScopeError)."""
    if batch_rows < 1:
        raise SafetyScopeError("--ray-batch-size must be >= 1")
    if start >= sum(counts):
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks come back in file order
    ds = ray.data.from_arrow_refs(_rechunk(ray, refs, counts, batch_rows, index=True, start=start))
    with warnings.catch_warnings():  # Ray 2.60 flags max_restarts/max_task_retries as "ray_remote_args"
        warnings.simplefilter("ignore")
        # each actor call (batch_size = batch_rows) gets exactly one of these blocks
        ds = ds.map_batches(actor, fn_constructor_kwargs=ctor_kwargs,
                            batch_size=batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus, num_gpus=gpus or None, max_restarts=MAX_RESTARTS,
                            max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": _env()})
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except Exception as e:
        raise _user_error(e) or e


def _run(ray, ds, actor, ctor_kwargs: dict, *, batch_rows: int, workers: int, cpus: float, gpus: float,
         shards: Path) -> tuple[list[Path], int]:
    """Map the input with the actor pool and stream the results to parquet shards under ``shards``.

    Returns the shard files (still holding ROW) in row order and the input row count, after checking that
    their ROW column is exactly 0..n-1: no row lost, none duplicated (whatever actors died on the way)."""
    if batch_rows < 1:
        raise SafetyScopeError("--ray-batch-size must be >= 1")
    refs, counts = _read_all(ray, ds)
    n = sum(counts)
    if n == 0:
        raise SafetyScopeError("the input has no rows")
    import numpy as np
    import pyarrow.parquet as pq

    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    files, expected, in_order = [], 0, True
    for i, table in enumerate(_mapped(ray, refs, counts, actor, ctor_kwargs, batch_rows=batch_rows, workers=workers,
                                      cpus=cpus, gpus=gpus)):
        if not table.num_rows:
            continue
        rows = table.column(ROW).to_numpy()
        if in_order and np.array_equal(rows, np.arange(expected, expected + len(rows))):
            expected += len(rows)  # the usual case: shards arrive in row order (preserve_order)
        else:
            in_order = False
        files.append(shards / f"shard-{i:06d}.parquet")
        pq.write_table(table, files[-1])
    if in_order and expected == n:
        return files, n
    # out of row order (not seen with preserve_order): sort in memory, check the index is exactly 0..n-1
    df = pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed").sort(ROW) if files else None
    got = 0 if df is None else df.height
    if got != n or not df.get_column(ROW).equals(pl.Series(ROW, range(n), dtype=df.schema[ROW])):
        raise SafetyScopeError(f"Ray returned {got} rows for {n} input rows (or a broken row index); nothing written")
    for f in files:
        f.unlink()
    files = [shards / "sorted.parquet"]
    df.write_parquet(files[0])
    return files, n


def _aligned_chunks(tables, chunk_rows: int, done: int, total: int):
    """(chunk index, rows without ROW/LEN, tokens) per ``chunk_rows`` chunk from chunk ``done`` on, in order,
    whatever block sizes Ray hands back; the row index must be exactly the plan's (nothing lost, duplicated or
    out of order), else the run stops before writing a wrong part."""
    import numpy as np

    expected, i, pending = done * chunk_rows, done, []
    for table in tables:
        if not table.num_rows:
            continue
        df = pl.from_arrow(table)
        rows = df.get_column(ROW).to_numpy()
        if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
            raise SafetyScopeError(f"Ray returned rows out of order near row {expected} (a broken row index); "
                                   "rerun the same command to resume from the finished parts")
        expected += len(rows)
        pending.append(df)
        have = sum(d.height for d in pending)
        while pending and (have >= chunk_rows or expected == total):
            buf = pl.concat(pending, how="vertical_relaxed") if len(pending) > 1 else pending[0]
            part, rest = buf.head(chunk_rows), buf.slice(chunk_rows)
            pending = [rest] if rest.height else []
            have = rest.height
            yield i, part.drop(ROW, LEN), int(part.get_column(LEN).sum())
            i += 1
    if expected != total:
        raise SafetyScopeError(f"Ray returned {expected} rows for {total} input rows; rerun the same command to resume "
                               "from the finished parts")


def _parts(files: list[Path], stats=None):
    """Rewrite the ordered shards without ROW, one in memory at a time; ``stats(df)`` sees each."""
    # blocks read from several csv/jsonl files may infer different types (null vs string ...): one schema for all
    schema = pl.concat([pl.read_parquet(f, n_rows=0) for f in files], how="vertical_relaxed").schema
    out = []
    for f in files:
        df = pl.read_parquet(f).drop(ROW)
        df = df.cast({c: t for c, t in schema.items() if c in df.columns and df.schema[c] != t})
        if stats:
            stats(df)
        part = f.with_name(f.stem + ".part.parquet")
        df.write_parquet(part)
        f.unlink()
        out.append(part)
    return out


def _num_rows(table) -> int:
    return table.num_rows


def _refs_and_counts(ray, ds) -> tuple[list, list[int]]:
    refs = ds.to_arrow_refs()
    num_rows = ray.remote(_num_rows)
    return refs, ray.get([num_rows.remote(r) for r in refs])


def _rechunk(ray, refs: list, counts: list[int], rows: int, *, index: bool, start: int = 0) -> list:
    """The same rows from row ``start`` on, in the same order, as blocks of exactly ``rows`` rows (the last one fewer).

    Done here rather than with Dataset.repartition, which guarantees exact block sizes only in recent Ray
    (``strict=True``): an actor call must see whole aligned chunks for the values to be the local engine's."""
    offsets = [0, *itertools.accumulate(counts)]
    cut = ray.remote(_cut)
    out, j = [], 0
    for lo in range(start, offsets[-1], rows):
        hi = min(lo + rows, offsets[-1])
        while offsets[j + 1] <= lo:
            j += 1
        spec, parts, k = [], [], j
        while k < len(counts) and offsets[k] < hi:
            if counts[k]:
                spec.append((max(lo, offsets[k]) - offsets[k], min(hi, offsets[k + 1]) - offsets[k]))
                parts.append(refs[k])
            k += 1
        out.append(cut.remote(spec, lo if index else None, *parts))
    return out


def _cut(spec, first_row, *tables):
    """Concatenate ``tables[i][a:b]`` for (a, b) in spec; with ``first_row``, add ROW = first_row, first_row+1 ..."""
    import pyarrow as pa

    t = pa.concat_tables([tb.slice(a, b - a) for tb, (a, b) in zip(tables, spec)], promote_options="permissive")
    if first_row is not None:
        t = t.append_column(ROW, pa.array(range(first_row, first_row + t.num_rows), pa.int64()))
    return t.combine_chunks()


def _user_error(e: BaseException) -> SafetyScopeError | None:
    """A SafetyScopeError raised inside an actor, however Ray wrapped it, as a one-line error here."""
    seen, first = set(), e
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SafetyScopeError) and not str(e).lstrip().startswith(("ray::", "Traceback")):
            return SafetyScopeError(str(e).strip().splitlines()[-1])
        e = getattr(e, "cause", None) or e.__cause__
    tag = "SafetyScopeError: "
    lines = [ln for ln in str(first).splitlines() if tag in ln]
    return SafetyScopeError(lines[-1].split(tag, 1)[1].strip()) if lines else None


def _check_resources(ray, started: bool, workers: int, cpus: float, gpus: float) -> None:
    """An actor pool larger than the cluster would wait forever: an error on a Ray we started (its size is
    fixed), a warning on a joined cluster (an autoscaler may still add nodes)."""
    if workers < 1 or cpus <= 0 or gpus < 0:
        raise SafetyScopeError("--workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")
    have = ray.cluster_resources()
    short = [f"{workers} x {per:g} {kind} (the cluster has {have.get(kind, 0):g})"
             for kind, per in (("CPU", cpus), ("GPU", gpus)) if per and workers * per > have.get(kind, 0) + 1e-9]
    if short:
        msg = f"the actor pool needs {' and '.join(short)}"
        if started:
            raise SafetyScopeError(f"{msg}; lower --workers or the per-worker resources")
        print(f"warning: {msg}; it waits until an autoscaler adds nodes", file=sys.stderr)


def _with_ray(fn, address, *, workers: int, cpus: float, gpus: float):
    ray = _ray()
    started = _connect(ray, address)
    try:
        _check_resources(ray, started, workers, cpus, gpus)
        return fn(ray)
    finally:
        if started:
            ray.shutdown()


def run_features_ray(input_path: str, output: str, cfg, *, text_column: str = "text", chunk_rows: int = CHUNK_ROWS,
                     keep_shards: bool = False, address: str | None = RayConfig.address, workers: int = RayConfig.workers,
                     cpus_per_worker: float = RayConfig.cpus_per_worker, gpus_per_worker: float = RayConfig.gpus_per_worker,
                     batch_rows: int | None = RayConfig.batch_rows,
                     progress: bool = True, overwrite: bool = False) -> dict:
    """`features` on Ray: the local engine's OUTPUT (id?, feature_ids, feature_acts), parts and resume.

    Each Ray batch holds whole ``chunk_rows`` chunks and the actors extract chunk by chunk as the local engine
    does, so the model batches and the values are the same; the driver writes each chunk's part as it
    arrives. The manifest is the local engine's (model and SAE fingerprints come from a task on the cluster,
    where the weights are), so a run interrupted on one engine resumes on the other."""
    from . import streaming
    from .features_file import manifest, mean_features, output_format

    out = Path(output)
    fmt = output_format(out, keep_shards)
    streaming.check_outputs(out, [] if "://" in input_path else [input_path], overwrite=overwrite)
    # cfg.batch_size: checked by FeatureConfig.__post_init__
    check_chunk_rows(chunk_rows)
    rows = -(-(batch_rows or chunk_rows) // chunk_rows) * chunk_rows  # whole chunks per Ray batch

    def go(ray):
        ds = _read(ray, input_path, text_column)
        ident = _identity_on_cluster(ray, cfg, cpus_per_worker, gpus_per_worker)
        with streaming.open_parts(out, lambda: manifest(input_path, ident, text_column, chunk_rows)) as parts:
            refs, counts = _read_all(ray, ds)
            total = sum(counts)
            if total == 0:
                raise SafetyScopeError("the input has no rows")
            done = streaming.check_parts(parts, total, chunk_rows)
            tables = _mapped(ray, refs, counts, _FeatureActor, {"cfg": cfg, "text_column": text_column,
                                                                "chunk_rows": chunk_rows},
                             batch_rows=rows, workers=workers, cpus=cpus_per_worker, gpus=gpus_per_worker,
                             start=done * chunk_rows)
            ran = streaming.write_chunks(parts, _aligned_chunks(tables, chunk_rows, done, total), total=total,
                                         done_rows=done * chunk_rows, desc="features", progress=progress)
            files = streaming.finished_parts(parts, total, chunk_rows)
            stats = {"rows": total, "resumed_chunks": done, "tokens": ran["tokens"], "seconds": ran["seconds"],
                     "mean_features": mean_features(files)}
            streaming.finish(parts, files, out, fmt, keep_shards=keep_shards)
        return stats

    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    return _with_ray(go, address, workers=workers, cpus=cpus_per_worker, gpus=gpus_per_worker)


def _identity(cfg) -> dict:
    import dataclasses

    from .features import FeatureExtractor
    from .features_file import identity

    _prepare_model(cfg.model)
    return identity(FeatureExtractor.from_config(dataclasses.replace(cfg, cache=False)))


def _identity_on_cluster(ray, cfg, cpus: float, gpus: float) -> dict:
    """features_file.identity as an actor computes it (same device and dtype), in one task before the pool starts."""
    task = ray.remote(_identity).options(num_cpus=cpus, num_gpus=gpus or None, max_retries=MAX_RESTARTS,
                                         runtime_env={"env_vars": _env()})
    try:
        return ray.get(task.remote(cfg))
    except Exception as e:
        raise _user_error(e) or e


def run_classify_ray(input_path: str, output: str, *, classifier: str | None = None, model: str | None = None,
                     sae: str | None = None, device: str | None = None, dtype: str | None = FeatureConfig.dtype,
                     batch_size: int = FeatureConfig.batch_size, batch_tokens: int | None = FeatureConfig.batch_tokens,
                     cache: bool = FeatureConfig.cache, text_column: str = "text", chunk_rows: int = CHUNK_ROWS,
                     overwrite: bool = False, address: str | None = RayConfig.address, workers: int = RayConfig.workers,
                     cpus_per_worker: float = RayConfig.cpus_per_worker, gpus_per_worker: float = RayConfig.gpus_per_worker,
                     batch_rows: int | None = RayConfig.batch_rows, lang_column: str | None = None) -> dict:
    """`classify` on Ray: the same OUTPUT and stats as `classify_file` (no resume: Ray retries instead);
    ``lang_column`` as in classify_chunk, so both engines give each row the same status."""
    from .data import table_format
    from .discovery.detector import UNVALIDATED, read_classifier
    from .outputs import check_output, output_lock
    from .streaming import assemble as _assemble

    out = Path(output)
    fmt = table_format(out, for_writing=True)
    check_output(out, inputs=[] if "://" in input_path else [input_path], overwrite=overwrite)
    clf = read_classifier(classifier)  # validated here; its text travels to the actors (no shared disk needed)
    import json

    check_chunk_rows(chunk_rows)
    rows = batch_rows or chunk_rows
    rows = -(-rows // chunk_rows) * chunk_rows  # whole --chunk-rows chunks per Ray batch
    ctor = {"classifier_json": json.dumps(clf) if classifier else None, "classifier_name": classifier,
            "text_column": text_column, "chunk_rows": chunk_rows, "lang_column": lang_column,
            "load": {"model": model, "sae": sae, "device": device, "dtype": dtype, "batch_size": batch_size, "batch_tokens": batch_tokens,
                     "cache": cache}}

    def go(ray):
        t0 = time.perf_counter()
        ds = _read(ray, input_path, text_column)
        if lang_column and lang_column not in ds.schema().names:
            raise SafetyScopeError(f"--lang-column {lang_column!r} is not a column of the input (columns: "
                                   f"{ds.schema().names})")
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ray-shards-", dir=out.resolve().parent) as tmp:
            files, n = _run(ray, ds, _ClassifyActor, ctor, batch_rows=rows, workers=workers,
                            cpus=cpus_per_worker, gpus=gpus_per_worker, shards=Path(tmp) / "shards")
            counts = [0, 0, 0]

            def count(df):
                status = df.get_column("status")
                counts[0] += int(df.get_column("toxic").sum() or 0)
                counts[1] += int((~status.is_in(["ok", UNVALIDATED])).sum())
                counts[2] += int((status == UNVALIDATED).sum())

            # streamed, one shard in memory at a time, through the local engine's own writer (same bytes per format)
            _assemble(_parts(files, count), out, fmt)
            toxic, skipped, unvalidated = counts
        return {"rows": n, "resumed_chunks": 0, "toxic": int(toxic), "skipped": int(skipped), "unvalidated": int(unvalidated),
                "seconds": time.perf_counter() - t0}

    with output_lock(out):  # a second run on the same output fails fast instead of racing on the temp file
        return _with_ray(go, address, workers=workers, cpus=cpus_per_worker, gpus=gpus_per_worker)


# -- actors (one model copy each) ------------------------------------------------------------------
def _chunks(table, chunk_rows: int):
    """The batch as polars frames, one per aligned chunk (row index // chunk_rows), in row order."""
    df = pl.from_arrow(table).sort(ROW)
    if df.height == 0:
        return []
    return df.with_columns((pl.col(ROW) // chunk_rows).alias("__chunk")).partition_by("__chunk", maintain_order=True,
                                                                                     include_key=False)


def _prepare_model(model) -> str:
    """resolve_model under a per-node file lock: actors and tasks on one node start together, and the first
    use of a GGUF model (the embedded default) converts it into the shared cache, which two processes must not
    do at once. Later calls find the converted copy at once; the loads themselves then run in parallel."""
    import fcntl

    from .backbone import cache_dir, resolve_model

    with open(cache_dir() / ".ray-model.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when fh closes
        return resolve_model(model)[1]


def _maybe_crash() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)  # an abrupt death (like an OOM kill): Ray restarts the actor and retries the batch


class _FeatureActor:
    # The model loads on the first batch, once per actor: an error there (a SafetyScopeError) is then a
    # task error that reaches the driver as one line, where a failed constructor would be retried.
    def __init__(self, cfg, text_column: str, chunk_rows: int):
        self.cfg, self.fx, self.text_column, self.chunk_rows = cfg, None, text_column, chunk_rows

    def __call__(self, table):
        from .features import FeatureExtractor
        from .features_file import features_chunk

        _maybe_crash()
        if self.fx is None:
            _prepare_model(self.cfg.model)
            self.fx = FeatureExtractor.from_config(self.cfg)
        chunks = _chunks(table, self.chunk_rows)  # the local engine's chunks: the same model batches
        if not chunks:
            return table.select([ROW])
        texts = pl.from_arrow(table.select([self.text_column])).to_series()
        if texts.dtype != pl.String and texts.dtype != pl.Null:
            raise SafetyScopeError(f"column {self.text_column!r} holds {texts.dtype}, not text")
        rows = table.column(ROW).to_pylist()
        bad = sorted(r for r, t in zip(rows, texts.to_list()) if not isinstance(t, str) or not t.strip())
        if bad:
            raise SafetyScopeError(f"{len(bad)}+ text(s) are null or empty (rows {bad[:10]}); drop them first")
        outs = []
        for df in chunks:
            frame, ex = features_chunk(self.fx, df.with_columns(pl.col(self.text_column).cast(pl.String)), self.text_column)
            outs.append(frame.insert_column(0, df.get_column(ROW)).with_columns(pl.Series(LEN, ex.n_tokens, pl.Int64)))
        return pl.concat(outs).to_arrow()


class _ClassifyActor:
    def __init__(self, classifier_json: str | None, classifier_name: str | None, text_column: str, chunk_rows: int,
                 load: dict, lang_column: str | None = None):
        self.clf, self.name, self.load, self.det = classifier_json, classifier_name, load, None
        self.text_column, self.chunk_rows, self.lang_column = text_column, chunk_rows, lang_column

    def _load(self):
        import json

        from .discovery.detector import Detector, read_classifier

        clf = json.loads(self.clf) if self.clf is not None else read_classifier(None)
        _prepare_model(self.load["model"] if self.load["model"] is not None else clf["model"]["id"])
        path = None
        if self.clf is not None:
            fd, path = tempfile.mkstemp(suffix=".json", prefix="safetyscope-classifier-")
            with os.fdopen(fd, "w") as f:
                f.write(self.clf)
        try:
            return Detector.load(path, **self.load)
        except SafetyScopeError as e:
            raise SafetyScopeError(str(e).replace(str(path), str(self.name))) from None
        finally:
            if path:
                os.unlink(path)

    def __call__(self, table):
        from .discovery.classify import classify_chunk

        _maybe_crash()
        if self.det is None:
            self.det = self._load()
        outs = [classify_chunk(self.det, df, self.text_column, self.lang_column) for df in _chunks(table, self.chunk_rows)]
        return pl.concat(outs).to_arrow() if outs else table
