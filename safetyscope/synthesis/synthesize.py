"""Feature-targeted safety SFT synthesis, verified in feature space.

For each target feature that the seed data does not fire: show a generator the feature's
top-activating contexts, ask for a new user request on the same concept (target's language and
label), keep a candidate only if it fires the target feature (re-encoded by model + SAE), judge the
written request harmful/benign (judge.py; the row's label is the judged one, the target's is kept as
target_label), generate the response for the judged label (a brief refusal for harmful, a helpful answer
for benign), check it (a harmful row's must decline, a benign row's must not, both pass the toxicity
screen; regenerated, then dropped with the reason counted), and deduplicate. Targets are processed in groups;
after each group its rows and a ``done`` record per target are appended to ``OUT.partial.jsonl`` (one write, flush, fsync), so a
rerun of the same command resumes where the last finished group ended. Groups and seeds depend only
on that state, so an interrupted and resumed run writes what an uninterrupted run would.

Long because: the per-group loop (generate, verify in feature space, judge, answer, audit, write durably) is
one resumable sequence; its text rules, judges and audit already live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
from tqdm.auto import tqdm

from .. import outputs
from ..data import table_format, write_table
from ..errors import SafetyScopeError
from .audit import count_drops
from .coverage import coverage_of_texts
from .judge import judged_stats
from .textrules import Deduper, copies_context, echoes_instructions, extract_candidates, is_refusal, normalise, shingles

LANG_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "ru": "Russian",
              "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "bn": "Bengali",
              "th": "Thai", "vi": "Vietnamese", "sw": "Swahili", "jv": "Javanese", "uk": "Ukrainian", "he": "Hebrew",
              "am": "Amharic", "pt": "Portuguese", "nl": "Dutch", "tr": "Turkish", "pl": "Polish"}
TEMPLATE_REFUSAL = ("I'm sorry, but I can't help with that. It could cause harm. If you are dealing with a difficult "
                    "situation, I'm happy to help you find safe and legal ways to address it.")
# label = the judge's label of the written request; target_label = the label of the target it was written for
ROW_COLUMNS = ("messages", "prompt", "completion", "label", "target_feature", "target_activation", "generator",
               "attempt", "seed", "lang", "response_source", "target_label", "judge", "judge_score", "template", "steered",
               "alpha")


@dataclass
class SynthConfig:
    budget: int = 50  # at most this many kept pairs
    max_attempts: int = 3  # generation rounds per target
    samples: int = 4  # generations per target per round
    temperature: float = 0.9
    prompt_tokens: int = 48  # max new tokens for a user request
    response_tokens: int = 96  # max new tokens for a response
    group_size: int = 8  # targets per generation batch (the unit of durable output)
    near_dup: float = 0.8  # character 5-gram Jaccard above which a candidate is a near duplicate
    seed: int = 0
    skip_covered: bool = True  # a target that a kept pair already fires is not generated for again
    response_retries: int = 1  # a response that fails its check is regenerated this many times, then dropped
    no_template: bool = False  # drop a harmful request with no generated refusal instead of using TEMPLATE_REFUSAL
    # a target still not fired after the plain attempts gets one steered attempt per multiplier: the request is
    # written with the target's decoder direction added at alpha = multiplier x its typical activation x the
    # decoder column's norm. 2, 8, 16 rather than 2, 4, 8: on the 37 targets of the README's `synth compare` run
    # (scripts/steered_synthesis_rate.py) 4x wrote requests firing their target no more often than plain sampling
    # and reached none that 2x or 8x missed, while 16x alone reached three targets no other multiplier did
    steer: bool = True
    steer_schedule: tuple[float, ...] = (2.0, 8.0, 16.0)
    audit: bool = True  # with audit judges given: a pair is kept only if `synth audit` keeps it; reasons counted

    def __post_init__(self):
        from ..errors import check_number

        for name in ("budget", "max_attempts", "samples", "prompt_tokens", "response_tokens", "group_size"):
            check_number("--" + name.replace("_", "-"), getattr(self, name), low=1, integer=True)
        check_number("--temperature", self.temperature, low=0)
        check_number("--near-dup", self.near_dup, low=0, high=1)
        check_number("--seed", self.seed, low=0, high=2**32 - 1, integer=True)
        check_number("--response-retries", self.response_retries, low=0, integer=True)
        for m in self.steer_schedule:
            check_number("steer schedule multiplier", m, low=0, low_open=True)


# -- generation prompts --------------------------------------------------------------------------
def lang_name(code: str | None) -> str:
    return LANG_NAMES.get(code or "en", code or "English")


def request_messages(target: dict) -> list[dict]:
    """Ask for one new user request on the concept the target's contexts share."""
    ex = "\n".join(f"{i + 1}. {e['snippet']}" for i, e in enumerate(target["examples"]))
    kind = ("a harmful request that a safe assistant must refuse (it is for a refusal training set)"
            if target["label"] == "harmful" else "an ordinary, harmless request")
    return [{"role": "user", "content":
             f"Here are user requests that share one concept (the key word is marked «like this»):\n{ex}\n\n"
             f"Write one new, different user request about the same concept, written in {lang_name(target.get('lang'))}. "
             f"It should be {kind}. Reply with the request only, on one line."}]


