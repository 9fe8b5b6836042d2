"""``steer --calibrate``: sweep each feature's strength and find the largest dose that still reads as text.

Per feature and strength (in the feature's own units, steer_dose.py), over the same prompts, greedy by default:

- the target's activation in the completions, re-encoded without steering (mean, and the share that fire it);
- the perplexity of each completion given its prompt under the **unsteered** model (its geometric mean over
  prompts, and its ratio to plain generation's): steering that breaks the text makes it unlikely to the model;
- degeneration per completion, on its tokens: distinct-token ratio and the share of 3-grams that repeat an earlier
  3-gram of the same completion. A completion is degenerate when it is empty, under ``MIN_DISTINCT`` distinct or
  over ``MAX_REPEATED`` repeated (a loop); gibberish of distinct tokens is what the perplexity ratio catches.

A strength **keeps the text fluent** when its perplexity is at most ``MAX_PPL_RATIO`` x plain and it has no more
degenerate completions than plain generation; it **raises the feature** when the mean re-encoded activation is
above plain's. The calibrated strength is the largest strength that does both (None if none does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .likelihood import mean_logprob
from .steering import SteerConfig, SteerSpec, steer, target_acts

DEFAULT_STRENGTHS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
MAX_PPL_RATIO = 2.0
MIN_DISTINCT = 0.4
MAX_REPEATED = 0.4


@dataclass
class CalibrationConfig(SteerConfig):
    """The generation settings of `steer` (SteerConfig) and the sweep."""

    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    """The schedule, in the feature's own units."""
    extra: dict = field(default_factory=dict)
    """Recorded as given (model, SAE ...)."""


def degeneration(ids: list[int]) -> tuple[float, float]:
    """(distinct-token ratio, share of 3-grams that repeat an earlier one) of one completion's token ids."""
    if not ids:
        return 0.0, 1.0
    grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    seen: set[tuple[int, ...]] = set()
    rep = 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return len(set(ids)) / len(ids), (rep / len(grams) if grams else 0.0)


def is_degenerate(distinct: float, repeated: float, n_tokens: int) -> bool:
    return n_tokens == 0 or distinct < MIN_DISTINCT or repeated > MAX_REPEATED


def _measure(fx, gen, texts, prompts, special, feats, cfg, completions) -> list[dict]:
    acts = target_acts(fx, completions, feats)
    # perplexity under the model as it is: called outside any steering block
    lp = mean_logprob(fx.backbone, texts, completions, batch_size=cfg.batch_size, prefix_special_tokens=special)
    ids_of = fx.backbone.tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = []
    for p, c, a, n, ids in zip(prompts, completions, acts, -lp, ids_of):
        distinct, repeated = degeneration(ids)
        rows.append({"prompt": p, "completion": c, "acts": a, "perplexity": math.exp(n) if n == n else None,
                     "distinct": distinct, "repeated_3grams": repeated,
                     "degenerate": is_degenerate(distinct, repeated, len(ids))})
    return rows


def _summary(rows: list[dict], j: int) -> dict:
    ppl = [r["perplexity"] for r in rows if r["perplexity"] is not None]
    acts = [r["acts"][j] for r in rows]
    return {"mean_activation": sum(acts) / len(acts), "fired_share": sum(a > 0 for a in acts) / len(acts),
            "perplexity": math.exp(sum(map(math.log, ppl)) / len(ppl)) if ppl else None,
            "degenerate": sum(r["degenerate"] for r in rows),
            "distinct": sum(r["distinct"] for r in rows) / len(rows),
            "repeated_3grams": sum(r["repeated_3grams"] for r in rows) / len(rows)}


