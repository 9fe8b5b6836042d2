"""Issue 13, files/resume/faults: a careless or hostile user never loses data, never gets a traceback, never
gets a silently wrong result. One test per case; all on the tiny model (seconds)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import CORPUS, REPO_ROOT, SAE_LAYERS, TOXIC_WORDS, fail_part_writes_after, run_cli

from safetyscope import streaming as streaming_mod
from safetyscope.errors import SafetyScopeError
from safetyscope.outputs import MARKER, output_lock

_run = run_cli


def _one_line_error(res, *needles):
    """Exit 2, one `error:` line, no traceback, and the message names what went wrong."""
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln[ln.index("error: "):] for ln in res.output.splitlines() if "error: " in ln]  # (after a progress bar)
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model_dir, qwen_scope_sae_dir):
    d = tmp_path_factory.mktemp("clf")
    rows = [{"text": t, "label": "toxic" if any(w in t for w in TOXIC_WORDS) else "clean"} for t in CORPUS * 4]
    data = d / "labelled.csv"
    pl.DataFrame(rows).write_csv(data)
    out = d / "clf.json"
    _run(["discover", data, "-o", out, "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
          "--layer", SAE_LAYERS[0], "--dtype", "float32", "--max-features", 3])
    return out


@pytest.fixture
def table(tmp_path):
    p = tmp_path / "in.jsonl"
    pl.DataFrame({"id": list(range(12)), "text": [f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(12)]}).write_ndjson(p)
    return p


def _classify(inp, out, clf, *extra, ok=True):
    return _run(["classify", inp, "-o", out, "-c", clf, "--chunk-rows", 3, "--no-cache", "--dtype", "float32", *extra],
                ok=ok)


# -- data loss: --overwrite only replaces what the tool wrote, never the input or the cwd -------
def test_overwrite_refuses_a_directory_the_tool_did_not_write(classifier, table, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    _one_line_error(_classify(table, d, classifier, "--overwrite", ok=False), "did not write")
    assert (d / "thesis.txt").read_text() == "years of work"
    res = _run(["synthesize", "--targets", classifier, "--seed-data", table, "-o", d, "--overwrite"], ok=False)
    _one_line_error(res, "did not write")
    assert (d / "thesis.txt").exists()


def test_overwrite_never_deletes_the_input_or_the_working_directory(classifier, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    inp = data / "in.jsonl"
    pl.DataFrame({"text": ["hello there"]}).write_ndjson(inp)
    _one_line_error(_classify(inp, data, classifier, "--overwrite", ok=False), "contains the input")
    _one_line_error(_classify(inp, inp, classifier, "--overwrite", ok=False), "is or contains the input")
    work = data / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), str(tmp_path)):
        _one_line_error(_classify(inp, target, classifier, "--overwrite", ok=False))
    assert inp.exists() and (work / "keep.txt").exists()


def test_overwrite_replaces_the_tools_own_outputs(classifier, table, tmp_path):
    for name in ("o.parquet", "o_hf"):
        out = tmp_path / name
        _classify(table, out, classifier)
        _one_line_error(_classify(table, out, classifier, ok=False), "already exists")
        _classify(table, out, classifier, "--overwrite")
    assert (tmp_path / "o_hf" / MARKER).is_file()
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "o_hf"))["id"] == list(range(12))


# -- resume validation ---------------------------------------------------------------------------
def test_disk_full_is_one_line_and_a_rerun_resumes(classifier, table, tmp_path, monkeypatch):
    ref = tmp_path / "ref.parquet"
    _classify(table, ref, classifier)
    out = tmp_path / "o.parquet"
    restore = fail_part_writes_after(monkeypatch, 2)
    _one_line_error(_classify(table, out, classifier, ok=False), "disk full", "rerun the same command")
    assert sorted(p.name for p in (tmp_path / "o.parquet.parts").glob("part-*")) == ["part-000000.parquet",
                                                                                    "part-000001.parquet"]
    restore()
    res = _classify(table, out, classifier)
    assert "resumed after 2 chunk(s)" in res.output
    assert pl.read_parquet(out).equals(pl.read_parquet(ref))


def test_disk_full_during_assembly_keeps_the_parts(classifier, table, tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    real = streaming_mod.assemble

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming_mod, "assemble", full)
    _one_line_error(_classify(table, out, classifier, ok=False), "disk full")
    assert len(list((tmp_path / "o.jsonl.parts").glob("part-*"))) == 4 and not out.exists()
    monkeypatch.setattr(streaming_mod, "assemble", real)
    assert "resumed after 4" in _classify(table, out, classifier).output
    assert pl.read_ndjson(out)["id"].to_list() == list(range(12))


def test_a_forged_part_is_detected(classifier, table, tmp_path, monkeypatch):
    out = tmp_path / "o.parquet"
    restore = fail_part_writes_after(monkeypatch, 2)
    _classify(table, out, classifier, ok=False)
    restore()
    part = tmp_path / "o.parquet.parts" / "part-000001.parquet"
    pl.read_parquet(part).head(1).write_parquet(part)  # 1 row where 3 belong
    _one_line_error(_classify(table, out, classifier, ok=False), "part-000001", "holds 1 rows", "needs 3")
    assert not out.exists()
    part.unlink()  # as the message says: delete it and it is recomputed
    _classify(table, out, classifier)
    assert pl.read_parquet(out)["id"].to_list() == list(range(12))


def test_a_changed_input_with_the_same_size_and_mtime_is_refused(classifier, table, tmp_path, monkeypatch):
    out = tmp_path / "o.parquet"
    restore = fail_part_writes_after(monkeypatch, 1)
    _classify(table, out, classifier, ok=False)
    restore()
    st = table.stat()
    raw = table.read_bytes()
    table.write_bytes(raw.replace(b"Hello", b"HELLO", 1) if b"Hello" in raw else raw.replace(b" 1", b" 7", 1))
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert table.stat().st_size == st.st_size and table.stat().st_mtime_ns == st.st_mtime_ns
    _one_line_error(_classify(table, out, classifier, ok=False), "input_sha256", "delete")


def test_a_different_dtype_or_batch_size_is_refused(classifier, table, tmp_path, monkeypatch):
    out = tmp_path / "o.parquet"
    restore = fail_part_writes_after(monkeypatch, 1)
    _classify(table, out, classifier, ok=False)
    restore()
    res = _run(["classify", table, "-o", out, "-c", classifier, "--chunk-rows", 3, "--no-cache", "--dtype", "bfloat16"],
               ok=False)
    _one_line_error(res, "dtype")
    _one_line_error(_classify(table, out, classifier, "--batch-size", 5, ok=False), "batch_size")
    _one_line_error(_run(["classify", table, "-o", out, "-c", classifier, "--chunk-rows", 4, "--no-cache",
                          "--dtype", "float32"], ok=False), "chunk_rows")


def test_a_truncated_manifest_is_one_line(classifier, table, tmp_path, monkeypatch):
    out = tmp_path / "o.parquet"
    restore = fail_part_writes_after(monkeypatch, 1)
    _classify(table, out, classifier, ok=False)
    restore()
    m = tmp_path / "o.parquet.parts" / "manifest.json"
    m.write_text(m.read_text()[:40])
    _one_line_error(_classify(table, out, classifier, ok=False), "manifest.json", "start over")


def test_a_failed_start_leaves_no_parts_behind(classifier, tmp_path):
    bad = tmp_path / "bad.jsonl"
    pl.DataFrame({"body": ["hello"]}).write_ndjson(bad)
    out = tmp_path / "o.parquet"
    _one_line_error(_classify(bad, out, classifier, ok=False), "missing column(s) ['text']")
    assert not (tmp_path / "o.parquet.parts").exists()
    _classify(bad, out, classifier, "--text-column", "body")  # the corrected command is not blocked
    assert pl.read_parquet(out).height == 1


def test_a_second_run_on_the_same_output_fails_fast(classifier, table, tmp_path):
    out = tmp_path / "o.parquet"
    with output_lock(out):  # another run holds the output
        _one_line_error(_classify(table, out, classifier, ok=False), "another safetyscope run")
    _classify(table, out, classifier)  # released: fine again
    assert not list(tmp_path.glob(".*lock"))


def _flock_holder(lock) -> int | None:
    """The pid holding a flock on ``lock``, from /proc/locks (None if nobody holds it)."""
    try:
        inode = os.stat(lock).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except FileNotFoundError:
        return None
    for ln in lines:  # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        f = ln.split()
        if "FLOCK" in f and "->" not in f and int(f[f.index("FLOCK") + 4].rsplit(":", 1)[1]) == inode:
            return int(f[f.index("FLOCK") + 3])
    return None


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks to see which process holds the lock")
def test_two_real_processes_race_for_one_output(classifier, tmp_path):
    """Two `safetyscope classify` processes started together on one -o: the one that takes the output lock is
    paused while it holds it, so the other must fail on its own, fast and in one line; the winner, resumed,
    writes the complete, correct output."""
    inp = tmp_path / "in.jsonl"
    # the number first: a text that starts like a discovery text has, by the causal prefix, a code exactly on
    # the tiny classifier's threshold, and another process's last-bit rounding could flip it
    pl.DataFrame({"id": list(range(200)), "text": [f"{i} {CORPUS[i % len(CORPUS)]}" for i in range(200)]}).write_ndjson(inp)
    ref = tmp_path / "ref.parquet"
    _classify(inp, ref, classifier)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}

    def racer(out):
        cmd = [sys.executable, "-m", "safetyscope", "classify", inp, "-o", out, "-c", classifier, "--chunk-rows", 4,
               "--no-cache", "--dtype", "float32"]
        return subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    running = []
    try:
        for attempt in range(3):  # again only if the winner finished before it could be paused
            out = tmp_path / f"o{attempt}.parquet"
            lock = out.with_name(f".{out.name}.safetyscope-lock")
            procs = {p.pid: p for p in (racer(out), racer(out))}
            running += procs.values()
            deadline = time.monotonic() + 120
            while (holder := _flock_holder(lock)) not in procs and time.monotonic() < deadline:
                assert all(p.poll() is None for p in procs.values()), [p.communicate() for p in procs.values()]
                time.sleep(0.002)
            assert holder in procs, "no process took the output lock"
            winner = procs.pop(holder)
            os.kill(winner.pid, signal.SIGSTOP)
            if _flock_holder(lock) != winner.pid:  # it released the lock before the pause: not a race
                os.kill(winner.pid, signal.SIGCONT)
                continue
            (loser,) = procs.values()
            _, err = loser.communicate(timeout=60)  # the winner is paused, holding the lock: no waiting for it
            assert loser.returncode == 2, err
            assert "Traceback" not in err
            errors = [ln for ln in err.splitlines() if "error: " in ln]
            assert len(errors) == 1 and "another safetyscope run is writing" in errors[0], err
            assert not out.exists()
            os.kill(winner.pid, signal.SIGCONT)
            _, err = winner.communicate(timeout=120)
            assert winner.returncode == 0, err
            got, want = pl.read_parquet(out), pl.read_parquet(ref)
            assert got["id"].to_list() == list(range(200))
            assert got.drop("score").equals(want.drop("score"))  # texts, verdicts, fired features, status
            assert np.allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5, atol=1e-6)
            assert not lock.exists() and not out.with_name(out.name + ".parts").exists()
            return
        pytest.fail("in 3 tries the winner always finished before it could be paused")
    finally:
        for p in running:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


@pytest.mark.parametrize("rows", [0, -3])
def test_chunk_rows_must_be_positive(classifier, table, tmp_path, rows):
    res = _run(["classify", table, "-o", tmp_path / "o.parquet", "-c", classifier, "--chunk-rows", rows], ok=False)
    _one_line_error(res, "--chunk-rows must be >= 1")


# -- unwritable outputs: one line, before any work ----------------------------------------------
def test_unwritable_outputs_are_one_line_errors(classifier, table, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in ("/proc/o.parquet", afile / "o.parquet"):
        _one_line_error(_classify(table, out, classifier, ok=False), "cannot write")
    _one_line_error(_run(["features", table, "-o", afile / "f.parquet"], ok=False), "cannot write")


def test_read_only_file_system_is_one_line(classifier, table, tmp_path, monkeypatch):
    import tempfile

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", ro)  # the probe check_output makes before any work
    _one_line_error(_classify(table, tmp_path / "o.parquet", classifier, ok=False), "read-only file system")


def test_csv_output_of_nested_columns(classifier, tmp_path):
    inp = tmp_path / "nested.jsonl"
    pl.DataFrame({"text": ["you are a stupid idiot", "thank you"], "tags": [["a", "b"], []],
                  "meta": [{"k": 1}, {"k": 2}]}).write_ndjson(inp)
    out = tmp_path / "o.csv"
    _classify(inp, out, classifier)
    df = pl.read_csv(out)
    assert df["tags"].to_list() == ["['a', 'b']", "[]"]
    assert [json.loads(v) for v in df["meta"]] == [{"k": 1}, {"k": 2}]


def test_eval_discover_overlap_check_the_output_before_any_work(classifier, table, tmp_path, monkeypatch):
    from safetyscope.features import FeatureExtractor

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(FeatureExtractor, "from_config", no_work)
    afile = tmp_path / "report"
    afile.write_text("x")
    _one_line_error(_run(["eval", table, "-o", afile], ok=False), "not a directory")
    _one_line_error(_run(["overlap", table, "-o", afile], ok=False), "not a directory")
    _one_line_error(_run(["discover", table, "-o", tmp_path], ok=False))
    for cmd in ("discover", "features"):  # -o naming the input itself
        _one_line_error(_run([cmd, table, "-o", table], ok=False), "is or contains the input")
    assert table.stat().st_size > 0
    _one_line_error(_run(["discover", table, "-o", afile / "clf.json"], ok=False), "cannot write")
    _one_line_error(_run(["synth", "targets", table, "-o", afile / "t.json"], ok=False), "cannot write")
    (tmp_path / "sub").mkdir()
    _one_line_error(_run(["synth", "targets", table, "-o", tmp_path / "sub"], ok=False), "is a directory")


# -- synthesize: a group's commit is atomic ------------------------------------------------------
def test_synthesis_group_commit_is_one_line_and_a_torn_one_is_dropped(tmp_path):
    from safetyscope.synthesis.synthesize import PartialFile

    path = tmp_path / "o.jsonl.partial.jsonl"
    p = PartialFile(path, {"key": "k"})
    p.commit([{"prompt": "a"}, {"prompt": "b"}], [{"target": 1, "status": "kept"}, {"target": 2, "status": "kept"}])
    assert len(path.read_text().splitlines()) == 2  # header + one line for the whole group
    whole = path.read_bytes()
    line = json.dumps({"kind": "group", "rows": [{"prompt": "c"}], "done": [{"target": 3, "status": "kept"}]})
    with open(path, "ab") as f:  # killed in the middle of the next group's write
        f.write(line[: line.index('"done"') + 3].encode())
    q = PartialFile(path, {"key": "k"})
    assert [r["prompt"] for r in q.rows] == ["a", "b"] and sorted(q.done) == [1, 2]
    assert path.read_bytes() == whole  # the torn tail is cut, so the next commit starts on a clean line
    path.write_bytes(b'{"kind": "hea')  # killed while writing the header: a fresh start, not an error
    assert PartialFile(path, {"key": "k"}).rows == []
    # a run with other settings that stopped before its first group does not block the corrected command ...
    assert PartialFile(path, {"key": "other"}).rows == [] and json.loads(path.read_text())["key"] == "other"
    # ... but one holding finished groups is never silently discarded
    PartialFile(path, {"key": "other"}).commit([{"prompt": "a"}], [{"target": 1, "status": "kept"}])
    with pytest.raises(SafetyScopeError, match="interrupted run with other"):
        PartialFile(path, {"key": "k"})


def test_feature_cache_disk_full_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """The cache only saves time: a full disk while storing codes disables it with one warning line."""
    from safetyscope.features import _FeatureCache

    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))
    cache = _FeatureCache("test-key")

    class FullDisk:
        def executemany(self, *a):
            raise sqlite3.OperationalError("database or disk is full")

        def rollback(self):
            pass

        def close(self):
            pass

    cache.db = FullDisk()
    import numpy as np

    cache.put_many({"h": ((np.zeros(1, np.int32), np.zeros(1, np.float32)), np.zeros(1), 1)})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "database or disk is full" in err[0]
    assert "--no-cache" in err[0] and cache.db is None
    cache.put_many({"h2": ((np.zeros(1, np.int32), np.zeros(1, np.float32)), np.zeros(1), 1)})  # disabled: no-op


def test_synthesis_disk_full_is_one_line_and_keeps_finished_groups(tmp_path, monkeypatch):
    from safetyscope.synthesis import synthesize as synth_mod

    path = tmp_path / "o.jsonl.partial.jsonl"
    p = synth_mod.PartialFile(path, {"key": "k"})
    p.commit([{"prompt": "a"}], [{"target": 1, "status": "kept"}])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synth_mod.os, "fsync", full)
    with pytest.raises(SafetyScopeError, match="disk full.*rerun the same command"):
        p.commit([{"prompt": "b"}], [{"target": 2, "status": "kept"}])
    monkeypatch.undo()
    assert sorted(synth_mod.PartialFile(path, {"key": "k"}).done)[0] == 1


def test_classify_and_features_manifests_record_the_same_extraction_settings(classifier, table):
    """A resume must refuse parts made with other extraction settings: both jobs' manifests take them from one
    place (FeatureExtractor.run_settings), so neither can leave one out."""
    from safetyscope.discovery.classify import _manifest
    from safetyscope.discovery.detector import Detector
    from safetyscope.features_file import identity, manifest

    det = Detector.load(classifier, dtype="float32", batch_size=5)
    settings = det.extractor.run_settings()
    assert settings == {"max_length": 256, "skip_first_token": det.extractor.skip_first_token, "pool": "max",
                        "dtype": "torch.float32",
                        "device": "cpu", "batch_size": 5, "batch_tokens": det.extractor.batch_tokens}
    by_classify = _manifest(table, det, "text", 3)
    by_features = manifest(str(table), identity(det.extractor), "text", 3)
    assert {k: by_classify[k] for k in settings} == {k: by_features[k] for k in settings} == settings
