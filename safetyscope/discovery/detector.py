"""A detector = feature extractor + rule + provenance, saved as one JSON file.

The JSON records the model and SAE (ids and weight fingerprints), the layer, the extraction settings,
the rule (feature ids, thresholds, deltas, firing rates or weights), how K was chosen and a summary
of the discovery data. It never holds the data itself. Loading it against another model or SAE is
an error, because feature ids only mean something for the SAE they were found in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SafetyScopeError
from ..features import FeatureConfig, FeatureExtractor
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

    def to_dict(self) -> dict:
        from .. import __version__

        fx = self.extractor
        return {
            "format": FORMAT,
            "package_version": __version__,
            "model": {"id": fx.backbone.model_id, "fingerprint": fx.backbone.fingerprint()},
            "sae": {"id": self.meta.get("sae_id"), "fingerprint": fx.sae.fingerprint(), "d_sae": fx.sae.cfg.d_sae,
                    "k": fx.sae.cfg.k, "activation": fx.sae.cfg.activation},
            "layer": fx.layer,
            "extraction": {"max_length": fx.max_length, "skip_first_token": fx.skip_first_token},
            "rule": self.rule.to_dict(),
            **{k: v for k, v in self.meta.items() if k not in ("sae_id",)},
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None, *, model: str | None = None, sae: str | None = None,
             device: str | None = None, dtype: str | None = "auto", batch_size: int = 32,
             cache: bool = True) -> "Detector":
        """Load a classifier file; ``model``/``sae`` override where the recorded ones are found
        (e.g. a moved directory), but their weights must match the recorded fingerprints."""
        d = read_classifier(path)
        sae_spec = sae if sae is not None else d["sae"]["id"]
        model_spec = model if model is not None else d["model"]["id"]
        ex = d.get("extraction", {})
        fx = FeatureExtractor.from_config(FeatureConfig(
            model=model_spec, sae=sae_spec, layer=d["layer"], k=d["sae"].get("k"), batch_size=batch_size,
            max_length=ex.get("max_length", 256), skip_first_token=ex.get("skip_first_token", False),
            device=device, dtype=dtype, cache=cache))
        check_compatible(d, fx, path)
        meta = {k: v for k, v in d.items() if k not in ("format", "package_version", "model", "sae", "layer",
                                                         "extraction", "rule")}
        meta["sae_id"] = d["sae"]["id"]
        return cls(fx, classifier_from_dict(d["rule"]), meta)


def read_classifier(path: str | Path | None) -> dict:
    p = Path(path) if path else DEFAULT_CLASSIFIER
    if not p.is_file():
        raise SafetyScopeError(f"{p}: no such classifier file")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SafetyScopeError(f"{p}: not a classifier file (invalid JSON: {e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise SafetyScopeError(f"{p}: not a safetyscope classifier file")
    return d


def check_compatible(d: dict, fx: FeatureExtractor, path) -> None:
    m_fp, s_fp = fx.backbone.fingerprint(), fx.sae.fingerprint()
    if d["model"]["fingerprint"] != m_fp:
        raise SafetyScopeError(f"{path}: discovered with model {d['model']['id']} (fingerprint {d['model']['fingerprint']}) "
                               f"but {fx.backbone.model_id} (fingerprint {m_fp}) was loaded; its features mean nothing here")
    if d["sae"]["fingerprint"] != s_fp:
        raise SafetyScopeError(f"{path}: discovered with SAE {d['sae']['id']} (fingerprint {d['sae']['fingerprint']}) "
                               f"but a different SAE (fingerprint {s_fp}) was loaded; its feature ids mean nothing here")
    if d["layer"] != fx.layer:
        raise SafetyScopeError(f"{path}: discovered at layer {d['layer']}, not {fx.layer}")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
