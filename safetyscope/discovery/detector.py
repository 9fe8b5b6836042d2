"""A detector = feature extractor + rule + provenance, saved as one JSON file.

The JSON records the model and SAE (ids and weight fingerprints), the layer, the extraction settings,
the rule (feature ids, thresholds, deltas, firing rates or weights), how K was chosen and a summary
of the discovery data. It never holds the data itself. Loading it against another model or SAE is
an error, because feature ids only mean something for the SAE they were found in.

A per-language file (``discover --per-language``) also holds ``rules_by_lang``: one rule per language, found
on that language's rows only (a feature that separates toxic from clean in one language is often noise in
another). Each row is scored by its own language's rule; ``rule`` is then the fallback for every other
language, found on all languages' rows pooled (those rows are outside the validated languages).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SafetyScopeError
from ..features import FeatureConfig, FeatureExtractor
from ..provenance import extractor_from_record, extractor_record, read_document, write_document
from .rules import classifier_from_dict, rule_inputs

FORMAT = "safetyscope-classifier"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Shipped classifiers by name (files in ASSETS): what `-c NAME`, `explain NAME` and Detector.load(NAME) accept.
CLASSIFIERS = {
    # linear rules on SAE codes + mean residual, one per language of the 14 pack languages (English: + implicit hate rows)
    "default": "toxicity-linear-smollm2-135m-instruct.json",
    "toxicity": "toxicity-linear-smollm2-135m-instruct.json",
    # the default before it: an English sparse linear rule over 82 SAE features (assets/README.md)
    "toxicity-sparse": "toxicity-smollm2-135m-instruct.json",
    # the Qwen-Scope-style OR-rule the default was before it (F1 operating point; assets/README.md)
    "toxicity-or-rule": "toxicity-or-rule-smollm2-135m-instruct.json",
    # linear rule on SAE codes + mean residual; clean comments of 14 languages among its benign rows
    "harmful-request": "harmful-request-smollm2-135m-instruct.json",
    # the harmful-request rule before it: English benign rows only, so it flags most non-instruction text
    "harmful-request-sparse": "harmful-request-sparse-smollm2-135m-instruct.json",
    # the audit's judges (synth audit): flagged = the response refuses; flagged = the prompt is not a user request
    "refusal": "refusal-smollm2-135m-instruct.json",
    "not-request": "not-request-smollm2-135m-instruct.json",
    # one linear rule per language of the 14 toxicity languages (SAE codes + mean residual, 5 % clean FPR), on
    # Gemma 3 270M (extra `safetyscope[gemma]`)
    "multilingual": "toxicity-linear-gemma3-270m.json",
    # `multilingual` before it: sparse linear rules at the F1 operating point (flags 15-39 % of clean text)
    "multilingual-f1": "toxicity-multilingual-gemma3-270m.json",
}
DEFAULT_CLASSIFIER = ASSETS / CLASSIFIERS["default"]
# a verdict is given, but the classifier was never checked on this language
UNVALIDATED = "unvalidated language"


def evidence(toxic: bool, fired: list[int]) -> list[int]:
    """classify's ``evidence_features`` (and explain's): the features that pushed a text towards its verdict. A toxic
    verdict lists the rule's ``fired`` features (OR-rule: those above their threshold; sparse linear: the active
    features of positive weight; linear: the active SAE features of largest positive contribution, at most 10);
    a clean verdict lists none, because features pushing towards toxic were outweighed there."""
    return list(fired) if toxic else []


def classifier_path(name_or_path: str | Path | None) -> Path:
    """A shipped classifier's name (see CLASSIFIERS; None = "default") or a classifier file -> its path."""
    if name_or_path is None:
        return DEFAULT_CLASSIFIER
    if str(name_or_path) in CLASSIFIERS:
        path = ASSETS / CLASSIFIERS[str(name_or_path)]
        if not path.is_file():  # a registered name whose file this installation does not (yet) hold
            raise SafetyScopeError(f"shipped classifier {str(name_or_path)!r} is missing from this installation "
                                   f"({path} does not exist)")
        return path
    p = Path(name_or_path)
    if not p.is_file():
        raise SafetyScopeError(f"{name_or_path}: neither a classifier file nor a shipped classifier "
                               f"(shipped: {', '.join(CLASSIFIERS)})")
    return p


def read_rules(d: dict, where, d_sae: int | None = None) -> tuple[object, dict[str, object]]:
    """(rule, {language: rule}) of a classifier document, every rule validated as ``classifier_from_dict`` does
    (and against the SAE's ``d_sae`` when given); an error names the file and the language."""
    def one(rd, label: str):
        try:
            rule = classifier_from_dict(rd)
        except SafetyScopeError as e:
            raise SafetyScopeError(f"{where}: {label}{e}") from None
        # a rule reading codes + mean residual has d_sae code columns (n_codes) and d_model more
        n_codes = getattr(rule, "n_codes", rule.n_features_in_)
        if d_sae is not None and n_codes != d_sae:
            raise SafetyScopeError(f"{where}: {label}rule n_features_in {n_codes} is not the SAE's "
                                   f"d_sae {d_sae}")
        return rule

    rule = one(d.get("rule"), "")
    by_lang = d.get("rules_by_lang")
    if by_lang is None:  # a single-rule file (every file written before per-language rules)
        return rule, {}
    if not isinstance(by_lang, dict) or not by_lang:
        raise SafetyScopeError(f"{where}: key 'rules_by_lang' must be a non-empty object of language -> rule; "
                               f"got {by_lang!r:.80}")
    out = {}
    for lang, rd in by_lang.items():
        if not lang.strip():
            raise SafetyScopeError(f"{where}: rules_by_lang has a rule under an empty language code")
        out[lang] = one(rd, f"rules_by_lang[{lang!r}]: ")
    return rule, out


