"""`features` streams (issue 16): durable parts of --chunk-rows rows, resume after kill -9, manifest checks,
--keep-shards; the output is the whole-file extraction's. All on the tiny model (seconds)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import CORPUS, SAE_LAYERS, fail_part_writes_after, kill_9_when, run_cli

from safetyscope import FeatureConfig, FeatureExtractor
from safetyscope.features import codes_frame
from safetyscope.outputs import MARKER


def _texts(n: int) -> list[str]:
    # varied lengths, so each chunk's length sort batches the texts differently from a whole-file sort
    return [" ".join([CORPUS[i % len(CORPUS)], CORPUS[(i * 7) % len(CORPUS)]][: 1 + i % 2])[: 12 + (i * 13) % 90]
            for i in range(n)]


def _input(path, n: int):
    pl.DataFrame({"id": [f"r{i}" for i in range(n)], "text": _texts(n), "extra": list(range(n))}).write_parquet(path)
    return path


@pytest.fixture
def margs(tiny_model_dir, qwen_scope_sae_dir):
    return ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32",
            "--no-cache", "--batch-size", 4]


def _in_memory(tiny_model_dir, qwen_scope_sae_dir, inp) -> pl.DataFrame:
    """The pre-streaming `features`: the whole table read, extracted in one call, written once."""
    df = pl.read_parquet(inp)
    cfg = FeatureConfig(model=str(tiny_model_dir), sae=str(qwen_scope_sae_dir), layer=SAE_LAYERS[0], dtype="float32",
                        cache=False, batch_size=4)
    return codes_frame(FeatureExtractor.from_config(cfg).extract(df["text"].to_list()).codes, df["id"])


def _assert_same(a: pl.DataFrame, b: pl.DataFrame):
    assert a.schema == b.schema and a["id"].to_list() == b["id"].to_list()
    assert a["feature_ids"].to_list() == b["feature_ids"].to_list()  # the same features fire on every text
    # within a chunk texts are batched with other neighbours than in a whole-file sort: padding may move the
    # last float32 bit (fp32 activations otherwise identical)
    np.testing.assert_allclose(a["feature_acts"].explode().to_numpy(), b["feature_acts"].explode().to_numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_streamed_output_equals_the_in_memory_extraction(tmp_path, tiny_model_dir, qwen_scope_sae_dir, margs, fmt):
    inp = _input(tmp_path / "in.parquet", 47)
    out = tmp_path / f"out.{fmt}"
    res = run_cli(["features", inp, "-o", out, "--chunk-rows", 10, *margs])  # 5 chunks, the last one of 7 rows
    assert "wrote 47 rows" in res.output and "resumed" not in res.output
    assert not (tmp_path / f"out.{fmt}.parts").exists()
    got = pl.read_parquet(out) if fmt == "parquet" else \
        pl.read_ndjson(out).cast({"feature_ids": pl.List(pl.Int32), "feature_acts": pl.List(pl.Float32)})
    assert got.columns == ["id", "feature_ids", "feature_acts"]
    _assert_same(got, _in_memory(tiny_model_dir, qwen_scope_sae_dir, inp))


def _cmd(inp, out, margs, *extra):
    return [sys.executable, "-m", "safetyscope", "features", str(inp), "-o", str(out), "--chunk-rows", "3",
            *map(str, margs), *map(str, extra)]


def test_kill_9_then_rerun_resumes_with_identical_output(tmp_path, margs):
    inp = _input(tmp_path / "big.parquet", 300)
    ref = tmp_path / "ref.parquet"
    run_cli(_cmd(inp, ref, margs)[3:])  # in-process: one interpreter start less
    out, parts = tmp_path / "out.parquet", tmp_path / "out.parquet.parts"
    proc = subprocess.Popen(_cmd(inp, out, margs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_9_when(proc, lambda: (parts / "part-000005.parquet").exists())
    assert not out.exists()
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert 6 <= n_parts < 100
    res = run_cli(_cmd(inp, out, margs)[3:])  # the rerun in-process (an interpreter start less)
    assert "resumed after" in res.output and not parts.exists()
    a, b = pl.read_parquet(out), pl.read_parquet(ref)
    assert a["id"].to_list() == [f"r{i}" for i in range(300)]  # every row once, in order
    assert a.equals(b)  # the same chunks, the same batches: bitwise the uninterrupted run's


def _one_line(res, *needles):
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = [ln[ln.index("error: "):] for ln in res.output.splitlines() if "error: " in ln]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_a_rerun_with_other_settings_is_refused_then_the_same_resumes(tmp_path, margs, monkeypatch):
    inp = _input(tmp_path / "in.parquet", 20)
    out = tmp_path / "o.parquet"
    restore = fail_part_writes_after(monkeypatch, 2)
    _one_line(run_cli(["features", inp, "-o", out, "--chunk-rows", 3, *margs], ok=False), "disk full", "rerun")
    restore()
    parts = tmp_path / "o.parquet.parts"
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    _one_line(run_cli(["features", inp, "-o", out, "--chunk-rows", 3, *margs, "--max-length", 8], ok=False),
              "interrupted run with another max_length")
    _one_line(run_cli(["features", inp, "-o", out, "--chunk-rows", 4, *margs], ok=False), "another chunk_rows")
    assert len(list(parts.glob("part-*"))) == 2  # refused runs touch nothing
    res = run_cli(["features", inp, "-o", out, "--chunk-rows", 3, *margs])
    assert "resumed after 2 chunk(s)" in res.output
    assert pl.read_parquet(out)["id"].to_list() == [f"r{i}" for i in range(20)]


def test_keep_shards_writes_a_directory_of_ordered_parts(tmp_path, margs):
    inp = _input(tmp_path / "in.parquet", 25)
    run_cli(["features", inp, "-o", tmp_path / "one.parquet", "--chunk-rows", 10, *margs])
    out = tmp_path / "shards"
    res = run_cli(["features", inp, "-o", out, "--chunk-rows", 10, "--keep-shards", *margs])
    assert "25/25" in res.stderr and "rows" in res.stderr and "tok/s" in res.stderr  # progress: rows and tokens/s
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "part-000000.parquet", "part-000001.parquet",
                                                     "part-000002.parquet"]
    assert [pl.read_parquet(p).height for p in sorted(out.glob("part-*"))] == [10, 10, 5]
    assert pl.read_parquet(sorted(out.glob("part-*.parquet"))).equals(pl.read_parquet(tmp_path / "one.parquet"))
    assert not (tmp_path / "shards.parts").exists()
    run_cli(["features", inp, "-o", out, "--chunk-rows", 25, "--keep-shards", "--overwrite", *margs])  # its own directory
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet"]
    _one_line(run_cli(["features", inp, "-o", tmp_path / "x.csv", "--keep-shards", *margs], ok=False),
              "--keep-shards writes a directory")


def test_a_null_text_anywhere_stops_before_any_part(tmp_path, margs):
    inp = tmp_path / "in.jsonl"
    texts = _texts(14)
    texts[11] = None
    pl.DataFrame({"text": texts}, schema={"text": pl.String}).write_ndjson(inp)
    res = run_cli(["features", inp, "-o", tmp_path / "o.parquet", "--chunk-rows", 3, *margs], ok=False)
    _one_line(res, "1 text(s) are null or empty (rows [11])")
    assert not (tmp_path / "o.parquet.parts").exists() and not (tmp_path / "o.parquet").exists()
    assert os.listdir(tmp_path) == ["in.jsonl"]
