"""safetyscope: sparse-autoencoder features of language models as safety and toxicity data tools.

The Python API (docs/api.md): ``Backbone`` (model + layer capture), ``SAE``/``load_sae``, ``FeatureExtractor``
(texts -> pooled SAE codes), the scikit-learn classifiers ``OrRuleClassifier`` and ``SparseLinearClassifier``,
and ``Detector`` (a saved classifier with its model and SAE: texts -> verdicts)."""

from .backbone import Backbone
from .errors import SafetyScopeError
from .features import FeatureConfig, FeatureExtractor
from .lazy import lazy_exports
from .sae import SAE, SAEConfig, load_sae

__version__ = "0.1.0"
__all__ = ["SAE", "Backbone", "Detector", "FeatureConfig", "FeatureExtractor", "OrRuleClassifier", "SAEConfig",
           "SafetyScopeError", "SparseLinearClassifier", "load_sae"]

# Imported on first use: scikit-learn costs every command's start-up, and most commands never fit a rule.
__getattr__, __dir__ = lazy_exports(__name__, {"Detector": ".discovery.detector", "OrRuleClassifier": ".discovery.rules",
                                               "SparseLinearClassifier": ".discovery.rules"})
