"""--engine ray (Ray Data actor pool) against the local engine: same OUTPUT, frame for frame."""

from __future__ import annotations

import errno
import sys

import numpy as np
import polars as pl
import pytest

ray = pytest.importorskip("ray")

from conftest import CORPUS, SAE_LAYERS, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"Ray cannot start here: {e}")
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Ray actors run torch with OMP_NUM_THREADS = --cpus-per-worker (1 here); float32 sums may be split
    differently with another thread count (last-bit differences), so the local reference runs with 1 too."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir):
    d = tmp_path_factory.mktemp("ray-clf")
    rows = [{"text": t, "label": int(any(w in t for w in ("stupid", "hate", "garbage", "shut", "bomb")))}
            for t in CORPUS * 4]
    pl.DataFrame(rows).write_csv(d / "lab.csv")
    run_cli(["discover", d / "lab.csv", "-o", d / "clf.json", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
          "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3])
    return d / "clf.json"


def _generated(path, with_gaps=True):
    texts = [f"{CORPUS[i % len(CORPUS)]} {CORPUS[(i * 7) % len(CORPUS)]}"[: 10 + (i * 13) % 80] for i in range(90)]
    if with_gaps:
        texts[5], texts[40] = None, "   "
    df = pl.DataFrame({"id": [f"g{i}" for i in range(90)], "text": texts, "extra": list(range(90))})
    df.write_ndjson(path) if path.suffix == ".jsonl" else df.write_parquet(path)
    return path


def test_classify_ray_matches_local_and_survives_a_dead_actor(ray_local, one_thread, classifier, tmp_path, monkeypatch):
    inp = _generated(tmp_path / "in.jsonl")
    common = ["-c", classifier, "--chunk-rows", 16, "--no-cache", "--dtype", "float32"]
    run_cli(["classify", inp, "-o", tmp_path / "local.parquet", *common])
    marker = tmp_path / "crashed"
    monkeypatch.setenv("SAFETYSCOPE_RAY_CRASH_ONCE", str(marker))  # the first batch kills its actor
    res = run_cli(["classify", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--workers", 2])
    assert marker.exists(), "the crash hook did not fire"
    assert "wrote 90 rows" in res.output
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert b["id"].to_list() == [f"g{i}" for i in range(90)]  # every row once, in input order
    assert b["status"][5] == "null text" and b["status"][40] == "empty text"
    assert a.equals(b) and a.schema == b.schema


def test_classify_ray_reads_the_lang_column_as_local_does(ray_local, one_thread, classifier, tmp_path):
    """The two engines give a row the same status: Ray used to drop --lang-column (and identified languages)."""
    inp = tmp_path / "langs.parquet"
    pl.DataFrame({"text": ["you are a stupid idiot", "have a nice day", "du bist dumm", "hello there"],
                  "language": ["en", "xx", "de", "en"]}).write_parquet(inp)
    common = ["-c", classifier, "--no-cache", "--dtype", "float32", "--lang-column", "language"]
    run_cli(["classify", inp, "-o", tmp_path / "local.parquet", *common])
    res = run_cli(["classify", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--workers", 1])
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert a.equals(b) and "unvalidated language" in b["status"].to_list()
    assert "rows are outside the classifier's validated languages" in res.output
    bad = run_cli(["classify", inp, "-o", tmp_path / "x.parquet", *common[:-1], "nope", "--engine", "ray"], ok=False)
    assert bad.exit_code == 2 and "--lang-column 'nope'" in bad.output and "Traceback" not in bad.output


def test_features_ray_matches_local_and_resumes_its_parts(ray_local, one_thread, tiny_model_dir, qwen_scope_sae_dir,
                                                          tmp_path, monkeypatch):
    inp = _generated(tmp_path / "in.parquet", with_gaps=False)
    common = ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32",
              "--no-cache", "--batch-size", 8, "--chunk-rows", 16]
    run_cli(["features", inp, "-o", tmp_path / "local.parquet", *common])
    # 20 rows per Ray batch -> 32 (whole chunks of 16), 3 batches over 2 actors: each actor extracts chunk by
    # chunk as the local engine does, so every model batch holds the texts the local engine batches together
    run_cli(["features", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--ray-batch-size", 20,
          "--workers", 2])
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert a.schema == b.schema and a.drop("feature_acts").equals(b.drop("feature_acts"))  # same rows, order, features
    # activations to float32 rounding: after other tests ran in this process, the in-process reference and the
    # actors' processes have differed in the last bit (alone, this test is bitwise equal)
    np.testing.assert_allclose(a["feature_acts"].explode().to_numpy(), b["feature_acts"].explode().to_numpy(),
                               rtol=1e-5, atol=1e-6)
    # a run stopped after 2 parts (disk full) resumes on Ray, the manifest being the same on both engines:
    # Ray then maps rows 32.. only
    from safetyscope import streaming

    real, calls = streaming.fsync_write_parquet, []

    def stop(df, path):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(df, path)

    monkeypatch.setattr(streaming, "fsync_write_parquet", stop)
    run_cli(["features", inp, "-o", tmp_path / "resumed.parquet", *common], ok=False)
    monkeypatch.setattr(streaming, "fsync_write_parquet", real)
    parts = tmp_path / "resumed.parquet.parts"
    assert len(list(parts.glob("part-*"))) == 2
    res = run_cli(["features", inp, "-o", tmp_path / "resumed.parquet", *common, "--engine", "ray", "--workers", 2])
    assert "resumed after 2 chunk(s)" in res.output and not parts.exists()
    c = pl.read_parquet(tmp_path / "resumed.parquet")
    assert c.drop("feature_acts").equals(a.drop("feature_acts"))
    # an error inside an actor (here: a null text) reaches the user as one line, nothing written
    bad = _generated(tmp_path / "bad.parquet")
    res = run_cli(["features", bad, "-o", tmp_path / "bad-out.parquet", *common, "--engine", "ray"], ok=False)
    assert res.exit_code == 2 and "null or empty" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "bad-out.parquet").exists() and not (tmp_path / "bad-out.parquet.parts").exists()


def test_classify_ray_on_ci_sample(ray_local, one_thread, classifier, shared_data, tmp_path):
    inp = shared_data / "toxicity" / "ci_sample.parquet"
    common = ["-c", classifier, "--chunk-rows", 100, "--no-cache", "--dtype", "float32"]
    run_cli(["classify", inp, "-o", tmp_path / "local.parquet", *common])
    run_cli(["classify", inp, "-o", tmp_path / "ray.parquet", *common, "--engine", "ray", "--workers", 2])
    a, b = pl.read_parquet(tmp_path / "local.parquet"), pl.read_parquet(tmp_path / "ray.parquet")
    assert a.height == pl.read_parquet(inp).height
    assert a.equals(b) and a.schema == b.schema


def test_ray_missing_or_unreachable_is_a_one_line_error(classifier, tmp_path, monkeypatch):
    inp = _generated(tmp_path / "in.parquet")
    res = run_cli(["classify", inp, "-o", tmp_path / "o.parquet", "-c", classifier, "--engine", "ray",
                "--address", "127.0.0.1:1"], ok=False)
    assert res.exit_code == 2 and "cannot reach Ray at 127.0.0.1:1" in res.output and "Traceback" not in res.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    res = run_cli(["classify", inp, "-o", tmp_path / "o.parquet", "-c", classifier, "--engine", "ray"], ok=False)
    assert res.exit_code == 2 and "pip install 'safetyscope[ray]'" in res.output


def test_rechunk_cuts_exact_blocks_in_order(ray_local):
    import pyarrow as pa

    from safetyscope.ray_engine import ROW, _rechunk

    tables = [pa.table({"x": list(range(a, b))}) for a, b in ((0, 5), (5, 5), (5, 17), (17, 18), (18, 30))]
    refs = [ray.put(t) for t in tables]
    out = ray.get(_rechunk(ray, refs, [t.num_rows for t in tables], 7, index=True))
    assert [t.num_rows for t in out] == [7, 7, 7, 7, 2]
    assert sum((t.column("x").to_pylist() for t in out), []) == list(range(30))
    assert sum((t.column(ROW).to_pylist() for t in out), []) == list(range(30))


def test_pool_larger_than_the_cluster(monkeypatch):
    from safetyscope.errors import SafetyScopeError
    from safetyscope.ray_engine import _check_resources

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0}

    _check_resources(FakeRay, True, 2, 1.0, 0.0)  # fits
    with pytest.raises(SafetyScopeError, match=r"3 x 1 CPU \(the cluster has 2\)"):
        _check_resources(FakeRay, True, 3, 1.0, 0.0)  # a Ray we started: it would wait forever
    with pytest.raises(SafetyScopeError, match="GPU"):
        _check_resources(FakeRay, True, 1, 1.0, 1.0)
    _check_resources(FakeRay, False, 3, 1.0, 0.0)  # a joined cluster may autoscale: only a warning
