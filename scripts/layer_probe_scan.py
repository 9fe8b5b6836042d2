"""Which layer of a model holds toxicity most linearly: a raw-activation probe on every layer, per language.

One forward pass captures every decoder layer; each text's residual stream is mean-pooled over its tokens
(position 0 left out, as in the SAE features); the evaluation's `probe_raw` (standardised logistic regression, C
by 3-fold CV) is fitted on a language's discovery sample and scored on its test sample. A subsample (default 300
discovery + 150 test texts per language, seed 0) keeps this to minutes on a CPU; no SAE is needed, so it tells
where an SAE is worth training before spending the hour it takes.

    python scripts/layer_probe_scan.py gemma3-270m [n_discovery n_test]
"""
from __future__ import annotations

import sys
import time

import numpy as np
from _toxicity import load_toxicity
from sklearn.metrics import f1_score

from safetyscope.backbone import Backbone
from safetyscope.data import parse_labels
from safetyscope.eval.metrics import raw_activation_probe


def main(model: str, n_disc: int = 300, n_test: int = 150, batch: int = 32, max_length: int = 256) -> None:
    df = load_toxicity()
    lang, split = df["lang"].to_numpy(), df["split"].to_numpy()
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(c, min(n, len(c)), replace=False)
                          for lg in sorted(set(lang))
                          for s, n in (("discovery", n_disc), ("test", n_test))
                          for c in [np.flatnonzero((lang == lg) & (split == s))]])
    texts, y = [df["text"][int(i)] for i in idx], parse_labels(df["label"], "toxicity data")[idx]
    bb = Backbone.from_pretrained(None if model == "default" else model)
    n_layers = bb.n_layers
    ids = [t[:max_length] for t in bb.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # little padding per batch
    means = np.zeros((n_layers, len(ids), bb.d_model), np.float32)
    t0 = time.time()
    for s in range(0, len(order), batch):
        b = order[s : s + batch]
        inp, mask = bb.pad([ids[i] for i in b])
        keep = mask.bool().clone()
        keep[:, 0] = False
        n_tok = keep.sum(1).clamp(min=1)
        for layer, h in bb.capture(inp, mask, list(range(n_layers))).items():
            means[layer, b] = ((h.float() * keep[..., None]).sum(1) / n_tok[:, None]).numpy()
    print(f"{len(texts)} texts, forward pass {time.time() - t0:.0f} s", flush=True)
    sub_lang, sub_split = lang[idx], split[idx]
    langs = sorted(set(sub_lang))
    print("layer macro " + " ".join(langs))
    for layer in range(n_layers):
        f1s = []
        for lg in langs:
            d, t = (sub_lang == lg) & (sub_split == "discovery"), (sub_lang == lg) & (sub_split == "test")
            probe = raw_activation_probe(0).fit(means[layer, d], y[d])
            f1s.append(f1_score(y[t], probe.predict(means[layer, t])))
        print(layer, f"{np.mean(f1s):.3f}", " ".join(f"{f:.2f}" for f in f1s), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:4]))
