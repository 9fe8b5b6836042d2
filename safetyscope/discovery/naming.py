"""Readable names of SAE features: per feature, the tokens where it fires most in the discovery data and one example
context around its strongest token (``…you should «kill» yourself…``). ``discover`` stores them in the classifier
file (``feature_names``); ``scripts/name_features.py`` adds them to an existing file; ``explain`` prints them.

Tokens come from the extractor's ``token_codes`` (the per-token codes explain shows), read only for the few texts of
highest pooled activation per feature, so naming costs a handful of forward passes per feature."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

TOP_TEXTS = 5  # per feature, the texts of highest pooled activation read token by token
CONTEXT = 3  # tokens either side of the strongest one in the example
MAX_PER_RULE = 100  # a rule over every SAE feature (linear): only its features of largest |weight| are named


def features_to_name(rules) -> tuple[list[int], str]:
    """(feature ids worth naming over ``rules``, no repeats; which ones they are, in words)."""
    ids: list[int] = []
    linear = False
    for rule in rules:
        if getattr(rule, "reads", "codes") == "codes+mean":
            w = rule.weights_[: rule.n_codes]
            top = np.argsort(-np.abs(w), kind="stable")[:MAX_PER_RULE]
            ids += top[w[top] != 0].tolist()
            linear = True
        else:
            ids += [int(f) for f in rule.features_]
    which = (f"each linear rule's {MAX_PER_RULE} SAE features of largest |weight| (other features are unnamed)"
             if linear else "every feature of the rule(s)")
    return list(dict.fromkeys(int(i) for i in ids)), which


def context(tokens: list[str], p: int, n: int = CONTEXT) -> str:
    """``n`` tokens either side of position ``p``, the token at ``p`` in «»; one line."""
    sep = "" if any(t[:1].isspace() for t in tokens) else " "  # BPE tokens carry their spaces; word-level ones not
    lo, hi = max(0, p - n), min(len(tokens), p + n + 1)
    tok = tokens[p]
    lead = tok[: len(tok) - len(tok.lstrip())]
    text = sep.join(tokens[lo:p] + [f"{lead}«{tok.strip()}»"] + tokens[p + 1: hi])
    return ("…" if lo > 0 else "") + " ".join(text.split()) + ("…" if hi < len(tokens) else "")


def name_features(extractor, texts: list[str], codes, ids: list[int], top_texts: int = TOP_TEXTS,
                  progress: bool = False) -> dict[str, dict]:
    """{feature id (as a string): {"tokens": [...], "example": "..."}} from ``texts`` and their pooled ``codes`` (CSR,
    texts x d_sae, as ``extract`` gives them). tokens: the token of strongest activation in each of the feature's
    ``top_texts`` texts of highest pooled activation, strongest first, no repeats; example: the strongest one's
    context. A feature active on none of the texts gets no name."""
    sub = sp.csc_matrix(codes[:, ids])
    need: dict[int, list[int]] = {}  # text row -> the features that read it
    for j, f in enumerate(ids):
        rows, vals = sub.indices[sub.indptr[j]: sub.indptr[j + 1]], sub.data[sub.indptr[j]: sub.indptr[j + 1]]
        for r in rows[vals > 0][np.argsort(-vals[vals > 0], kind="stable")[:top_texts]]:
            need.setdefault(int(r), []).append(f)
    peaks: dict[int, list[tuple[float, str, str]]] = {}  # feature -> (activation, token, context) per text
    # one forward pass per text (token-level codes); up to top_texts x len(ids) texts, so a bar
    for row in tqdm(sorted(need), desc="naming features", unit="text", disable=not progress):
        tokens, tc = extractor.token_codes(texts[row])
        cols = tc[:, need[row]].numpy()
        for j, (f, p) in enumerate(zip(need[row], cols.argmax(0))):
            if cols[p, j] > 0:
                peaks.setdefault(f, []).append((float(cols[p, j]), tokens[p], context(tokens, int(p))))
    out = {}
    for f in ids:
        if f in peaks:
            best = sorted(peaks[f], key=lambda x: -x[0])
            toks = list(dict.fromkeys(t.strip() for _, t, _ in best if t.strip()))
            out[str(f)] = {"tokens": toks, "example": best[0][2]}
    return out


def names_record(det, texts: list[str], codes, data: str, progress: bool = False) -> dict:
    """The classifier file's ``feature_names``: which features are named, how, from which data, and the names."""
    ids, which = features_to_name([det.rule, *det.rules_by_lang.values()])
    return {"named": which, "data": data,
            "method": f"tokens: the token of strongest activation in each of the {TOP_TEXTS} texts of highest pooled "
                      f"activation; example: {CONTEXT} tokens either side of the strongest one",
            "features": name_features(det.extractor, texts, codes, ids, progress=progress)}


def feature_name(meta: dict, fid: int) -> dict | None:
    """A feature's name from a classifier's ``feature_names`` (None: unnamed, or a file written before names)."""
    return meta.get("feature_names", {}).get("features", {}).get(str(int(fid)))


def short_name(name: dict | None) -> str:
    """One line: up to three top tokens and the example context."""
    if not name:
        return "(unnamed)"
    return f"[{', '.join(name['tokens'][:3])}] {name['example']}"
