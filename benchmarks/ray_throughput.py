"""Throughput of `safetyscope classify` with the local engine and with `--engine ray` on the same file.

Each run is the CLI as a user types it, in a fresh process, timed from start to exit: Python start, Ray start
(a local instance, started and shut down by the command), model load in every actor, classification, output.
The outputs are compared with the local engine's frame for frame. The peak RSS of one Ray actor process is
sampled with psutil while the Ray runs go.

    python benchmarks/ray_throughput.py [--input FILE] [-c CLASSIFIER.json] [--workers 1 2] [--extra-args ARGS]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import psutil

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity" / "ci_sample.parquet"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "comments.csv"


def _actor_rss_peak(stop: threading.Event, peak: list) -> None:
    while not stop.is_set():
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
                if "_ClassifyActor" in title or "MapWorker" in title:
                    peak[0] = max(peak[0], p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stop.wait(0.2)


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"failed: {shlex.join(cmd)}\n{res.stderr[-3000:]}")
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(SHARED if SHARED.exists() else EXAMPLE))
    ap.add_argument("-c", "--classifier", default=None, help="classifier JSON [default: the shipped one]")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--extra-args", default="", help="passed to every classify run, e.g. '--dtype float32'")
    args = ap.parse_args(argv)
    exe = ["safetyscope"]
    n = pl.read_parquet(args.input).height if args.input.endswith(".parquet") else None
    print(f"input: {args.input} ({n} rows); {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [*exe, "classify", args.input, "--no-cache", "--overwrite", *shlex.split(args.extra_args),
                *(["-c", args.classifier] if args.classifier else [])]
        local = Path(tmp) / "local.parquet"
        cmd = [*base, "-o", str(local)]
        print("$", shlex.join(cmd).replace(tmp, "/tmp/x"), flush=True)
        rows.append(("local", _run(cmd), None, True))
        ref = pl.read_parquet(local)
        n = ref.height
        for w in args.workers:
            out = Path(tmp) / f"ray{w}.parquet"
            cmd = [*base, "-o", str(out), "--engine", "ray", "--workers", str(w)]
            print("$", shlex.join(cmd).replace(tmp, "/tmp/x"), flush=True)
            stop, peak = threading.Event(), [0]
            th = threading.Thread(target=_actor_rss_peak, args=(stop, peak), daemon=True)
            th.start()
            dt = _run(cmd)
            stop.set()
            th.join()
            rows.append((f"ray --workers {w}", dt, peak[0], pl.read_parquet(out).equals(ref)))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"\n{'engine':<20}{'wall s':>9}{'rows/s':>9}{'vs local':>10}{'actor peak RSS':>16}  same output")
    for name, dt, rss, same in rows:
        print(f"{name:<20}{dt:>9.1f}{n / dt:>9.1f}{rows[0][1] / dt:>9.2f}x"
              f"{'' if rss is None else f'{rss / 2**20:.0f} MiB':>16}  {'yes' if same else 'NO'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
