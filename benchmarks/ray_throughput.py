"""Throughput of `safetyscope classify` with the local engine and with `--engine ray` on the same file.

Each run is the CLI as a user types it, in a fresh process, timed from start to exit: Python start, Ray start
(a local instance, started and shut down by the command), model load in every actor, classification, output.
The outputs are compared with the local engine's frame for frame. The peak RSS of one Ray actor process is
sampled with psutil while the Ray runs go.

    python benchmarks/ray_throughput.py [--input FILE] [-c CLASSIFIER.json] [--workers 1 2] [--repeats 2] [--extra-args ARGS]
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


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    dt = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"failed: {shlex.join(cmd)}\n{res.stderr[-3000:]}")
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(SHARED if SHARED.exists() else EXAMPLE))
    ap.add_argument("-c", "--classifier", default=None, help="classifier JSON [default: the shipped one]")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--extra-args", default="", help="passed to every classify run, e.g. '--dtype float32'")
    args = ap.parse_args(argv)
    exe = ["safetyscope"]
    print(f"input: {args.input}; {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    # (name, extra CLI args, extra env). Ray gives each actor OMP_NUM_THREADS = its CPUs (1 by default), while
    # the local engine uses torch's default (one thread per core): "local, 1 thread" separates the two effects.
    configs = [("local", [], {}), ("local, 1 thread", [], {"OMP_NUM_THREADS": "1"})]
    configs += [(f"ray --workers {w}", ["--engine", "ray", "--workers", str(w)], {}) for w in args.workers]
    times = {name: [] for name, _, _ in configs}
    peaks = {name: 0 for name, _, _ in configs}
    same = {name: True for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        base = [*exe, "classify", args.input, "--no-cache", "--overwrite", *shlex.split(args.extra_args),
                *(["-c", args.classifier] if args.classifier else [])]
        ref = None
        for rep in range(args.repeats):  # interleaved, reversed every other round: load drifts hit all alike
            for name, extra, env in configs if rep % 2 == 0 else configs[::-1]:
                out = Path(tmp) / f"{configs.index((name, extra, env))}-{len(times[name])}.parquet"
                cmd = [*base, "-o", str(out), *extra]
                print("$", *(f"{k}={v}" for k, v in env.items()), shlex.join(cmd).replace(tmp, "/tmp/x"), flush=True)
                stop, peak = threading.Event(), [0]
                th = threading.Thread(target=_actor_rss_peak, args=(stop, peak), daemon=True)
                if extra:  # actor processes only (a Ray run's actors may still be exiting when the next run starts)
                    th.start()
                times[name].append(_run(cmd, env))
                stop.set()
                if extra:
                    th.join()
                peaks[name] = max(peaks[name], peak[0])
                df = pl.read_parquet(out)
                ref = df if name == "local" and ref is None else ref
                if ref is not None:
                    same[name] &= df.equals(ref)
                print(f"  {times[name][-1]:.1f} s", flush=True)
        n = ref.height
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    best_local = min(times["local"])
    print(f"\n{'engine':<20}{'wall s (each run)':>24}{'best s':>8}{'rows/s':>8}{'vs local':>10}{'actor RSS':>11}  same")
    for name, _, _ in configs:
        b = min(times[name])
        print(f"{name:<20}{' '.join(f'{t:.1f}' for t in times[name]):>24}{b:>8.1f}{n / b:>8.1f}{best_local / b:>9.2f}x"
              f"{f'{peaks[name] / 2**20:.0f} MiB' if peaks[name] else '':>11}  {'yes' if same[name] else 'NO'}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
