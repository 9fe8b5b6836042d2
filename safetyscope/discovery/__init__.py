"""Discovery of toxic SAE features, the rules built on them, and batch classification."""

from .detector import Detector
from .rules import OrRuleClassifier, SparseLinearClassifier, firing_rates, rank_features

__all__ = ["Detector", "OrRuleClassifier", "SparseLinearClassifier", "firing_rates", "rank_features"]
