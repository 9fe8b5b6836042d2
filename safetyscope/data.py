"""Dataset I/O: the one place that reads and writes tables.

Formats, chosen by the path: ``.parquet``, ``.csv``, ``.jsonl``/``.ndjson``/``.json`` (one object
per line), or a directory written by ``datasets.Dataset.save_to_disk``. Everything is a polars
DataFrame in memory; large inputs are read in row chunks with :func:`iter_chunks`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from .errors import SafetyScopeError

# Label spellings every labelled-data command accepts (toxicity: toxic/clean, safety prompts: harmful/benign)
POSITIVE = {"1", "true", "toxic", "harmful", "yes"}
NEGATIVE = {"0", "false", "clean", "benign", "no", "non-toxic", "nontoxic"}

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def table_format(path: str | os.PathLike, *, for_writing: bool = False) -> str:
    """'parquet', 'csv', 'jsonl' or 'hf' (a datasets directory), from the path alone."""
    p = Path(path)
    fmt = TABLE_SUFFIXES.get(p.suffix.lower())
    if fmt:
        return fmt
    if p.is_dir() or (for_writing and p.suffix == ""):
        return "hf"
    if for_writing:
        raise SafetyScopeError(f"{path}: unknown output format {p.suffix!r}; name a .parquet, .csv or .jsonl file, or a "
                               "directory (Hugging Face datasets)")
    if not p.exists():
        raise SafetyScopeError(f"{path}: no such file or directory")
    raise SafetyScopeError(
        f"{path}: unknown table format {p.suffix!r}; use .parquet, .csv, .jsonl or a Hugging Face datasets directory"
    )


def _load_hf(path: Path) -> pl.DataFrame:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise SafetyScopeError(f"{path}: not a Hugging Face datasets directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise SafetyScopeError(f"{path}: holds a DatasetDict with splits {list(ds)}; point at one split's directory")
    return pl.from_arrow(ds.data.table)


def read_table(path: str | os.PathLike, *, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a whole table; ``columns`` are required to exist (a clear error names what is there)."""
    p = Path(path)
    fmt = table_format(p)
    if not p.exists():
        raise SafetyScopeError(f"{path}: no such file or directory")
    try:
        if fmt == "parquet":
            df = pl.read_parquet(p)
        elif fmt == "csv":
            df = pl.read_csv(p, infer_schema_length=None)  # the whole file: a column may change type late
        elif fmt == "jsonl":
            df = pl.read_ndjson(_without_bom(p), infer_schema_length=None)
        else:
            df = _load_hf(p)
    except SafetyScopeError:
        raise
    except Exception as e:  # polars/arrow parse errors: the user's file is malformed
        raise SafetyScopeError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    if df.height == 0:  # nothing to compute on: an empty file is a mistake, not an empty result
        raise SafetyScopeError(f"{path}: the table has no rows")
    require_columns(df, columns or [], path)
    return df


def require_columns(df: pl.DataFrame, columns: list[str], where: str | os.PathLike) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        hint = ""
        if len(missing) == 1 and missing[0] in ("text", "prompt"):  # the default text column of some command
            hint = "; name yours with --text-column"
        raise SafetyScopeError(f"{where}: missing column(s) {missing}; columns present: {df.columns}{hint}")


def count_rows(path: str | os.PathLike) -> int:
    p = Path(path)
    fmt = table_format(p)
    if not p.exists():
        raise SafetyScopeError(f"{path}: no such file or directory")
    if fmt == "hf":
        return read_table(p).height
    try:
        n = _scan(p, fmt).select(pl.len()).collect().item()
    except pl.exceptions.PolarsError as e:  # empty or malformed: the same one line as read_table's
        raise SafetyScopeError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    if n == 0 and fmt == "csv":
        with open(p, "rb") as fh:
            lines = sum(1 for line in fh if line.strip())
        if lines > 1:  # a quote opened and never closed swallows every row after the header
            raise SafetyScopeError(f"{path}: cannot read as csv: {lines - 1} line(s) after the header but no row "
                                   "parsed; look for a quote (\") that is opened and never closed")
    return n


