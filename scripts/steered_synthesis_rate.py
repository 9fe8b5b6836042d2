"""Does steering make the generator write requests that fire their target? Per-candidate fire rates, plain vs steered.

For each target a `synth compare` run left uncovered by the seed data (T_miss), the generator writes requests with the
same generation prompt as `synthesize` (`request_messages`), unsteered (multiplier 0) and with the target's decoder
direction added at generated positions (alpha = multiplier x the target's mean activation x its decoder column's norm,
as in `synthesize`). Every candidate is verified as `synthesize` verifies it: near copies of the shown contexts
(5-gram Jaccard > 0.8, or over 80 % of the candidate's 5-grams in one context) do not count; the rest are re-encoded
without steering and count if the target fires. Reported per multiplier: candidates, the share that fire their target
(95% bootstrap CI over targets), targets with at least one firing candidate, and per target the rates, so a target
that steering does not reach is named.

    python scripts/steered_synthesis_rate.py reports/synthesis --mults 0,2,4,8 --samples 8 -o reports/steering/synthesis_rate
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from safetyscope.features import FeatureConfig, FeatureExtractor
from safetyscope.generators import TransformersGenerator
from safetyscope.steering import SteerSpec, steer
from safetyscope.synthesis.synthesize import derive_seed, request_messages, typical_activation
from safetyscope.synthesis.textrules import copies_context, extract_candidates, shingles


def verified(fx, target: dict, samples: list[str]) -> tuple[int, int, float]:
    """(candidates, candidates that fire the target unsteered, their max activation) of one target's generations."""
    ex = [shingles(e["text"]) for e in target["examples"]]
    seen, cands = set(), []
    for s in samples:
        for c in extract_candidates(s):
            if c not in seen and not copies_context(c, ex):  # containment >= Jaccard: covers the near-copy check too
                seen.add(c)
                cands.append(c)
    if not cands:
        return 0, 0, 0.0
    acts = fx.transform(cands)[:, target["id"]].toarray().ravel()
    return len(cands), int((acts > 0).sum()), float(acts.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir", help="a `synth compare` output directory (compare.json, targets.json)")
    ap.add_argument("--mults", default="0,2,4,8", help="steering multipliers; 0 = unsteered")
    ap.add_argument("--samples", type=int, default=8, help="generations per target and multiplier")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("-o", "--output-dir", default="reports/steering/synthesis_rate")
    a = ap.parse_args()
    t0 = time.perf_counter()
    cdir, out = Path(a.compare_dir), Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    miss = set(json.loads((cdir / "compare.json").read_text())["targets"]["T_miss_ids"])
    targets = [t for t in json.loads((cdir / "targets.json").read_text())["targets"] if t["id"] in miss]
    fx = FeatureExtractor.from_config(FeatureConfig())
    gen = TransformersGenerator.from_backbone(fx.backbone, 16)
    mults = [float(m) for m in a.mults.split(",")]
    per: dict[int, dict] = {t["id"]: {} for t in targets}
    for m in mults:
        for i, t in enumerate(targets):
            seed = derive_seed(a.seed, t["id"])  # the same sampling seed at every multiplier: paired
            msgs = [request_messages(t)]
            if m:
                alpha = m * typical_activation(t)[0] * float(fx.sae.W_dec[:, t["id"]].norm())
                with steer(gen.model, fx.sae, fx.layer, [SteerSpec(t["id"], alpha=alpha)], positions="generated"):
                    outs = gen.generate(msgs, n=a.samples, temperature=a.temperature, max_new_tokens=a.tokens, seed=seed)
            else:
                outs = gen.generate(msgs, n=a.samples, temperature=a.temperature, max_new_tokens=a.tokens, seed=seed)
            n, f, mx = verified(fx, t, outs[0])
            per[t["id"]][str(m)] = {"candidates": n, "fired": f, "max_activation": mx}
        print(f"multiplier {m:g}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(a.seed)
    table = []
    for m in mults:
        c = np.array([per[t["id"]][str(m)]["candidates"] for t in targets], float)
        f = np.array([per[t["id"]][str(m)]["fired"] for t in targets], float)
        idx = rng.integers(0, len(targets), (a.bootstrap, len(targets)))
        boots = f[idx].sum(1) / np.maximum(c[idx].sum(1), 1)
        table.append({"multiplier": m, "candidates": int(c.sum()), "fired": int(f.sum()),
                      "fire_rate": float(f.sum() / max(c.sum(), 1)),
                      "fire_rate_ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                      "targets_hit": int((f > 0).sum()), "targets": len(targets)})
    never = [t["id"] for t in targets if all(per[t["id"]][str(m)]["fired"] == 0 for m in mults)]
    res = {"settings": vars(a), "model": fx.backbone.model_id, "layer": fx.layer, "table": table, "per_target": per,
           "never_fired": never, "seconds": time.perf_counter() - t0}
    (out / "synthesis_rate.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Steered vs plain request writing on T_miss ({len(targets)} targets of {cdir}; {res['model']}, layer "
             f"{res['layer']})", "",
             f"{a.samples} generations per target and multiplier (temperature {a.temperature}, the same seed at every "
             "multiplier); a candidate counts if it is not a near copy of a shown context and fires its target "
             f"re-encoded without steering. 95% bootstrap CI over targets. Run time {res['seconds']:.0f} s.", "",
             "| multiplier | candidates | fire their target | fire rate [95% CI] | targets hit |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['multiplier']:g}{' (plain)' if not r['multiplier'] else ''} | {r['candidates']} | {r['fired']} | "
                     f"{r['fire_rate']:.1%} [{r['fire_rate_ci'][0]:.1%}, {r['fire_rate_ci'][1]:.1%}] | "
                     f"{r['targets_hit']}/{r['targets']} |")
    lines += ["", f"Targets no multiplier reached: {never or 'none'}"]
    (out / "synthesis_rate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
