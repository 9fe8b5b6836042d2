"""The target set T: safety-relevant SAE features found by the discovery contrast on a reference set.

delta_f = P(fires | harmful) - P(fires | benign) (``rank_features``); features with delta >= min_delta
are harmful-specific candidates and, with ``benign=True``, features with -delta >= min_delta are
benign-specific ones. A large delta alone does not make a safety concept: on a reference set whose harmful rows
come from a few sources, features of those sources' style (multiple-choice layouts, instruction phrasing) win the
contrast too, and their top contexts are benign requests. So a candidate is kept only when all three hold:

1. its firing is specific to its label: precision = P(label | fires) >= ``min_precision`` (support is the
   ``min_fires`` / ``max_fire_rate`` filter);
2. it is significant: a one-sided Fisher exact test of fires vs label (the hypergeometric upper tail: the chance
   of at least this many rows of its label among the rows it fires on), Benjamini-Hochberg q <= ``fdr``. The family
   is every feature that passes the support filter (a filter that does not look at the labels, so it does not bias
   the tests), one family per direction;
3. its top-activating contexts are judged as its label by a request judge: more than half of its ``n_examples``
   contexts (the ``judge_window`` tokens either side of the firing token, so the judge reads the concept where the
   feature fires rather than the rest of a long prompt). Skipped when no judge is given.

Candidates are examined by decreasing |delta| until ``max_targets`` are kept. Each target records the numbers
behind its keeping (precision, p/q value, judge votes) and a one-line ``why``; candidates that fail are listed
under ``rejected`` (the first ``max_rejected`` by |delta|) with their ``reasons`` and the same numbers, and
``selection`` counts the reasons over every candidate examined (the judge's over the ``judged`` ones: a candidate that
fails the statistics once the list is full is not judged). Each target carries its explanation material: the
top-activating reference texts with the strongest token marked «like this», its majority label and language.

T must come from rows disjoint from the data whose coverage is later measured (a feature found on
a data set is by construction fired by it); ``synth compare`` uses disjoint halves of the pool split.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..data import data_sha256, parse_labels, text_list
from ..errors import SafetyScopeError
from ..features import FeatureExtractor
from ..provenance import extractor_record, read_document

FORMAT = "safetyscope-targets"
REASONS = ("low_precision", "not_significant", "contexts_not_harmful", "contexts_not_benign")
# the bars of `synth targets`. TargetsConfig's own defaults leave them off (every precision and q passes), so a library
# caller that does not ask for them (``synth compare``) selects as before, by the contrast alone
MIN_PRECISION, FDR = 0.8, 0.05
_REJECTED_EXAMPLE = ("snippet", "activation", "label", "judged_context", "judged", "judge_score")


@dataclass
class TargetsConfig:
    text_column: str = "prompt"
    label_column: str = "label"
    min_delta: float = 0.05
    max_targets: int = 64
    benign: bool = True  # also benign-specific features (delta <= -min_delta)
    min_fires: int = 3  # a target must fire on at least this many reference rows
    max_fire_rate: float = 1.0  # ... and on at most this share of them (specific features, not generic ones)
    n_examples: int = 4  # top-activating contexts kept per target
    window: int = 12  # tokens either side of the max token in a snippet
    min_precision: float = 0.0  # P(target's label | fires) at least this (`synth targets`: MIN_PRECISION)
    fdr: float = 1.0  # Benjamini-Hochberg q of the one-sided Fisher test at most this (`synth targets`: FDR)
    judge_window: int = 6  # tokens either side of the max token in the context the judge reads
    max_rejected: int = 100  # rejected candidates listed in the file (by |delta|), so it stays small

    def __post_init__(self):
        from ..errors import check_number

        check_number("--min-delta", self.min_delta, low=0, high=1)
        check_number("--max-targets", self.max_targets, low=1, integer=True)
        check_number("--min-fires", self.min_fires, low=1, integer=True)
        check_number("--max-fire-rate", self.max_fire_rate, low=0, high=1, low_open=True)
        check_number("--examples", self.n_examples, low=1, integer=True)
        check_number("window", self.window, low=0, integer=True)
        check_number("--min-precision", self.min_precision, low=0, high=1)
        check_number("--fdr", self.fdr, low=0, high=1, low_open=True)
        check_number("--judge-window", self.judge_window, low=0, integer=True)
        check_number("--max-rejected", self.max_rejected, low=0, integer=True)


def snippet(tokens: list[str], acts: np.ndarray, window: int) -> tuple[str, str]:
    """The text around the max-activating token, that token wrapped in «…»; and the token itself."""
    pos = int(np.argmax(acts))
    lo, hi = max(0, pos - window), min(len(tokens), pos + window + 1)
    left, tok, right = "".join(tokens[lo:pos]), tokens[pos], "".join(tokens[pos + 1 : hi])
    lead = tok[: len(tok) - len(tok.lstrip())]
    s = f"{'…' if lo > 0 else ''}{left}{lead}«{tok.strip()}»{right}{'…' if hi < len(tokens) else ''}"
    return s.strip(), tok.strip()


def plain_context(snip: str) -> str:
    """A snippet as a judge reads it: without the «» marks and the ellipses of a cut."""
    return re.sub("[«»]", "", snip).strip().strip("…").strip()


def fisher_greater(k: np.ndarray, n_total: int, n_label: int, n_fires: np.ndarray) -> np.ndarray:
    """One-sided Fisher exact p-values: P(X >= k) for X ~ Hypergeometric(n_total rows, n_label of the label,
    n_fires drawn), i.e. the chance that a feature firing on n_fires random rows hits at least k of the label."""
    from scipy.stats import hypergeom

    return np.clip(hypergeom.sf(np.asarray(k) - 1, n_total, n_label, np.asarray(n_fires)), 0.0, 1.0)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q): q_(i) = min over j >= i of p_(j) * m / j, capped at 1; a
    feature is significant at FDR alpha when q <= alpha."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.empty(m)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def token_activations(fx: FeatureExtractor, texts: list[str], wanted: list[list[int]]) -> list[tuple[list[str], dict]]:
    """Per text: its tokens and, for each feature in ``wanted[i]``, that feature's code at every token (what
    ``fx.token_codes`` gives, in model batches instead of one text at a time)."""
    import torch

    ids, _ = fx.tokenize(texts)
    out: list = [None] * len(texts)
    with torch.inference_mode():
        for batch, input_ids, mask in fx.backbone.batches(ids, batch_size=fx.batch_size, batch_tokens=fx.batch_tokens):
            hidden = fx.backbone.capture(input_ids, mask, [fx.layer])[fx.layer].float()
            for b, i in enumerate(batch):
                n = len(ids[i])
                codes = fx.sae.encode(hidden[b, :n]).float().cpu()  # right padding: the real tokens come first
                if fx.skip_first_token:
                    codes[0] = 0
                toks = [fx.backbone.tokenizer.decode([t]) for t in ids[i]]
                out[i] = (toks, {f: codes[:, f].numpy() for f in wanted[i]})
    return out


def _why(t: dict, cfg: TargetsConfig, judged: bool) -> str:
    lab = t["label"]
    parts = [f"precision {t['precision']:.2f} (P({lab} | fires), {t['n_fires_label']}/{t['n_fires']} fires; "
             f"bar {cfg.min_precision:g})", f"q {t['q_value']:.2g} (p {t['p_value']:.2g}; FDR {cfg.fdr:g})"]
    if judged:
        parts.append(f"{t['judge_votes'][lab]}/{len(t['examples'])} contexts judged {lab}")
    return "; ".join(parts)


def find_targets(df: pl.DataFrame, cfg: TargetsConfig, fx: FeatureExtractor, *, progress: bool = False,
                 source: str = "reference", judge=None) -> dict:
    """``judge``: anything with ``judge(requests) -> list[Verdict]`` (synthesis.judge); None skips the context
    test (its fields are then null and no candidate is rejected for its contexts)."""
    if cfg.min_delta <= 0 or cfg.max_targets < 1:
        raise SafetyScopeError("--min-delta must be > 0 and --max-targets >= 1")
    texts = text_list(df, cfg.text_column, source)
    y = parse_labels(df.get_column(cfg.label_column), source)
    if len(set(y.tolist())) < 2:
        raise SafetyScopeError(f"{source}: the contrast needs both harmful and benign rows")
    codes = fx.transform(texts, progress=progress).tocsc()
    from ..discovery.rules import rank_features  # scikit-learn: loaded for the work, not by TargetsConfig's readers

    order, delta, p_h, p_b = rank_features(codes, y)
    fires = (codes > 0).astype(np.int64).tocsc()
    n_fires = np.asarray(fires.sum(axis=0)).ravel()
    n_harm = np.asarray(fires.T @ (y == 1).astype(np.int64)).ravel()
    n_rows, n_pos = len(y), int((y == 1).sum())
    tested = (n_fires >= cfg.min_fires) & (n_fires <= cfg.max_fire_rate * n_rows)
    p_val = {"harmful": fisher_greater(n_harm, n_rows, n_pos, n_fires),
             "benign": fisher_greater(n_fires - n_harm, n_rows, n_rows - n_pos, n_fires)}
    q_val = {}
    for lab, p in p_val.items():
        q = np.full(len(p), np.nan)
        q[tested] = bh_qvalues(p[tested])
        q_val[lab] = q
    cand = [int(f) for f in order if delta[f] >= cfg.min_delta and tested[f]]
    if cfg.benign:
        cand += [int(f) for f in order[::-1] if -delta[f] >= cfg.min_delta and tested[f]]
    cand = sorted(cand, key=lambda f: (-abs(delta[f]), f))
    langs = df.get_column("lang").to_list() if "lang" in df.columns else [None] * len(texts)

    def record(f: int) -> dict:
        lab = "harmful" if delta[f] > 0 else "benign"
        n_lab = int(n_harm[f] if lab == "harmful" else n_fires[f] - n_harm[f])
        col = codes[:, f]
        vals = col.data[col.data > 0]
        rows = col.indices[col.data > 0]
        lang_counts = Counter(langs[r] for r in rows if langs[r] is not None)
        reasons = []
        prec = n_lab / n_fires[f]
        if prec < cfg.min_precision:
            reasons.append("low_precision")
        if not q_val[lab][f] <= cfg.fdr:
            reasons.append("not_significant")
        return {
            "id": f, "label": lab, "delta": float(delta[f]),
            "p_fire_harmful": float(p_h[f]), "p_fire_benign": float(p_b[f]), "n_fires": int(n_fires[f]),
            "n_fires_label": n_lab, "precision": float(prec), "p_value": float(p_val[lab][f]),
            "q_value": float(q_val[lab][f]),
            "max_activation": float(vals.max()), "mean_activation": float(vals.mean()),
            "lang": lang_counts.most_common(1)[0][0] if lang_counts else None,
            "langs": dict(lang_counts.most_common(5)),
            "judge_votes": None, "judged_share": None,
            "_top": [int(r) for r in rows[np.argsort(-vals, kind="stable")][: cfg.n_examples]], "reasons": reasons,
        }

    targets: list[dict] = []
    rejected: list[dict] = []
    counts: Counter = Counter()
    examined = judged = 0  # the judge is asked about the candidates that may be kept or listed, so counts its reason there
    chunk = 64  # candidates whose contexts are encoded and judged together
    from tqdm.auto import tqdm

    # encoding and judging the candidates' top contexts can take as long as the extraction: a bar over candidates
    bar = tqdm(total=len(cand), desc="checking candidates", unit="feature", disable=not progress)
    for start in range(0, len(cand), chunk):
        if len(targets) >= cfg.max_targets:
            break
        recs = [record(f) for f in cand[start : start + chunk]]
        # contexts are worked out for every candidate that may be kept and for those listed as rejected
        room = cfg.max_rejected - len(rejected)
        need = []
        for r in recs:
            if not r["reasons"] or room > 0:
                need.append(r)
                room -= bool(r["reasons"])
        _add_examples(need, texts, y, langs, codes, fx, cfg, judge)
        for r in recs:
            if len(targets) >= cfg.max_targets:
                break
            examined += 1
            judged += r["judge_votes"] is not None
            if "examples" in r and judge is not None:
                lab = r["label"]
                r["judged_share"] = r["judge_votes"][lab] / len(r["examples"])
                if 2 * r["judge_votes"][lab] <= len(r["examples"]):
                    r["reasons"].append(f"contexts_not_{lab}")
            r.pop("_top")
            counts.update(r["reasons"])
            if r["reasons"]:
                if len(rejected) < cfg.max_rejected:
                    # the listing says why, it is not explanation material: the snippet stands for the full text
                    r["examples"] = [{k: e[k] for k in _REJECTED_EXAMPLE if k in e} for e in r.get("examples", [])]
                    r["why"] = "rejected: " + ", ".join(r["reasons"]) + "; " + _why(r, cfg, judge is not None and "examples" in r)
                    rejected.append(r)
            else:
                r.pop("reasons")
                r["why"] = _why(r, cfg, judge is not None)
                targets.append(r)
        bar.update(len(recs))
        bar.set_postfix(kept=len(targets))
    bar.close()
    selection = {"tested_features": int(tested.sum()), "candidates": len(cand), "examined": examined,
                 "judged": judged, "kept": len(targets), "rejected": examined - len(targets), "rejected_listed": len(rejected),
                 "rejected_by_reason": {k: counts[k] for k in REASONS if counts[k]},
                 "judge": getattr(judge, "name", None)}
    return {"reference_data": {"source": source, "rows": len(texts), "harmful": n_pos,
                               "benign": int(len(y) - n_pos), "sha256": data_sha256(y, texts)},
            "settings": asdict(cfg), "selection": selection, "targets": targets, "rejected": rejected}


def _add_examples(recs: list[dict], texts, y, langs, codes, fx: FeatureExtractor, cfg: TargetsConfig, judge) -> None:
    """Fill ``examples`` (and, with a judge, each example's verdict and ``judge_votes``) of the records, encoding
    each needed reference row once for all the records that show it."""
    if not recs:  # every candidate of the chunk failed the bars and the rejected list is already full
        return
    wanted: dict[int, set[int]] = {}
    for r in recs:
        for row in r["_top"]:
            wanted.setdefault(row, set()).add(r["id"])
    rows = sorted(wanted)
    acts = dict(zip(rows, token_activations(fx, [texts[i] for i in rows], [sorted(wanted[i]) for i in rows])))
    contexts = []
    for r in recs:
        r["examples"] = []
        for row in r["_top"]:
            toks, a = acts[row]
            snip, tok = snippet(toks, a[r["id"]], cfg.window)
            ex = {"text": texts[row], "snippet": snip, "token": tok, "activation": float(codes[row, r["id"]]),
                  "label": "harmful" if y[row] else "benign", "lang": langs[row]}
            if judge is not None:
                ex["judged_context"] = plain_context(snippet(toks, a[r["id"]], cfg.judge_window)[0])
                contexts.append(ex["judged_context"])
            r["examples"].append(ex)
    if judge is None:
        return
    from .judge import Verdict

    # a context of only marks or spaces is nothing to judge: no verdict (it counts as not agreeing)
    uniq = sorted({c for c in contexts if c})
    verdicts = dict(zip(uniq, judge.judge(uniq)))
    for r in recs:
        votes = {"harmful": 0, "benign": 0, "unjudged": 0}
        for ex in r["examples"]:
            v = verdicts.get(ex["judged_context"], Verdict(None, None))
            ex["judged"], ex["judge_score"] = v.label, v.score
            votes[v.label or "unjudged"] += 1
        r["judge_votes"] = votes


def targets_document(found: dict, fx: FeatureExtractor, sae_id: str | None) -> dict:
    return {"format": FORMAT, **extractor_record(fx, sae_id), **found}


def read_targets(path: str | Path) -> dict:
    d = read_document(path, FORMAT, "targets", " (make one with `safetyscope synth targets`)")
    targets = d.get("targets")
    if not isinstance(targets, list):
        raise SafetyScopeError(f"{path}: key 'targets' must be a list; got {targets!r:.80}")
    if not targets:
        n_rej = d.get("selection", {}).get("rejected") if isinstance(d.get("selection"), dict) else None
        why = (f"; all {n_rej} candidates were rejected, see its 'rejected' list (lower --min-precision, raise --fdr?)"
               if n_rej else " (lower --min-delta?)")
        raise SafetyScopeError(f"{path}: holds no targets{why}")
    d_sae = d.get("sae", {}).get("d_sae") if isinstance(d.get("sae"), dict) else None
    for i, t in enumerate(targets):
        fid = t.get("id") if isinstance(t, dict) else None
        # a NaN, a negative id or one past the SAE's width would index the wrong feature or crash deep in the run
        if not isinstance(fid, int) or isinstance(fid, bool) or fid < 0 or (isinstance(d_sae, int) and fid >= d_sae):
            bound = f" and < d_sae {d_sae}" if isinstance(d_sae, int) else ""
            raise SafetyScopeError(f"{path}: targets[{i}].id must be an integer >= 0{bound}; got {fid!r:.40}")
        if t.get("label") not in ("harmful", "benign"):
            raise SafetyScopeError(f"{path}: targets[{i}].label must be 'harmful' or 'benign'; got {t.get('label')!r:.40}")
    return d


def load_request_judge(spec: str, *, endpoint: str | None = None, device: str | None = None, dtype: str | None = None,
                       classifier_kwargs: dict | None = None):
    """The judge of ``--judge-classifier``: ``none`` (no context test: None, with a warning), an LLM judge spec
    (``llm:MODEL``, ``qwen3guard:MODEL``, ``llamaguard:MODEL``; reached through ``endpoint`` when given) or a
    classifier file / shipped name (flagged = harmful)."""
    import sys

    from .llm_judge import SPEC_PREFIXES, make_pair_judge, parse_judge_spec

    prefix, sep, _ = spec.partition(":")
    if sep and prefix.casefold() in SPEC_PREFIXES:
        from ..generators import GeneratorConfig

        try:
            parse_judge_spec(spec)
        except SafetyScopeError as e:  # the same check, named as this command's option
            raise SafetyScopeError(str(e).replace("--judge ", "--judge-classifier ", 1)) from None
        return make_pair_judge(spec, GeneratorConfig(endpoint=endpoint, device=device, dtype=dtype or "auto"))
    if endpoint:
        raise SafetyScopeError(f"--judge-endpoint is for an LLM judge ({' / '.join(p + ':MODEL' for p in SPEC_PREFIXES)}), "
                               f"not --judge-classifier {spec!r}")
    if spec in ("none", "off"):
        print("warning: --judge-classifier none: targets are not checked for what their contexts are about",
              file=sys.stderr)
        return None
    from ..discovery.detector import Detector
    from .judge import DetectorJudge

    return DetectorJudge(Detector.load(spec, **(classifier_kwargs or {})), spec)
