"""Extraction benchmark: safetyscope's FeatureExtractor against a naive SAE-feature pipeline.

    python benchmarks/extract.py [--n-texts 256] [--batch-size 32] [--layer 15] [--max-length 256]

Runs on the embedded default model (SmolLM2-135M-Instruct, 30 layers, d_model 576) with a *random*
TopK SAE (width 4608, k 32) at ``--layer``: the time and memory of extraction do not depend on the
trained weights, only on the shapes. Everything runs in one process, one pipeline after the other:

  (a) safetyscope   FeatureExtractor, cache off, bf16 (what dtype auto picks on CPUs with native bf16): texts sorted by length, the
                    forward stops after the captured layer, only real tokens are SAE-encoded (TopK
                    sparse), max-pooled with a scatter.
  (b) naive         the full model (all layers, final norm, LM head) with output_hidden_states=True in
                    float32, batches in input order padded to the longest text of the batch, a dense
                    SAE encode of every position (padding included, masked afterwards), max over tokens.
  (c) safetyscope   the same as (a) in float32: (c) vs (b) is the structural gain, (a) vs (c) the dtype gain.

Tokens/s counts real (non-padding) tokens after truncation at --max-length, the same for all three.
Each pipeline runs --repeats times, interleaved; the fastest time is kept (the CPUs may be shared).
Peak memory is the peak process RSS (sampled every 2 ms by a thread) above the RSS just before the
pipeline started, models already loaded; glibc's free lists are trimmed before each pipeline.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from safetyscope import SAE, Backbone, FeatureExtractor, SAEConfig
from safetyscope.backbone import cpu_has_native_bf16

SHARED_EN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "toxicity" / "en.parquet"

FALLBACK = [
    "Thanks!",
    "What time does the library open on Sundays?",
    "I can't believe you would say something that stupid to your own sister, honestly.",
    "The committee will reconvene next Tuesday to review the revised budget proposal and the updated timeline "
    "for the bridge renovation, which has been delayed twice because of supply problems.",
    "lol no",
    "Could you recommend a good vegetarian recipe that takes less than thirty minutes?",
    "Get out of here, nobody wants you around, you worthless idiot.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product; "
    "the light-dependent reactions take place in the thylakoid membranes while the Calvin cycle runs in the stroma.",
    "She smiled.",
    "My flight got cancelled again and the airline won't refund me, this is absolutely ridiculous.",
    "Here is a short poem about autumn: leaves fall slowly, the air turns cold, and the evenings grow long and quiet.",
    "Why is the sky blue?",
]


def load_texts(n: int) -> tuple[list[str], str]:
    if SHARED_EN.exists():
        import polars as pl

        df = pl.read_parquet(SHARED_EN)
        if "split" in df.columns:
            df = df.filter(pl.col("split") == "discovery")
        texts = [t for t in df.get_column("text").to_list() if t and t.strip()][:n]
        return texts, f"{SHARED_EN.name} discovery split, first {len(texts)}"
    texts = [FALLBACK[i % len(FALLBACK)] + ("" if i < len(FALLBACK) else f" ({i})") for i in range(n)]
    return texts, f"built-in fallback list ({len(FALLBACK)} sentences cycled to {n})"


def random_sae(d_model: int, d_sae: int, k: int, layer: int, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_sae, d_model, generator=g) / d_model**0.5
    W_dec = W_enc.T.contiguous()
    cfg = SAEConfig(d_model=d_model, d_sae=d_sae, activation="topk", k=k, layer=layer, source="random (benchmark)")
    return SAE.from_tensors(cfg, W_enc, torch.zeros(d_sae), W_dec, torch.zeros(d_model))


class PeakRSS:
    """Peak RSS above the starting RSS, sampled in a background thread."""

    def __init__(self, interval: float = 0.002):
        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta_mib = (self.peak - self.base) / 2**20


@torch.inference_mode()
def naive_extract(model, tokenizer, sae: SAE, texts: list[str], layer: int, batch_size: int, max_length: int):
    """Full fp32 forward with every hidden state, dense SAE code of every position, masked max."""
    codes = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s : s + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out = model(**enc, output_hidden_states=True)
        hidden = out.hidden_states[layer + 1]  # output of decoder layer `layer`
        z = sae.encode(hidden.float())  # (batch, seq, d_sae), padding included
        z = z * enc["attention_mask"][..., None]
        codes.append(z.max(dim=1).values)
    return torch.cat(codes).numpy()


def timed(fn):
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        result = fn()
    return result, time.perf_counter() - t0, mem.delta_mib


def firing_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(share of texts with identical firing sets, mean Jaccard of the firing sets)."""
    fa, fb = a > 0, b > 0
    same = (fa == fb).all(1).mean()
    inter, union = (fa & fb).sum(1), (fa | fb).sum(1)
    return float(same), float(np.mean(inter / np.maximum(union, 1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest time is reported")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    texts, source = load_texts(args.n_texts)
    bb16 = Backbone.from_pretrained(None, dtype="auto")
    bb32 = Backbone.from_pretrained(None, dtype="float32")
    tok = bb32.tokenizer
    sae = random_sae(bb32.d_model, args.d_sae, args.k, args.layer)
    lengths = np.array([min(len(x), args.max_length) for x in tok(texts)["input_ids"]])
    n_tok = int(lengths.sum())

    print(f"model: {bb32.model_id} ({bb32.n_layers} layers, d_model {bb32.d_model}), layer {args.layer}")
    print(f"SAE: random TopK, width {args.d_sae}, k {args.k} (timing depends on shapes only, not on trained weights)")
    print(f"texts: {len(texts)} from {source}; {n_tok} tokens (min {lengths.min()}, median {int(np.median(lengths))}, "
          f"max {lengths.max()}), batch size {args.batch_size}, max length {args.max_length}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} CPUs, "
          f"native bf16: {cpu_has_native_bf16()} (dtype auto = {'bf16' if cpu_has_native_bf16() else 'fp32'} here)")

    def fx(bb):
        return FeatureExtractor(bb, sae, args.layer, batch_size=args.batch_size, max_length=args.max_length, cache=False)

    fx16, fx32 = fx(bb16), fx(bb32)
    # warm-up (one batch each), so that first-call overheads are not timed
    fx16.extract(texts[: args.batch_size])
    fx32.extract(texts[: args.batch_size])
    naive_extract(bb32.model, tok, sae, texts[: args.batch_size], args.layer, args.batch_size, args.max_length)

    pipelines = {
        "naive fp32 (full model, dense SAE)":
            lambda: naive_extract(bb32.model, tok, sae, texts, args.layer, args.batch_size, args.max_length),
        "safetyscope fp32": lambda: fx32.extract(texts).codes.toarray(),
        "safetyscope bf16": lambda: fx16.extract(texts).codes.toarray(),
    }
    load0 = os.getloadavg()[0]
    runs: dict[str, tuple] = {}
    for _ in range(args.repeats):  # interleaved rounds; keep the fastest time and the largest memory peak
        for name, fn in pipelines.items():
            codes, secs, mib = timed(fn)
            old = runs.get(name)
            runs[name] = (codes, min(secs, old[1]) if old else secs, max(mib, old[2]) if old else mib)
    print(f"load average (1 min) before/after the timed runs: {load0:.1f} / {os.getloadavg()[0]:.1f}"
          f"{'  (other processes share the CPUs: absolute figures are pessimistic)' if load0 > 1.5 else ''}")

    naive_codes, naive_s, _ = runs["naive fp32 (full model, dense SAE)"]
    print()
    print(f"{'pipeline':<36} {'seconds':>8} {'tokens/s':>9} {'peak RSS +MiB':>14} {'vs naive':>9} "
          f"{'same firing set':>16} {'mean Jaccard':>13}")
    for name, (codes, secs, mib) in runs.items():
        same, jac = firing_agreement(codes, naive_codes)
        print(f"{name:<36} {secs:>8.2f} {n_tok / secs:>9.0f} {mib:>14.0f} {naive_s / secs:>8.2f}x "
              f"{100 * same:>15.1f}% {jac:>13.4f}")
    s16, s32 = runs["safetyscope bf16"][1], runs["safetyscope fp32"][1]
    print()
    print(f"ratio safetyscope/naive tokens/s: {naive_s / s16:.2f}x (bf16), {naive_s / s32:.2f}x (fp32: "
          f"structural gain), bf16/fp32 dtype gain {s32 / s16:.2f}x")
    print("agreement = texts whose set of firing features (max activation > 0) equals the naive pipeline's")


if __name__ == "__main__":
    main()
