#!/usr/bin/env python
"""Build the offline corpus the embedded default SAE is trained on (a parquet with columns text, source).

Sources (all from the shared research pack, never shipped; only the trained SAE weights are):

* ``toxicity/<lang>.parquet``, rows with ``split == "discovery"`` only (the ``test`` split is never read;
  ``ci_sample.parquet`` is skipped because it is a subset of the language files and holds test rows);
* ``safety/prompts.parquet``, column ``prompt``, both ``seed`` and ``pool`` rows;
* optionally ``--generate N`` answers written by SmolLM2-135M-Instruct itself (chat template, greedy
  decoding) to N prompts drawn from the benign and harmful safety prompts, so the SAE also sees
  assistant-style text.

Deterministic: the same inputs and arguments give the same rows in the same order.

    python scripts/build_sae_corpus.py -o /tmp/sae_corpus.parquet
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import time
from pathlib import Path

import polars as pl

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def discovery_splits(data: Path) -> list[tuple[str, pl.DataFrame]]:
    """(language file stem, its `discovery` rows) per toxicity file; never `test`, never the CI sample
    (it repeats rows of the other files)."""
    out = []
    for f in sorted(glob.glob(str(data / "toxicity" / "*.parquet"))):
        if Path(f).name == "ci_sample.parquet":
            continue
        df = pl.read_parquet(f).filter(pl.col("split") == "discovery")
        out.append((Path(f).stem, df))
    return out


def toxicity_rows(data: Path) -> pl.DataFrame:
    return pl.concat([df.select(pl.col("text"), pl.lit("toxicity:" + stem).alias("source"))
                      for stem, df in discovery_splits(data)])


def safety_rows(data: Path) -> pl.DataFrame:
    df = pl.read_parquet(data / "safety" / "prompts.parquet")
    return df.select(pl.col("prompt").alias("text"), (pl.lit("safety:") + pl.col("source")).alias("source"))


def generated_rows(data: Path, n: int, seed: int, max_new_tokens: int, batch_size: int) -> pl.DataFrame:
    """Answers of the embedded default model to n English safety prompts (half benign, half harmful)."""
    import torch

    from safetyscope.backbone import Backbone

    torch.manual_seed(seed)
    df = pl.read_parquet(data / "safety" / "prompts.parquet").filter(pl.col("lang") == "en")
    rng = random.Random(seed)
    picked = []
    for label in ("benign", "harmful"):
        rows = sorted(df.filter(pl.col("label") == label)["prompt"].to_list())
        picked += rng.sample(rows, min(len(rows), n - n // 2 if label == "benign" else n // 2))
    bb = Backbone.from_pretrained(None, dtype="float32")
    tok, model = bb.tokenizer, bb.model
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out = []
    t0 = time.time()
    for s in range(0, len(picked), batch_size):
        chunk = picked[s : s + batch_size]
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [f"{p}\n{a.strip()}" for p, a in zip(chunk, answers)]
        print(f"generated {len(out)}/{len(picked)} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return pl.DataFrame({"text": out, "source": ["generated:smollm2-135m-instruct"] * len(out)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="/tmp/sae_corpus.parquet")
    ap.add_argument("--data", default=str(DATA), help="the shared data pack [default: ../shared/data]")
    ap.add_argument("--generate", type=int, default=0, help="model-written answers to add (0 = none)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--gen-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = Path(a.data)
    parts = [toxicity_rows(data), safety_rows(data)]
    if a.generate:
        parts.append(generated_rows(data, a.generate, a.seed, a.max_new_tokens, a.gen_batch_size))
    df = pl.concat(parts).filter(pl.col("text").str.strip_chars().str.len_chars() > 0)
    df = df.unique(subset="text", keep="first", maintain_order=True)
    # seeded shuffle so that a token budget taken from the top is a uniform sample of the sources
    df = df.with_row_index("i").sample(fraction=1.0, shuffle=True, seed=a.seed).drop("i")
    os.makedirs(Path(a.output).parent, exist_ok=True)
    df.write_parquet(a.output)
    counts = df.group_by("source").len().sort("source")
    for src, n in counts.iter_rows():
        print(f"{src}\t{n}", file=sys.stderr)
    print(f"wrote {df.height} texts to {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