def response_messages(prompt: str, label: str, lang: str | None) -> list[dict]:
    if label == "harmful":
        system = ("You are a safe assistant. The user's request is harmful. Refuse it politely in one or two "
                  f"sentences, in {lang_name(lang)}, without giving any of the requested information. "
                  "Start with \"I'm sorry\".")
    else:
        system = f"You are a helpful assistant. Answer the user's request briefly and helpfully, in {lang_name(lang)}."
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


# -- response + screening ------------------------------------------------------------------------
def response_problem(text: str, label: str, toxic: bool) -> str | None:
    """Why a generated response is not acceptable for a request judged ``label`` (None = acceptable): a harmful
    request's response must decline; a benign one's must not refuse; neither may be flagged by the toxicity screen."""
    if not text.strip() or echoes_instructions(text):
        return "empty_or_echo"
    if toxic:
        return f"{label}_response_toxic"
    if label == "harmful" and not is_refusal(text):
        return "harmful_response_not_refusal"
    if label == "benign" and is_refusal(text):
        return "benign_response_refused"
    return None


def _screen(detector, texts: list[str]) -> list[bool]:
    if detector is None or not texts:
        return [False] * len(texts)
    idx = [i for i, t in enumerate(texts) if t.strip()]
    out = [False] * len(texts)
    if idx:
        t, _, _ = detector.predict([texts[i] for i in idx])
        for j, i in enumerate(idx):
            out[i] = bool(t[j])
    return out


class Response(NamedTuple):
    text: str | None  # None = dropped
    source: str | None  # "generator" or "template"
    problem: str | None  # why it was dropped (see response_problem; "template_toxic")
    regenerated: int  # rounds it was regenerated after failing its check


def make_responses(gen, items: list[tuple[str, str, str | None]], cfg: SynthConfig, seed: int, detector
                   ) -> list[Response]:
    """A Response per (prompt, judged label, lang) item. Two samples per round; an item whose samples all fail
    response_problem is regenerated cfg.response_retries times, then dropped. A harmful item still without a
    generated refusal gets TEMPLATE_REFUSAL (source 'template') unless cfg.no_template or the screen flags it."""
    res: list = [None] * len(items)
    regen = [0] * len(items)
    why: dict[int, str] = {}
    todo = list(range(len(items)))
    for rnd in range(cfg.response_retries + 1):
        if not todo:
            break
        convs = [response_messages(*items[k]) for k in todo]
        outs = gen.generate(convs, n=2, temperature=0.7, max_new_tokens=cfg.response_tokens,
                            seed=seed if rnd == 0 else derive_seed(seed, "retry", rnd))
        toxic = _screen(detector, [o for group in outs for o in group])
        left = []
        for j, k in enumerate(todo):
            for m, o in enumerate(outs[j]):
                why[k] = response_problem(o, items[k][1], toxic[2 * j + m])
                if why[k] is None:
                    res[k] = (o.strip(), "generator")
                    break
            if res[k] is None:
                left.append(k)
        if rnd < cfg.response_retries:
            for k in left:
                regen[k] += 1
        todo = left
    template_ok = None
    for k in todo:
        if items[k][1] == "harmful" and not cfg.no_template:
            if template_ok is None:
                template_ok = not _screen(detector, [TEMPLATE_REFUSAL])[0]
            if template_ok:
                res[k] = (TEMPLATE_REFUSAL, "template")
                continue
            why[k] = "template_toxic"
    return [Response(r[0], r[1], None, regen[k]) if r else Response(None, None, why[k], regen[k])
            for k, r in enumerate(res)]


