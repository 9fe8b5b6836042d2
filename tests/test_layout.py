"""The layer rule, checked on the source: cli -> jobs -> core, never upward. Only safetyscope.cli imports click,
and no chain of imports among safetyscope modules (module level or inside functions) leads back to where it began."""

import ast
import importlib.util
from pathlib import Path

import safetyscope

ROOT = Path(safetyscope.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = ("safetyscope", *p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every module this file imports, anywhere in it (lazy imports inside functions count too)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), pkg) if node.level else node.module
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}  # submodules
    return found


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_only_the_cli_package_imports_click():
    modules, graph = _graph()
    assert "safetyscope.cli.options" in modules and "safetyscope.training" in modules
    users = sorted(m for m, imps in graph.items() if any(i == "click" or i.startswith("click.") for i in imps))
    assert "safetyscope.cli" in users  # the walk sees click where it is
    assert [m for m in users if m != "safetyscope.cli" and not m.startswith("safetyscope.cli.")] == []


def test_no_module_below_cli_imports_the_cli():
    # `python -m safetyscope` (__main__) is the one entry point above the cli package
    _, graph = _graph()
    upward = {m: sorted(i for i in imps if i == "safetyscope.cli" or i.startswith("safetyscope.cli."))
              for m, imps in graph.items() if not m.startswith("safetyscope.cli") and m != "safetyscope.__main__"}
    assert {m: v for m, v in upward.items() if v} == {}


def test_no_import_cycle_among_safetyscope_modules():
    modules, graph = _graph()
    edges = {m: sorted(i for i in imps if i in modules and i != m) for m, imps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_public_api_names_the_classes_and_loads_classifiers_lazily():
    import subprocess
    import sys

    # the command line starts without scikit-learn (about a second): rules load when a command needs them
    code = ("import sys, safetyscope, safetyscope.cli; assert 'sklearn' not in sys.modules; "
            "from safetyscope import Backbone, SAE, load_sae, FeatureExtractor, OrRuleClassifier, "
            "SparseLinearClassifier, Detector; "
            "from safetyscope.discovery.rules import OrRuleClassifier as O; from safetyscope.discovery import Detector as D; "
            "assert OrRuleClassifier is O and Detector is D and set(safetyscope.__all__) <= set(dir(safetyscope)); "
            "import safetyscope.discovery as d, safetyscope.eval as e, safetyscope.synthesis as s; "
            "assert all(callable(getattr(m, n)) for m in (d, e, s) for n in m.__all__); "
            "print(sorted(safetyscope.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert "Detector" in out.stdout and "SparseLinearClassifier" in out.stdout


def test_every_public_name_has_a_line_in_the_api_docs():
    import re

    doc = (ROOT.parent / "docs" / "api.md").read_text()
    described = set(re.findall(r"^\| `(\w+)` \| \S", doc, flags=re.M))
    assert set(safetyscope.__all__) <= described, sorted(set(safetyscope.__all__) - described)


def _option_defaults(command) -> dict:
    return {p.name: p.default for p in command.params}


def test_option_defaults_come_from_the_config_dataclasses():
    """One source per default: an option's default is its config field's (or the job's constant), so changing the
    dataclass changes the command; a literal written twice would disagree here."""
    from safetyscope.cli import main
    from safetyscope.cli.options import field_default
    from safetyscope.eval.config import PERCENTS, SEEDS
    from safetyscope.features import FeatureConfig
    from safetyscope.synthesis.compare import CompareConfig
    from safetyscope.training import TrainConfig

    train = _option_defaults(main.commands["sae"].commands["train"])
    for option, field in [("width", "d_sae"), ("k", "k"), ("epochs", "epochs"), ("batch_tokens", "batch_tokens"),
                          ("auxk_alpha", "auxk_alpha"), ("dead_tokens", "dead_tokens"), ("held_out", "held_out"),
                          ("max_length", "max_length"), ("batch_size", "batch_size"), ("seed", "seed"),
                          ("model_dtype", "model_dtype"), ("dtype", "save_dtype")]:
        assert train[option] == getattr(TrainConfig, field), option
    compare = _option_defaults(main.commands["synth"].commands["compare"])
    for option in ("seed_langs", "seed_sources", "ref_langs", "max_seed_rows", "max_ref_rows", "min_delta",
                   "max_targets", "max_fire_rate", "sample_seed", "min_precision", "fdr", "judge_targets", "audit"):
        assert (list(compare[option]) if isinstance(compare[option], tuple) else compare[option]) == \
            field_default(CompareConfig, option), option
    from safetyscope.cli.synthesis import parse_schedule
    from safetyscope.synthesis.synthesize import SynthConfig

    assert parse_schedule(compare["steer_schedule"]) == SynthConfig.steer_schedule
    from safetyscope.synthesis.sft_eval import SFTEvalConfig

    sft = _option_defaults(main.commands["synth"].commands["sft-eval"])
    for option, field in [("arms", "arms"), ("train_batch_size", "batch_size")] + [
            (f, f) for f in ("base_rows", "max_arm_rows", "lora_r", "lora_alpha", "max_steps", "lr", "max_seq_len", "seed",
                             "n_harmful", "n_xstest", "n_benign", "max_new_tokens", "answer_tokens", "gen_batch_size",
                             "bootstrap", "save_adapters")]:
        value = list(sft[option]) if isinstance(sft[option], tuple) else sft[option]
        assert value == field_default(SFTEvalConfig, field), option
    ev = main.commands["eval"]
    parsed = {p.name: p.type.convert(p.default, p, None) for p in ev.params if p.name in ("seeds", "fractions")}
    assert parsed == {"seeds": SEEDS, "fractions": PERCENTS}
    feats = _option_defaults(main.commands["features"])
    for option in ("batch_size", "max_length", "dtype"):
        assert feats[option] == getattr(FeatureConfig, option), option


MAX_LINES = 450


def test_no_module_is_longer_than_one_reading_without_a_reason():
    """A module over MAX_LINES lines says why in its docstring (a paragraph starting "Long because:")."""
    long = {}
    for name, path in _modules().items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_LINES and "Long because:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long[name] = n
    assert long == {}


# core modules (the package's top level) that still import a job subpackage, and why; a new one fails the test below
CORE_TO_JOB = {
    "safetyscope.ray_engine": "runs classify's chunk function and loads its Detector on each actor",
    "safetyscope.steering": "classifier_features reads a Detector's rules to suppress their features",
}
JOBS = ("safetyscope.discovery", "safetyscope.synthesis", "safetyscope.eval")


def test_core_modules_do_not_import_the_jobs():
    _, graph = _graph()
    core = {m: sorted(i for i in imps if i.startswith(JOBS)) for m, imps in graph.items()
            if m.count(".") == 1 and not m.startswith(JOBS) and m != "safetyscope.__main__"}
    assert {m for m, bad in core.items() if bad} == set(CORE_TO_JOB)
