"""Fit the audit's two classifier judges on the embedded model and write them as classifier files.

- ``refusal`` (flagged = the response refuses): a linear rule on the response's SAE codes + mean residual, fitted
  on data/audit/responses.csv (hand-written refusals and compliances in 11 languages, data/audit/README.md).
- ``not-request`` (flagged = the prompt is not a user request): fitted on user requests (the prompts of
  responses.csv and seed prompts of the safety pack, both labels, every language) against text that is not a
  request: the responses of responses.csv (assistant statements), discovery comments of the toxicity pack (user
  statements, toxic and clean) and fragments cut from the requests (a random 30-70 % prefix without its ending,
  or the rest of it without its beginning). Its threshold drops 5 % of requests by out-of-fold scores.

Neither sees data/audit/pairs.csv or committed_rows.csv (the audit's evaluation sets). Needs ../shared/data for
``not-request``. Run: python scripts/build_audit_judges.py [--out safetyscope/assets]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import polars as pl

from safetyscope.discovery.detector import Detector
from safetyscope.discovery.rules import LinearProbeClassifier, rule_inputs
from safetyscope.features import FeatureConfig, FeatureExtractor

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESPONSES = ROOT / "data" / "audit" / "responses.csv"
TOX_LANGS = ("en", "de", "fr", "es", "it", "ru", "zh", "ja", "ar", "hi", "uk")


def fragments(texts: list[str], rng: random.Random) -> list[str]:
    """A cut-off piece of each text of >= 5 words: its first 30-70 % of words (no ending) or the rest (no start)."""
    out = []
    for t in texts:
        w = t.split()
        if len(w) < 5:
            continue
        k = max(2, int(len(w) * rng.uniform(0.3, 0.7)))
        piece = " ".join(w[:k]).rstrip("?.!,;:") if rng.random() < 0.6 else " ".join(w[k:])[:1].lower() + " ".join(w[k:])[1:]
        out.append(piece)
    return out


def fit(fx, texts: list[str], y: np.ndarray, target_fpr: float | None, C: float, seed: int):
    ex = fx.extract(texts, progress=True)
    d_sae = ex.codes.shape[1]
    clf = LinearProbeClassifier(n_codes=d_sae, C=C, target_fpr=target_fpr, random_state=seed)
    clf.fit(rule_inputs(clf, ex.codes, ex.mean_acts), y)
    return clf


def data_record(texts: list[str], y: np.ndarray, sources: list[str]) -> dict:
    from safetyscope.data import data_sha256

    per_source: dict[str, list[int]] = {}
    for s, v in zip(sources, y):
        per_source.setdefault(s, [0, 0])[int(v)] += 1
    return {"rows": len(texts), "positive": int(y.sum()), "per_source": {k: {"negative": a, "positive": b}
                                                                             for k, (a, b) in sorted(per_source.items())},
            "sha256": data_sha256(y.tolist(), texts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "safetyscope" / "assets"))
    ap.add_argument("--C", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-lang", type=int, default=60)
    ap.add_argument("--comments-per-lang", type=int, default=40)
    ap.add_argument("--only", choices=["refusal", "not-request"], default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    fx = FeatureExtractor.from_config(FeatureConfig())
    resp = pl.read_csv(RESPONSES)
    out = Path(args.out)

    if args.only in (None, "refusal"):
        texts = resp["response"].to_list()
        y = (resp["kind"] == "refusal").to_numpy().astype(int)
        clf = fit(fx, texts, y, None, args.C, args.seed)
        meta = {"sae_id": "default", "discovery_data": data_record(texts, y, resp["lang"].to_list()),
                "validation": {"languages": sorted(set(resp["lang"].to_list())),
                               "method": "python scripts/build_audit_judges.py; measured by python "
                                         "scripts/audit_eval.py on data/audit/pairs.csv"},
                "settings": {"flagged": "refusal", "text": "the response alone", "C": args.C}}
        Detector(fx, clf, meta).save(out / "refusal-smollm2-135m-instruct.json")
        print("wrote refusal judge", meta["discovery_data"]["rows"], "rows")

    if args.only in (None, "not-request"):
        safety = pl.read_parquet(DATA / "safety" / "prompts.parquet").filter(pl.col("split") == "seed")
        requests = resp["prompt"].unique(maintain_order=True).to_list()
        src = ["responses.csv prompt"] * len(requests)
        for (lang,), g in sorted(safety.group_by("lang"), key=lambda kv: str(kv[0][0])):
            g = g.sample(min(len(g), args.prompts_per_lang), seed=args.seed)
            requests += g["prompt"].to_list()
            src += [f"safety seed {lang}"] * len(g)
        non = resp["response"].to_list()
        nsrc = ["responses.csv response"] * len(non)
        for lang in TOX_LANGS:
            t = pl.read_parquet(DATA / "toxicity" / f"{lang}.parquet").filter(pl.col("split") == "discovery")
            t = t.sample(min(len(t), args.comments_per_lang), seed=args.seed)
            non += t["text"].to_list()
            nsrc += [f"comment {lang}"] * len(t)
        frags = fragments(requests, rng)
        non += frags
        nsrc += ["fragment of a request"] * len(frags)
        texts = non + requests
        y = np.array([1] * len(non) + [0] * len(requests))
        clf = fit(fx, texts, y, 0.05, args.C, args.seed)
        meta = {"sae_id": "default", "discovery_data": data_record(texts, y, nsrc + src),
                "validation": {"languages": sorted(set(safety["lang"].to_list())),
                               "method": "python scripts/build_audit_judges.py; measured by python "
                                         "scripts/audit_eval.py on data/audit/pairs.csv"},
                "settings": {"flagged": "not a user request", "target_fpr": "5 % of requests flagged (out-of-fold)",
                             "C": args.C}}
        Detector(fx, clf, meta).save(out / "not-request-smollm2-135m-instruct.json")
        print("wrote not-request judge", len(texts), "rows")


if __name__ == "__main__":
    main()
