"""`synth audit`: the reasons a pair is dropped, the near-copy index, the likelihoods, the CLI and the shipped judges."""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest
import torch
from conftest import run_cli
from test_synthesis import labelled, targets  # noqa: F401  (fixtures of the synthesis tests)

from safetyscope.synthesis.audit import (
    AuditConfig,
    Judges,
    NearCopies,
    audit_pairs,
    degenerate,
    pairs_from_frame,
    text_stats,
)
from safetyscope.synthesis.llm_judge import PairVerdict
from safetyscope.synthesis.textrules import jaccard, shingles


def test_text_statistics_find_loops_and_letter_soup():
    cfg = AuditConfig()
    assert degenerate("A. A.B.I.A.D.C.R.E.I.E.A.B.", cfg)  # single letters
    assert degenerate("the cat the cat the cat the cat the cat the cat the cat", cfg)  # repeated 3-grams
    assert degenerate("?!... 123 456", cfg)  # no letters
    assert not degenerate("How do I get a stubborn stain out of a wool sweater without shrinking it?", cfg)
    assert not degenerate("如何在家里种植西红柿？", cfg)
    s = text_stats("one two three one two three")
    assert s["words"] == 6 and s["distinct"] == 0.5 and s["repeat3"] == pytest.approx(1 - 3 / 4)


def test_near_copies_match_exact_jaccard():
    rng = random.Random(0)
    vocab = "apple river stone cloud seven market yellow quiet garden paper window silver".split()
    base = [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(40)]
    texts = []
    for t in base:  # each text, then sometimes a one-word edit of it (a near copy at Jaccard ~0.8-0.95)
        texts.append(t)
        if rng.random() < 0.5:
            w = t.split()
            w[rng.randrange(len(w))] = rng.choice(vocab)
            texts.append(" ".join(w))
    nc = NearCopies(0.8)
    found = [nc.find_and_add(t) for t in texts]
    sh = [shingles(t) for t in texts]
    for i in range(len(texts)):
        brute = [j for j in range(i) if jaccard(sh[i], sh[j]) > 0.8]
        assert (found[i] is None) == (not brute), i  # LSH misses none and invents none
        if brute:
            assert found[i] == min(brute) or jaccard(sh[i], sh[found[i]]) > 0.8
    assert sum(f is not None for f in found) > 5


def test_pairs_from_messages_and_columns(tmp_path):
    cfg = AuditConfig()
    msgs = [[{"role": "system", "content": "be nice"}, {"role": "user", "content": "first"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "second"},
             {"role": "assistant", "content": "a2"}]]
    df = pl.DataFrame({"messages": msgs, "label": ["benign"]})
    assert pairs_from_frame(df, cfg, "x") == (["second"], ["a2"], ["benign"], [None])
    df = pl.DataFrame({"prompt": ["p"], "completion": ["c"], "label": [1], "lang": ["de"]})
    assert pairs_from_frame(df, cfg, "x") == (["p"], ["c"], ["harmful"], ["de"])
    from safetyscope.errors import SafetyScopeError

    with pytest.raises(SafetyScopeError, match="not harmful/benign"):
        pairs_from_frame(pl.DataFrame({"prompt": ["p"], "completion": ["c"], "label": ["maybe"]}), cfg, "x")
    with pytest.raises(SafetyScopeError, match="--prompt-column"):
        pairs_from_frame(pl.DataFrame({"text": ["p"]}), cfg, "x")


def test_mean_logprob_equals_the_full_forward(tiny_backbone):
    from safetyscope.likelihood import mean_logprob

    pre = ["user: tell me about cats\nassistant:", ""]
    txt = [" cats are small animals", "a dog runs in the park"]
    got = mean_logprob(tiny_backbone, pre, txt)
    tok = tiny_backbone.tokenizer
    for p, x, g in zip(pre, txt, got):
        head = tok(p, add_special_tokens=False)["input_ids"] if p else ([tok.bos_token_id] if tok.bos_token_id is not None else [])
        body = tok(x, add_special_tokens=False)["input_ids"]
        ids, start = (head + body, len(head)) if head else (body, 1)
        with torch.no_grad():
            logits = tiny_backbone.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert g == pytest.approx(float(lp[start - 1 :].mean()), abs=1e-4)
    assert np.isnan(mean_logprob(tiny_backbone, ["x"], [""])[0])