@dataclass
class Detector:
    extractor: FeatureExtractor
    rule: object  # OrRuleClassifier or SparseLinearClassifier; the fallback when rules_by_lang is set
    meta: dict
    rules_by_lang: dict = field(default_factory=dict)  # language -> rule found on that language's rows

    def rule_for(self, lang: str | None):
        """The rule that scores a row in ``lang``: its own language's rule, else the (fallback) ``rule``."""
        return self.rules_by_lang.get(lang, self.rule)

    def predict(self, texts: list[str], *, langs: list[str | None] | None = None, progress: bool = False):
        """(toxic bool array, score float array, fired feature ids per text) for non-empty texts. A per-language
        detector scores each text with its language's rule (``langs``; None: identified offline, as classify
        does); a single-rule detector ignores ``langs``."""
        ex = self.extractor.extract(texts, progress=progress)
        codes, means = ex.codes, ex.mean_acts
        if not self.rules_by_lang:
            X = rule_inputs(self.rule, codes, means)
            score = self.rule.decision_function(X)
            return score > 0, score, self.rule.fired(X)
        if langs is None:
            from ..langid import identify

            langs = identify(texts)
        if len(langs) != len(texts):
            raise SafetyScopeError(f"{len(texts)} texts but {len(langs)} languages")
        keys = np.array([lang if lang in self.rules_by_lang else "" for lang in langs], dtype=object)
        score, fired = np.empty(len(texts)), [None] * len(texts)
        for key in set(keys.tolist()):  # "" = the fallback rule
            idx = np.flatnonzero(keys == key)
            rule = self.rule_for(key)
            X = rule_inputs(rule, codes[idx], means[idx])
            score[idx] = rule.decision_function(X)
            for i, f in zip(idx, rule.fired(X)):
                fired[i] = f
        return score > 0, score, fired

    def languages_and_status(self, texts: list[str | None], langs: list[str | None] | None = None):
        """(language, status) per text, the one place classify and explain take them from: ``langs`` as given (None:
        identified offline); status "null text", "empty text", "unvalidated language" (a language outside
        ``validated_languages``: the verdict is still given) or "ok"."""
        if langs is None:
            from ..langid import identify

            langs = list(identify(texts))
        validated = set(self.validated_languages())
        status = ["null text" if t is None else "empty text" if not str(t).strip()
                  else "ok" if lang in validated else UNVALIDATED for t, lang in zip(texts, langs)]
        return langs, status

    def validated_languages(self) -> list[str]:
        """Languages the classifier was checked on: ``validation.languages`` of the file, else (files written
        before it was recorded) the languages of its discovery data summary; none known = none validated."""
        recorded = self.meta.get("validation", {}).get("languages")
        if recorded is not None:
            return list(recorded)
        return sorted(self.meta.get("discovery_data", {}).get("per_lang", {}))

    def to_dict(self) -> dict:
        by_lang = {"rules_by_lang": {la: r.to_dict() for la, r in self.rules_by_lang.items()}} if self.rules_by_lang else {}
        return {"format": FORMAT, **extractor_record(self.extractor, self.meta.get("sae_id")),
                "rule": self.rule.to_dict(), **by_lang, **{k: v for k, v in self.meta.items() if k not in ("sae_id",)}}

    def save(self, path: str | Path) -> None:
        write_document(self.to_dict(), path)

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, *, model: str | None = None, sae: str | None = None,
             device: str | None = None, dtype: str | None = FeatureConfig.dtype,
             batch_size: int = FeatureConfig.batch_size, cache: bool = FeatureConfig.cache,
             batch_tokens: int | None = FeatureConfig.batch_tokens, backbone=None) -> "Detector":
        """Load a shipped classifier by name (CLASSIFIERS; None = "default") or a classifier file; ``model``/``sae``
        override where the recorded ones are found (e.g. a moved directory), but their weights must match the
        recorded fingerprints. ``backbone``: the recorded model, already loaded (checked like a loaded one)."""
        path = classifier_path(name_or_path)
        d = read_classifier(path)
        fx = extractor_from_record(d, path, model=model, sae=sae, device=device, dtype=dtype,
                                   batch_size=batch_size, cache=cache, batch_tokens=batch_tokens, backbone=backbone)
        meta = {k: v for k, v in d.items() if k not in ("format", "package_version", "model", "sae", "layer",
                                                         "extraction", "rule", "rules_by_lang")}
        meta["sae_id"] = d["sae"]["id"]
        rule, by_lang = read_rules(d, path, fx.sae.cfg.d_sae)
        return cls(fx, rule, meta, by_lang)


def read_classifier(name_or_path: str | Path | None) -> dict:
    return read_document(classifier_path(name_or_path), FORMAT, "classifier")
