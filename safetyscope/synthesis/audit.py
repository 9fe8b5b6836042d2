"""`synth audit`: a keep/drop verdict per SFT pair (prompt, response, label), the reasons and the scores behind them.

A pair is fit to train on when its prompt is a request, neither side is degenerate, it is not a near copy, its
label is the request's, a harmful request is refused, a benign one is answered, the answer depends on its prompt
and both sides are in the same language. Each check is one signal below; a pair is kept only if no check drops it.

Signals (none needs a second model):
- request judge: a classifier on the prompt (flagged = harmful; the shipped ``harmful-request``), or an LLM judge;
- response judge: a classifier on the response (flagged = refusal; the shipped ``refusal``, fitted on hand-written
  refusals and compliances, data/audit/README.md), or the same LLM judge; the decline-phrase test of
  textrules.is_refusal is recorded beside it as one weak signal, not used for the verdict;
- request form: a classifier on the prompt (flagged = not a user request; the shipped ``not-request``), the
  instruction-echo test and a minimum length;
- text statistics: distinct-word ratio, repeated 3-grams, single-character "words", letters at all;
- the backbone's likelihood: perplexity of each side; the prompt's log-probability as a user turn over that as an
  assistant turn (a "request" that reads as assistant-speak is none); the response's log-probability gain given its
  prompt over an empty prompt (an answer that any prompt would get is off topic);
- language identification of both sides (and the row's ``lang``), offline;
- near copies: character 5-gram Jaccard against earlier rows (MinHash-bucketed, so a large table is not compared
  pair by pair) and containment in given contexts (e.g. a targets file's examples).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from ..errors import SafetyScopeError
from .llm_judge import PairVerdict
from .textrules import echoes_instructions, is_refusal, jaccard, normalise, shingles

REASONS = {
    "not_request": "the prompt is not a user request (fragment, statement, copied instructions)",
    "degenerate": "degenerate text: repetition, letter soup, no words, or implausible under the model",
    "near_copy": "a near copy of an earlier row or of a given context",
    "label_disagrees": "the row's label is not the request judge's",
    "harmful_complied": "a harmful request that the response does not refuse",
    "benign_refused": "a benign request that the response refuses",
    "off_topic": "the response is no more likely after its prompt than after an empty one",
    "language_mismatch": "prompt and response (or the row's lang) are in different languages",
    "judge_failed": "a judge gave no usable answer",
    "no_response": "the row has no response to train on",
}
AUDIT_COLUMNS = ("audit_verdict", "audit_reasons", "request_judged", "request_score", "response_judged",
                 "response_score", "not_request_score", "prompt_user_role", "phrase_refusal", "prompt_perplexity", "response_perplexity",
                 "response_gain", "prompt_lang", "response_lang", "copy_of")


@dataclass
class AuditConfig:
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"  # used when the prompt/completion columns are absent
    label_column: str | None = "label"  # harmful/benign; absent: the request judge's label is the row's
    lang_column: str | None = "lang"  # the row's claimed language, checked when present
    request_judge: str = "harmful-request"  # classifier (name or file) or llm:/qwen3guard:/llamaguard:MODEL
    response_judge: str = "refusal"  # classifier; ignored when request_judge is an LLM judge (it judges both)
    request_form: str | None = "not-request"  # classifier flagging prompts that are no request; None = not used
    # 5-gram Jaccard above which a later prompt is a near copy: one word changed in a short prompt gives 0.5-0.85,
    # distinct short questions of one template ("the capital of Australia / of France") 0.56 (data/audit dev rows)
    near_dup: float = 0.6
    min_words: int = 3  # a prompt of fewer words (CJK: characters / 2) is not a request
    min_distinct: float = 0.4  # distinct-word ratio below this (texts of >= 12 words) is degenerate
    max_repeat: float = 0.3  # share of repeated word 3-grams above this is degenerate
    max_single_char: float = 0.5  # share of one-character words above this (>= 6 words) is letter soup
    max_perplexity: float = 3000.0  # either side more perplexing than this under the backbone is degenerate
    min_gain: float = 0.0  # a benign answer's mean log-prob gain given its prompt at or below this is off topic
    # a prompt the chat model finds likelier as an assistant turn than as a user turn (by more than this, in mean
    # log-prob per token) is no request: generators asked for a request often write assistant-speak or answers
    min_user_role: float = 0.0
    check_language: bool = True
    require_response: bool = True  # False: a row without a response is a prompt, audited on its request side only
    judged_label: bool = False  # use the judge's label instead of the row's for the response checks

    def __post_init__(self):
        from ..errors import check_number

        check_number("--near-dup", self.near_dup, low=0, high=1)
        check_number("--min-words", self.min_words, low=0, integer=True)
        for name in ("min_distinct", "max_repeat", "max_single_char"):
            check_number("--" + name.replace("_", "-"), getattr(self, name), low=0, high=1)
        check_number("--max-perplexity", self.max_perplexity, low=1)
        check_number("--min-gain", self.min_gain)
        check_number("--min-user-role", self.min_user_role)


# -- reading pairs ---------------------------------------------------------------------------------
def pairs_from_frame(df: pl.DataFrame, cfg: AuditConfig, where: str) -> tuple[list[str], list[str], list[str | None],
                                                                               list[str | None]]:
    """(prompts, responses, labels, langs) of a table with prompt/completion columns or a messages column (the
    last user turn before the last assistant turn; earlier turns are context the audit does not judge)."""
    cols = set(df.columns)
    if cfg.prompt_column in cols and cfg.completion_column in cols:
        prompts = _strings(df[cfg.prompt_column])
        responses = _strings(df[cfg.completion_column])
    elif cfg.messages_column in cols:
        prompts, responses = [], []
        for i, msgs in enumerate(df[cfg.messages_column].to_list()):
            p, r = _last_exchange(msgs, f"{where} row {i}")
            prompts.append(p)
            responses.append(r)
    else:
        raise SafetyScopeError(f"{where}: no {cfg.prompt_column!r}/{cfg.completion_column!r} columns and no "
                               f"{cfg.messages_column!r} column (columns: {', '.join(df.columns[:12])}); name them "
                               "with --prompt-column/--completion-column or --messages-column")
    labels: list[str | None] = [None] * len(prompts)
    if cfg.label_column and cfg.label_column in cols:
        labels = [_label(v, f"{where} row {i}") for i, v in enumerate(df[cfg.label_column].to_list())]
    langs: list[str | None] = [None] * len(prompts)
    if cfg.lang_column and cfg.lang_column in cols:
        langs = [str(v) if v else None for v in df[cfg.lang_column].to_list()]
    return prompts, responses, labels, langs


def _strings(s: pl.Series) -> list[str]:
    return ["" if v is None else str(v) for v in s.to_list()]


def _last_exchange(msgs, where: str) -> tuple[str, str]:
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise SafetyScopeError(f"{where}: messages must be a list of {{role, content}} turns")
    a = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    u = max((k for k, m in enumerate(msgs[: a if a is not None else len(msgs)]) if m["role"] == "user"), default=None)
    if u is None:
        raise SafetyScopeError(f"{where}: no user turn in messages")
    return str(msgs[u]["content"] or ""), "" if a is None else str(msgs[a]["content"] or "")


_HARMFUL = {"harmful", "unsafe", "1", "true", "toxic"}
_BENIGN = {"benign", "safe", "harmless", "0", "false", "clean"}


def _label(v, where: str) -> str | None:
    if v is None or str(v).strip() == "":
        return None
    t = str(v).strip().casefold()
    if t in _HARMFUL:
        return "harmful"
    if t in _BENIGN:
        return "benign"
    raise SafetyScopeError(f"{where}: label {v!r} is not harmful/benign (or 1/0); pass --label-column none to "
                           "let the request judge label the rows")


# -- text statistics ---------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def word_count(text: str) -> float:
    """Words, with CJK characters counted two to a word (those scripts do not separate words by spaces)."""
    cjk = len(_CJK.findall(text))
    return len(_WORD.findall(_CJK.sub(" ", text))) + cjk / 2


def text_stats(text: str) -> dict:
    words = [w.casefold() for w in _WORD.findall(text)]
    n = len(words)
    grams = [tuple(words[i : i + 3]) for i in range(max(0, n - 2))]
    return {"words": n, "distinct": len(set(words)) / n if n else 0.0,
            "repeat3": 1 - len(set(grams)) / len(grams) if grams else 0.0,
            "single_char": sum(len(w) == 1 and not _CJK.match(w) for w in words) / n if n else 0.0,
            "letters": any(ch.isalpha() for ch in text)}


def degenerate(text: str, cfg: AuditConfig) -> bool:
    s = text_stats(text)
    if not s["letters"]:
        return True
    return ((s["words"] >= 12 and s["distinct"] < cfg.min_distinct) or s["repeat3"] > cfg.max_repeat
            or (s["words"] >= 6 and s["single_char"] > cfg.max_single_char))


# -- near copies -------------------------------------------------------------------------------------
class NearCopies:
    """Earlier texts whose 5-gram Jaccard with a new one exceeds ``threshold``. MinHash signatures in bands
    (LSH) pick the candidates; Jaccard is computed exactly on those only, so n rows cost ~n, not n^2 comparisons.
    With 16 bands of 4 hashes a pair at Jaccard 0.8 shares a band with probability 1 - (1 - 0.8^4)^16 > 0.9999."""

    BANDS, ROWS = 16, 4

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sh: list[set[str]] = []
        self.exact: dict[str, int] = {}
        self.buckets: dict[tuple, list[int]] = {}
        rng = np.random.default_rng(0)
        n = self.BANDS * self.ROWS
        self.a = rng.integers(1, 2**61 - 1, n, dtype=np.uint64)
        self.b = rng.integers(0, 2**61 - 1, n, dtype=np.uint64)

    def _signature(self, sh: set[str]) -> np.ndarray:
        h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3
                      for s in sh] or [0], dtype=np.uint64)
        return (h[None, :] * self.a[:, None] + self.b[:, None]).min(axis=1)  # uint64 wrap-around: a universal hash

    def find_and_add(self, text: str) -> int | None:
        """Index of an earlier near copy of ``text`` (None: new); ``text`` is added either way."""
        key, sh = normalise(text), shingles(text)
        hit = self.exact.get(key)
        sig = self._signature(sh)
        bands = [(b, *sig[b * self.ROWS : (b + 1) * self.ROWS].tolist()) for b in range(self.BANDS)]
        if hit is None:
            seen: set[int] = set()
            for band in bands:
                for j in self.buckets.get(band, ()):
                    if j not in seen:
                        seen.add(j)
                        if jaccard(sh, self.sh[j]) > self.threshold:
                            hit = j if hit is None else min(hit, j)
        i = len(self.sh)
        self.sh.append(sh)
        self.exact.setdefault(key, i)
        for band in bands:
            self.buckets.setdefault(band, []).append(i)
        return hit


# -- the audit ---------------------------------------------------------------------------------------
@dataclass
class Judges:
    """What the audit asks: ``pair`` judges request harm and response refusal (PairVerdict per row); ``form``
    flags prompts that are not requests (a Detector; None = not checked); ``fx`` holds the backbone whose
    likelihoods the audit reads."""
    pair: Any  # .judge_pairs(prompts, responses) -> list[PairVerdict]
    form: Any  # a Detector, or None
    fx: Any  # a FeatureExtractor
    names: dict = field(default_factory=dict)


class ClassifierPairJudge:
    """Two classifier files: one on the prompt (flagged = harmful), one on the response (flagged = refusal)."""

    def __init__(self, request_detector, response_detector, names: tuple[str, str]):
        self.req, self.resp = request_detector, response_detector
        self.name = f"classifiers:{names[0]}+{names[1]}"

    def judge_pairs(self, prompts: list[str], responses: list[str]) -> list[PairVerdict]:
        harm, hs, _ = self.req.predict(prompts) if prompts else ([], [], [])
        idx = [i for i, r in enumerate(responses) if r.strip()]
        ref = np.zeros(len(responses), dtype=bool)
        rs = np.full(len(responses), np.nan)
        if idx:
            f, s, _ = self.resp.predict([responses[i] for i in idx])
            ref[idx], rs[idx] = f, s
        has = set(idx)
        return [PairVerdict("harmful" if h else "benign", float(a),
                            ("refusal" if ref[i] else "compliance") if i in has else None,
                            float(rs[i]) if i in has else None, "" if i in has else "no response")
                for i, (h, a) in enumerate(zip(harm, hs))]


class FallbackResponses:
    """A pair judge whose response field is completed by a classifier where the judge reports none (Llama Guard
    rates a safe response without saying whether it refused)."""

    def __init__(self, primary, response_detector, name: str):
        self.primary, self.resp = primary, response_detector
        self.name = f"{primary.name}+{name}"

    def judge_pairs(self, prompts: list[str], responses: list[str]) -> list[PairVerdict]:
        out = self.primary.judge_pairs(prompts, responses)
        idx = [i for i, (v, r) in enumerate(zip(out, responses)) if v.response is None and r.strip()]
        if idx:
            f, s, _ = self.resp.predict([responses[i] for i in idx])
            for i, fi, si in zip(idx, f, s):
                out[i] = out[i]._replace(response="refusal" if fi else "compliance", response_score=float(si),
                                         note=(out[i].note + "; response by the response classifier").lstrip("; "))
        return out


def load_judges(cfg: AuditConfig, *, judge_gen=None, **load_kw) -> Judges:
    """The judges of ``cfg``: classifier files (or shipped names) loaded with ``load_kw`` (Detector.load's), and,
    for an ``llm:``/``qwen3guard:``/``llamaguard:`` request judge, the LLM pair judge over ``judge_gen`` (a
    GeneratorConfig). The backbone whose likelihoods the audit reads is the response classifier's model."""
    from ..discovery.detector import Detector, read_classifier

    loaded: dict[str, Any] = {}  # model -> its backbone: the shipped judges share one model, loaded once

    def load(name: str):
        model = load_kw.get("model") or read_classifier(name)["model"]["id"]
        det = Detector.load(name, backbone=loaded.get(model), **load_kw)
        loaded.setdefault(model, det.extractor.backbone)
        return det

    resp = load(cfg.response_judge)
    form = load(cfg.request_form) if cfg.request_form else None
    names = {"response": cfg.response_judge, "request_form": cfg.request_form or "echo test only"}
    if ":" in cfg.request_judge and not cfg.request_judge.endswith((".json", ".JSON")):
        from ..generators import GeneratorConfig
        from .llm_judge import make_pair_judge, parse_judge_spec

        fmt, _ = parse_judge_spec(cfg.request_judge)
        llm = make_pair_judge(cfg.request_judge, judge_gen or GeneratorConfig())
        pair: Any = FallbackResponses(llm, resp, cfg.response_judge) if fmt == "llamaguard" else llm
        names.update(request=cfg.request_judge, response=cfg.request_judge + (
            f" (safe responses: {cfg.response_judge})" if fmt == "llamaguard" else ""))
    else:
        req = load(cfg.request_judge)
        pair = ClassifierPairJudge(req, resp, (cfg.request_judge, cfg.response_judge))
        names["request"] = cfg.request_judge
    return Judges(pair, form, resp.extractor, names)


def audit_pairs(prompts: list[str], responses: list[str], labels: list[str | None], langs: list[str | None],
                judges: Judges, cfg: AuditConfig, *, contexts: list[str] | tuple[str, ...] = (), progress: bool = False
                ) -> tuple[pl.DataFrame, dict]:
    """The audit columns (AUDIT_COLUMNS) per pair, and a summary (counts per reason and verdict)."""
    from tqdm.auto import tqdm

    from ..langid import UNDETERMINED, identify
    from ..likelihood import mean_logprob

    n = len(prompts)
    # the stages over the whole table (judges, request form, four likelihood passes, languages): one step each
    bar = tqdm(total=7, disable=not progress or not n, desc="audit", unit="stage")
    verdicts = judges.pair.judge_pairs(prompts, responses) if n else []
    bar.update()
    form = (judges.form.predict(prompts)[1] if judges.form is not None and n else np.full(n, np.nan))
    bar.update()
    # likelihoods under the backbone: each side as a chat turn, the response also after an empty user turn
    fx = judges.fx
    tok = fx.backbone.tokenizer
    user = [_render(tok, [{"role": "user", "content": p}]) for p in prompts]
    after_empty_user = [_render(tok, [{"role": "user", "content": ""}])] * n
    lp = {}
    for key, prefixes, texts in (("prompt", [_render(tok, [], user_prefix=True)] * n, prompts),
                                 ("prompt_as_answer", after_empty_user, prompts), ("response", user, responses),
                                 ("response_free", after_empty_user, responses)):
        lp[key] = mean_logprob(fx.backbone, prefixes, texts)
        bar.update()
    lp_prompt, lp_resp, lp_free = lp["prompt"], lp["response"], lp["response_free"]
    role = lp_prompt - lp["prompt_as_answer"]
    p_lang, r_lang = identify(prompts), identify(responses)
    bar.update()
    bar.close()
    copies = NearCopies(cfg.near_dup)
    ctx_sh = [shingles(c) for c in contexts]
    rows, counts = [], {k: 0 for k in REASONS}
    for i in range(n):
        p, r, v = prompts[i], responses[i], verdicts[i]
        reasons = []
        if (not p.strip() or echoes_instructions(p) or word_count(p) < cfg.min_words
                or (not np.isnan(form[i]) and form[i] > 0) or (np.isfinite(role[i]) and role[i] < cfg.min_user_role)):
            reasons.append("not_request")
        if not r.strip() and cfg.require_response:
            reasons.append("no_response")
        if not p.strip() or degenerate(p, cfg) or (r.strip() and degenerate(r, cfg)) or any(
                np.isfinite(x) and np.exp(-x) > cfg.max_perplexity for x in (lp_prompt[i], lp_resp[i])):
            reasons.append("degenerate")
        copy_of = copies.find_and_add(p)
        s = shingles(p)
        if copy_of is not None or (s and any(len(s & c) / len(s) > cfg.near_dup for c in ctx_sh)):
            reasons.append("near_copy")
        label = labels[i] or v.request
        if v.request is None or (r.strip() and v.response is None):
            reasons.append("judge_failed")
        elif labels[i] is not None and labels[i] != v.request:
            reasons.append("label_disagrees")
        acting = v.request if cfg.judged_label else label
        if v.response == "compliance" and acting == "harmful":
            reasons.append("harmful_complied")
        if v.response == "refusal" and acting == "benign":
            reasons.append("benign_refused")
        gain = lp_resp[i] - lp_free[i]
        if v.response == "compliance" and acting == "benign" and np.isfinite(gain) and gain <= cfg.min_gain:
            reasons.append("off_topic")
        if cfg.check_language:
            known = [x for x in (p_lang[i], r_lang[i], langs[i]) if x and x != UNDETERMINED]
            if len({_base_lang(x) for x in known}) > 1:
                reasons.append("language_mismatch")
        for k in reasons:
            counts[k] += 1
        rows.append({"audit_verdict": "drop" if reasons else "keep", "audit_reasons": reasons,
                     "request_judged": v.request, "request_score": v.request_score, "response_judged": v.response,
                     "response_score": v.response_score, "not_request_score": _num(form[i]), "prompt_user_role": _num(role[i]),
                     "phrase_refusal": is_refusal(r) if r.strip() else None,
                     "prompt_perplexity": _ppl(lp_prompt[i]), "response_perplexity": _ppl(lp_resp[i]),
                     "response_gain": _num(gain), "prompt_lang": p_lang[i], "response_lang": r_lang[i],
                     "copy_of": copy_of})
    frame = pl.DataFrame(rows, schema={"audit_verdict": pl.String, "audit_reasons": pl.List(pl.String),
                                       "request_judged": pl.String, "request_score": pl.Float64,
                                       "response_judged": pl.String, "response_score": pl.Float64,
                                       "not_request_score": pl.Float64, "prompt_user_role": pl.Float64,
                                       "phrase_refusal": pl.Boolean,
                                       "prompt_perplexity": pl.Float64, "response_perplexity": pl.Float64,
                                       "response_gain": pl.Float64, "prompt_lang": pl.String,
                                       "response_lang": pl.String, "copy_of": pl.Int64})
    kept = sum(r["audit_verdict"] == "keep" for r in rows)
    summary = {"rows": n, "kept": kept, "dropped": n - kept, "reasons": {k: v for k, v in counts.items() if v},
               "reason_meanings": REASONS, "judges": judges.names, "config": asdict(cfg),
               "kept_per_label": _per_label(rows, labels, verdicts)}
    return frame, summary


def count_drops(rejected: dict, reasons) -> None:
    """Add a dropped row's audit reasons to a rejection count, as ``audit_<reason>`` (synthesize and compare)."""
    for r in reasons:
        rejected["audit_" + r] = rejected.get("audit_" + r, 0) + 1


def _render(tok, messages, user_prefix: bool = False) -> str:
    """The chat-template text before a turn's content: the whole conversation with a generation prompt, or (with
    ``user_prefix``) what precedes a user message's content. Plain "user: " for tokenizers without a template."""
    if not getattr(tok, "chat_template", None):
        return "user: " if user_prefix else "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    if user_prefix:  # render a marker message and cut at it
        marker = "\x00MARK\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
        return text[: text.index(marker)]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _base_lang(code: str) -> str:
    return code.split("_")[0].split("-")[0].casefold()


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _ppl(lp) -> float | None:
    return float(np.exp(-lp)) if np.isfinite(lp) else None


def _per_label(rows, labels, verdicts) -> dict:
    out: dict[str, int] = {}
    for r, lab, v in zip(rows, labels, verdicts):
        if r["audit_verdict"] == "keep":
            key = lab or v.request or "unknown"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def format_summary(s: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])) or "none"
    return (f"kept {s['kept']} of {s['rows']} pairs ({s['kept_per_label'] or 'none'}); dropped {s['dropped']}; "
            f"reasons (a row may have several): {reasons}")
