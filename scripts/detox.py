"""Measured detoxification by feature steering: continuations of toxic prompt fragments, three arms.

- plain: the unsteered model;
- suppressed: every feature of the shipped toxicity OR-rule clamped to 0 at every position (`steer -c toxicity-or-rule
  --suppress`);
- control: as many random features clamped to 0, each drawn among the 10 features whose firing rate on the prompts
  is nearest to a classifier feature's (so the control edits about as often); the mean edit norm of each arm is
  reported, so the size of the two interventions is measured, not assumed.

Prompts: toxic rows of the shared toxicity pack cut in half (first half of the words): English `discovery` rows and,
per extra language, the `rtp_lx` rows (RTP-LX, the pack's `source` column). Greedy continuations, judged on the
continuation alone by (1) the raw-activation probe (eval's `probe_raw`: logistic regression on mean-pooled residual
activations of the SAE's layer, fitted on that language's discovery rows minus the prompt rows, its accuracy on test
rows reported) — not by the features that were suppressed — and (2) the toxicity classifier itself. Fluency: the
perplexity of the continuation given the prompt under the unsteered model, and the mean continuation length.
95% bootstrap CIs over prompts (differences vs plain: paired).

    python scripts/detox.py --n-en 60 --tokens 24 -o reports/steering
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from safetyscope.discovery.detector import classifier_path, read_classifier, read_rules
from safetyscope.eval.metrics import raw_activation_probe
from safetyscope.provenance import extractor_from_record
from safetyscope.steering import SteerSpec, classifier_features, run_steer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"  # ../shared/data of the repository


def prompt_rows(lang: str, n: int, seed: int) -> pl.DataFrame:
    df = pl.read_parquet(DATA / f"{lang}.parquet").filter(pl.col("label") == 1)
    df = df.filter(pl.col("split") == "discovery") if lang == "en" else df.filter(pl.col("source") == "rtp_lx")
    words = df["text"].str.split(" ")
    df = df.with_columns(words.alias("_w")).filter(pl.col("_w").list.len() >= 8)
    df = df.sample(min(n, df.height), seed=seed, shuffle=True)
    return df.with_columns(pl.col("_w").map_elements(lambda w: " ".join(w[: len(w) // 2]), return_dtype=pl.String)
                           .alias("prompt")).drop("_w")


def fit_probe(fx, lang: str, exclude: set[str], n_fit: int, n_check: int, seed: int):
    df = pl.read_parquet(DATA / f"{lang}.parquet").filter(~pl.col("id").is_in(list(exclude)))
    fit = pl.concat([df.filter((pl.col("split") == "discovery") & (pl.col("label") == y)).sample(n_fit // 2, seed=seed)
                     for y in (0, 1)])
    check = pl.concat([df.filter((pl.col("split") == "test") & (pl.col("label") == y)).sample(n_check // 2, seed=seed)
                       for y in (0, 1)])
    probe = raw_activation_probe(seed).fit(fx.extract(fit["text"].to_list()).mean_acts, fit["label"].to_numpy())
    acc = float((probe.predict(fx.extract(check["text"].to_list()).mean_acts) == check["label"].to_numpy()).mean())
    return probe, {"fit_rows": fit.height, "test_rows": check.height, "test_accuracy": acc}


def judge(fx, rule, probe, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(probe toxic, classifier toxic) per text; an empty continuation is not toxic."""
    ok = [i for i, t in enumerate(texts) if t.strip()]
    p, c = np.zeros(len(texts), bool), np.zeros(len(texts), bool)
    if ok:
        ex = fx.extract([texts[i] for i in ok])
        p[ok] = probe.predict(ex.mean_acts) == 1
        c[ok] = rule.decision_function(ex.codes) > 0
    return p, c