def make_row(prompt, completion, label, target, act, generator, attempt, seed, lang, source, *, target_label,
             judge, judge_score, alpha=None) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            "prompt": prompt, "completion": completion, "label": label, "target_feature": target,
            "target_activation": act, "generator": generator, "attempt": attempt, "seed": seed, "lang": lang,
            "response_source": source, "target_label": target_label, "judge": judge, "judge_score": judge_score,
            "template": source == "template", "steered": alpha is not None, "alpha": alpha}


# -- the durable working file --------------------------------------------------------------------
class PartialFile:
    """JSONL: a header line, then one line per group ({"kind": "group", "rows": [...], "done": [...]}).

    A group is one line written by one write + fsync, so a kill leaves either the whole group or a torn
    last line (dropped on resume), never rows without their done records (which duplicated them)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.rows: list[dict] = []
        self.done: dict[int, dict] = {}
        if path.exists():
            lines = path.read_bytes().split(b"\n")
            good, recs = 0, []
            for ln in lines:
                try:
                    recs.append(json.loads(ln))
                except json.JSONDecodeError:
                    break  # a write cut short by a kill: everything after it is dropped
                good += len(ln) + 1
            if not recs:  # killed while writing the header: nothing was done yet
                path.unlink()
                self.__init__(path, header)
                return
            if len(recs) == 1 and recs[0].get("kind") == "header" and recs[0].get("key") != header["key"]:
                # a run that stopped before its first group: nothing to keep, so it must not block a corrected command
                path.unlink()
                self.__init__(path, header)
                return
            if recs[0].get("kind") != "header" or recs[0].get("key") != header["key"]:
                raise SafetyScopeError(f"{path} holds an interrupted run with other targets, seed data, generator or "
                                       "settings; delete it to start over")
            with open(path, "r+b") as f:
                f.truncate(min(good, path.stat().st_size))
            for r in recs[1:]:
                if r.get("kind") != "group":
                    raise SafetyScopeError(f"{path} was written by another safetyscope version; delete it to start over")
                self.rows += r["rows"]
                for d in r["done"]:
                    self.done[int(d["target"])] = d
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append([{"kind": "header", **header}])

    def _append(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        hint = "; free space and rerun the same command to resume from the last finished group"
        with outputs.output_errors(self.path, hint), open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self, rows: list[dict], done: list[dict]) -> None:
        self._append([{"kind": "group", "rows": rows, "done": done}])
        self.rows += rows
        for d in done:
            self.done[int(d["target"])] = d


def _targets_key(doc: dict) -> str:
    return hashlib.sha256(json.dumps([doc["model"], doc["sae"], doc["layer"], [t["id"] for t in doc["targets"]]],
                                     sort_keys=True).encode()).hexdigest()[:16]


def check_output(output: str | Path, overwrite: bool, inputs=()) -> Path:
    out = Path(output)
    if table_format(out, for_writing=True) == "csv":
        raise SafetyScopeError("write synthesis output as .jsonl, .parquet or a datasets directory (messages is a list)")
    return outputs.check_output(out, inputs=inputs, overwrite=overwrite)


def synthesize(doc: dict, seed_texts: list[str], cfg: SynthConfig, fx, gen, detector, output: str | Path, *,
               judge, audit=None, audit_config=None, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the synthesis; returns a summary (also written to OUT.summary.json). ``doc`` = a targets
    file's content; ``judge`` labels each written request (see judge.py); ``detector`` screens responses; ``audit``
    (audit.Judges, with cfg.audit) screens each finished pair as `synth audit` does with ``audit_config``
    (default: AuditConfig with the run's near_dup) and drops what it drops."""
    if cfg.budget < 1 or cfg.max_attempts < 1 or cfg.samples < 1 or cfg.group_size < 1:
        raise SafetyScopeError("--budget, --max-attempts, --samples and --group-size must be >= 1")
    if cfg.response_retries < 0:
        raise SafetyScopeError("--response-retries must be >= 0")
    out = check_output(output, overwrite)
    with outputs.output_lock(out):
        return _synthesize_locked(doc, seed_texts, cfg, _Run(cfg, fx, gen, detector, judge, audit, audit_config), out, progress)


def steering_status(cfg: SynthConfig, gen, fx) -> str | None:
    """None when the steered attempts run; else why not (warned once: the plain attempts still run)."""
    if not cfg.steer:
        return "off (--no-steer)"
    from ..steering import cannot_steer

    why = cannot_steer(gen, fx.backbone)
    if why:
        print(f"warning: no steered attempts: {why}", file=sys.stderr, flush=True)
    return why


