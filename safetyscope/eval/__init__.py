"""Evaluation: per-language results beside baselines and controls, cross-lingual transfer, data efficiency and
feature overlap (what `safetyscope eval` and `safetyscope overlap` run)."""

from ..lazy import lazy_exports

_WHERE = {"run_eval": ".run", "evaluate_languages": ".per_language", "layer_sweep": ".per_language", "methods": ".per_language",
          "transfer_matrix": ".transfer", "efficiency_curves": ".transfer", "binary_metrics": ".metrics",
          "recall_at_fpr": ".metrics", "wilson_interval": ".metrics", "compare_controls": ".controls", "footprint": ".overlap",
          "overlap_matrices": ".overlap", "redundancy": ".overlap", "run_overlap": ".overlap"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