def _has_bom(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(3) == b"\xef\xbb\xbf"


def _without_bom(p: Path):
    """JSON Lines with a UTF-8 byte-order mark (Windows editors write one): the bytes without it; else the path."""
    if not _has_bom(p):
        return p
    import io

    return io.BytesIO(p.read_bytes()[3:])


def _scan(p: Path, fmt: str) -> pl.LazyFrame:
    """A lazy reader; schemas inferred over the whole file, as read_table does."""
    if fmt == "parquet":
        return pl.scan_parquet(p)
    if fmt == "csv":
        return pl.scan_csv(p, infer_schema_length=None)
    if _has_bom(p):  # scan_ndjson cannot skip it: read the file once, without the mark
        return pl.read_ndjson(_without_bom(p), infer_schema_length=None).lazy()
    return pl.scan_ndjson(p, infer_schema_length=None)


def iter_chunks(path: str | os.PathLike, chunk_rows: int, *, start: int = 0,
                columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
    """Row chunks of a table, from row ``start``, without holding the whole file for columnar formats;
    ``columns``: only these (required to exist: the error names what is there)."""
    p = Path(path)
    fmt = table_format(p)
    if fmt == "hf":  # memory-mapped arrow: slicing is cheap
        df = read_table(p, columns=columns)
        df = df.select(columns) if columns else df
        for off in range(start, df.height, chunk_rows):
            yield df.slice(off, chunk_rows)
        return
    try:
        total = count_rows(p)
        lf = _scan(p, fmt)
        if columns:
            require_columns(pl.DataFrame(schema=lf.collect_schema()), columns, path)
            lf = lf.select(columns)
        for off in range(start, total, chunk_rows):
            yield lf.slice(off, chunk_rows).collect()
    except pl.exceptions.PolarsError as e:
        raise SafetyScopeError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None


def csv_safe(df: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested values: lists become ``[1, 2]`` strings and structs/lists of structs JSON strings,
    so nothing is lost and the check happens before any row is written."""
    import json

    def as_text(v):
        if v is None:
            return None
        if isinstance(v, dict) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], dict)):
            return json.dumps(v, ensure_ascii=False, default=str)
        return str(list(v))

    nested = [c for c, t in df.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct))]
    return df.with_columns(pl.col(c).map_elements(as_text, return_dtype=pl.String) for c in nested)


def write_table(df: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write by extension, atomically (temporary file then rename) so a crash never leaves half a file.
    An existing output is replaced only through ``outputs.replace`` (plain files or our marked directories);
    callers validate the path with ``outputs.check_output`` before their work."""
    from .outputs import output_errors, remove_temp, replace, temp_path

    p = Path(path)
    fmt = table_format(p, for_writing=True)
    tmp = temp_path(p)
    with output_errors(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_temp(tmp)
        try:
            if fmt == "hf":
                import datasets

                datasets.Dataset(df.to_arrow()).save_to_disk(str(tmp))
            elif fmt == "parquet":
                df.write_parquet(tmp)
            elif fmt == "csv":
                csv_safe(df).write_csv(tmp)
            else:
                df.write_ndjson(tmp)
            replace(tmp, p)
        except BaseException:
            remove_temp(tmp)
            raise


def require_text(df: pl.DataFrame, text_column: str, where: str | os.PathLike = "input") -> pl.DataFrame:
    """``df`` with its text column checked: present and text (an all-null column is read as text). Numbers
    are a mistake to name as such, not texts that are "null or empty"."""
    require_columns(df, [text_column], where)
    dtype = df.schema[text_column]
    if dtype == pl.Null:
        return df.with_columns(pl.col(text_column).cast(pl.String))
    if dtype != pl.String:
        raise SafetyScopeError(f"{where}: column {text_column!r} holds {dtype}, not text")
    return df


def text_list(df: pl.DataFrame, text_column: str, where: str | os.PathLike = "input") -> list[str | None]:
    """The text column as Python strings; nulls stay None (callers decide what an empty text means)."""
    return require_text(df, text_column, where).get_column(text_column).to_list()


def parse_labels(values: pl.Series, where: str) -> np.ndarray:
    """1/0, true/false, toxic/clean (also harmful/benign) -> int array; anything else is named in the error."""
    if values.null_count():
        raise SafetyScopeError(f"{where}: {values.null_count()} row(s) have no label")
    if values.dtype.is_nested() or values.dtype == pl.Binary or values.dtype == pl.Object:
        raise SafetyScopeError(f"{where}: label column {values.name!r} holds {values.dtype}, not labels; use 1/0, true/false, "
                               "toxic/clean or harmful/benign")
    norm = values.cast(pl.String).str.strip_chars().str.to_lowercase()
    bad = sorted(set(norm.to_list()) - POSITIVE - NEGATIVE)
    if bad:
        raise SafetyScopeError(f"{where}: labels must be 1/0, true/false, toxic/clean or harmful/benign; found {bad[:10]}")
    return norm.is_in(list(POSITIVE)).to_numpy().astype(int)


def data_sha256(*columns) -> str:
    """sha256 of a table's rows in order, one tab-joined line per row of the given columns: what a classifier, a
    target set (label, text) or an eval report (every evaluated column) was computed from, recorded so that a rerun
    on other data is visible. The one data hash of the project."""
    h = hashlib.sha256()
    for row in zip(*(np.asarray(c).tolist() if isinstance(c, np.ndarray) else list(c) for c in columns)):
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest()


def id_half(row_id: str) -> int:
    """0 or 1 from the sha256 of a row id: a split of a table into two stable halves that does not depend on row
    order or on which other rows are present (synth compare finds targets on half 0 of `pool` and samples the
    natural arm and sft-eval's held-out prompts from half 1, so no arm is measured on what chose its targets)."""
    return hashlib.sha256(row_id.encode()).digest()[0] & 1
