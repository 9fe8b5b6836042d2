"""What `discover` fits, as plain data: the one source of its defaults (the command's options read them here)
and of the fixed choices of the rule classes. No scikit-learn import, so the command line starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RuleKind = Literal["or_rule", "sparse_linear", "linear"]
Selection = Literal["greedy", "delta"]  # OrRuleClassifier: forward selection, or the report's top K by delta
Criterion = Literal["recall_at_fpr", "f1"]  # what OrRuleClassifier's selection and K optimise


@dataclass
class DiscoverConfig:
    text_column: str = "text"
    label_column: str = "label"
    langs: list[str] | None = None  # keep rows whose `lang` is one of these
    split: str | None = None  # keep rows whose `split` equals this (e.g. "discovery")
    kind: RuleKind = "or_rule"
    selection: Selection = "greedy"  # or_rule; "delta" is the report's top-K by delta
    max_features: int | None = None  # K; None = chosen on held-back data (or_rule) / 128 (sparse_linear)
    threshold: float = 0.0
    fpr_cap: float | None | str = "auto"  # or_rule: 0.2 for greedy, 0.02 for delta (see OrRuleClassifier)
    # most recall at a bounded clean firing rate (real traffic is mostly clean), or "f1"; sparse_linear: the
    # threshold at target_fpr of out-of-fold clean scores, or the logistic one
    criterion: Criterion = "recall_at_fpr"
    target_fpr: float = 0.02
    seed: int = 0
    layers: list[int] = field(default_factory=list)  # several = scan and keep the best single-feature delta
    # one rule per language (each on its own rows) plus the pooled rule as the fallback for other languages
    per_language: bool = False
    # kind of that pooled fallback (None: `kind`); "or_rule" keeps a sparse per-language file cheap to make:
    # an L1 path over every language's rows pooled costs far more than the per-language fits together
    fallback_kind: RuleKind | None = None
    # a column naming each row's group (e.g. `source`): K / C and the operating point are chosen on held-out
    # groups, so a setting is rewarded for carrying over to a source it was not fitted on
    group_column: str | None = None
    # with per_language: one rule fitted on every language's rows (each language weighing the same) and only its
    # threshold set per language (shared_rule.py), instead of one rule fitted on each language's own rows
    shared_weights: bool = False

    def __post_init__(self):
        from ..errors import check_number

        # a negative threshold fires on every text (inactive features are 0): a rule that always fires
        check_number("--threshold", self.threshold, low=0)
        check_number("--target-fpr", self.target_fpr, low=0, high=1, low_open=True, high_open=True)
        check_number("--seed", self.seed, low=0, high=2**32 - 1, integer=True)
        check_number("--max-features", self.max_features, low=1, integer=True, none_ok=True)
        if self.shared_weights:
            from ..errors import SafetyScopeError

            if not self.per_language:
                raise SafetyScopeError("--shared-weights sets one threshold per language: it needs --per-language")
            if self.kind == "or_rule":
                raise SafetyScopeError("--shared-weights needs a weighted rule: --kind linear or --kind sparse_linear")
            if self.group_column:
                raise SafetyScopeError("--shared-weights sets each language's threshold on out-of-fold rows, not on "
                                       "held-out groups: drop --group-column")
        if isinstance(self.fpr_cap, float):
            check_number("--fpr-cap", self.fpr_cap, low=0, high=1, low_open=True)
