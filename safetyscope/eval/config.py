"""The `eval` job's defaults, in a module light enough for the command line to import (no scikit-learn)."""

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)  # shares of the discovery rows in the efficiency curves
PERCENTS = tuple(round(f * 100, 6) for f in FRACTIONS)  # the same, in % (how `eval --fractions` takes them)
SEEDS = (0, 1, 2)  # the subsamples drawn per fraction
