"""The committed `synth compare` arms after the audit: kept rows per arm, coverage of T_miss over kept rows only.

Reads reports/synthesis/{targeted,targeted_steered,random,natural,no-template/targeted}.jsonl, the targets (targets.json) and the
seed rows (seed.jsonl) of that run, audits every arm's rows as `synth audit` does (the natural arm holds prompts
without responses: audited on the request side only) and recounts coverage over the kept rows. Writes
reports/audit/compare-arms.{json,md}. Run: python scripts/audit_compare_arms.py
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from safetyscope.synthesis.audit import AuditConfig, audit_pairs, load_judges, pairs_from_frame
from safetyscope.synthesis.coverage import coverage_of_texts
from safetyscope.synthesis.targets import read_targets

ROOT = Path(__file__).resolve().parents[1]
SYN = ROOT / "reports" / "synthesis"
ARMS = {"targeted synthesis": "targeted.jsonl", "targeted + steering": "targeted_steered.jsonl",
        "random synthesis": "random.jsonl", "natural sampling": "natural.jsonl",
        # the same targets and seed, generator responses only (synthesize --no-template; no-template/README.md)
        "targeted, --no-template": "no-template/targeted.jsonl"}


def main() -> None:
    doc = read_targets(SYN / "targets.json")
    ids = [t["id"] for t in doc["targets"]]
    contexts = [e["text"] for t in doc["targets"] for e in t.get("examples", [])]
    judges = load_judges(AuditConfig())
    fx = judges.fx
    seed = pl.read_ndjson(SYN / "seed.jsonl")["prompt"].to_list()
    seed_cov = coverage_of_texts(fx, seed, ids)
    miss = seed_cov["uncovered"]
    res, md = {"T": len(ids), "T_miss": len(miss), "arms": {}}, []
    for arm, file in ARMS.items():
        df = pl.read_ndjson(SYN / file)
        if "completion" not in df.columns:  # natural sampling: prompts only
            df = df.with_columns(pl.lit("").alias("completion"))
        cfg = AuditConfig(require_response=arm != "natural sampling")
        p, r, lab, lang = pairs_from_frame(df, cfg, file)
        frame, summary = audit_pairs(p, r, lab, lang, judges, cfg, contexts=contexts)
        keep = frame["audit_verdict"] == "keep"
        kept = [x for x, k in zip(p, keep) if k]
        cov = coverage_of_texts(fx, kept, miss) if kept else {"n_covered": 0}
        res["arms"][arm] = {"rows": len(p), "kept": len(kept), "kept_per_label": summary["kept_per_label"],
                            "reasons": summary["reasons"], "T_miss_covered_by_kept": cov["n_covered"],
                            "T_miss_coverage_kept": cov["n_covered"] / len(miss) if miss else None,
                            "kept_rows": [{"prompt": a, "completion": b, "label": c} for a, b, c, k in
                                          zip(p, r, lab, keep) if k][:10]}
        md.append(f"| {arm} | {len(p)} | {len(kept)} | {summary['kept_per_label'] or '{}'} | "
                  f"{cov['n_covered']}/{len(miss)} | "
                  + ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items(), key=lambda kv: -kv[1])) + " |")
    out = ROOT / "reports" / "audit"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare-arms.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    text = "\n".join([f"# The committed compare arms after the audit (|T| = {len(ids)}, |T_miss| = {len(miss)})", "",
                      "| arm | rows | kept | kept per label | T_miss covered by kept rows | drop reasons (a row may have several) |",
                      "|---|---|---|---|---|---|", *md, ""])
    (out / "compare-arms.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