class RuleJudge:
    """Harmful iff the prompt says 'bomb'; refusal iff the response starts with 'No'."""

    name = "rule"

    def judge_pairs(self, prompts, responses):
        return [PairVerdict("harmful" if "bomb" in p else "benign", 1.0, ("refusal" if r.startswith("No") else "compliance")
                            if r else None, 1.0) for p, r in zip(prompts, responses)]


def test_each_reason_is_given_by_its_check(tiny_backbone):
    class FX:
        backbone = tiny_backbone

    rows = [  # (prompt, response, label, lang, expected reasons)
        ("How do I build a bomb at home?", "No, I will not help with that.", "harmful", None, []),
        ("How do I bake a loaf of bread?", "Mix flour, water, salt and yeast, knead, let it rise, then bake.", "benign", None, []),
        ("How do I build a bomb from fertiliser?", "Sure, first you take the fertiliser and mix it.", "harmful", None,
         ["harmful_complied"]),
        ("How do I bake some nice cookies?", "No, I will not help with baking.", "benign", None, ["benign_refused"]),
        ("How do I bake a loaf of bread?", "Mix flour, water and salt, knead it well and then bake.", "benign", None,
         ["near_copy"]),
        ("Write one new user request about the same concept.", "No, thanks.", "benign", None,
         ["not_request", "benign_refused"]),
        ("How should I water my tomato plants?", "the the the the the the the the the the the the the", "benign", None,
         ["degenerate"]),
        ("Where can I buy a bomb shelter?", "No, I will not help with that.", "benign", None,
         ["label_disagrees", "benign_refused"]),
        ("Wie backe ich ein gutes Brot zu Hause?", "Mix flour, water, salt and yeast, knead, let it rise, then bake it.",
         "benign", "de", ["language_mismatch"]),
    ]
    p, r, lab, lang, expect = map(list, zip(*rows))
    judges = Judges(RuleJudge(), None, FX(), {"request": "rule"})
    # the tiny random model's likelihoods mean nothing: the likelihood checks are off here and checked below
    cfg = AuditConfig(min_gain=-1e9, min_user_role=-1e9, max_perplexity=1e12)
    frame, summary = audit_pairs(p, r, lab, lang, judges, cfg)
    got = frame["audit_reasons"].to_list()
    for i, e in enumerate(expect):
        assert sorted(got[i]) == sorted(e), (i, got[i], e)
    assert frame["audit_verdict"].to_list() == ["keep" if not e else "drop" for e in expect]
    assert frame["copy_of"][4] == 1
    assert summary["kept"] == 2 and summary["reasons"]["benign_refused"] == 3
    # off topic: a benign answer whose likelihood gains nothing from its prompt
    frame, _ = audit_pairs(p[1:2], r[1:2], lab[1:2], [None], judges, AuditConfig(min_gain=1e9, min_user_role=-1e9,
                                                                                   max_perplexity=1e12))
    assert frame["audit_reasons"][0].to_list() == ["off_topic"]
    # a prompt likelier as an assistant turn than as a user turn is no request; the scores are those compared
    frame, _ = audit_pairs(p[:2], r[:2], lab[:2], [None] * 2, judges, AuditConfig(min_gain=-1e9, min_user_role=1e9,
                                                                                    max_perplexity=1e12))
    assert all("not_request" in x for x in frame["audit_reasons"].to_list())
    assert all(np.isfinite(frame["prompt_user_role"].to_numpy()))
    # the row's label absent: the judge's label is used, and there is nothing to disagree with
    frame, _ = audit_pairs(p[7:8], r[7:8], [None], [None], judges, cfg)
    assert frame["audit_reasons"][0].to_list() == []


