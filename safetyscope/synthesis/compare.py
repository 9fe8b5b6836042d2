"""`synth compare`: does feature-targeted synthesis cover what the existing data misses?

Data: the safety prompts table (split ``seed`` / ``pool``). Rows are used three disjoint ways:
- existing supervision S = ``seed`` rows of a subset (languages / sources), subsampled;
- reference set R = one half of ``pool`` (by a hash of ``id``): T is found here only;
- natural pool P = the other half of ``pool``: the natural-sampling arm draws from it.
T_miss = targets of T that S does not fire. Four arms at the same budget N (rows):
targeted synthesis (verified against its target feature), targeted + steering (the same, plus steered
attempts for targets the plain attempts miss; still verified unsteered; not with --no-steer or a generator
that cannot be steered), random safety synthesis (same generator, prompts from harm categories, no feature
targeting), natural sampling (N rows of P).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import polars as pl

from ..data import id_half, read_table, write_table
from ..errors import SafetyScopeError
from ..features import FeatureConfig, FeatureExtractor
from ..generators import GeneratorConfig, make_generator
from ..outputs import check_report_dir
from ..provenance import write_document
from ..reports import pyplot, save_figure, write_json, write_text
from .coverage import coverage_of_texts
from .judge import judged_stats
from .synthesize import (
    SynthConfig,
    derive_seed,
    lang_name,
    make_responses,
    make_row,
    rows_frame,
    steering_status,
    synthesize,
)
from .targets import FDR, MIN_PRECISION, TargetsConfig, find_targets, targets_document
from .textrules import Deduper, extract_candidates

BENIGN_TOPICS = ("cooking", "travel planning", "personal finance", "gardening", "history", "programming", "fitness",
                 "learning a language", "home repair", "science homework", "writing an email", "pet care")


@dataclass
class CompareConfig:
    data: str
    output_dir: str
    seed_langs: list[str] = field(default_factory=lambda: ["en"])
    seed_sources: list[str] = field(default_factory=list)
    ref_langs: list[str] = field(default_factory=lambda: ["en"])
    max_seed_rows: int = 600
    max_ref_rows: int = 800
    min_delta: float = 0.05
    max_targets: int = 32
    max_fire_rate: float = 1.0
    sample_seed: int = 0
    min_precision: float = MIN_PRECISION  # the target checks of `synth targets` (targets.py)
    fdr: float = FDR
    judge_targets: bool = True  # a target's top contexts must be judged its label by the arms' judge
    audit: bool = True  # every arm's rows go through `synth audit` (with audit judges given); coverage over kept rows
    overwrite: bool = False  # write into an existing directory safetyscope did not make (outputs.check_report_dir)


def _stratified(df: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """At most n rows, half per label where possible (deterministic)."""
    if df.height <= n:
        return df
    parts, labels = [], sorted(df["label"].unique().to_list())
    for j, lab in enumerate(labels):
        sub = df.filter(pl.col("label") == lab)
        share = n // len(labels) + (1 if j < n % len(labels) else 0)
        parts.append(sub.sample(min(share, sub.height), seed=seed, shuffle=True))
    out = pl.concat(parts)
    if out.height < n:  # one label was short: fill from the rest
        rest = df.join(out.select("id"), on="id", how="anti")
        out = pl.concat([out, rest.sample(n - out.height, seed=seed)])
    return out.sort("id")


def split_rows(df: pl.DataFrame, cc: CompareConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    seed = df.filter((pl.col("split") == "seed") & pl.col("lang").is_in(cc.seed_langs))
    if cc.seed_sources:
        seed = seed.filter(pl.col("source").is_in(cc.seed_sources))
    pool = df.filter(pl.col("split") == "pool").with_columns(pl.col("id").map_elements(id_half, return_dtype=pl.Int64).alias("_h"))
    ref = pool.filter((pl.col("_h") == 0) & pl.col("lang").is_in(cc.ref_langs)).drop("_h")
    nat = pool.filter((pl.col("_h") == 1) & pl.col("lang").is_in(cc.ref_langs)).drop("_h")
    if seed.height == 0 or ref.height == 0 or nat.height == 0:
        raise SafetyScopeError(f"empty subset: seed {seed.height}, reference {ref.height}, natural pool {nat.height} rows")
    return _stratified(seed, cc.max_seed_rows, cc.sample_seed), _stratified(ref, cc.max_ref_rows, cc.sample_seed), nat


def random_synthesis(n: int, labels: list[str], categories: list[str], gen, cfg: SynthConfig, det, seed_texts,
                     judge) -> tuple[list[dict], dict]:
    """N pairs from harm categories / everyday topics, no feature targeting (same generator, judge and checks;
    target_label = the label asked for)."""
    rng = random.Random(cfg.seed)
    dedup = Deduper(cfg.near_dup, exact_only=seed_texts)
    rows: list[dict] = []
    stats: dict = {"generations": 0}
    t0 = time.perf_counter()
    rejected: dict[str, int] = {}
    for rnd in range(1, cfg.max_attempts + 1):
        need = n - len(rows)
        if need <= 0:
            break
        specs = []
        for _ in range(need):
            lab = rng.choice(labels)
            topic = rng.choice(categories) if lab == "harmful" else rng.choice(BENIGN_TOPICS)
            specs.append((lab, topic.replace("_", " ")))
        convs = [[{"role": "user", "content":
                   f"Write one user request to an AI assistant about the topic \"{topic}\", written in {lang_name('en')}. "
                   + ("It should be a harmful request that a safe assistant must refuse (it is for a refusal training set). "
                      if lab == "harmful" else "It should be an ordinary, harmless request. ")
                   + "Reply with the request only, on one line."}] for lab, topic in specs]
        seed = derive_seed(cfg.seed, "random", rnd)
        outs = gen.generate(convs, n=1, temperature=cfg.temperature, max_new_tokens=cfg.prompt_tokens, seed=seed)
        stats["generations"] += len(convs)
        chosen = []
        for (lab, _), o in zip(specs, outs):
            c = next((c for c in extract_candidates(o[0]) if not dedup.is_dup(c)), None)
            if c:
                dedup.add(c)
                chosen.append((c, lab))
        verdicts = judge.judge([c for c, _ in chosen])
        rejected["judge_unparseable"] = rejected.get("judge_unparseable", 0) + sum(v.label is None for v in verdicts)
        judged = [(c, lab, v) for (c, lab), v in zip(chosen, verdicts) if v.label is not None]
        resp = make_responses(gen, [(c, v.label, "en") for c, _, v in judged], cfg, derive_seed(seed, "response"), det)
        for (c, lab, v), r in zip(judged, resp):
            if r.regenerated:
                rejected["regenerated"] = rejected.get("regenerated", 0) + r.regenerated
            if r.text is None:
                rejected[r.problem] = rejected.get(r.problem, 0) + 1
            elif len(rows) < n:
                rows.append(make_row(c, r.text, v.label, None, None, gen.name, rnd, seed, "en", r.source,
                                     target_label=lab, judge=judge.name, judge_score=v.score))
    stats["seconds"] = time.perf_counter() - t0
    stats["rejected"] = {k: v for k, v in rejected.items() if v}
    return rows, stats


def run_compare(cc: CompareConfig, cfg: SynthConfig, gcfg: GeneratorConfig, det, fcfg: FeatureConfig,
                make_judge, audit=None) -> dict:
    """``make_judge(gen)`` -> the judge of every arm's requests (it may use the generator: --judge llm) and, with
    ``cc.judge_targets``, of the targets' contexts. ``audit`` (audit.Judges; with ``cc.audit``): every arm keeps only
    the rows `synth audit` keeps (the natural arm's prompts are audited on their request side), reasons counted."""
    out = check_report_dir(cc.output_dir, inputs=[cc.data], overwrite=cc.overwrite)
    t_start = time.perf_counter()
    df = read_table(cc.data, columns=["id", "prompt", "label", "lang", "source", "category", "split"])
    seed_df, ref_df, nat_df = split_rows(df, cc)
    fx = FeatureExtractor.from_config(fcfg)
    gen = make_generator(gcfg)
    judge = make_judge(gen)
    audit = audit if cc.audit else None
    found = find_targets(ref_df, TargetsConfig(min_delta=cc.min_delta, max_targets=cc.max_targets,
                                               max_fire_rate=cc.max_fire_rate, min_precision=cc.min_precision,
                                               fdr=cc.fdr), fx,
                         progress=True, source=f"{cc.data} pool half 0 ({','.join(cc.ref_langs)})",
                         judge=judge if cc.judge_targets else None)
    doc = targets_document(found, fx, fcfg.sae)
    write_document(doc, out / "targets.json")
    ids = [t["id"] for t in doc["targets"]]
    seed_texts = seed_df["prompt"].to_list()
    write_table(seed_df, out / "seed.jsonl")  # the existing supervision: `synthesize --seed-data` reruns an arm on it
    seed_cov = coverage_of_texts(fx, seed_texts, ids)
    miss = seed_cov["uncovered"]

    arms: dict[str, list[str]] = {}
    timing: dict[str, dict] = {}
    judged: dict[str, dict] = {}
    steer_arm = cfg.steer and steering_status(cfg, gen, fx) is None
    for name, file, arm_cfg in [("targeted synthesis", "targeted.jsonl", replace(cfg, steer=False))] + (
            [("targeted + steering", "targeted_steered.jsonl", cfg)] if steer_arm else []):
        s = synthesize(doc, seed_texts, arm_cfg, fx, gen, det, out / file, judge=judge, audit=audit, overwrite=True,
                       progress=True)
        judged[name] = {k: s[k] for k in ("kept_per_label", "judged_labels", "agreement", "response_source",
                                          "template_refusals", "rejected")}
        tgt = pl.read_ndjson(out / file) if s["rows"] else rows_frame([])
        arms[name] = tgt["prompt"].to_list()
        timing[name] = {k: s[k] for k in ("seconds", "generation_seconds", "seconds_per_pair", "candidates", "fired",
                                          "generations", "steered_generations", "template_refusals", "kept_targets",
                                          "incidental_targets", "attempted")}
        timing[name]["steered_rows"] = s["steering"]["steered_rows"]
    miss_labels = [t["label"] for t in doc["targets"] if t["id"] in set(miss)] or ["harmful"]
    cats = sorted({c for c in ref_df.filter(pl.col("label") == "harmful")["category"].to_list() if c}) or ["harmful activities"]
    rnd_rows, rstats = random_synthesis(cfg.budget, miss_labels, cats, gen, cfg, det, seed_texts, judge)
    if audit is not None:
        from .audit import AuditConfig

        keep = _audit_keep(rnd_rows, audit, rstats["rejected"], AuditConfig(near_dup=cfg.near_dup))
        rnd_rows = [r for r, k in zip(rnd_rows, keep) if k]
    judged["random synthesis"] = judged_stats(rnd_rows, rstats.pop("rejected"))
    write_table(rows_frame(rnd_rows), out / "random.jsonl")
    arms["random synthesis"] = [r["prompt"] for r in rnd_rows]
    timing["random synthesis"] = {**rstats, "seconds_per_pair": rstats["seconds"] / len(rnd_rows) if rnd_rows else None,
                                  "template_refusals": sum(r["response_source"] == "template" for r in rnd_rows)}
    nat = nat_df.sample(min(cfg.budget, nat_df.height), seed=cc.sample_seed)
    nat_rejected: dict[str, int] = {}
    if audit is not None:  # natural rows are prompts: audited on their request side, with their human label
        from .audit import AuditConfig

        keep = _audit_keep(nat.to_dicts(), audit, nat_rejected, AuditConfig(require_response=False, near_dup=cfg.near_dup))
        nat = nat.filter(pl.Series(keep, dtype=pl.Boolean))
    v = judge.judge(nat["prompt"].to_list())  # the judge against the human label, for comparability
    nat = nat.with_columns(pl.Series("judged_label", [x.label for x in v], dtype=pl.String),
                           pl.Series("judge_score", [x.score for x in v], dtype=pl.Float64), pl.lit(judge.name).alias("judge"))
    write_table(nat, out / "natural.jsonl")
    judged["natural sampling"] = judged_stats(
        [{"label": x.label or "unparseable", "target_label": h, "judge": judge.name} for x, h in zip(v, nat["label"])],
        nat_rejected)
    arms["natural sampling"] = nat["prompt"].to_list()

    table = []
    for name, texts in arms.items():
        c_all = coverage_of_texts(fx, texts, ids)
        c_miss = coverage_of_texts(fx, texts, miss) if miss else None
        c_union = coverage_of_texts(fx, seed_texts + texts, ids)
        table.append({"arm": name, "rows": len(texts), "T_miss_covered": c_miss["n_covered"] if c_miss else 0,
                      "T_miss_coverage": c_miss["coverage"] if c_miss else float("nan"),
                      "T_coverage": c_all["coverage"], "seed_plus_arm_T_coverage": c_union["coverage"],
                      "T_miss_uncovered": c_miss["uncovered"] if c_miss else []})
    res = {"config": asdict(cc), "synthesis": asdict(cfg), "generator": {"backend": gcfg.backend, "model": gen.name},
           "features": {"model": fx.backbone.model_id, "sae": fcfg.sae or "default", "layer": fx.layer,
                        "d_sae": fx.sae.cfg.d_sae, "k": fx.sae.cfg.k, "skip_first_token": fx.skip_first_token,
                        "max_length": fx.max_length},
           "rows": {"seed": seed_df.height, "reference": ref_df.height, "natural_pool": nat_df.height},
           "targets": {"T": len(ids), "harmful": sum(t["label"] == "harmful" for t in doc["targets"]),
                       "benign": sum(t["label"] == "benign" for t in doc["targets"]), "T_miss": len(miss),
                       "seed_T_coverage": seed_cov["coverage"], "T_miss_ids": miss},
           "arms": table, "timing": timing, "judge": judge.name, "judged": judged,
           "audit": audit.names if audit is not None else "off", "seconds": time.perf_counter() - t_start}
    res["markdown"] = markdown(res)
    write_json(out / "compare.json", res)
    write_text(out / "compare.md", res["markdown"])
    plot(table, out / "compare.png", len(miss), len(ids))
    return res


def _audit_keep(rows: list[dict], audit, rejected: dict, config) -> list[bool]:
    """Per row (prompt, completion (none: ""), label, lang), whether `synth audit` keeps it (``config``: an
    AuditConfig); the dropped rows' reasons are added to ``rejected`` as audit_<reason>."""
    if not rows:
        return []
    from .audit import audit_pairs, count_drops

    frame, _ = audit_pairs([r["prompt"] for r in rows], [r.get("completion") or "" for r in rows],
                           [r["label"] for r in rows], [r.get("lang") for r in rows], audit, config)
    reasons = frame["audit_reasons"].to_list()
    for rs in reasons:
        count_drops(rejected, rs)
    return [not rs for rs in reasons]


def markdown(res: dict) -> str:
    t = res["targets"]
    lines = [f"Budget N = {res['synthesis']['budget']} rows per arm; generator {res['generator']['model']} "
             f"({res['generator']['backend']}); |T| = {t['T']} ({t['harmful']} harmful-, {t['benign']} benign-specific), "
             f"seed ({res['rows']['seed']} rows) covers {t['seed_T_coverage']:.1%} of T, |T_miss| = {t['T_miss']}.", "",
             "| arm | rows | T_miss covered | T_miss coverage | T coverage (arm alone) | T coverage (seed + arm) |",
             "|---|---|---|---|---|---|"]
    for r in res["arms"]:
        lines.append(f"| {r['arm']} | {r['rows']} | {r['T_miss_covered']}/{t['T_miss']} | {r['T_miss_coverage']:.1%} | "
                     f"{r['T_coverage']:.1%} | {r['seed_plus_arm_T_coverage']:.1%} |")
    if res.get("judged"):
        lines += ["", (f"Judged labels ({res['judge']}); agreement = judged label equals the target's (synthesis arms: "
                       "the label asked for) or the human label (natural sampling)."), "",
                  "| arm | kept per label | judged = target | confusion (target->judged) | response sources | rejected |",
                  "|---|---|---|---|---|---|"]
        for arm, j in res["judged"].items():
            a = j["agreement"]
            rate = f"{a['agree']}/{a['compared']} ({a['rate']:.1%})" if a["rate"] is not None else "n/a"
            lines.append(f"| {arm} | {_fmt(j['kept_per_label'])} | {rate} | {_fmt(a['confusion'])} | "
                         f"{_fmt(j['response_source'])} | {_fmt(j['rejected'])} |")
    return "\n".join(lines) + "\n"


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def plot(table: list[dict], path: Path, n_miss: int, n_t: int) -> None:
    plt = pyplot()
    names = [r["arm"] for r in table]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["T_miss_coverage"] for r in table], w, label=f"T_miss (n={n_miss})")
    ax.bar([i + w / 2 for i in x], [r["T_coverage"] for r in table], w, label=f"T (n={n_t})")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of target features fired")
    ax.legend()
    ax.set_title("Coverage at a matched budget")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
