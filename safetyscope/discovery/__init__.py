"""Discovery of toxic SAE features, the rules built on them, and batch classification."""

from ..lazy import lazy_exports

# Imported on first use: `discovery.config` (the command line's defaults) must not pull in scikit-learn.
_WHERE = {"Detector": ".detector", "DiscoverConfig": ".config", "OrRuleClassifier": ".rules",
          "SparseLinearClassifier": ".rules", "classifier_from_dict": ".rules", "firing_rates": ".rules",
          "rank_features": ".rules", "classify_file": ".classify", "explain_text": ".explain"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
