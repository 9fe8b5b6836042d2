"""The eval report leads with a summary computed from its results, names the losing cases, and explains its method
names; the report files can be rewritten from a results.json alone."""

from __future__ import annotations

import json

from safetyscope.eval import report
from safetyscope.eval.summary import summary


def _row(lang, method, f1, rec5=0.3):
    return {"lang": lang, "method": method, "f1": f1, "recall_at_5pct_fpr": rec5, "roc_auc": 0.8,
            "recall_at_1pct_fpr": 0.1, "fpr": 0.1, "precision_at_5pct": 0.2}


def _ctl(verdict, diff=0.01):
    m = {"trained": 0.7, "control": 0.7 - diff, "diff": diff, "ci95": [-0.02, 0.04]}
    return {"f1": m, "recall_at_5pct_fpr": m, "roc_auc": m, "verdict": verdict}


def synthetic() -> dict:
    rows = []
    for lang, (or_f1, sparse_f1) in {"aa": (0.60, 0.80), "bb": (0.85, 0.90), "cc": (0.70, 0.667)}.items():
        rows += [_row(lang, "or_rule", or_f1), _row(lang, "sparse_linear", sparse_f1, 0.5),
                 _row(lang, "probe_raw", 0.95, 0.7), _row(lang, "majority", 0.667),
                 _row(lang, "or_rule_fpr2", 0.2), _row(lang, "or_rule_K=1", 0.5), _row(lang, "or_rule_K=10", 0.6)]
    controls = {"n_boot": 10, "langs": {"aa": {"random_sae_or_rule": _ctl("does not clearly beat")},
                                        "bb": {"random_sae_or_rule": _ctl("beats", 0.1)},
                                        "cc": {"random_sae_or_rule": _ctl("loses to", -0.1)}},
                "macro": {"random_sae_or_rule": _ctl("does not clearly beat")}}
    return {"config": {"model": "tiny", "layer": 1, "langs": ["aa", "bb", "cc"], "texts": 99},
            "per_language": rows, "random_controls": controls, "transfer": None, "efficiency": None,
            "layer_sweep": None}


def test_summary_names_the_winner_and_every_losing_case():
    lines = summary(synthetic())
    assert 3 <= len(lines) <= 5
    best, majority, control = lines
    # the best SAE method by macro F1 (sparse_linear 0.789) behind the raw probe (0.950) by 0.161
    assert "`sparse_linear` 0.789" in best and "behind the best baseline `probe_raw` (0.950) by 0.161" in best
    assert "best SAE method `sparse_linear` 0.500, best baseline `probe_raw` 0.700" in best
    # at or below the majority F1: or_rule in aa, sparse_linear in cc (equal); not or_rule_fpr2 (a low-FPR rule)
    assert "`or_rule` in aa 0.600" in majority and "`sparse_linear` in cc 0.667" in majority
    assert "bb" not in majority and "or_rule_fpr2" not in majority
    assert "in 2 of 3 languages (aa, cc), worse in cc" in control and "random_sae_or_rule" in control
    assert "macro: does not clearly beat" in control


def test_report_files_lead_with_the_summary_and_a_glossary(tmp_path):
    res = synthetic()
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert report.main([str(tmp_path)]) == 0  # from results.json alone: no model
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Summary") < md.index("## Method names") < md.index("## Per language")
    assert "| or_rule_fpr2 |" in md.split("## Method names")[1].split("##")[0]
    assert "| or_rule_K=k |" in md and "| logreg_sae |" not in md  # only the methods the report holds
    html = (tmp_path / "report.html").read_text()
    assert html.index("<ul class='lead'>") < html.index("<table>")
    assert "<strong>At or below the majority baseline" in html and "<code>or_rule</code> in aa 0.600" in html
    assert (tmp_path / "per_language_f1.png").read_bytes()[:4] == b"\x89PNG"


def test_plots_give_every_line_its_own_colour():
    for n in (3, 10, 14, 20):
        got = report.colours(n)
        assert len(got) == n and len(set(map(str, got))) == n