@torch.inference_mode()
def fluency(fx, prompts: list[str], conts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean NLL per continuation token given the prompt, continuation tokens) under the unsteered model."""
    tok, model = fx.backbone.tokenizer, fx.backbone.model
    nll, n = np.full(len(conts), np.nan), np.zeros(len(conts), int)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        a = tok(p)["input_ids"]
        b = tok(" " + c, add_special_tokens=False)["input_ids"] if c.strip() else []
        n[i] = len(b)
        if not b:
            continue
        ids = torch.tensor([a + b], device=fx.backbone.device)
        logits = model(input_ids=ids).logits[0, len(a) - 1 : -1].float()
        nll[i] = float(torch.nn.functional.cross_entropy(logits, ids[0, len(a):]))
    return nll, n


def boot(x: np.ndarray, rng, reps: int, stat=np.nanmean) -> list[float]:
    idx = rng.integers(0, len(x), (reps, len(x)))
    vals = np.array([stat(x[i]) for i in idx])
    return [float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))]


def control_features(fx, prompts: list[str], feats: list[int], seed: int) -> list[int]:
    codes = fx.transform(prompts)
    rate = np.asarray((codes > 0).mean(axis=0)).ravel()
    rng, out = np.random.default_rng(seed), []
    perm = rng.permutation(len(rate))  # ties (e.g. the many features that never fire) in random order, not by id
    for f in feats:
        order = [g for g in perm[np.argsort(np.abs(rate[perm] - rate[f]), kind="stable")] if g not in feats and g not in out]
        out.append(int(rng.choice(order[:10])))
    return out


def residual_norm(fx, texts: list[str]) -> float:
    """Mean norm of the SAE layer's output over real tokens (the first token excluded: its norm is an outlier)."""
    norms = []
    for t in texts:
        ids = fx.backbone.tokenizer(t, return_tensors="pt")["input_ids"].to(fx.backbone.device)
        with torch.inference_mode():
            h = fx.backbone.model(input_ids=ids, output_hidden_states=True).hidden_states[fx.layer + 1][0, 1:]
        norms += h.float().norm(dim=-1).tolist()
    return float(np.mean(norms))


def add_specs(fx, feats: list[int], weights: list[float], norm: float) -> list[SteerSpec]:
    """Subtract ``sum_F w_F u_F`` (u_F: F's unit decoder direction) scaled so the edit's norm is ``norm``."""
    U = torch.stack([fx.sae.W_dec[:, f].float() / fx.sae.W_dec[:, f].float().norm() for f in feats])
    w = torch.tensor(weights, dtype=torch.float32)
    c = norm / float((w @ U).norm())
    return [SteerSpec(f, alpha=-c * float(x)) for f, x in zip(feats, w)]


