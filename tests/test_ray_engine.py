"""--engine ray (Ray Data actor pool) against the local engine: same OUTPUT, frame for frame."""

from __future__ import annotations

import sys

import polars as pl
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from safetyscope.cli import main  # noqa: E402

from conftest import CORPUS, SAE_LAYERS  # noqa: E402


def _run(args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.fixture(scope="module")
def ray_local():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"Ray cannot start here: {e}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir):
    d = tmp_path_factory.mktemp("ray-clf")
    rows = [{"text": t, "label": int(any(w in t for w in ("stupid", "hate", "garbage", "shut", "bomb")))}
            for t in CORPUS * 4]
    pl.DataFrame(rows).write_csv(d / "lab.csv")
    _run(["discover", d / "lab.csv", "-o", d / "clf.json", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
          "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3])
    return d / "clf.json"


def _generated(path, with_gaps=True):
    texts = [f"{CORPUS[i % len(CORPUS)]} {CORPUS[(i * 7) % len(CORPUS)]}"[: 10 + (i * 13) % 80] for i in range(90)]
    if with_gaps:
        texts[5], texts[40] = None, "   "
    df = pl.DataFrame({"id": [f"g{i}" for i in range(90)], "text": texts, "extra": list(range(90))})
    df.write_ndjson(path) if path.suffix == ".jsonl" else df.write_parquet(path)
    return path


def test_classify_ray_matches_local_and_survives_a_dead_actor(ray_local, classifier, tmp_path, monkeypatch):
    inp = _generated(tmp_path / "in.jsonl")
    common = ["-c", classifier, "--chunk-rows", 16, "--no-cache", "--dtype", "float32"]
    _run(["classify", inp, "-o", tmp_path / "local.parquet", *common])
    marker = tmp_path / "crashed"
    monkeypatch.setenv("SAFETYSCOPE_RAY_CRASH_ONCE", str(marker))  # the first batch kills its actor
    res = _run(["classify", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--workers", 2])
    assert marker.exists(), "the crash hook did not fire"
    assert "wrote 90 rows" in res.output
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert b["id"].to_list() == [f"g{i}" for i in range(90)]  # every row once, in input order
    assert b["status"][5] == "null text" and b["status"][40] == "empty text"
    assert a.equals(b) and a.schema == b.schema


def test_features_ray_matches_local(ray_local, tiny_model_dir, qwen_scope_sae_dir, tmp_path):
    inp = _generated(tmp_path / "in.parquet", with_gaps=False)
    common = ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32",
              "--no-cache"]
    _run(["features", inp, "-o", tmp_path / "local.parquet", *common])
    # one Ray batch = the whole file: the same length-sorted model batches as the local engine, so bitwise equal
    # and one actor holding both CPUs of the local Ray (2 torch threads, as the local engine here)
    _run(["features", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--ray-batch-size", 1000,
          "--cpus-per-worker", 2])
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert a.equals(b) and a.schema == b.schema
    # an error inside an actor (here: a null text) reaches the user as one line, nothing written
    bad = _generated(tmp_path / "bad.parquet")
    res = _run(["features", bad, "-o", tmp_path / "bad-out.parquet", *common, "--engine", "ray"], ok=False)
    assert res.exit_code == 2 and "null or empty" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "bad-out.parquet").exists()


def test_classify_ray_on_ci_sample(ray_local, classifier, shared_data, tmp_path):
    inp = shared_data / "toxicity" / "ci_sample.parquet"
    common = ["-c", classifier, "--chunk-rows", 100, "--no-cache", "--dtype", "float32"]
    _run(["classify", inp, "-o", tmp_path / "local.parquet", *common])
    _run(["classify", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--workers", 2])
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert a.height == pl.read_parquet(inp).height
    assert a.equals(b) and a.schema == b.schema


def test_ray_missing_or_unreachable_is_a_one_line_error(classifier, tmp_path, monkeypatch):
    inp = _generated(tmp_path / "in.parquet")
    res = _run(["classify", inp, "-o", tmp_path / "o.parquet", "-c", classifier, "--engine", "ray",
                "--address", "127.0.0.1:1"], ok=False)
    assert res.exit_code == 2 and "cannot reach Ray at 127.0.0.1:1" in res.output and "Traceback" not in res.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    res = _run(["classify", inp, "-o", tmp_path / "o.parquet", "-c", classifier, "--engine", "ray"], ok=False)
    assert res.exit_code == 2 and "pip install 'safetyscope[ray]'" in res.output
