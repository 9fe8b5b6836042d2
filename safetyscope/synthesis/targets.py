"""The target set T: safety-relevant SAE features found by the discovery contrast on a reference set.

delta_f = P(fires | harmful) - P(fires | benign) (``rank_features``); features with delta >= min_delta
are harmful-specific targets and, with ``benign=True``, features with -delta >= min_delta are
benign-specific ones. Each target carries its explanation material: the top-activating reference texts
with the strongest token marked «like this», its majority label and language.

T must come from rows disjoint from the data whose coverage is later measured (a feature found on
a data set is by construction fired by it); ``synth compare`` uses disjoint halves of the pool split.
"""

from __future__ import annotations

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

    def __post_init__(self):
        from ..errors import check_number

        check_number("--min-delta", self.min_delta, low=0, high=1)
        check_number("--max-targets", self.max_targets, low=1, integer=True)
        check_number("--min-fires", self.min_fires, low=1, integer=True)
        check_number("--max-fire-rate", self.max_fire_rate, low=0, high=1, low_open=True)
        check_number("--examples", self.n_examples, low=1, integer=True)
        check_number("window", self.window, low=0, integer=True)


def snippet(tokens: list[str], acts: np.ndarray, window: int) -> tuple[str, str]:
    """The text around the max-activating token, that token wrapped in «…»; and the token itself."""
    pos = int(np.argmax(acts))
    lo, hi = max(0, pos - window), min(len(tokens), pos + window + 1)
    left, tok, right = "".join(tokens[lo:pos]), tokens[pos], "".join(tokens[pos + 1 : hi])
    lead = tok[: len(tok) - len(tok.lstrip())]
    s = f"{'…' if lo > 0 else ''}{left}{lead}«{tok.strip()}»{right}{'…' if hi < len(tokens) else ''}"
    return s.strip(), tok.strip()


def find_targets(df: pl.DataFrame, cfg: TargetsConfig, fx: FeatureExtractor, *, progress: bool = False,
                 source: str = "reference") -> dict:
    if cfg.min_delta <= 0 or cfg.max_targets < 1:
        raise SafetyScopeError("--min-delta must be > 0 and --max-targets >= 1")
    texts = text_list(df, cfg.text_column, source)
    y = parse_labels(df.get_column(cfg.label_column), source)
    if len(set(y.tolist())) < 2:
        raise SafetyScopeError(f"{source}: the contrast needs both harmful and benign rows")
    codes = fx.transform(texts, progress=progress).tocsc()
    from ..discovery.rules import rank_features  # scikit-learn: loaded for the work, not by TargetsConfig's readers

    order, delta, p_h, p_b = rank_features(codes, y)
    n_fires = np.diff(codes.indptr)
    ok = (n_fires >= cfg.min_fires) & (n_fires <= cfg.max_fire_rate * len(texts))
    cand = [int(f) for f in order if delta[f] >= cfg.min_delta and ok[f]]
    if cfg.benign:
        cand += [int(f) for f in order[::-1] if -delta[f] >= cfg.min_delta and ok[f]]
    cand = sorted(cand, key=lambda f: (-abs(delta[f]), f))[: cfg.max_targets]
    langs = df.get_column("lang").to_list() if "lang" in df.columns else [None] * len(texts)
    targets = []
    for f in cand:
        col = codes[:, f]
        rows, vals = col.indices, col.data
        top = rows[np.argsort(-vals, kind="stable")][: cfg.n_examples]
        examples = []
        for r in top:
            toks, z = fx.token_codes(texts[r])
            snip, tok = snippet(toks, z[:, f].numpy(), cfg.window)
            examples.append({"text": texts[r], "snippet": snip, "token": tok, "activation": float(codes[r, f]),
                             "label": "harmful" if y[r] else "benign", "lang": langs[r]})
        lang_counts = Counter(langs[r] for r in rows if langs[r] is not None)
        targets.append({
            "id": f, "label": "harmful" if delta[f] > 0 else "benign", "delta": float(delta[f]),
            "p_fire_harmful": float(p_h[f]), "p_fire_benign": float(p_b[f]), "n_fires": int(n_fires[f]),
            "max_activation": float(vals.max()), "mean_activation": float(vals.mean()),
            "lang": lang_counts.most_common(1)[0][0] if lang_counts else None,
            "langs": dict(lang_counts.most_common(5)), "examples": examples,
        })
    return {"reference_data": {"source": source, "rows": len(texts), "harmful": int(y.sum()),
                               "benign": int(len(y) - y.sum()), "sha256": data_sha256(y, texts)},
            "settings": asdict(cfg), "targets": targets}


def targets_document(found: dict, fx: FeatureExtractor, sae_id: str | None) -> dict:
    return {"format": FORMAT, **extractor_record(fx, sae_id), **found}


def read_targets(path: str | Path) -> dict:
    d = read_document(path, FORMAT, "targets", " (make one with `safetyscope synth targets`)")
    targets = d.get("targets")
    if not isinstance(targets, list):
        raise SafetyScopeError(f"{path}: key 'targets' must be a list; got {targets!r:.80}")
    if not targets:
        raise SafetyScopeError(f"{path}: holds no targets (lower --min-delta?)")
    d_sae = d.get("sae", {}).get("d_sae") if isinstance(d.get("sae"), dict) else None
    for i, t in enumerate(targets):
        fid = t.get("id") if isinstance(t, dict) else None
        # a NaN, a negative id or one past the SAE's width would index the wrong feature or crash deep in the run
        if not isinstance(fid, int) or isinstance(fid, bool) or fid < 0 or (isinstance(d_sae, int) and fid >= d_sae):
            bound = f" and < d_sae {d_sae}" if isinstance(d_sae, int) else ""
            raise SafetyScopeError(f"{path}: targets[{i}].id must be an integer >= 0{bound}; got {fid!r:.40}")
    return d
