"""`features` and `classify` on a Ray cluster through Ray Data (``--engine ray``; ``pip install 'safetyscope[ray]'``).

The input is read as a Ray dataset, given a row index 0..n-1 in file order (per-block offsets), cut into
blocks of exactly ``batch_rows`` rows and mapped by a pool of actors, each of which loads the model,
SAE and classifier once and runs the local engine's own code (``FeatureExtractor.extract``,
``classify_chunk``) on whole aligned chunks: a ``classify`` block holds whole ``--chunk-rows`` chunks of the
local engine; for ``features`` the rows are first sorted by token count as the local engine batches them,
and a block holds whole ``--batch-size`` model batches. So the model sees the same batches and the values
are bitwise the same. Results stream back to the driver
as parquet shards in row order (``preserve_order``); the driver checks the index is exactly 0..n-1 (a
restarted actor can neither lose nor duplicate rows unnoticed; shards out of order would be sorted), drops
it and writes OUTPUT with the local engine's writer, one shard in memory at a time for ``classify``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import polars as pl

from .data import TABLE_SUFFIXES
from .errors import SafetyScopeError

ROW = "__safetyscope_row"
LEN = "__safetyscope_tokens"  # features: tokens per text (after truncation), the local engine's batching key
# Ray Data's reader per table format of data.TABLE_SUFFIXES (the one list of suffixes)
READERS = {suffix: {"parquet": "read_parquet", "csv": "read_csv", "jsonl": "read_json"}[fmt]
           for suffix, fmt in TABLE_SUFFIXES.items()}
MAX_RESTARTS = 4  # per actor: a dead actor is restarted and its batch retried, this many times
CRASH_ONCE_ENV = "SAFETYSCOPE_RAY_CRASH_ONCE"  # tests: path of a marker file; the first batch to create it kills its actor


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


def _run(ray, ds, actor, ctor_kwargs: dict, *, batch_rows: int, workers: int, cpus: float, gpus: float,
         shards: Path, prepare=None) -> tuple[list[Path], int]:
    """Index and cut into ``batch_rows`` blocks, ``prepare`` (features: sort by length), map with the actor pool,
    stream the results to parquet shards under ``shards``.

    Returns the shard files (still holding ROW) in row order and the input row count, after checking that
    their ROW column is exactly 0..n-1: no row lost, none duplicated (whatever actors died on the way)."""
    if batch_rows < 1:
        raise SafetyScopeError("--ray-batch-size must be >= 1")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks come back in file order
    try:  # read everything before the actors start: they hold a CPU each, and read tasks queued behind
        # them on a small cluster would wait forever. The texts sit in the object store (spilled if large).
        refs, counts = _refs_and_counts(ray, ds)
    except Exception as e:
        raise SafetyScopeError(f"Ray cannot read the input: {str(e).strip().splitlines()[0]}") from None
    n = sum(counts)
    if n == 0:
        raise SafetyScopeError("the input has no rows")
    # blocks of exactly batch_rows rows (the last one fewer), holding ROW = the row number in file order
    refs = _rechunk(ray, refs, counts, batch_rows, index=True)
    if prepare is not None:  # then re-cut into batch_rows blocks in the new order
        try:
            refs, counts = _refs_and_counts(ray, prepare(ray.data.from_arrow_refs(refs)))
        except Exception as e:
            raise _user_error(e) or e
        refs = _rechunk(ray, refs, counts, batch_rows, index=False)
    # each actor call (batch_size = batch_rows) then gets exactly one of these blocks
    ds = ray.data.from_arrow_refs(refs)
    with warnings.catch_warnings():  # Ray 2.60 flags max_restarts/max_task_retries as "ray_remote_args"
        warnings.simplefilter("ignore")
        ds = ds.map_batches(actor, fn_constructor_kwargs=ctor_kwargs,
                            batch_size=batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus, num_gpus=gpus or None, max_restarts=MAX_RESTARTS,
                            max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": _env()})
    import numpy as np
    import pyarrow.parquet as pq

    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    files, expected, in_order = [], 0, True
    try:
        for i, table in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            if not table.num_rows:
                continue
            rows = table.column(ROW).to_numpy()
            if in_order and np.array_equal(rows, np.arange(expected, expected + len(rows))):
                expected += len(rows)  # the usual case: shards arrive in row order (preserve_order)
            else:
                in_order = False
            files.append(shards / f"shard-{i:06d}.parquet")
            pq.write_table(table, files[-1])
    except Exception as e:
        raise _user_error(e) or e
    if in_order and expected == n:
        return files, n
    # out of row order (features: processed in length order): sort in memory, check the index is exactly 0..n-1
    df = pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed").sort(ROW) if files else None
    got = 0 if df is None else df.height
    if got != n or not df.get_column(ROW).equals(pl.Series(ROW, range(n), dtype=df.schema[ROW])):
        raise SafetyScopeError(f"Ray returned {got} rows for {n} input rows (or a broken row index); nothing written")
    for f in files:
        f.unlink()
    files = [shards / "sorted.parquet"]
    df.write_parquet(files[0])
    return files, n


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


def _rechunk(ray, refs: list, counts: list[int], rows: int, *, index: bool) -> list:
    """The same rows, in the same order, as blocks of exactly ``rows`` rows (the last one fewer).

    Done here rather than with Dataset.repartition, which guarantees exact block sizes only in recent Ray
    (``strict=True``): an actor call must see whole aligned chunks for the values to be the local engine's."""
    offsets = [0, *itertools.accumulate(counts)]
    cut = ray.remote(_cut)
    out, j = [], 0
    for lo in range(0, offsets[-1], rows):
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


