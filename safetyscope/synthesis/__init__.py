"""Feature-targeted safety data synthesis: target sets, coverage, generation with judging and screening, and the
experiments comparing it with random synthesis and natural data (what `safetyscope synth ...` runs)."""

from ..lazy import lazy_exports

_WHERE = {"TargetsConfig": ".targets", "find_targets": ".targets", "read_targets": ".targets",
          "coverage_of_texts": ".coverage", "SynthConfig": ".synthesize",
          "GeneratorConfig": "..generators", "make_generator": "..generators", "DetectorJudge": ".judge",
          "LLMJudge": ".judge", "CompareConfig": ".compare", "run_compare": ".compare",
          "SFTEvalConfig": ".sft_eval", "run_sft_eval": ".sft_eval"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