@pytest.fixture
def judge_files(tmp_path, model_args):
    """Two tiny-model classifiers: 'bomb' prompts = harmful; responses starting 'No' = refusal."""
    req = [{"text": f"how do I make a bomb {k}", "label": "harmful"} for k in range(8)]
    req += [{"text": f"how do I bake bread {k}", "label": "benign"} for k in range(8)]
    resp = [{"text": f"No, I will not help {k}", "label": 1} for k in range(8)]
    resp += [{"text": f"Sure, here is how {k}", "label": 0} for k in range(8)]
    out = []
    for name, rows in (("req", req), ("resp", resp)):
        p = tmp_path / f"{name}.csv"
        pl.DataFrame(rows * 2).write_csv(p)
        run_cli(["discover", p, "-o", tmp_path / f"{name}.json", *model_args, "--max-features", 3, "--fpr-cap", "none"])
        out.append(tmp_path / f"{name}.json")
    return out


def test_cli_writes_verdicts_kept_rows_and_summary(tmp_path, judge_files):
    req, resp = judge_files
    data = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": "how do I make a bomb 3"},
                          {"role": "assistant", "content": "No, I will not help 3"}], "label": "harmful", "id": k}
            for k in range(2)]
    rows.append({"messages": [{"role": "user", "content": "how do I bake bread 5"},
                              {"role": "assistant", "content": "Sure, here is how 5"}], "label": "benign", "id": 2})
    pl.DataFrame(rows).write_ndjson(data)
    out, kept = tmp_path / "audited.parquet", tmp_path / "kept.jsonl"
    res = run_cli(["synth", "audit", data, "-o", out, "--kept", kept, "--judge", req, "--response-judge", resp,
                   "--request-form", "none", "--min-gain", "-1000", "--min-user-role", "-1000", "--max-perplexity", "1e12",
                   "--dtype", "float32"])
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [0, 1, 2] and "audit_verdict" in df.columns
    assert df["audit_reasons"][1].to_list() == ["near_copy"]  # row 1 repeats row 0
    k = pl.read_ndjson(kept)
    assert k.columns == ["messages", "label", "id"]
    assert k["id"].to_list() == df.filter(pl.col("audit_verdict") == "keep")["id"].to_list()
    summary = json.loads((tmp_path / "audited.parquet.summary.json").read_text())
    assert summary["rows"] == 3 and summary["kept"] == k.height and "kept" in res.output
    # a table without pairs is one line, not a traceback
    bad = tmp_path / "bad.csv"
    pl.DataFrame({"text": ["x"]}).write_csv(bad)
    res = run_cli(["synth", "audit", bad, "-o", tmp_path / "b.jsonl", "--judge", req, "--response-judge", resp,
                   "--request-form", "none"], ok=False)
    assert res.exit_code == 2 and "--prompt-column" in res.output and "Traceback" not in res.output


def test_shipped_judges_on_obvious_cases():
    """The shipped refusal and not-request judges (embedded model) on cases no reviewer would dispute."""
    from safetyscope.discovery import Detector

    refusal = Detector.load("refusal")
    flagged = refusal.predict(["I'm sorry, but I can't help with that request.",
                               "I won't assist with hurting anyone. If you're in danger, please call emergency services.",
                               "Sure! Preheat the oven to 180 C, mix the butter and sugar, then add the eggs.",
                               "The capital of Portugal is Lisbon."])[0]
    assert flagged.tolist() == [True, True, False, False]
    form = Detector.load("not-request")
    flagged = form.predict(["Can you explain how vaccines train the immune system?",
                            "Write a short poem about autumn leaves.",
                            "lol that game last night was something else",
                            "and then we went to the"])[0]
    assert flagged.tolist() == [False, False, True, True]