def run_features_ray(input_path: str, output: str, cfg, *, text_column: str = "text", address: str | None = None,
                     workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                     batch_rows: int | None = None) -> dict:
    """`features` on Ray: writes OUTPUT (id?, feature_ids, feature_acts) as the local engine does.

    The local engine runs the model on batches of ``cfg.batch_size`` texts taken in one global order (longest
    first, ties in row order); padding and batch shapes change the values (bf16: even which features fire).
    So the rows are sorted by that key first and cut into Ray batches of a multiple of ``cfg.batch_size``:
    every model batch then holds the same texts as the local engine's, and the values are bitwise the same."""
    from .data import table_format, write_table
    from .outputs import check_output

    table_format(output, for_writing=True)
    # features has no --overwrite: it replaces a file, or a directory it wrote, as the local engine does
    check_output(output, inputs=[] if "://" in input_path else [input_path], overwrite=True)
    if cfg.batch_size < 1:
        raise SafetyScopeError("--batch-size must be >= 1")
    rows = batch_rows or 1024
    rows = -(-rows // cfg.batch_size) * cfg.batch_size  # whole model batches per Ray batch

    def by_length(ds):
        return ds.map_batches(_token_lengths, fn_kwargs={"model": cfg.model, "max_length": cfg.max_length,
                                                         "text_column": text_column},
                              batch_format="pyarrow", runtime_env={"env_vars": _env()}).sort([LEN, ROW], descending=[True, False])

    def go(ray):
        ds = _read(ray, input_path, text_column)
        with tempfile.TemporaryDirectory(prefix=".ray-shards-", dir=Path(output).resolve().parent) as tmp:
            files, n = _run(ray, ds, _FeatureActor, {"cfg": cfg, "text_column": text_column}, batch_rows=rows,
                            workers=workers, cpus=cpus_per_worker, gpus=gpus_per_worker, shards=Path(tmp) / "shards",
                            prepare=by_length)
            df = pl.concat([pl.read_parquet(f).drop(ROW) for f in files], how="vertical_relaxed")  # as local: all in memory
        write_table(df, output)
        return {"rows": n, "mean_features": df.get_column("feature_ids").list.len().mean()}

    Path(output).resolve().parent.mkdir(parents=True, exist_ok=True)
    return _with_ray(go, address, workers=workers, cpus=cpus_per_worker, gpus=gpus_per_worker)


def run_classify_ray(input_path: str, output: str, *, classifier: str | None = None, model: str | None = None,
                     sae: str | None = None, device: str | None = None, dtype: str | None = "auto", batch_size: int = 32,
                     batch_tokens: int | None = 512, cache: bool = True, text_column: str = "text", chunk_rows: int = 1024,
                     overwrite: bool = False,
                     address: str | None = None, workers: int = 1, cpus_per_worker: float = 1.0,
                     gpus_per_worker: float = 0.0, batch_rows: int | None = None) -> dict:
    """`classify` on Ray: the same OUTPUT and stats as `classify_file` (no resume: Ray retries instead)."""
    from .data import table_format
    from .discovery.classify import _assemble
    from .discovery.detector import read_classifier
    from .outputs import check_output, output_lock

    out = Path(output)
    fmt = table_format(out, for_writing=True)
    check_output(out, inputs=[] if "://" in input_path else [input_path], overwrite=overwrite)
    clf = read_classifier(classifier)  # validated here; its text travels to the actors (no shared disk needed)
    import json

    if chunk_rows < 1:
        raise SafetyScopeError("--chunk-rows must be >= 1")
    rows = batch_rows or chunk_rows
    rows = -(-rows // chunk_rows) * chunk_rows  # whole --chunk-rows chunks per Ray batch
    ctor = {"classifier_json": json.dumps(clf) if classifier else None, "classifier_name": classifier,
            "text_column": text_column, "chunk_rows": chunk_rows,
            "load": {"model": model, "sae": sae, "device": device, "dtype": dtype, "batch_size": batch_size, "batch_tokens": batch_tokens,
                     "cache": cache}}

    def go(ray):
        t0 = time.perf_counter()
        ds = _read(ray, input_path, text_column)
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ray-shards-", dir=out.resolve().parent) as tmp:
            files, n = _run(ray, ds, _ClassifyActor, ctor, batch_rows=rows, workers=workers,
                            cpus=cpus_per_worker, gpus=gpus_per_worker, shards=Path(tmp) / "shards")
            counts = [0, 0, 0]

            def count(df):
                status = df.get_column("status")
                counts[0] += int(df.get_column("toxic").sum() or 0)
                counts[1] += int((~status.is_in(["ok", "unvalidated language"])).sum())
                counts[2] += int((status == "unvalidated language").sum())

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


_TOKENIZERS: dict = {}  # per Ray worker process: tasks reuse it


def _prepare_model(model) -> str:
    """resolve_model under a per-node file lock: actors and tasks on one node start together, and the first
    use of a GGUF model (the embedded default) converts it into the shared cache, which two processes must not
    do at once. Later calls find the converted copy at once; the loads themselves then run in parallel."""
    import fcntl

    from .backbone import cache_dir, resolve_model

    with open(cache_dir() / ".ray-model.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when fh closes
        return resolve_model(model)[1]


def _token_lengths(table, model, max_length: int, text_column: str):
    """LEN for each row as FeatureExtractor.tokenize counts it (null/empty texts: 0; the actor rejects them)."""
    import pyarrow as pa

    if model not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model] = AutoTokenizer.from_pretrained(_prepare_model(model))
    texts = table.column(text_column).to_pylist()
    ok = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    lens = [0] * len(texts)
    if ok:
        from .backbone import token_ids

        for i, x in zip(ok, token_ids(_TOKENIZERS[model], [texts[i] for i in ok], max_length)[0]):
            lens[i] = len(x)
    return table.append_column(LEN, pa.array(lens, pa.int64()))


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
    def __init__(self, cfg, text_column: str):
        self.cfg, self.fx, self.text_column = cfg, None, text_column

    def __call__(self, table):
        from .features import FeatureExtractor, codes_frame

        _maybe_crash()
        if self.fx is None:
            _prepare_model(self.cfg.model)
            self.fx = FeatureExtractor.from_config(self.cfg)
        # rows come sorted by (LEN desc, ROW), the batch starting at a multiple of batch_size in that order:
        # extract()'s own stable sort by length keeps it, so its model batches are the local engine's
        df = pl.from_arrow(table)
        if df.height == 0:
            return table.select([ROW])
        texts = df.get_column(self.text_column)
        if texts.dtype != pl.String and texts.dtype != pl.Null:
            raise SafetyScopeError(f"column {self.text_column!r} holds {texts.dtype}, not text")
        texts = texts.to_list()
        bad = sorted(r for r, t in zip(df.get_column(ROW).to_list(), texts) if not isinstance(t, str) or not t.strip())
        if bad:
            raise SafetyScopeError(f"{len(bad)}+ text(s) are null or empty (rows {bad[:10]}); drop them first")
        out = codes_frame(self.fx.extract(texts).codes, df.get_column("id") if "id" in df.columns else None)
        return out.insert_column(0, df.get_column(ROW)).to_arrow()


class _ClassifyActor:
    def __init__(self, classifier_json: str | None, classifier_name: str | None, text_column: str, chunk_rows: int,
                 load: dict):
        self.clf, self.name, self.load, self.det = classifier_json, classifier_name, load, None
        self.text_column, self.chunk_rows = text_column, chunk_rows

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
        outs = [classify_chunk(self.det, df, self.text_column) for df in _chunks(table, self.chunk_rows)]
        return pl.concat(outs).to_arrow() if outs else table
