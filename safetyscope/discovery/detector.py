"""A detector = feature extractor + rule + provenance, saved as one JSON file.

The JSON records the model and SAE (ids and weight fingerprints), the layer, the extraction settings,
the rule (feature ids, thresholds, deltas, firing rates or weights), how K was chosen and a summary
of the discovery data. It never holds the data itself. Loading it against another model or SAE is
an error, because feature ids only mean something for the SAE they were found in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SafetyScopeError
from ..features import FeatureExtractor
from ..provenance import extractor_from_record, extractor_record, read_document, write_document
from .rules import classifier_from_dict

FORMAT = "safetyscope-classifier"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Shipped classifiers by name (files in ASSETS): what `-c NAME`, `explain NAME` and Detector.load(NAME) accept.
CLASSIFIERS = {
    "default": "toxicity-smollm2-135m-instruct.json",
    "toxicity": "toxicity-smollm2-135m-instruct.json",
    "harmful-request": "harmful-request-smollm2-135m-instruct.json",
}
DEFAULT_CLASSIFIER = ASSETS / CLASSIFIERS["default"]


def classifier_path(name_or_path: str | Path | None) -> Path:
    """A shipped classifier's name (see CLASSIFIERS; None = "default") or a classifier file -> its path."""
    if name_or_path is None:
        return DEFAULT_CLASSIFIER
    if str(name_or_path) in CLASSIFIERS:
        return ASSETS / CLASSIFIERS[str(name_or_path)]
    p = Path(name_or_path)
    if not p.is_file():
        raise SafetyScopeError(f"{name_or_path}: neither a classifier file nor a shipped classifier "
                               f"(shipped: {', '.join(CLASSIFIERS)})")
    return p


@dataclass
class Detector:
    extractor: FeatureExtractor
    rule: object  # OrRuleClassifier or SparseLinearClassifier
    meta: dict

    def predict(self, texts: list[str], *, progress: bool = False):
        """(toxic bool array, score float array, fired feature ids per text) for non-empty texts."""
        codes = self.extractor.transform(texts, progress=progress)
        score = self.rule.decision_function(codes)
        return score > 0, score, self.rule.fired(codes)

    def validated_languages(self) -> list[str]:
        """Languages the classifier was checked on: ``validation.languages`` of the file, else (files written
        before it was recorded) the languages of its discovery data summary; none known = none validated."""
        recorded = self.meta.get("validation", {}).get("languages")
        if recorded is not None:
            return list(recorded)
        return sorted(self.meta.get("discovery_data", {}).get("per_lang", {}))

    def to_dict(self) -> dict:
        return {"format": FORMAT, **extractor_record(self.extractor, self.meta.get("sae_id")),
                "rule": self.rule.to_dict(), **{k: v for k, v in self.meta.items() if k not in ("sae_id",)}}

    def save(self, path: str | Path) -> None:
        write_document(self.to_dict(), path)

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, *, model: str | None = None, sae: str | None = None,
             device: str | None = None, dtype: str | None = "auto", batch_size: int = 32,
             cache: bool = True) -> "Detector":
        """Load a shipped classifier by name (CLASSIFIERS; None = "default") or a classifier file; ``model``/``sae`` override where the recorded ones are found
        (e.g. a moved directory), but their weights must match the recorded fingerprints."""
        path = classifier_path(name_or_path)
        d = read_classifier(path)
        fx = extractor_from_record(d, path, model=model, sae=sae, device=device, dtype=dtype,
                                   batch_size=batch_size, cache=cache)
        meta = {k: v for k, v in d.items() if k not in ("format", "package_version", "model", "sae", "layer",
                                                         "extraction", "rule")}
        meta["sae_id"] = d["sae"]["id"]
        try:
            rule = classifier_from_dict(d.get("rule"))
        except SafetyScopeError as e:
            raise SafetyScopeError(f"{path or DEFAULT_CLASSIFIER}: {e}") from None
        if rule.n_features_in_ != fx.sae.cfg.d_sae:
            raise SafetyScopeError(f"{path or DEFAULT_CLASSIFIER}: rule n_features_in {rule.n_features_in_} is not "
                                   f"the SAE's d_sae {fx.sae.cfg.d_sae}")
        return cls(fx, rule, meta)


def read_classifier(name_or_path: str | Path | None) -> dict:
    return read_document(classifier_path(name_or_path), FORMAT, "classifier")
