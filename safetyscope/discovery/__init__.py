"""Discovery of toxic SAE features, the rules built on them, and batch classification."""

__all__ = ["Detector", "OrRuleClassifier", "SparseLinearClassifier", "firing_rates", "rank_features"]

# Imported on first use: `discovery.config` (the command line's defaults) must not pull in scikit-learn.
_LAZY = {"Detector": ".detector", "OrRuleClassifier": ".rules", "SparseLinearClassifier": ".rules",
         "firing_rates": ".rules", "rank_features": ".rules"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