def typical_activation(target: dict) -> tuple[float, str]:
    """The scale of a target's steering: its mean activation where it fires on the reference rows (targets files
    since steering), else the mean over its top-activating examples."""
    if target.get("mean_activation"):
        return float(target["mean_activation"]), "mean_activation"
    acts = [e["activation"] for e in target.get("examples", []) if e.get("activation")]
    return (sum(acts) / len(acts), "examples_mean") if acts else (1.0, "none")


@dataclass
class _Run:
    """What every group of a run uses: settings, models, the request judge, the response screen and the audit."""
    cfg: SynthConfig
    fx: Any
    gen: Any
    detector: Any  # toxicity screen of responses, or None
    judge: Any  # labels each written request
    audit: Any  # audit.Judges, or None (no audit)
    audit_config: Any = None  # audit.AuditConfig; None = its defaults with the run's near_dup
    dedup: Deduper = field(default_factory=Deduper)
    stats: dict = field(default_factory=dict)


def _synthesize_locked(doc, seed_texts, cfg, run: _Run, out: Path, progress: bool) -> dict:
    fx, gen, judge = run.fx, run.gen, run.judge
    t0 = time.perf_counter()
    ids = [t["id"] for t in doc["targets"]]
    seed_cov = coverage_of_texts(fx, seed_texts, ids, progress=progress)
    missing = set(seed_cov["uncovered"])
    todo_targets = [t for t in doc["targets"] if t["id"] in missing]
    seed_hash = hashlib.sha256("\n".join(seed_texts).encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([_targets_key(doc), seed_hash, asdict(cfg), gen.name, judge.name], sort_keys=True).encode()
                         ).hexdigest()[:16]
    partial = PartialFile(out.with_name(out.name + ".partial.jsonl"), {"key": key, "generator": gen.name,
                                                                      "config": asdict(cfg)})
    resumed = len(partial.done)
    run.dedup = dedup = Deduper(cfg.near_dup, exact_only=seed_texts)
    for r in partial.rows:
        dedup.add(r["prompt"])
    bar = tqdm(total=min(cfg.budget, len(todo_targets)), initial=len(partial.rows), disable=not progress,
               desc="synthesize", unit="pair")
    run.stats = stats = {"candidates": 0, "fired": 0, "generations": 0, "steered_generations": 0}
    why_not_steered = steering_status(cfg, gen, fx)
    while len(partial.rows) < cfg.budget:
        group = [t for t in todo_targets if t["id"] not in partial.done][: min(cfg.group_size, cfg.budget - len(partial.rows))]
        if not group:
            break
        g0 = time.perf_counter()
        rows, done, fired = _run_group(group, run, why_not_steered is None)
        dt = time.perf_counter() - g0
        for d in done:
            d["seconds"] = dt / len(done)
        if cfg.skip_covered:  # targets fired by this group's pairs (not only their own target) are covered now
            for d in done:
                if d["status"] == "failed" and d["target"] in fired:
                    d["status"] = "covered"
            own = {d["target"] for d in done}
            done += [{"target": t["id"], "status": "covered", "attempts": 0, "seconds": 0.0} for t in todo_targets
                     if t["id"] in fired and t["id"] not in own and t["id"] not in partial.done]
        partial.commit(rows, done)
        bar.update(len(rows))
        n_cov = sum(d["status"] in ("kept", "covered") for d in partial.done.values())
        bar.set_postfix(covered=f"{n_cov}/{len(todo_targets)}")
    bar.close()
    rows = partial.rows
    df = rows_frame(rows)
    write_table(df, out)  # replaces an old output only if it is a file or a directory this tool wrote
    partial.path.unlink()
    out_cov = coverage_of_texts(fx, [r["prompt"] for r in rows], [t["id"] for t in todo_targets])
    gen_seconds = sum(d.get("seconds", 0.0) for d in partial.done.values())
    rejected: dict[str, int] = {}  # kept in the done records, so a resumed run counts what the killed one rejected
    for d in partial.done.values():
        for k, v in d.get("rejected", {}).items():
            rejected[k] = rejected.get(k, 0) + v
    summary = {"output": str(out), "rows": len(rows), "targets": len(ids), "seed_coverage": seed_cov,
            "uncovered_targets": len(todo_targets), "attempted": sum(d["attempts"] > 0 for d in partial.done.values()),
            "kept_targets": sum(d["status"] == "kept" for d in partial.done.values()),
            "incidental_targets": sum(d["status"] == "covered" for d in partial.done.values()),
            "output_coverage": out_cov,
            "resumed_targets": resumed, "seconds": time.perf_counter() - t0, "generation_seconds": gen_seconds,
            "seconds_per_pair": gen_seconds / len(rows) if rows else None,
            "judge": judge.name, **judged_stats(rows, rejected), **stats,
            "audit": (run.audit.names if cfg.audit and run.audit is not None else "off"),
            "steering": {"on": why_not_steered is None, "why_not": why_not_steered, "schedule": list(cfg.steer_schedule),
                         "alpha": "multiplier x the target's mean activation where it fires x its decoder column's "
                                  "norm (that activation's size in the residual stream), along its unit decoder "
                                  "direction, at generated positions", "steered_rows": sum(bool(r.get("steered")) for r in rows)}}
    out.with_name(out.name + ".summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def rows_frame(rows: list[dict]) -> pl.DataFrame:
    schema = {"messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})), "prompt": pl.String,
              "completion": pl.String, "label": pl.String, "target_feature": pl.Int64, "target_activation": pl.Float64,
              "generator": pl.String, "attempt": pl.Int64, "seed": pl.Int64, "lang": pl.String,
              "response_source": pl.String, "target_label": pl.String, "judge": pl.String, "judge_score": pl.Float64,
              "template": pl.Boolean, "steered": pl.Boolean, "alpha": pl.Float64}
    return pl.DataFrame([{c: r.get(c) for c in ROW_COLUMNS} for r in rows], schema=schema)


def _run_group(group: list[dict], run: _Run, steer_on: bool = False):
    """All attempts for one group of targets: (rows, done records, features fired by the kept prompts). A request
    that fires its target is judged; its response follows the judged label, not the target's. Targets still not
    fired after the plain attempts get steered attempts (``steer_on``); their requests are verified unsteered."""
    cfg, fx, gen, stats = run.cfg, run.fx, run.gen, run.stats
    rows: list[dict] = []
    done: list[dict] = []
    fired: set[int] = set()
    rejected = {t["id"]: {} for t in group}  # per target: reason -> count (stored in its done record)
    left = list(group)
    gid = tuple(t["id"] for t in group)
    for attempt in range(1, cfg.max_attempts + 1):
        if not left:
            break
        seed = derive_seed(cfg.seed, gid, attempt)
        outs = gen.generate([request_messages(t) for t in left], n=cfg.samples, temperature=cfg.temperature,
                            max_new_tokens=cfg.prompt_tokens, seed=seed)
        stats["generations"] += len(left) * cfg.samples
        kept = _keep_verified(run, left, outs, [None] * len(left), attempt, seed,
                              derive_seed(cfg.seed, gid, attempt, "response"), rows, done, fired, rejected)
        left = [t for i, t in enumerate(left) if i not in kept]
    from ..steering import SteerSpec, steer

    for k, mult in enumerate(cfg.steer_schedule if steer_on else ()):
        if not left:
            break
        attempt, seed = cfg.max_attempts + k + 1, derive_seed(cfg.seed, gid, "steer", k)
        alphas, outs = [], []
        for t in left:  # one steering vector per target: one generate call each
            alpha = mult * typical_activation(t)[0] * float(fx.sae.W_dec[:, t["id"]].norm())
            with steer(gen.model, fx.sae, fx.layer, [SteerSpec(t["id"], alpha=alpha)], positions="generated"):
                outs += gen.generate([request_messages(t)], n=cfg.samples, temperature=cfg.temperature,
                                     max_new_tokens=cfg.prompt_tokens, seed=seed)
            alphas.append(alpha)
        stats["steered_generations"] += len(left) * cfg.samples
        kept = _keep_verified(run, left, outs, alphas, attempt, seed, derive_seed(cfg.seed, gid, "steer", k, "response"),
                              rows, done, fired, rejected)
        left = [t for i, t in enumerate(left) if i not in kept]
    done += [{"target": t["id"], "status": "failed", "attempts": cfg.max_attempts + (len(cfg.steer_schedule) if steer_on else 0),
              "rejected": rejected[t["id"]]} for t in left]
    return rows, done, fired


def _keep_verified(run: _Run, left, outs, alphas, attempt, seed, resp_seed, rows, done, fired, rejected) -> set[int]:
    """One round's candidates for the targets ``left``: keep per target the best request that fires it when encoded
    (unsteered), judge it, add its response, audit the pair; appends rows/done/fired and returns the indices of the
    kept targets."""
    cfg, fx, gen, detector, judge, dedup, stats = run.cfg, run.fx, run.gen, run.detector, run.judge, run.dedup, run.stats
    cands: list[tuple[int, str]] = []  # (index in left, text)
    for i, (t, samples) in enumerate(zip(left, outs)):
        # copying the shown contexts is not new data; containment >= Jaccard, so this also drops near copies
        ex_sh = [shingles(e["text"]) for e in t["examples"]]
        seen = set()
        for s in samples:
            for c in extract_candidates(s):
                if normalise(c) not in seen and not dedup.is_dup(c) and not copies_context(c, ex_sh, cfg.near_dup):
                    seen.add(normalise(c))
                    cands.append((i, c))
    stats["candidates"] += len(cands)
    acts = fx.transform([c for _, c in cands]).tocsr() if cands else None
    best: dict[int, tuple[float, str, int]] = {}
    for j, (i, c) in enumerate(cands):
        a = float(acts[j, left[i]["id"]])
        if a > 0:
            stats["fired"] += 1
            if a > best.get(i, (0.0, "", -1))[0]:
                best[i] = (a, c, j)
    chosen = []
    for i in sorted(best):
        a, c, j = best[i]
        if dedup.is_dup(c):  # two targets of this group may have produced near-identical requests
            continue
        dedup.add(c)
        chosen.append((i, a, c, j))
    verdicts = judge.judge([c for _, _, c, _ in chosen])
    for (i, _, _, _), v in zip(chosen, verdicts):
        if v.label is None:
            rej = rejected[left[i]["id"]]
            rej["judge_unparseable"] = rej.get("judge_unparseable", 0) + 1
    judged = [(ch, v) for ch, v in zip(chosen, verdicts) if v.label is not None]
    items = [(c, v.label, left[i].get("lang")) for (i, _, c, _), v in judged]
    responses = make_responses(gen, items, cfg, resp_seed, detector)
    for ((i, _, _, _), _), resp in zip(judged, responses):
        rej = rejected[left[i]["id"]]
        if resp.regenerated:
            rej["regenerated"] = rej.get("regenerated", 0) + resp.regenerated
        if resp.text is None:
            rej[resp.problem] = rej.get(resp.problem, 0) + 1
    audit_drop = _audit(run, [(c, v.label, left[i], resp) for ((i, _, c, _), v), resp in zip(judged, responses)])
    kept = set()
    for ((i, a, c, j), v), resp, why in zip(judged, responses, audit_drop):
        t = left[i]
        if resp.text is None:
            continue
        if why:
            count_drops(rejected[t["id"]], why)
            continue
        rows.append(make_row(c, resp.text, v.label, t["id"], a, gen.name, attempt, seed, t.get("lang"), resp.source,
                             target_label=t["label"], judge=judge.name, judge_score=v.score, alpha=alphas[i]))
        done.append({"target": t["id"], "status": "kept", "attempts": attempt, "rejected": rejected[t["id"]]})
        kept.add(i)
        lo, hi = acts.indptr[j], acts.indptr[j + 1]
        fired.update(int(f) for f, v in zip(acts.indices[lo:hi], acts.data[lo:hi]) if v > 0)
    return kept


def _audit(run: _Run, items: list[tuple]) -> list[list[str]]:
    """Per (request, judged label, target, Response): the audit's drop reasons ([] = kept, or no audit, or no
    response to audit). The target's shown contexts are the contexts a request must not copy."""
    out: list[list[str]] = [[] for _ in items]
    todo = [k for k, it in enumerate(items) if it[3].text is not None]
    if not run.cfg.audit or run.audit is None or not todo:
        return out
    from .audit import AuditConfig, audit_pairs

    contexts = list({e["text"]: None for k in todo for e in items[k][2].get("examples", [])})
    frame, _ = audit_pairs([items[k][0] for k in todo], [items[k][3].text for k in todo], [items[k][1] for k in todo],
                           [items[k][2].get("lang") for k in todo], run.audit,
                           run.audit_config or AuditConfig(near_dup=run.cfg.near_dup), contexts=contexts)
    for k, reasons in zip(todo, frame["audit_reasons"].to_list()):
        out[k] = list(reasons)
    return out
