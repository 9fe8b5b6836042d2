"""kill -9 at a moment inside a unit of work (a chunk of classify/features, a group of synthesize), then the same
command again: every row once, in order, and the output bit-identical to an uninterrupted run, in float32 and
bfloat16, with the feature cache on and off (issue 28). The killed run is a real process; the reference and the
rerun run in-process (an interpreter start less)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, kill_9_when, run_cli

MATRIX = [(dtype, cache) for dtype in ("float32", "bfloat16") for cache in (True, False)]
IDS = [f"{d}-{'cache' if c else 'no-cache'}" for d, c in MATRIX]


def _texts(n: int) -> list[str]:
    # lengths 3..~30 words, so a chunk's batches (by --batch-tokens) hold different numbers of texts
    return [" ".join([CORPUS[i % len(CORPUS)], CORPUS[(i * 7) % len(CORPUS)]][: 1 + i % 2]) + f" {i}" + " again" * (i % 5)
            for i in range(n)]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("kill") / "in.parquet"
    pl.DataFrame({"id": [f"r{i}" for i in range(240)], "text": _texts(240)}).write_parquet(p)
    return p


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir) -> Path:
    d = tmp_path_factory.mktemp("kclf")
    rows = [{"text": t, "label": "toxic" if any(w in t for w in TOXIC_WORDS) else "clean"} for t in CORPUS * 4]
    pl.DataFrame(rows).write_parquet(d / "l.parquet")
    run_cli(["discover", d / "l.parquet", "-o", d / "clf.json", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
             "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 5, "--kind", "sparse_linear"])
    return d / "clf.json"


def _kill_mid_chunk(cmd: list, parts: Path, env: dict) -> None:
    """Start ``cmd``, kill -9 it a moment after its 2nd part is written (inside the 3rd chunk, whose texts the cache
    may partly hold), check no output and whole parts are left."""
    # the tiny model runs a whole chunk in milliseconds, so on a loaded machine the run could end inside the 0.3 s
    # below: the killed process takes 0.1 s per forward pass (a sitecustomize of its own; the code is unchanged)
    slow = parts.parent / "slow"
    slow.mkdir(exist_ok=True)
    (slow / "sitecustomize.py").write_text(
        "import time\nimport safetyscope.backbone as b\n_capture = b.Backbone.capture\n"
        "def capture(self, *a, **k):\n    time.sleep(0.1)\n    return _capture(self, *a, **k)\n"
        "b.Backbone.capture = capture\n")
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), env.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "safetyscope", *map(str, cmd)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t = {"at": None}

    def ready() -> bool:  # 2 parts written, then 0.3 s more: the 3rd chunk is under way
        if t["at"] is None and (parts / "part-000001.parquet").exists():
            t["at"] = time.time()
        return t["at"] is not None and time.time() - t["at"] > 0.3

    kill_9_when(proc, ready)
    assert 2 <= len(list(parts.glob("part-*.parquet"))) < 8, "the kill must land before the end of the run"


@pytest.mark.parametrize("dtype,cache", MATRIX, ids=IDS)
@pytest.mark.parametrize("command", ["classify", "features"])
def test_kill_9_mid_chunk_resumes_bit_identical(command, dtype, cache, table, classifier, tiny_model_dir,
                                                qwen_scope_sae_dir, tmp_path, monkeypatch):
    env = {**os.environ, "SAFETYSCOPE_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))
    common = ["--dtype", dtype, "--chunk-rows", 30, "--batch-size", 8, "--batch-tokens", 64,
              *([] if cache else ["--no-cache"])]
    if command == "classify":
        def cmd(out):
            return ["classify", table, "-o", out, "-c", classifier, *common]
    else:
        def cmd(out):
            return ["features", table, "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer",
                    SAE_LAYERS[0], *common]
    out, ref = tmp_path / "out.parquet", tmp_path / "ref.parquet"
    _kill_mid_chunk(cmd(out), tmp_path / "out.parquet.parts", env)
    assert not out.exists()
    res = run_cli(cmd(out))
    assert "resumed after" in res.output
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache-ref"))  # the reference: no cache of the killed run
    run_cli(cmd(ref))
    a, b = pl.read_parquet(out), pl.read_parquet(ref)
    assert a["id"].to_list() == [f"r{i}" for i in range(240)]  # every row once, in order
    assert a.equals(b)  # bitwise: scores / activations and fired features of every row


# -- synthesize: groups are the durable unit; the generator is the tiny model (greedy requests are seeded) --------
@pytest.fixture(scope="module")
def synth_inputs(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir, classifier) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ksynth")
    rows = [{"prompt": t, "label": "harmful" if any(w in t for w in TOXIC_WORDS) else "benign"} for t in CORPUS * 4]
    pl.DataFrame(rows).write_parquet(d / "ref.parquet")
    run_cli(["synth", "targets", d / "ref.parquet", "-o", d / "targets.json", "--min-delta", "0.05", "--min-precision",
             "0", "--fdr", "1", "--judge-classifier", "none", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
             "--layer", SAE_LAYERS[0], "--dtype", "float32"])
    pl.DataFrame({"prompt": ["hello"]}).write_ndjson(d / "seed.jsonl")  # covers (almost) nothing: every target to do
    return d / "targets.json", d / "seed.jsonl"


@pytest.mark.parametrize("dtype,cache", MATRIX, ids=IDS)
def test_synthesize_killed_mid_group_resumes_bit_identical(dtype, cache, synth_inputs, classifier, tiny_model_dir,
                                                           tmp_path, monkeypatch):
    targets, seed = synth_inputs
    env = {**os.environ, "SAFETYSCOPE_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))

    def cmd(out):
        return ["synthesize", "--targets", targets, "--seed-data", seed, "-o", out, "--generator", tiny_model_dir,
                "--dtype", dtype, "--classifier", "none", "--judge-classifier", classifier, "--no-audit", "--budget", 5,
                "--group-size", 1, "--samples", 2, "--prompt-tokens", 12, "--response-tokens", 6, "--max-attempts", 1,
                "--no-steer", "--batch-tokens", 64, *([] if cache else ["--no-cache"])]

    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    partial = tmp_path / "out.jsonl.partial.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "safetyscope", *map(str, cmd(out))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = {"at": None}

    def ready() -> bool:  # two groups committed (header + 2 lines), then a moment into the third
        if t["at"] is None and partial.exists() and partial.read_bytes().count(b"\n") >= 3:
            t["at"] = time.time()
        return t["at"] is not None and time.time() - t["at"] > 0.2

    kill_9_when(proc, ready, poll=0.01)
    assert not out.exists()
    n_groups = partial.read_bytes().count(b'"kind": "group"')
    res = run_cli(cmd(out))
    assert "resumed after" in res.output and not partial.exists(), res.output
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache-ref"))
    run_cli(cmd(ref))
    a, b = pl.read_ndjson(out), pl.read_ndjson(ref)
    assert n_groups >= 2 and a.height > 0  # groups were committed before the kill; the run keeps rows
    assert a["target_feature"].n_unique() == a.height  # no row twice
    assert a.equals(b)  # prompts, responses, labels, judge scores and activations, bitwise
