"""Measure `synth audit` on the hand-labelled pairs: share of unusable pairs dropped, of usable pairs kept.

Sets: data/audit/pairs.csv (hand-written pairs of every failure kind) and data/audit/committed_rows.csv (the
project's own synthetic rows, labelled by hand), each split into dev and holdout by a hash of the row id
(data/audit/README.md). Each file is audited whole, as a user's table would be (a near copy's original may sit in
the other split), and measured on the rows of ``--split``. Choices (thresholds, judges) are made on ``--split
dev``; ``--split holdout`` is run once, after, to report. Writes OUT/<split>.json and OUT/<split>.md.

Run: python scripts/audit_eval.py --split dev [-o reports/audit]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import polars as pl

from safetyscope.synthesis.audit import AuditConfig, audit_pairs, load_judges, pairs_from_frame
from safetyscope.synthesis.targets import read_targets

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "reports" / "synthesis" / "targets.json"
SETS = {"pairs": ROOT / "data" / "audit" / "pairs.csv", "committed": ROOT / "data" / "audit" / "committed_rows.csv"}


def measure(df: pl.DataFrame, audited: pl.DataFrame) -> dict:
    d = df.hstack(audited.select("audit_verdict", "audit_reasons"))
    usable, unusable = d.filter(pl.col("usable") == 1), d.filter(pl.col("usable") == 0)
    per_kind = {}
    for (kind,), g in sorted(d.group_by("kind"), key=lambda kv: kv[0][0]):
        reasons: dict[str, int] = {}
        for rs in g["audit_reasons"].to_list():
            for r in rs:
                reasons[r] = reasons.get(r, 0) + 1
        per_kind[kind] = {"rows": len(g), "kept": int((g["audit_verdict"] == "keep").sum()), "reasons": reasons}
    return {"rows": len(d), "usable": len(usable), "unusable": len(unusable),
            "usable_kept": int((usable["audit_verdict"] == "keep").sum()),
            "unusable_dropped": int((unusable["audit_verdict"] == "drop").sum()),
            "keep_rate_usable": float((usable["audit_verdict"] == "keep").mean()) if len(usable) else None,
            "drop_rate_unusable": float((unusable["audit_verdict"] == "drop").mean()) if len(unusable) else None,
            "per_kind": per_kind}


def markdown(res: dict, split: str) -> str:
    out = [f"# Audit on the hand-labelled pairs: {split} split", ""]
    for name, r in res["sets"].items():
        out += [f"## {name}: {r['rows']} rows", "",
                f"- unusable dropped: {r['unusable_dropped']}/{r['unusable']} ({r['drop_rate_unusable']:.1%}) "
                f"(target >= 90 %)" if r["unusable"] else "- no unusable rows",
                f"- usable kept: {r['usable_kept']}/{r['usable']} ({r['keep_rate_usable']:.1%}) (target >= 60 %)"
                if r["usable"] else "- no usable rows", "",
                "| kind | rows | kept | reasons given |", "|---|---|---|---|"]
        for k, v in r["per_kind"].items():
            reasons = ", ".join(f"{a} {b}" for a, b in sorted(v["reasons"].items(), key=lambda kv: -kv[1]))
            out.append(f"| {k} | {v['rows']} | {v['kept']} | {reasons} |")
        out.append("")
    out += ["Settings: " + json.dumps(res["config"]), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["dev", "holdout"], required=True)
    ap.add_argument("-o", "--output", default=str(ROOT / "reports" / "audit"))
    ap.add_argument("--request-form", default=AuditConfig.request_form)
    ap.add_argument("--min-gain", type=float, default=AuditConfig.min_gain)
    ap.add_argument("--max-perplexity", type=float, default=AuditConfig.max_perplexity)
    args = ap.parse_args()
    cfg = AuditConfig(request_form=None if args.request_form == "none" else args.request_form,
                      min_gain=args.min_gain, max_perplexity=args.max_perplexity)
    judges = load_judges(cfg)
    res: dict = {"split": args.split, "config": asdict(cfg), "sets": {}}
    frames = {}
    for name, path in SETS.items():
        if not path.exists():
            continue
        df = pl.read_csv(path)
        if "completion" not in df.columns:
            df = df.rename({"response": "completion"})
        df = df.with_columns(pl.col("completion").fill_null(""))
        if name == "committed":  # the natural arm's rows are prompts without a response: nothing to train on
            df = df.filter(pl.col("completion") != "")
        p, r, lab, lang = pairs_from_frame(df, cfg, str(path))
        # the synthetic rows were written from the targets' shown contexts: synthesize's audit checks copies of them
        contexts = [e["text"] for t in read_targets(TARGETS)["targets"] for e in t.get("examples", [])] \
            if name == "committed" else []
        audited, _ = audit_pairs(p, r, lab, lang, judges, cfg, contexts=contexts)
        both = df.hstack(audited).filter(pl.col("split") == args.split)
        res["sets"][name] = measure(both.select(df.columns), both.select(audited.columns))
        frames[name] = both
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.split}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{args.split}.md").write_text(markdown(res, args.split))
    for name, f in frames.items():
        f.with_columns(pl.col("audit_reasons").list.join(",")).write_csv(out / f"{args.split}-{name}-rows.csv")
    print(markdown(res, args.split))


if __name__ == "__main__":
    main()
