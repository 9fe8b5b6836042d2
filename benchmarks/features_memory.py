"""Peak memory of `features`: the streamed file path against the old all-in-memory path.

    python benchmarks/features_memory.py [--sizes 1000,10000,100000] [--chunk-rows 1024] [--paths streaming,old]

Model: the tests' tiny random Qwen3 (tests/conftest.py build_tiny_model, d_model 64, 4 layers, fp32) with a
random TopK SAE of width 16384 and k 50 at layer 1, so the output (up to ~50 x tokens features per text) and
not the model dominates memory. Texts: synthetic sentences of 3-24 words from the tests' vocabulary.

Each (size, path) runs in a fresh process: the model and SAE are loaded and warmed up on a few texts, then the
peak RSS above that point is sampled every 2 ms (benchmarks/extract.py PeakRSS) while the path turns the
input parquet file into an output parquet file:

  old        read the whole table, FeatureExtractor.extract on every text, codes_frame, write_table
             (what `features` did before it streamed)
  streaming  features_file.features_file: chunks of --chunk-rows rows, a durable part per chunk, parts
             concatenated at the end (what `features` does now)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # build_tiny_model, CORPUS

D_SAE, K, LAYER = 16384, 50, 1


def synthetic(n: int, seed: int = 0) -> list[str]:
    from conftest import CORPUS

    words = sorted({w for t in CORPUS for w in t.split()})
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(3, 24))) for _ in range(n)]


def child(path: str, inp: str, model_dir: str, chunk_rows: int) -> dict:
    import torch
    from extract import PeakRSS, random_sae

    from safetyscope import Backbone, FeatureExtractor

    bb = Backbone.from_pretrained(model_dir, dtype="float32")
    fx = FeatureExtractor(bb, random_sae(bb.d_model, D_SAE, K, LAYER), LAYER, cache=False)
    fx.extract(synthetic(64, seed=1))  # warm-up: kernels, allocator pools
    out = Path(inp).with_name(f"out-{path}.parquet")
    with torch.inference_mode(), PeakRSS() as peak:
        t0 = time.perf_counter()
        if path == "old":
            from safetyscope.data import read_table, text_list, write_table
            from safetyscope.features import codes_frame

            df = read_table(inp, columns=["text"])
            ex = fx.extract(text_list(df, "text"))
            write_table(codes_frame(ex.codes, df.get_column("id")), out)
            tokens = int(ex.n_tokens.sum())
        else:
            from safetyscope.features_file import features_file

            tokens = features_file(None, inp, str(out), chunk_rows=chunk_rows, extractor=fx, progress=False)["tokens"]
        seconds = time.perf_counter() - t0
    return {"peak_mib": peak.delta_mib, "seconds": seconds, "tokens": tokens, "out_bytes": out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--paths", default="streaming,old", help="which paths to run (both: ratio and output check)")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "INPUT", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.chunk_rows)))
        return

    import polars as pl
    import torch
    from conftest import build_tiny_model

    print(f"tiny Qwen3 (d_model 64, 4 layers, fp32), random TopK SAE width {D_SAE} k {K} at layer {LAYER}; "
          f"chunk rows {args.chunk_rows}; torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = str(build_tiny_model(tmp / "model"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "SAFETYSCOPE_CACHE": str(tmp / "cache")}
        print(f"{'texts':>7} {'path':<10} {'seconds':>8} {'tokens/s':>9} {'peak RSS +MiB':>14} {'old/streaming':>14}")
        for n in (int(x) for x in args.sizes.split(",")):
            inp = tmp / f"in-{n}.parquet"
            pl.DataFrame({"id": [f"t{i}" for i in range(n)], "text": synthetic(n)}).write_parquet(inp)
            res = {}
            for path in args.paths.split(","):
                cmd = [sys.executable, __file__, "--chunk-rows", str(args.chunk_rows), "--child", path, str(inp), model_dir]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stderr[-3000:])
                res[path] = json.loads(r.stdout.strip().splitlines()[-1])
                x = res[path]
                ratio = f"{res['old']['peak_mib'] / max(res['streaming']['peak_mib'], 1e-9):.1f}x" if len(res) == 2 else ""
                print(f"{n:>7} {path:<10} {x['seconds']:>8.1f} {x['tokens'] / x['seconds']:>9.0f} {x['peak_mib']:>14.0f} "
                      f"{ratio:>14}", flush=True)
            if len(res) == 2:
                same = pl.read_parquet(tmp / "out-old.parquet").drop("feature_acts").equals(
                    pl.read_parquet(tmp / "out-streaming.parquet").drop("feature_acts"))
                print(f"{n:>7} same ids and fired features, old vs streaming: {same}", flush=True)
            for f in tmp.glob("out-*.parquet"):
                f.unlink()
            inp.unlink()
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} (the CPUs may be shared: seconds are pessimistic)")


if __name__ == "__main__":
    main()