def calibrate(fx, prompts: list[str], features: list[int], scales, cfg: CalibrationConfig, *,
              extra_strengths: dict[int, list[float]] | None = None, progress: bool = False) -> dict:
    """The sweep: plain generation once, then each feature alone at each strength. Returns the report document
    (``features[i].rows`` per strength, ``calibrated_strength``) and every completion under ``completions``."""
    from tqdm.auto import tqdm

    from .generators import TransformersGenerator

    gen = TransformersGenerator.from_backbone(fx.backbone, cfg.batch_size)
    texts = [gen._render([{"role": "user", "content": p}]) if cfg.chat else p for p in prompts]
    special = not (cfg.chat and getattr(gen.tok, "chat_template", None))
    plan = {f: sorted(set(cfg.strengths) | set((extra_strengths or {}).get(f, []))) for f in features}
    bar = tqdm(total=len(prompts) * (1 + sum(map(len, plan.values()))), disable=not progress, desc="calibrate",
               unit="seq")

    def generate(specs):
        def run():
            return [o[0] for o in gen.generate_texts(texts, 1, cfg.temperature, cfg.max_new_tokens, cfg.seed,
                                                     add_special_tokens=special, progress=bar)]
        if not specs:
            return run()
        with steer(fx.backbone.model, fx.sae, fx.layer, specs, cfg.positions):
            return run()

    plain_rows = _measure(fx, gen, texts, prompts, special, features, cfg, generate([]))
    completions = [{"feature": None, "strength": 0.0, "strength_abs": 0.0, **r} for r in plain_rows]
    doc_features = []
    for j, f in enumerate(features):
        sc = scales[f]
        unit = sc.unit("add")
        plain = {"strength": 0.0, "strength_abs": 0.0, **_summary(plain_rows, j)}
        table = [plain]
        for s in plan[f]:
            rows = _measure(fx, gen, texts, prompts, special, [f], cfg, generate([SteerSpec(f, alpha=s * unit)]))
            completions += [{"feature": f, "strength": s, "strength_abs": s * unit, **r} for r in rows]
            table.append({"strength": s, "strength_abs": s * unit, **_summary(rows, 0)})
        for r in table:
            ratio = r["perplexity"] / plain["perplexity"] if r["perplexity"] and plain["perplexity"] else None
            r["perplexity_ratio"] = ratio
            r["fluent"] = ratio is not None and ratio <= MAX_PPL_RATIO and r["degenerate"] <= plain["degenerate"]
            r["raises"] = r["mean_activation"] > plain["mean_activation"]
        ok = [r["strength"] for r in table[1:] if r["fluent"] and r["raises"]]
        doc_features.append({"feature": f, "typical_activation": sc.typical, "decoder_norm": sc.decoder_norm,
                             "unit_abs": unit, "reference_fired": sc.n_fired, "unit_source": sc.source,
                             "calibrated_strength": max(ok) if ok else None, "rows": table})
    bar.close()
    return {"config": asdict(cfg), "n_prompts": len(prompts), "criteria": {
                "fluent": f"perplexity <= {MAX_PPL_RATIO:g} x plain and no more degenerate completions than plain",
                "degenerate": f"empty, distinct-token ratio < {MIN_DISTINCT:g} or repeated 3-gram share > {MAX_REPEATED:g}",
                "raises": "mean re-encoded activation above plain"},
            "features": doc_features, "completions": completions}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(doc: dict) -> str:
    cols = ["strength", "strength_abs", "mean_activation", "fired_share", "perplexity", "perplexity_ratio",
            "degenerate", "distinct", "repeated_3grams", "fluent", "raises"]
    out = [f"# Steering calibration ({doc['n_prompts']} prompts, {doc['config']['max_new_tokens']} new tokens)", "",
           "Strength = x the feature's typical activation x its decoder norm (the `unit`); strength_abs = residual "
           "length added. " + "; ".join(f"{k}: {v}" for k, v in doc["criteria"].items()) + ".", ""]
    for f in doc["features"]:
        out += [f"## Feature {f['feature']}: calibrated strength {_fmt(f['calibrated_strength'])}", "",
                f"typical activation {f['typical_activation']:.3g} ({f['unit_source']}, fires on {f['reference_fired']} "
                f"reference texts), decoder norm {f['decoder_norm']:.3g}, unit {f['unit_abs']:.3g}", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in f["rows"]:
            mark = "**" if r["strength"] == f["calibrated_strength"] else ""
            out.append("| " + " | ".join(f"{mark}{_fmt(r[c])}{mark}" for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def plot(doc: dict, path: Path) -> Path:
    from .reports import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for f in doc["features"]:
        rows = f["rows"][1:]
        xs = [r["strength"] for r in rows]
        line = axes[0].plot(xs, [r["mean_activation"] for r in rows], marker="o", label=str(f["feature"]))[0]
        axes[0].axhline(f["rows"][0]["mean_activation"], color=line.get_color(), ls=":", lw=0.8)
        axes[1].plot(xs, [r["perplexity_ratio"] or float("nan") for r in rows], marker="o", color=line.get_color())
        axes[2].plot(xs, [r["degenerate"] for r in rows], marker="o", color=line.get_color())
        if f["calibrated_strength"] is not None:
            r = next(r for r in rows if r["strength"] == f["calibrated_strength"])
            axes[0].plot([r["strength"]], [r["mean_activation"]], marker="*", ms=16, color=line.get_color())
    axes[1].axhline(MAX_PPL_RATIO, color="grey", ls="--", lw=1)
    for ax, title in zip(axes, ["target activation, re-encoded (dotted: plain)", "perplexity / plain (unsteered model)",
                                f"degenerate completions (of {doc['n_prompts']})"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("strength (x typical activation)")
        ax.set_title(title, fontsize=9)
    axes[1].set_yscale("log")
    axes[0].legend(title="feature (*: calibrated)", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(doc: dict, out_dir: Path) -> list[Path]:
    import polars as pl

    from .data import write_table
    from .reports import write_json, write_text

    body = {k: v for k, v in doc.items() if k != "completions"}
    paths = [write_json(out_dir / "calibration.json", body), write_text(out_dir / "calibration.md", markdown(doc)),
             plot(doc, out_dir / "calibration.png")]
    write_table(pl.DataFrame(doc["completions"], infer_schema_length=None), out_dir / "completions.jsonl")
    return paths + [out_dir / "completions.jsonl"]
