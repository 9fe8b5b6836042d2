"""A fresh bad-input run over every command (issue 28's target: at most 2 % of cases not a clear one-line error or a
correct result). Each case runs `python -m safetyscope ...` in a subprocess on the tiny test model and SAE (built
here as tests/conftest.py builds them) and is classified automatically:

* error:   exit 2, exactly one `error: ` line, no traceback, and the line names what the case expects (the option,
           the field, the file); an error line that does not name it is a failure (misleading) to read by hand;
* correct: exit 0 and the case's stated expectation holds (a check on the written output);
* failure: anything else (a traceback, another exit code, exit 0 with a wrong result).

Usage: python scripts/bad_input_run.py [--out reports/bad-input] [--only SUBSTRING] [--jobs 2]
Writes OUT/results.json (one record per case) and OUT/report.md (the table and the counts)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@dataclass
class Case:
    name: str
    args: list  # argv after `python -m safetyscope`; str() of each
    expect: str  # "error" | "ok" | "either" (a clear error naming `words`, or a correct result)
    words: tuple = ()  # the error line must hold one of these (case-insensitive)
    check: Callable[[], str | None] | None = None  # correct result: None if right, else what is wrong
    why: str = ""  # what a correct result is (stated per case)
    stdin: bytes | None = None
    env: dict = field(default_factory=dict)
    out_check: Callable[[str], str | None] | None = None  # a check of what the command printed (stdout)


class Ctx:
    """The files every case builds on: tiny model, SAE, a labelled table, a classifier, a targets file, a trained SAE."""

    def __init__(self, root: Path):
        import torch
        from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, build_tiny_model, random_sae_tensors

        self.root = root
        self.layer = SAE_LAYERS[0]
        self.model = build_tiny_model(root / "tiny model")  # a path with a space in it, on purpose
        self.sae = root / "sae" / "SAE-Res-Tiny-W256-L0_8"
        self.sae.mkdir(parents=True)
        for n in SAE_LAYERS:
            torch.save(random_sae_tensors(seed=100 + n), self.sae / f"layer{n}.sae.pt")
        rows = [{"id": f"r{i}", "text": t, "prompt": t, "completion": "I'm sorry, I can't help with that.",
                 "label": "toxic" if any(w in t for w in TOXIC_WORDS) else "clean", "lang": "en",
                 "split": "test" if i % 4 == 0 else "discovery"} for i, t in enumerate(CORPUS * 4)]
        self.rows = rows
        self.data = root / "data.parquet"
        pl.DataFrame(rows).write_parquet(self.data)
        self.csv = root / "data.csv"
        pl.DataFrame(rows).write_csv(self.csv)
        self.texts = root / "texts.csv"
        pl.DataFrame({"text": CORPUS}).write_csv(self.texts)
        self.m = ["--model", self.model, "--sae", self.sae, "--layer", self.layer, "--dtype", "float32"]
        self.clf = root / "clf.json"
        self._run(["discover", self.data, "-o", self.clf, *self.m, "--max-features", 3])
        self.targets = root / "targets.json"
        self._run(["synth", "targets", self.data, "-o", self.targets, "--label-column", "label", "--text-column", "text",
                   "--min-delta", "0.05", "--min-precision", "0", "--fdr", "1", "--judge-classifier", "none", *self.m])
        self.trained = root / "trained-sae"
        self._run(["sae", "train", "--model", self.model, "--layer", self.layer, "--corpus", self.texts, "--width", 32,
                   "--k", 4, "--max-tokens", 300, "--epochs", 1, "--model-dtype", "float32", "-o", self.trained])
        self.n = 0

    def _run(self, args):
        r = subprocess.run([sys.executable, "-m", "safetyscope", *map(str, args)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"setup failed: {args}\n{r.stderr[-3000:]}")

    def path(self, name: str) -> Path:
        """A fresh directory per case, holding ``name`` (not created)."""
        self.n += 1
        d = self.root / f"case{self.n:03d}"
        d.mkdir()
        return d / name

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.path(name)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def table(self, name: str, df: pl.DataFrame) -> Path:
        p = self.path(name)
        {".parquet": df.write_parquet, ".csv": df.write_csv, ".jsonl": df.write_ndjson}[p.suffix](p)
        return p

    def edited_json(self, src: Path, edit: Callable[[dict], None], name: str = "edited.json") -> Path:
        d = json.loads(src.read_text())
        edit(d)
        return self.file(name, json.dumps(d))

    def edited_sae(self, edit: Callable[[dict], None]) -> Path:
        p = self.path("sae")
        shutil.copytree(self.trained, p)
        c = json.loads((p / "config.json").read_text())
        edit(c)
        (p / "config.json").write_text(json.dumps(c))
        return p


# -- checks of a correct result ------------------------------------------------------------------------------------
def read_out(p: Path) -> pl.DataFrame:
    if p.is_dir():
        return pl.concat([pl.read_parquet(f) for f in sorted(p.glob("*.parquet"))])
    return {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".jsonl": pl.read_ndjson}[p.suffix](p)


def has_rows(p: Path, n: int, *cols: str) -> Callable[[], str | None]:
    def check():
        if not p.exists():
            return f"{p.name} was not written"
        df = read_out(p)
        if df.height != n:
            return f"{df.height} rows, want {n}"
        missing = [c for c in cols if c not in df.columns]
        return f"no column(s) {missing}" if missing else None
    return check


def classified(p: Path, n: int, ok_status=("ok",)) -> Callable[[], str | None]:
    """classify's output: n rows, a verdict and a score on every ok row."""
    def check():
        bad = has_rows(p, n, "toxic", "score", "status")()
        if bad:
            return bad
        df = read_out(p).filter(pl.col("status").is_in(list(ok_status)))
        return "a verdict is null on an ok row" if df["toxic"].null_count() else None
    return check


def same_as(p: Path, ref: Path, cols=("toxic", "score")) -> Callable[[], str | None]:
    def check():
        if not p.exists():
            return f"{p.name} was not written"
        a, b = read_out(p), read_out(ref)
        return None if a.select(cols).equals(b.select(cols)) else "differs from the plain run's output"
    return check


def unchanged(p: Path) -> Callable[[], str | None]:
    before = p.read_bytes()
    return lambda: None if p.read_bytes() == before else f"{p} was changed"