def main():
    global DATA
    ap = argparse.ArgumentParser()
    ap.add_argument("--classifier", default="toxicity", help="shipped classifier name or file whose features are suppressed")
    ap.add_argument("--n-en", type=int, default=200, help="English prompts (0: none)")
    ap.add_argument("--rtp-langs", default="", help="comma-separated languages whose rtp_lx rows are also used")
    ap.add_argument("--n-rtp", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--strengths", default="0.25,0.5,1",
                    help="subtraction strengths: the edit's norm as a multiple of the layer's mean residual norm")
    ap.add_argument("--probe-rows", type=int, default=400)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA), help="the shared toxicity pack's directory")
    ap.add_argument("-o", "--output-dir", default="reports/steering")
    a = ap.parse_args()
    DATA = Path(a.data)
    t0 = time.perf_counter()
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = classifier_path(a.classifier)
    doc = read_classifier(path)
    fx = extractor_from_record(doc, path, dtype="float32")
    fallback, by_lang = read_rules(doc, path, fx.sae.cfg.d_sae)  # a per-language file: one rule per language
    feats = classifier_features(path, fx)  # the features that push towards toxic (positive weight), of every rule
    w_of: dict[int, float] = {}  # a feature's largest weight in any rule
    for r in (fallback, *by_lang.values()):
        for f, w in zip(r.features_, getattr(r, "weights_", np.ones(len(r.features_)))):
            w_of[int(f)] = max(w_of.get(int(f), -np.inf), float(w))
    strengths = [float(x) for x in a.strengths.split(",") if x]
    langs = (["en"] if a.n_en else []) + [x for x in a.rtp_langs.split(",") if x]  # --n-en 0: RTP-LX languages only
    rng = np.random.default_rng(a.seed)
    res = {"settings": vars(a), "model": fx.backbone.model_id, "layer": fx.layer, "classifier": str(path.name),
           "rule": type(fallback).__name__ + (f" per language ({len(by_lang)})" if by_lang else ""),
           "suppressed_features": feats, "languages": {}}
    examples = []
    for lang in langs:
        rule = by_lang.get(lang, fallback)  # the classifier as a judge: its rule for this language
        rows = prompt_rows(lang, a.n_en if lang == "en" else a.n_rtp, a.seed)
        prompts = rows["prompt"].to_list()
        probe, probe_info = fit_probe(fx, lang, set(rows["id"].to_list()), a.probe_rows, 200, a.seed)
        ctrl = control_features(fx, prompts, feats, a.seed)
        # subtraction weights: a feature's classifier weight x its mean activation where it fires on the prompts
        # (its typical size in the residual stream, with the decoder norm); the control gets the same weights
        codes = fx.transform(prompts).tocsc()
        acts = [float(codes[:, f].data.mean()) if codes[:, f].nnz else 0.0 for f in feats]
        wts = [max(w_of[f], 0.0) * max(x, 1e-3) * float(fx.sae.W_dec[:, f].norm()) for f, x in zip(feats, acts)]
        hnorm = residual_norm(fx, prompts[:50])
        arms = [("clamp 0", "suppressed", [SteerSpec(f, clamp=0.0) for f in feats]),
                ("clamp 0", "control", [SteerSpec(f, clamp=0.0) for f in ctrl])]
        for s in strengths:
            arms += [(f"subtract {s:g}", "suppressed", add_specs(fx, feats, wts, s * hnorm)),
                     (f"subtract {s:g}", "control", add_specs(fx, ctrl, wts, s * hnorm))]
        conts: dict[str, list[str]] = {}
        table = {}
        for i, (strength, who, specs) in enumerate(arms):
            rs, st = run_steer(fx, prompts, specs, chat=False, max_new_tokens=a.tokens, plain=i == 0, progress=True)
            if i == 0:
                conts["plain"] = [r["plain_completion"] for r in rs]
                table["plain"] = {"strength": "none", "who": "plain", "stats": None}
            conts[f"{who} ({strength})"] = [r["completion"] for r in rs]
            table[f"{who} ({strength})"] = {"strength": strength, "who": who, "stats": st}
        base: dict = {}
        probe_toxic: dict[str, np.ndarray] = {}  # per arm, per prompt: reused for the paired vs-control intervals
        for name, d in table.items():
            p, c = judge(fx, rule, probe, conts[name])
            probe_toxic[name] = p
            nll, n = fluency(fx, prompts, conts[name])
            if name == "plain":
                base = {"p": p, "c": c}
            row = {"strength": d["strength"], "who": d["who"], "n": len(p), "probe_toxic": float(p.mean()),
                   "probe_toxic_ci": boot(p.astype(float), rng, a.bootstrap),
                   "classifier_toxic": float(c.mean()), "classifier_toxic_ci": boot(c.astype(float), rng, a.bootstrap),
                   "perplexity": float(np.exp(np.nanmean(nll))),
                   "perplexity_ci": [float(np.exp(v)) for v in boot(nll, rng, a.bootstrap)],
                   "mean_tokens": float(n.mean()), "mean_tokens_ci": boot(n.astype(float), rng, a.bootstrap),
                   "empty": int((n == 0).sum())}
            if d["stats"] is not None:
                row |= {"edited_positions": d["stats"]["edited_positions"], "mean_edit_norm": d["stats"]["mean_edit_norm"]}
            if name != "plain":
                row["probe_delta_ci"] = boot(p.astype(float) - base["p"], rng, a.bootstrap)
                row["classifier_delta_ci"] = boot(c.astype(float) - base["c"], rng, a.bootstrap)
            table[name] = row
        for name, row in table.items():  # suppressed vs its own control, paired over prompts
            if row["who"] == "suppressed":
                q = f"control ({row['strength']})"
                diff = probe_toxic[name].astype(float) - probe_toxic[q].astype(float)
                row["probe_vs_control_ci"] = boot(diff, rng, a.bootstrap)
        res["languages"][lang] = {"prompts": len(prompts), "control_features": ctrl, "probe": probe_info,
                                  "residual_norm": hnorm, "arms": table}
        names = list(conts)
        for j in range(min(3, len(prompts))):
            examples.append({"lang": lang, "prompt": prompts[j], **{k: conts[k][j] for k in names}})
        pl.DataFrame([{"lang": lang, "prompt": p, **{k: conts[k][j] for k in names}} for j, p in enumerate(prompts)]
                     ).write_ndjson(out / f"continuations_{lang}.jsonl")
    res["examples"], res["seconds"] = examples, time.perf_counter() - t0
    (out / "detox.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    (out / "detox.md").write_text(markdown(res))
    plot(res, out / "detox.png")
    print(markdown(res))


def plot(res: dict, path: Path) -> None:
    """Toxic share (probe) against perplexity, per language: suppressed and control at each strength, plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(res["languages"])
    fig, axes = plt.subplots(1, len(langs), figsize=(5 * len(langs), 4), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        arms = res["languages"][lang]["arms"]
        for who, style in (("suppressed", "o-"), ("control", "s--")):
            pts = [(r["perplexity"], r["probe_toxic"], r["strength"]) for r in arms.values() if r["who"] == who]
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, label=who)
            for x, y, s in pts:
                ax.annotate(s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        pr = arms["plain"]
        ax.plot([pr["perplexity"]], [pr["probe_toxic"]], "k*", markersize=12, label="plain")
        ax.set(title=f"{lang}: {res['languages'][lang]['prompts']} prompts", xlabel="perplexity (unsteered model)",
               ylabel="toxic continuations (probe)", xscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict) -> str:
    pct = lambda v, ci: f"{v:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"  # noqa: E731
    dlt = lambda r, k: f"[{r[k][0]:+.1%}, {r[k][1]:+.1%}]" if k in r else "-"  # noqa: E731
    s = res["settings"]
    lines = [f"# Detoxification by feature steering ({res['model']}, layer {res['layer']})", "",
             f"Greedy continuations ({s['tokens']} new tokens) of toxic prompt fragments. Suppressed = the "
             f"{len(res['suppressed_features'])} features of `{res['classifier']}` ({res['rule']}) that push towards "
             "toxic, at every position: *clamp 0* sets each one's activation to 0 where it fires (text without them is "
             "untouched); *subtract s* subtracts the sum of their unit decoder directions, weighted by classifier weight "
             "x mean activation on the prompts x decoder norm, scaled to an edit of norm s x the layer's mean residual "
             "norm. Control = as many firing-rate-matched random features, same edit (same weights, same norm). "
             "Toxic share judged on the continuation alone by the raw-activation probe (independent of the suppressed "
             "features) and by the classifier (not independent: its own features were suppressed). Perplexity of the "
             f"continuation given the prompt under the unsteered model. 95% bootstrap CIs ({s['bootstrap']} resamples; "
             f"deltas paired over prompts). Run time {res['seconds']:.0f} s.", ""]
    for lang, d in res["languages"].items():
        pr = d["probe"]
        lines += [f"## {lang}: {d['prompts']} prompts (probe: {pr['fit_rows']} rows fitted, test accuracy "
                  f"{pr['test_accuracy']:.1%} on {pr['test_rows']}); residual norm {d['residual_norm']:.1f}; control "
                  f"features {d['control_features'][:12]}{' ...' if len(d['control_features']) > 12 else ''}", "",
                  "| arm | probe: toxic | vs plain | vs control | classifier: toxic | vs plain | perplexity "
                  "| mean tokens | mean edit norm |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm, r in d["arms"].items():
            lines.append(f"| {arm} | {pct(r['probe_toxic'], r['probe_toxic_ci'])} | {dlt(r, 'probe_delta_ci')} | "
                         f"{dlt(r, 'probe_vs_control_ci')} | {pct(r['classifier_toxic'], r['classifier_toxic_ci'])} | "
                         f"{dlt(r, 'classifier_delta_ci')} | {r['perplexity']:.1f} "
                         f"[{r['perplexity_ci'][0]:.1f}, {r['perplexity_ci'][1]:.1f}] | {r['mean_tokens']:.1f} | "
                         f"{r.get('mean_edit_norm', 0):.2f} |")
        lines.append("")
    lines += ["## Examples (first prompts of each language)", ""]
    for e in res["examples"]:
        lines.append(f"- [{e['lang']}] prompt: {e['prompt']!r}")
        lines += [f"  - {k}: {v!r}" for k, v in e.items() if k not in ("lang", "prompt")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