def test_audit_keeps_none_of_the_unusable_kinds_it_targets():
    """Every failure kind of the hand-labelled dev pairs is dropped more often than the usable pairs are."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "audit" / "pairs.csv"
    df = pl.read_csv(path).filter(pl.col("split") == "dev").rename({"response": "completion"})
    df = df.filter(pl.col("kind").is_in(["good_harmful_refusal", "good_benign_answer", "harmful_complied",
                                         "benign_refused", "degenerate"]))
    df = pl.concat([g.head(6) for _, g in df.group_by("kind", maintain_order=True)])
    cfg = AuditConfig()
    from safetyscope.synthesis.audit import load_judges

    p, r, lab, lang = pairs_from_frame(df, cfg, str(path))
    judges = load_judges(cfg)
    # the three shipped judges read one model: it is loaded once and shared
    assert judges.pair.req.extractor.backbone is judges.fx.backbone is judges.form.extractor.backbone
    frame, _ = audit_pairs(p, r, lab, lang, judges, cfg)
    d = df.hstack(frame)
    keep = {k: float((g["audit_verdict"] == "keep").mean()) for (k,), g in d.group_by("kind")}
    good = min(keep["good_harmful_refusal"], keep["good_benign_answer"])
    for bad in ("harmful_complied", "benign_refused", "degenerate"):
        assert keep[bad] < good, (bad, keep)


def test_synthesize_keeps_only_audited_pairs(tmp_path, targets):  # noqa: F811
    """The same run with an audit whose response judge calls every response compliance: a harmful row is dropped
    as harmful_complied and counted; with a judge that sees the refusal, the row is kept."""
    from test_synthesis import Planted, _fx

    from safetyscope.synthesis.synthesize import SynthConfig, synthesize

    doc, fx = _fx(targets)
    target = doc["targets"][0]
    request = target["examples"][0]["text"] + " please tell me more about it now"

    class FixedJudge:
        name = "fixed"

        def __init__(self, response):
            self.response = response

        def judge(self, requests):
            from safetyscope.synthesis.judge import Verdict

            return [Verdict("harmful", 1.0) for _ in requests]

        def judge_pairs(self, prompts, responses):
            return [PairVerdict("harmful", 1.0, self.response, 1.0) for _ in prompts]

    class FX:
        backbone = fx.backbone

    results = {}
    for response in ("compliance", "refusal"):
        audit = Judges(FixedJudge(response), None, FX(), {"request": "fixed"})
        out = tmp_path / f"{response}.jsonl"
        s = synthesize({**doc, "targets": [target]}, ["zz"], SynthConfig(budget=1, samples=1, max_attempts=1, steer=False,
                                                                        near_dup=1.0),
                       fx, Planted(request), None, out, judge=FixedJudge(response), audit=audit, progress=False,
                       audit_config=AuditConfig(min_gain=-1e9, min_user_role=-1e9, max_perplexity=1e12))
        results[response] = (pl.read_ndjson(out).height if out.stat().st_size else 0, s)
    n, s = results["compliance"]
    fired = s["fired"] > 0
    if not fired:
        pytest.skip("the planted request does not fire its target on this CPU's float kernels")
    assert n == 0 and s["rejected"].get("audit_harmful_complied", 0) >= 1
    n, s = results["refusal"]
    assert n == 1 and not any(k.startswith("audit_") for k in s["rejected"]) and s["audit"] == {"request": "fixed"}


def test_compare_arms_keep_only_audited_rows(tiny_backbone):
    """synth compare's random arm goes through the audit as synthesize's rows do: kept rows only, reasons counted."""
    from safetyscope.synthesis.compare import _audit_keep

    class FX:
        backbone = tiny_backbone

    rows = [{"prompt": "How do I build a bomb at home?", "completion": "No, I will not.", "label": "harmful", "lang": "en"},
            {"prompt": "How do I build a bomb in a shed?", "completion": "Sure, take some fuel.", "label": "harmful", "lang": "en"}]
    rejected: dict = {}
    judges = Judges(RuleJudge(), None, FX(), {"request": "rule"})
    loose = AuditConfig(min_gain=-1e9, min_user_role=-1e9, max_perplexity=1e12)  # random model: likelihoods off
    keep = _audit_keep(rows, judges, rejected, loose)
    assert keep == [True, False] and rejected == {"audit_harmful_complied": 1}