def all_of(*checks):
    def check():
        for c in checks:
            bad = c()
            if bad:
                return bad
        return None
    return check


def json_has(p: Path, key: str) -> Callable[[], str | None]:
    def check():
        if not p.exists():
            return f"{p.name} was not written"
        return None if key in json.loads(p.read_text()) else f"no {key!r} in {p.name}"
    return check


# -- the cases -----------------------------------------------------------------------------------------------------
def cases(c: Ctx) -> list[Case]:  # noqa: C901 (one flat list is the clearest form)
    from conftest import CORPUS

    L: list[Case] = []
    n = len(c.rows)

    def err(name, args, *words, stdin=None):
        L.append(Case(name, args, "error", words, stdin=stdin))

    def ok(name, args, check, why, stdin=None):
        L.append(Case(name, args, "ok", (), check, why, stdin=stdin))

    def either(name, args, words, check, why):
        L.append(Case(name, args, "either", tuple(words), check, why))

    def cls(*extra, data=None, out=None, clf=None):
        return ["classify", data or c.data, "-o", out or c.path("o.parquet"), "-c", clf or c.clf, "--dtype", "float32",
                "--no-cache", *extra]

    def feats(*extra, data=None, out=None, m=None):
        return ["features", data or c.texts, "-o", out or c.path("f.parquet"), *(m or c.m), "--no-cache", *extra]

    def disc(*extra, data=None):
        return ["discover", data or c.data, "-o", c.path("d.json"), *c.m, "--max-features", 2, *extra]

    # classify: option values
    err("classify --chunk-rows 0", cls("--chunk-rows", 0), "--chunk-rows")
    err("classify --chunk-rows -3", cls("--chunk-rows", -3), "--chunk-rows")
    err("classify --chunk-rows abc", cls("--chunk-rows", "abc"), "--chunk-rows")
    err("classify --batch-size -1", cls("--batch-size", -1), "--batch-size")
    err("classify --batch-tokens 0", cls("--batch-tokens", 0), "--batch-tokens")
    err("classify --text-column nope", cls("--text-column", "nope"), "nope")
    err("classify --lang-column nope", cls("--lang-column", "nope"), "--lang-column")
    err("classify --dtype int8", cls("--dtype", "int8"), "dtype")  # names the value and lists the dtypes
    err("classify --device cuda:7 (no GPU)", cls("--device", "cuda:7"), "cuda")
    err("classify --device ''", cls("--device", ""), "device")
    err("classify --workers 0 --engine ray", cls("--engine", "ray", "--workers", 0), "--workers", "ray")
    err("classify --cpus-per-worker -1 --engine ray", cls("--engine", "ray", "--cpus-per-worker", -1),
        "--cpus-per-worker", "ray")
    # classify: the classifier argument
    err("classify -c missing.json", cls(clf=c.root / "missing.json"), "missing.json")
    err("classify -c a directory", cls(clf=c.sae), str(c.sae.name))
    err("classify -c a CSV file", cls(clf=c.csv), "data.csv")
    err("classify -c a JSON array", cls(clf=c.file("arr.json", "[1, 2]")), "arr.json")
    err("classify -c an empty file", cls(clf=c.file("empty.json", "")), "empty.json")
    err("classify -c a targets file", cls(clf=c.targets), "targets")
    # classify: the input
    err("classify INPUT a directory", cls(data=c.sae.parent), "sae")
    err("classify INPUT missing", cls(data=c.root / "nope.parquet"), "nope.parquet")
    err("classify INPUT .txt", cls(data=c.file("t.txt", "hello\n")), ".txt")
    err("classify INPUT random bytes .parquet", cls(data=c.file("bad.parquet", os.urandom(300))), "bad.parquet")
    err("classify INPUT parquet, text a list column", cls(data=c.table("l.parquet", pl.DataFrame({"text": [["a"], ["b"]]}))),
        "text")
    err("classify INPUT parquet, text a struct column",
        cls(data=c.table("s.parquet", pl.DataFrame({"text": [{"a": "x"}, {"a": "y"}]}))), "text")
    err("classify INPUT parquet, text Float64", cls(data=c.table("f.parquet", pl.DataFrame({"text": [1.5, 2.5]}))), "text")
    err("classify INPUT parquet, text Boolean", cls(data=c.table("b.parquet", pl.DataFrame({"text": [True, False]}))), "text")
    nullt = c.path("o.parquet")
    either("classify INPUT a null text", cls(data=c.table("n.parquet", pl.DataFrame({"text": ["hello there", None]})),
                                             out=nullt), ["null", "empty"], _null_marked(nullt),
           "an error naming the null text, or 2 rows with the null one not scored 'ok'")
    err("classify INPUT parquet with no rows", cls(data=c.table("z.parquet", pl.DataFrame({"text": []}, schema={"text": pl.String}))),
        "no rows")
    err("classify INPUT CSV, tab-separated", cls(data=c.file("tabs.csv", "text\tlabel\nhello there\t1\n")), "text")
    err("classify INPUT CSV, latin-1 bytes", cls(data=c.file("latin.csv", "text\ncaf\xe9 au lait\n".encode("latin-1"))),
        "utf", "latin.csv")
    err("classify INPUT JSONL, a line not an object", cls(data=c.file("arr.jsonl", '{"text": "a"}\n[1, 2]\n')), "arr.jsonl")
    err("classify -o .xlsx", cls(out=c.path("o.xlsx")), ".xlsx")
    err("classify -o under /proc (read-only fs)", cls(out="/proc/safetyscope-out.parquet"), "/proc")
    err("classify -o an existing symlink to a user file",
        cls(out=_symlink(c, c.file("mine.parquet", b"mine"))), "already exists")
    err("classify -o the classifier file --overwrite", cls("--overwrite", out=c.clf), "json", "output format")
    err("classify -o a path under a file", cls(out=c.texts / "o.parquet"), "texts.csv", "not a directory")
    ok_path = c.path("sp ace d/o u t.parquet")
    ok_path.parent.mkdir()
    ok("classify paths with spaces", cls(data=c.table("in put.csv", pl.DataFrame({"text": CORPUS})), out=ok_path),
       classified(ok_path, len(CORPUS)), "all 15 rows classified")
    link_out = c.path("o.parquet")
    ok("classify INPUT a symlink", cls(data=_symlink(c, c.data), out=link_out), classified(link_out, n),
       "the target's 60 rows classified")
    ref = c.path("ref.parquet")
    subprocess.run([sys.executable, "-m", "safetyscope", *map(str, cls(data=c.texts, out=ref))], capture_output=True)
    crlf = c.path("o.parquet")
    crlf_csv = c.path("crlf.csv")
    crlf_csv.write_bytes(pl.DataFrame({"text": CORPUS}).write_csv().replace("\n", "\r\n").encode())
    ok("classify INPUT CSV with CRLF line ends", cls(data=crlf_csv, out=crlf),
       all_of(classified(crlf, 15), same_as(crlf, ref)), "the same verdicts and scores as the LF file")
    dup = c.path("o.parquet")
    either("classify INPUT CSV, two 'text' columns", cls(data=c.file("dup.csv", "text,text\nhello there,b\nnice day,c\n"),
                                                        out=dup), ["text", "duplicate"], classified(dup, 2),
           "an error naming the duplicate column, or 2 rows classified")
    emp = c.path("o.parquet")
    ok("classify an empty and a blank text among others",
       cls(data=c.table("e.parquet", pl.DataFrame({"text": ["hello there", "", "   ", "nice day"]})), out=emp),
       has_rows(emp, 4, "status"), "4 rows, each with a status (empty texts marked, not dropped)")
    huge = c.path("o.parquet")
    ok("classify a 2 MB text", cls(data=c.table("h.parquet", pl.DataFrame({"text": ["you idiot " * 200_000, "hi"]})),
                                   out=huge), classified(huge, 2), "2 rows (the long text truncated to max_length)")
    uni = c.path("o.jsonl")
    ok("classify unicode texts (CJK, RTL, emoji, combining)",
       cls(data=c.table("u.jsonl", pl.DataFrame({"text": ["日本語のテキスト", "مرحبا بالعالم", "🔥💀🙂", "e\u0301\u200b"]})),
           out=uni), has_rows(uni, 4, "status"), "4 rows written as JSON Lines")
    nul = c.path("o.parquet")
    either("classify a text holding NUL characters",
           cls(data=c.table("nul.parquet", pl.DataFrame({"text": ["hello\x00there", "nice day"]})), out=nul),
           ["nul", "\\x00"], has_rows(nul, 2, "status"), "2 rows, or an error naming the NUL")
    ids = c.path("o.parquet")
    ok("classify a numeric id column and extra columns kept",
       cls(data=c.table("ids.parquet", pl.DataFrame({"id": [1.5, 2.5], "text": ["a b", "c d"], "x": [[1], [2]]})), out=ids),
       has_rows(ids, 2, "id", "x"), "the input's columns kept, 2 rows")
    csv_nested = c.path("o.csv")
    ok("classify a parquet with a nested column, -o .csv",
       cls(data=c.table("nest.parquet", pl.DataFrame({"text": ["a b", "c d"], "meta": [{"k": [1]}, {"k": [2]}]})),
           out=csv_nested), has_rows(csv_nested, 2, "meta"), "a CSV (nested columns as JSON text)")
    stdin_out = c.path("o.parquet")
    either("classify INPUT '-' (stdin)", cls(data="-", out=stdin_out), ["'-'", "stdin", "-:"], classified(stdin_out, 2),
           "an error saying '-' (stdin) is not read, or the 2 rows given")
    L[-1].stdin = b"text\nhello there\nyou idiot\n"

    # classifier file fields
    clf = c.clf

    def ce(name, edit, *words):
        err(f"classifier file: {name}", cls(clf=c.edited_json(clf, edit)), *words)

    ce("rule.kind 'bogus'", lambda d: d["rule"].update(kind="bogus"), "bogus")
    ce("no rule", lambda d: d.pop("rule"), "rule")
    ce("rule.features[0].id -1", lambda d: d["rule"]["features"][0].update(id=-1), "id")
    ce("rule.features[0].id 256 (= d_sae)", lambda d: d["rule"]["features"][0].update(id=256), "id", "256")
    ce("rule.features[0].id 'x'", lambda d: d["rule"]["features"][0].update(id="x"), "id")
    ce("rule.features[0].threshold 'abc'", lambda d: d["rule"]["features"][0].update(threshold="abc"), "threshold")
    ce("rule.features[0].threshold NaN", lambda d: d["rule"]["features"][0].update(threshold=float("nan")), "threshold")
    ce("rule.features a string", lambda d: d["rule"].update(features="8,246"), "features")
    ce("rule.features[0] a number", lambda d: d["rule"].update(features=[8]), "features")
    ce("layer '1'", lambda d: d.update(layer="1"), "layer")
    ce("layer -1", lambda d: d.update(layer=-1), "layer")
    ce("layer 99", lambda d: d.update(layer=99), "layer")
    ce("sae.d_sae 999", lambda d: d["sae"].update(d_sae=999), "d_sae", "999")
    ce("sae.k -1", lambda d: d["sae"].update(k=-1), "sae.k")
    ce("sae.k 'eight'", lambda d: d["sae"].update(k="eight"), "sae.k")
    ce("model.fingerprint changed", lambda d: d["model"].update(fingerprint="sha256:" + "0" * 64), "fingerprint")
    ce("model.id a missing path", lambda d: d["model"].update(id=str(c.root / "gone")), "gone", "--model")
    ce("model a string", lambda d: d.update(model="tiny"), "model")
    ce("extraction.max_length 0", lambda d: d["extraction"].update(max_length=0), "max_length")
    ce("extraction.max_length -5", lambda d: d["extraction"].update(max_length=-5), "max_length")
    ce("extraction.max_length 1.5", lambda d: d["extraction"].update(max_length=1.5), "max_length")
    ce("extraction a list", lambda d: d.update(extraction=[256]), "extraction")
    ce("validation.languages [1, 2]", lambda d: d["validation"].update(languages=[1, 2]), "languages")
    ce("validation a list", lambda d: d.update(validation=["en"]), "validation")
    ce("discovery_data.per_lang a string", lambda d: d["discovery_data"].update(per_lang="en"), "per_lang")
    ce("format 'safetyscope-sae'", lambda d: d.update(format="safetyscope-sae"), "format", "classifier")
    params_out, params_ref = c.path("o.parquet"), c.path("ref.parquet")
    subprocess.run([sys.executable, "-m", "safetyscope", *map(str, cls(out=params_ref))], capture_output=True)
    ok("classifier file: rule.params.threshold -inf",
       cls(clf=c.edited_json(clf, lambda d: d["rule"]["params"].update(threshold=float("-inf"))), out=params_out),
       same_as(params_out, params_ref), "the same verdicts: params are the fitting settings (a refit reads them); "
       "each feature's own threshold decides")
    bom_out = c.path("o.parquet")
    bom = c.file("bom.json", b"\xef\xbb\xbf" + clf.read_bytes())
    either("classifier file with a UTF-8 BOM", cls(clf=bom, out=bom_out), ["bom.json"], classified(bom_out, n),
           "read as the same classifier, or an error naming the file")
    noext = c.path("o.parquet")
    ok("classifier file without 'extraction'", cls(clf=c.edited_json(clf, lambda d: d.pop("extraction")), out=noext),
       classified(noext, n), "the SAE's defaults used; 60 rows")

    # features: option values, model and SAE paths
    err("features --layer -1", feats("--layer", -1), "--layer")
    err("features --layer 99", feats("--layer", 99), "layer", "99")
    err("features --layer abc", feats("--layer", "abc"), "--layer")
    err("features --k 0", feats("--k", 0), "--k")
    err("features --k 100000", feats("--k", 100000), "--k", "k")
    err("features --max-length 0", feats("--max-length", 0), "--max-length")
    err("features --max-length -1", feats("--max-length", -1), "--max-length")
    err("features --batch-tokens -1", feats("--batch-tokens", -1), "--batch-tokens")
    err("features --layers ''", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model, "--sae", c.sae,
                                 "--layers", ""], "--layers")
    err("features --layers 1,1", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model, "--sae", c.sae,
                                  "--layers", "1,1"], "--layers", "1")
    err("features --model missing dir", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.root / "gone",
                                         "--sae", c.sae, "--layer", 1], "gone")
    err("features --model a CSV file", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.csv, "--sae", c.sae,
                                        "--layer", 1], "data.csv", "model")
    err("features --model an empty directory", ["features", c.texts, "-o", c.path("f.parquet"), "--model",
                                                _mkdir(c.path("empty")), "--sae", c.sae, "--layer", 1], "empty", "model")
    err("features --sae missing", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model,
                                   "--sae", c.root / "nosae", "--layer", 1], "nosae")
    bad_pt = c.path("SAE-Res-X-W256-L0_8")
    bad_pt.mkdir()
    (bad_pt / "layer1.sae.pt").write_bytes(os.urandom(500))
    err("features --sae a .pt of random bytes", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model,
                                                 "--sae", bad_pt, "--layer", 1], "layer1.sae.pt", "sae")
    pk = c.path("SAE-Res-P-W256-L0_8")
    pk.mkdir()
    ran = c.root / "payload-ran"
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    (pk / "layer1.sae.pt").write_bytes(pickle.dumps({"W_enc": Payload()}))
    err("features --sae a pickled .pt with a payload", ["features", c.texts, "-o", c.path("f.parquet"), "--model",
                                                        c.model, "--sae", pk, "--layer", 1], "layer1.sae.pt", "sae")

    def se(name, edit, *words):
        err(f"SAE config: {name}", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model,
                                    "--sae", c.edited_sae(edit), "--dtype", "float32", "--no-cache"], *words)

    se("k '4'", lambda d: d.update(k="4"), "k")
    se("k 0", lambda d: d.update(k=0), "k")
    se("k 99 (> d_sae)", lambda d: d.update(k=99), "k")
    se("d_sae -1", lambda d: d.update(d_sae=-1), "d_sae")
    se("d_sae 64 (weights hold 32)", lambda d: d.update(d_sae=64), "d_sae", "shape")
    se("d_model 99", lambda d: d.update(d_model=99), "d_model", "99")
    se("activation 'foo'", lambda d: d.update(activation="foo"), "activation")
    se("layer 'x'", lambda d: d.update(layer="x"), "layer")
    se("layer -3", lambda d: d.update(layer=-3), "layer")
    se("format 'other'", lambda d: d.update(format="other"), "format", "config")
    se("an empty object", lambda d: d.clear(), "config")
    nocfg = c.path("sae")
    shutil.copytree(c.trained, nocfg)
    (nocfg / "config.json").unlink()
    err("SAE dir without config.json", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model,
                                        "--sae", nocfg], "config.json", "sae")
    badjson = c.path("sae")
    shutil.copytree(c.trained, badjson)
    (badjson / "config.json").write_text("{not json")
    err("SAE config.json not JSON", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model,
                                     "--sae", badjson], "config.json")
    trunc = c.path("sae")
    shutil.copytree(c.trained, trunc)
    w = trunc / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    err("SAE safetensors truncated", ["features", c.texts, "-o", c.path("f.parquet"), "--model", c.model,
                                      "--sae", trunc], "sae.safetensors", "sae")
    f64 = c.path("f.parquet")
    either("features --dtype float64", feats("--dtype", "float64", out=f64), ["--dtype", "float64"],
           has_rows(f64, 15, "feature_ids"), "15 rows, or an error naming the dtype")
    one = c.path("f.parquet")
    ok("features --chunk-rows 1", feats("--chunk-rows", 1, out=one), has_rows(one, 15, "feature_ids"),
       "15 rows, one part each, assembled in order")
    shards = c.path("shards")
    ok("features --keep-shards", feats("--keep-shards", "--chunk-rows", 4, out=shards),
       has_rows(shards, 15, "feature_ids"), "a directory of parts holding the 15 rows")
    ucol = c.path("f.parquet")
    ok("features a unicode column name", feats("--text-column", "texte ü", out=ucol,
                                              data=c.table("u.parquet", pl.DataFrame({"texte ü": CORPUS}))),
       has_rows(ucol, 15, "feature_ids"), "15 rows")
    err("features --keep-shards with --layers", ["features", c.texts, "-o", c.path("f"), "--model", c.model, "--sae",
                                                 c.sae, "--layers", "1,3", "--keep-shards"], "--keep-shards", "--layers")
    err("features --batch-size 0 (conflicts with nothing)", feats("--batch-size", 0), "--batch-size")
    err("features --text-column label (not text)", feats("--text-column", "label", data=c.table(
        "lab.parquet", pl.DataFrame({"text": ["a", "b"], "label": [1, 0]}))), "label")
    err("features INPUT JSON (not JSON Lines)", feats(data=c.file("a.json", '[{"text": "a"}]')), ".json")

    # discover
    err("discover --max-features 0", disc("--max-features", 0), "--max-features")
    err("discover --max-features -2", disc("--max-features", -2), "--max-features")
    err("discover --fpr-cap 2", disc("--fpr-cap", 2), "--fpr-cap")
    err("discover --fpr-cap abc", disc("--fpr-cap", "abc"), "--fpr-cap")
    err("discover --target-fpr 1.5", disc("--target-fpr", 1.5), "--target-fpr")
    err("discover --label-column nope", disc("--label-column", "nope"), "nope")
    err("discover --split nosuch", disc("--split", "nosuch"), "nosuch", "split")
    err("discover --lang zz", disc("--lang", "zz"), "zz")
    err("discover --group-column nope", disc("--group-column", "nope"), "nope")
    err("discover --scan-layers 1,99", disc("--scan-layers", "1,99"), "99", "layer")
    err("discover --threshold nan", disc("--threshold", "nan"), "--threshold")
    err("discover --threshold inf", disc("--threshold", "inf"), "--threshold")

    def labels(vals, name):
        return c.table(name, pl.DataFrame({"text": [r["text"] for r in c.rows],
                                           "label": [vals[i % len(vals)] for i in range(n)]}))

    yn = c.path("d.json")
    ok("discover labels 'yes'/'no'", ["discover", labels(["yes", "no", "no"], "yn.parquet"), "-o", yn, *c.m,
                                      "--max-features", 2], json_has(yn, "rule"),
       "a classifier file: yes/no are documented labels (data.POSITIVE/NEGATIVE)")
    err("discover labels 2/0", disc(data=labels([2, 0, 0], "20.parquet")), "label", "2")
    err("discover labels with NaN", disc(data=labels([1.0, 0.0, float("nan")], "nan.parquet")), "label", "nan")
    err("discover labels with nulls", disc(data=labels(["toxic", "clean", None], "null.parquet")), "label", "null")
    err("discover one label only", disc(data=labels(["clean"], "one.parquet")), "label", "toxic")
    err("discover labels a list column", disc(data=c.table("ll.parquet", pl.DataFrame(
        {"text": [r["text"] for r in c.rows], "label": [[1]] * n}))), "label")
    bl = c.path("d.json")
    ok("discover labels true/false (booleans)", ["discover", labels([True, False, False], "bool.parquet"), "-o", bl, *c.m,
                                                 "--max-features", 2], json_has(bl, "rule"),
       "a classifier file (booleans are labels)")

    # explain
    err("explain no texts and no --input", ["explain", c.clf], "--input", "text")
    err("explain --input a directory", ["explain", c.clf, "--input", c.sae.parent], "sae")
    err("explain missing classifier", ["explain", c.root / "none.json", "hello"], "none.json")
    err("explain --limit abc", ["explain", c.clf, "--input", c.data, "--limit", "abc"], "--limit")
    err("explain --text-column nope", ["explain", c.clf, "--input", c.data, "--text-column", "nope"], "nope")
    L.append(Case("explain texts and --input both", ["explain", c.clf, "hello there", "--input", c.data, "--limit", 3,
                                                     "--json"], "ok", (), None,
                  "the argument text and the first 3 rows of --input: 4 JSON lines",
                  out_check=lambda o: None if len([ln for ln in o.splitlines() if ln.startswith("{")]) == 4
                  else f"{len(o.splitlines())} lines printed, want 4"))

    # eval, overlap
    def ev(*extra, data=None):
        return ["eval", data or c.data, "-o", c.path("rep"), *c.m, "--skip", "transfer,efficiency,random_sae", *extra]

    err("eval --langs zz", ev("--langs", "zz"), "zz")
    err("eval --methods bogus", ev("--methods", "bogus"), "bogus")
    err("eval --group-column nope", ev("--group-column", "nope"), "nope")
    err("eval data without a split column", ev(data=c.table("nosplit.parquet", pl.DataFrame(
        {"text": [r["text"] for r in c.rows], "label": [r["label"] for r in c.rows], "lang": ["en"] * n}))), "split")
    err("eval --fractions 0", ev("--fractions", "0"), "--fractions")
    err("eval --scan-layers 99", ev("--scan-layers", "99"), "99")
    err("overlap --name for 1 of 2 datasets", ["overlap", c.data, c.texts, "-o", c.path("ov"), *c.m, "--name", "a"],
        "--name")
    err("overlap --pool bogus", ["overlap", c.data, "-o", c.path("ov"), *c.m, "--pool", "bogus"], "--pool")
    err("overlap --text-column nope", ["overlap", c.data, "-o", c.path("ov"), *c.m, "--text-column", "nope"], "nope")
    ovd = c.path("ov")
    ok("overlap the same file twice", ["overlap", c.texts, c.texts, "-o", ovd, *c.m, "--name", "a", "--name", "b"],
       _overlap_one(ovd), "overlap 1.0 between the two copies")

    # steer
    def st(*extra):
        return ["steer", c.data, "--text-column", "prompt", "-o", c.path("s.jsonl"), *c.m, "--max-new-tokens", 2,
                *extra]

    err("steer --feature 3 (no strength)", st("--feature", "3"), "--feature")
    err("steer --feature x:1", st("--feature", "x:1"), "--feature")
    err("steer --feature 99999:1", st("--feature", "99999:1"), "99999")
    err("steer --feature 3:nan", st("--feature", "3:nan"), "--feature", "nan")
    err("steer --feature 3:inf", st("--feature", "3:inf"), "--feature", "inf")
    err("steer --clamp 3:-1", st("--clamp", "3:-1"), "clamp")
    err("steer --max-new-tokens 0", st("--feature", "3:1", "--max-new-tokens", 0), "--max-new-tokens")
    err("steer --positions bogus", st("--feature", "3:1", "--positions", "bogus"), "--positions")
    err("steer --suppress without -c", st("--suppress"), "--suppress", "-c")
    err("steer --text-column nope", ["steer", c.data, "--text-column", "nope", "-o", c.path("s.jsonl"), *c.m,
                                     "--feature", "3:1"], "nope")
    err("steer no edit given", st(), "--feature", "--clamp")

    # sae train
    def tr(*extra):
        return ["sae", "train", "--model", c.model, "--layer", 1, "--corpus", c.texts, "--width", 16, "--k", 2,
                "--max-tokens", 100, "--epochs", 1, "--model-dtype", "float32", "-o", c.path("sae"), *extra]

    err("sae train --width 0", tr("--width", 0), "--width")
    err("sae train --k 0", tr("--k", 0), "--k")
    err("sae train --k 64 > --width 16", tr("--k", 64), "--k")
    err("sae train --held-out 1.5", tr("--held-out", 1.5), "--held-out")
    err("sae train --held-out -0.1", tr("--held-out", -0.1), "--held-out")
    err("sae train --batch-tokens 0", tr("--batch-tokens", 0), "--batch-tokens")
    err("sae train --dead-tokens -1", tr("--dead-tokens", -1), "--dead-tokens")
    err("sae train --layer 99", tr("--layer", 99), "layer")
    err("sae train --corpus missing", tr("--corpus", c.root / "nocorpus.csv"), "nocorpus.csv")
    err("sae train --corpus a directory", tr("--corpus", c.sae.parent), "sae")
    err("sae train --model-dtype bogus", tr("--model-dtype", "bogus"), "dtype")
    err("sae train --epochs 0", tr("--epochs", 0), "--epochs")
    err("sae train --batch-size 0", tr("--batch-size", 0), "--batch-size")
    err("sae train --max-length 0", tr("--max-length", 0), "--max-length")
    err("sae train --text-column nope", tr("--text-column", "nope"), "nope")
    err("sae info on a missing directory", ["sae", "info", c.root / "nowhere"], "nowhere")
    err("sae info --layer -1", ["sae", "info", c.sae, "--layer", -1], "--layer", "layer")
    L.append(Case("sae info on a trained SAE", ["sae", "info", c.trained], "ok", (), None,
                  "prints the config with its d_sae", out_check=lambda o: None if "d_sae" in o else "no d_sae printed"))

    # synth targets, coverage, synthesize, audit
    def tg(*extra, data=None):
        return ["synth", "targets", data or c.data, "-o", c.path("t.json"), "--text-column", "text", *c.m,
                "--judge-classifier", "none", *extra]

    err("synth targets --max-targets 0", tg("--max-targets", 0), "--max-targets")
    err("synth targets --max-fire-rate 2", tg("--max-fire-rate", 2), "--max-fire-rate")
    err("synth targets --min-precision 1.5", tg("--min-precision", 1.5), "--min-precision")
    err("synth targets --fdr 0", tg("--fdr", 0), "--fdr")
    err("synth targets --label-column nope", tg("--label-column", "nope"), "nope")
    err("synth targets labels 'maybe'", tg(data=c.table("maybe.parquet", pl.DataFrame(
        {"text": [r["text"] for r in c.rows], "label": ["maybe", "harmful", "benign"] * (n // 3)}))), "label", "maybe")
    err("synth targets --judge-classifier missing.json", tg("--judge-classifier", c.root / "missing.json"), "missing.json")

    def te(name, edit, *words):
        err(f"targets file: {name}", ["coverage", c.data, "--targets", c.edited_json(c.targets, edit),
                                      "--text-column", "text", "--dtype", "float32"], *words)

    te("targets a dict", lambda d: d.update(targets={"id": 1}), "targets")
    te("targets[0] a number", lambda d: d.update(targets=[3]), "targets[0]")
    te("targets[0].label 'neutral'", lambda d: d["targets"][0].update(label="neutral"), "label")
    te("layer 'x'", lambda d: d.update(layer="x"), "layer")
    te("no targets key", lambda d: d.pop("targets"), "targets")
    te("sae.d_sae 'big'", lambda d: d["sae"].update(d_sae="big"), "d_sae")
    empty_t = c.edited_json(c.targets, lambda d: d.update(targets=[]))
    either("targets file: an empty target list", ["coverage", c.data, "--targets", empty_t, "--text-column", "text",
                                                 "--dtype", "float32"], ["targets", "no target"], lambda: None,
           "an error saying there are no targets, or coverage of nothing reported (exit 0)")
    err("coverage --text-column nope", ["coverage", c.data, "--targets", c.targets, "--text-column", "nope"], "nope")
    cov = c.path("cov.json")
    ok("coverage -o a new report", ["coverage", c.data, "--targets", c.targets, "--text-column", "text", "--dtype",
                                    "float32", "-o", cov], json_has(cov, "coverage"), "a JSON report with 'coverage'")

    def sy(*extra):
        return ["synthesize", "--targets", c.targets, "--seed-data", c.data, "--text-column", "text", "-o",
                c.path("s.jsonl"), "--generator", c.model, "--dtype", "float32", "--classifier", "none",
                "--judge-classifier", c.clf, "--no-audit", *extra]

    err("synthesize --budget 0", sy("--budget", 0), "--budget")
    err("synthesize --budget -1", sy("--budget", -1), "--budget")
    err("synthesize --samples 0", sy("--samples", 0), "--samples")
    err("synthesize --group-size 0", sy("--group-size", 0), "--group-size")
    err("synthesize --max-attempts 0", sy("--max-attempts", 0), "--max-attempts")
    err("synthesize --response-retries -1", sy("--response-retries", -1), "--response-retries")
    err("synthesize --response-tokens 0", sy("--response-tokens", 0), "--response-tokens")
    err("synthesize --gen-batch-size 0", sy("--gen-batch-size", 0), "--gen-batch-size")
    err("synthesize --seed-data missing", ["synthesize", "--targets", c.targets, "--seed-data", c.root / "noseed.jsonl",
                                           "-o", c.path("s.jsonl")], "noseed.jsonl")
    err("synthesize --backend openai, no --endpoint", sy("--backend", "openai"), "--endpoint")
    err("synthesize --endpoint not a URL", sy("--backend", "openai", "--endpoint", "not a url"), "--endpoint", "url")
    err("synthesize --generator missing dir", sy("--generator", c.root / "nogen"), "nogen")

    def au(*extra, data=None):
        return ["synth", "audit", data or c.data, "-o", c.path("a.jsonl"), "--judge", c.clf, "--response-judge", c.clf,
                "--request-form", "none", "--label-column", "none", "--dtype", "float32", *extra]

    err("synth audit --near-dup 2", au("--near-dup", 2), "--near-dup")
    err("synth audit --max-perplexity -1", au("--max-perplexity", -1), "--max-perplexity")
    err("synth audit --min-gain nan", au("--min-gain", "nan"), "--min-gain")
    err("synth audit --prompt-column nope", au("--prompt-column", "nope"), "nope")
    err("synth audit --contexts missing.json", au("--contexts", c.root / "nocontexts.json"), "nocontexts.json")
    err("synth audit labels 'maybe'", ["synth", "audit", c.table("am.parquet", pl.DataFrame(
        {"prompt": ["a b", "c d"], "completion": ["x", "y"], "label": ["maybe", "harmful"]})), "-o", c.path("a.jsonl"),
        "--judge", c.clf, "--response-judge", c.clf, "--request-form", "none", "--dtype", "float32"], "label", "maybe")
    err("synth audit --judge missing", au("--judge", c.root / "nojudge.json"), "nojudge.json")
    err("synth compare data without a split column", ["synth", "compare", c.texts, "-o", c.path("cmp"), *c.m,
                                                     "--judge-classifier", c.clf, "--no-audit"], "split", "column")
    err("synth compare --budget 0", ["synth", "compare", c.data, "-o", c.path("cmp"), *c.m, "--judge-classifier", c.clf,
                                     "--no-audit", "--budget", 0], "--budget")
    err("synth sft-eval --arms-dir missing", ["synth", "sft-eval", "--arms-dir", c.root / "noarms", "--data", c.data,
                                              "-o", c.path("sft")], "noarms")
    return L


def _null_marked(p: Path):
    def check():
        bad = has_rows(p, 2, "status")()
        if bad:
            return bad
        st = read_out(p)["status"].to_list()
        return None if st[0] == "ok" and st[1] != "ok" else f"statuses {st}"
    return check


def _symlink(c: Ctx, target: Path) -> Path:
    p = c.path("link" + target.suffix)
    p.symlink_to(target)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _overlap_one(d: Path):
    def check():
        f = d / "overlap.json"
        if not f.exists():
            return "no overlap.json"
        o = json.loads(f.read_text())["overlap"]
        return None if abs(o[0][1] - 1.0) < 1e-9 else f"overlap {o[0][1]}, want 1.0"
    return check


# -- running and classifying ---------------------------------------------------------------------------------------
def _cli_child(args: list[str], stdin: bytes | None, out_path: str, err_path: str, env: dict) -> None:
    """One case in a process forked from the preloaded server: `safetyscope ARGS` exactly as `python -m safetyscope`
    runs it (its main(), stdout/stderr to files, a traceback and exit 1 for an exception that escapes)."""
    import traceback

    os.environ.update(env)
    fd_in = os.open(os.devnull, os.O_RDONLY)
    if stdin is not None:
        r, w = os.pipe()
        os.write(w, stdin)
        os.close(w)
        fd_in = r
    os.dup2(fd_in, 0)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
    sys.argv = ["safetyscope", *args]
    code = 1
    try:
        from safetyscope.cli import main

        main(prog_name="safetyscope")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_forked(case: Case, env: dict, mp_ctx, tmp: Path) -> tuple[int, str, str]:
    out, err = tmp / f"{id(case)}.out", tmp / f"{id(case)}.err"
    p = mp_ctx.Process(target=_cli_child, args=([str(a) for a in case.args], case.stdin, str(out), str(err),
                                                {**env, **case.env}))
    p.start()
    p.join(600)
    if p.is_alive():
        p.kill()
        p.join()
        return -1, "", "timeout (600 s)"
    return p.exitcode, out.read_text(errors="replace"), err.read_text(errors="replace")


def run_case(case: Case, env: dict, mp_ctx=None, tmp: Path | None = None) -> dict:
    t0 = time.perf_counter()
    if mp_ctx is not None and tmp is not None:
        code, out, errs = _run_forked(case, env, mp_ctx, tmp)
    else:
        try:
            r = subprocess.run([sys.executable, "-m", "safetyscope", *map(str, case.args)], input=case.stdin,
                               capture_output=True, env={**env, **case.env}, timeout=600)
            code, out, errs = r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            code, out, errs = -1, "", "timeout (600 s)"
    text = out + "\n" + errs
    lines = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    rec = {"case": case.name, "expect": case.expect, "exit": code, "seconds": round(time.perf_counter() - t0, 1),
           "error_line": lines[0] if len(lines) == 1 else None, "why": case.why}
    if "Traceback" in text:
        rec.update(outcome="failure", note="traceback: " + text.strip().splitlines()[-1][:300])
    elif code == 2 and len(lines) == 1:
        named = not case.words or any(w.lower() in lines[0].lower() for w in case.words)
        if case.expect == "ok":
            rec.update(outcome="failure", note="a correct run was expected")
        elif named:
            rec.update(outcome="error")
        else:
            rec.update(outcome="failure", note=f"misleading? the error names none of {list(case.words)}")
    elif code == 0:
        if case.expect == "error":
            rec.update(outcome="failure", note="exit 0 where an error was expected")
        else:
            bad = case.check() if case.check else None
            if not bad and case.out_check:
                bad = case.out_check(out)
            rec.update(outcome="failure" if bad else "correct", note=bad or "")
    else:
        rec.update(outcome="failure", note=f"exit {code}, {len(lines)} error line(s): " + (text.strip()[-300:]))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "reports" / "bad-input"))
    ap.add_argument("--only", default=None, help="Run the cases whose name holds this text.")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--merge", action="store_true", help="With --only: put the rerun cases' records into the "
                    "existing results-LABEL.json (a case whose stated expectation was corrected).")
    ap.add_argument("--label", default="run", help="Name of this run in the report (e.g. before, after).")
    ap.add_argument("--subprocess", action="store_true",
                    help="Start `python -m safetyscope` per case (slower: an interpreter and torch import each) instead "
                         "of forking each case from a server that imported safetyscope, torch and transformers once.")
    ap.add_argument("--report", action="store_true", help="Only write OUT/report.md from the results files.")
    args = ap.parse_args()
    if args.report:
        return write_report(Path(args.out))
    with tempfile.TemporaryDirectory(prefix="bad-input-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "SAFETYSCOPE_CACHE": str(root / "cache"), "PYTHONWARNINGS": "ignore"}
        os.environ["SAFETYSCOPE_CACHE"] = env["SAFETYSCOPE_CACHE"]
        ctx = Ctx(root)
        wanted = args.only.split("|") if args.only else None
        todo = [k for k in cases(ctx) if not wanted or any(w in k.name for w in wanted)]
        names = [k.name for k in todo]
        assert len(set(names)) == len(names), "case names must be unique"
        mp_ctx = None
        if not args.subprocess:
            import multiprocessing as mp

            mp_ctx = mp.get_context("forkserver")
            mp_ctx.set_forkserver_preload(["torch", "transformers", "safetyscope.cli", "safetyscope.features",
                                           "safetyscope.backbone", "safetyscope.discovery.detector"])
        io = root / "io"
        io.mkdir()
        with ThreadPoolExecutor(args.jobs) as pool:
            recs = list(pool.map(lambda k: run_case(k, env, mp_ctx, io), todo))
        payload_ran = (root / "payload-ran").exists()
    for r in recs:
        print(f"{r['outcome']:8s} {r['case']}: {r.get('note') or r.get('error_line') or ''}"[:220])
    counts = {k: sum(r["outcome"] == k for r in recs) for k in ("error", "correct", "failure")}
    share = counts["failure"] / max(len(recs), 1)
    print(f"{len(recs)} cases: {counts}; not a clear error or a correct result: {share:.1%}; "
          f"pickled payload ran: {payload_ran}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only:
        if not args.merge:
            return
        old = json.loads((out / f"results-{args.label}.json").read_text())
        by_name = {r["case"]: r for r in recs}
        recs = [by_name.get(r["case"], r) | ({"rerun": True} if r["case"] in by_name else {}) for r in old["results"]]
        counts = {k: sum(r["outcome"] == k for r in recs) for k in ("error", "correct", "failure")}
        share = counts["failure"] / len(recs)
        print(f"merged into {args.label}: {len(recs)} cases: {counts}; {share:.1%}")
    (out / f"results-{args.label}.json").write_text(json.dumps({"cases": len(recs), "counts": counts,
                                                                 "failure_share": share, "payload_ran": payload_ran,
                                                                 "results": recs}, indent=1, ensure_ascii=False) + "\n")
    write_report(out)



NOTES = [
    "* before: 13 of the 34 failures are one bug seen 14 times: the case `classify -o the classifier file --overwrite` "
    "exited 0 and wrote JSON Lines over the run's shared classifier file (data loss: .json reads as JSON Lines and the "
    "classifier, an input through -c, was not checked as one); every later case reading that classifier then failed. "
    "Fixed in outputs.check_output: a table output never replaces a safetyscope document.",
    "* before: 2 tracebacks (`DiscoverConfig ... shared_weights`) came from another session's half-written edit of "
    "discovery/config.py and discover.py during the run, not from a bad input; they ran clean after.",
    "* before, judged acceptable by reading and their expected words corrected in the script (not counted as fixes): "
    "`--dtype int8` and `--device ''` (the line names the dtype/device and lists the valid ones), `steer --clamp 3:-1` "
    "(names the clamp and why: activations are >= 0), `classify` of a null text (marked, not scored: a correct result).",
    "* after, first run: 4 failures (1.9 %). Three were expectations of this script that reading showed wrong: the CRLF "
    "CSV case wrote unquoted commas (the error was right), yes/no are documented labels, and `explain TEXT --input F` "
    "explains both by design. The cases were corrected and rerun (marked `rerun`).",
    "* left: `discover`/`synth targets` with a label column of lists: a polars cast traceback in "
    "discovery/discover.py:load_labelled, which another session was editing (uncommitted) during this run; the fix "
    "is one check before its `cast(pl.String)` (data.parse_labels now names nested label columns, but load_labelled "
    "casts first).",
]


def write_report(out: Path) -> None:
    """OUT/report.md from OUT/results-before.json and OUT/results-after.json: counts, then every case of the last run."""
    runs = {k: json.loads((out / f"results-{k}.json").read_text()) for k in ("before", "after")
            if (out / f"results-{k}.json").exists()}
    md = ["# Fresh bad-input run (issue 28)", "",
          "`python scripts/bad_input_run.py` (each case: `safetyscope ARGS` on the tiny test model and SAE; see the "
          "script's docstring for how an outcome is classified). Target: at most 2 % of cases neither a clear one-line "
          "error nor a correct result.", "",
          "| run | cases | clear error | correct result | failure | failure share |", "|---|---|---|---|---|---|"]
    for k, r in runs.items():
        c = r["counts"]
        md.append(f"| {k} | {r['cases']} | {c['error']} | {c['correct']} | {c['failure']} | {r['failure_share']:.1%} |")
    for k, r in runs.items():
        md += ["", f"## Failures, {k}", ""]
        md += [f"* {x['case']}: {x.get('note') or x.get('error_line')}" for x in r["results"] if x["outcome"] == "failure"]
    md += ["", "## Notes (read by hand)", "", *NOTES]
    last = runs.get("after") or runs.get("before")
    md += ["", "## Every case, last run", "", "| case | outcome | exit | error line / what was checked |",
           "|---|---|---|---|"]
    for x in last["results"]:
        what = x.get("error_line") or x.get("why") or ""
        if x["outcome"] == "failure":
            what = x.get("note") or what
        what = what.replace("|", "\\|").replace("\n", " ")[:200]
        md.append(f"| {x['case'].replace('|', '/')} | {x['outcome']}{' (rerun)' if x.get('rerun') else ''} | "
                  f"{x['exit']} | {what} |")
    (out / "report.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
