"""A detector = feature extractor + rule + provenance, saved as one JSON file.

The JSON records the model and SAE (ids and weight fingerprints), the layer, the extraction settings,
the rule (feature ids, thresholds, deltas, firing rates or weights), how K was chosen and a summary
of the discovery data. It never holds the data itself. Loading it against another model or SAE is
an error, because feature ids only mean something for the SAE they were found in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..features import FeatureExtractor
from ..provenance import extractor_from_record, extractor_record, read_document, write_document
from .rules import classifier_from_dict

FORMAT = "safetyscope-classifier"
DEFAULT_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "toxicity-smollm2-135m-instruct.json"


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
    def load(cls, path: str | Path | None = None, *, model: str | None = None, sae: str | None = None,
             device: str | None = None, dtype: str | None = "auto", batch_size: int = 32,
             cache: bool = True) -> "Detector":
        """Load a classifier file; ``model``/``sae`` override where the recorded ones are found
        (e.g. a moved directory), but their weights must match the recorded fingerprints."""
        d = read_classifier(path)
        fx = extractor_from_record(d, path or DEFAULT_CLASSIFIER, model=model, sae=sae, device=device, dtype=dtype,
                                   batch_size=batch_size, cache=cache)
        meta = {k: v for k, v in d.items() if k not in ("format", "package_version", "model", "sae", "layer",
                                                         "extraction", "rule")}
        meta["sae_id"] = d["sae"]["id"]
        return cls(fx, classifier_from_dict(d["rule"]), meta)


def read_classifier(path: str | Path | None) -> dict:
    return read_document(path or DEFAULT_CLASSIFIER, FORMAT, "classifier")
