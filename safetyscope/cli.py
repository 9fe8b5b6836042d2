"""The `safetyscope` command line. Each job's commands live beside its code and are registered here."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from .errors import SafetyScopeError
from .ray_engine import ray_options

INTERRUPTED = "interrupted: rerun the same command to resume"


def user_errors(fn):
    """Turn SafetyScopeError (a user mistake) into one line on stderr and exit code 2 (Ctrl-C: ``_Group``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SafetyScopeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


class NumberList(click.ParamType):
    """A comma-separated list of numbers ("1,2,5"), checked when the command line is parsed, so a typo is a
    one-line usage error before any model loads (not a ValueError after a long extraction)."""

    def __init__(self, kind: type = int, low: float | None = None, high: float | None = None):
        self.kind, self.low, self.high = kind, low, high
        self.name = f"comma-separated {kind.__name__}s"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            out = tuple(self.kind(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a list of {self.name}", param, ctx)
        bad = [v for v in out if (self.low is not None and v <= self.low) or (self.high is not None and v > self.high)]
        if bad:
            self.fail(f"{bad} outside ({self.low}, {self.high}]", param, ctx)
        return out


def model_options(fn):
    """--model/--sae/--layer/--k and the extraction knobs shared by every command that reads texts."""
    opts = [
        click.option("--model", default=None, help="Hub id, local HF directory or .gguf file [default: embedded SmolLM2-135M-Instruct]."),
        click.option("--sae", default=None, help="SAE directory, Qwen-Scope .pt file/dir or hub repo [default: embedded]."),
        click.option("--layer", type=int, default=None, help="Decoder layer whose output the SAE reads [default: the SAE's]."),
        click.option("--k", type=int, default=None, help="Override k of a TopK SAE (Qwen-Scope files do not store it)."),
        click.option("--batch-size", type=int, default=32, show_default=True),
        click.option("--max-length", type=int, default=256, show_default=True, help="Tokens kept per text."),
        click.option("--skip-first-token/--keep-first-token", default=None,
                     help="Leave out position 0 (attention sink) when pooling [default: as the SAE was trained]."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available]."),
        click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPUs and on CPUs with native bf16, else float32), float32, bfloat16, float16."),
        click.option("--no-cache", is_flag=True, help="Do not reuse or store per-text results."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def recorded_model_options(what: str):
    """Options of commands that read a saved artefact (a classifier, a targets file): where to find its
    model/SAE if they moved (checked against its fingerprints) and the extraction knobs."""
    def deco(fn):
        for opt in reversed([
            click.option("--model", default=None, help=f"Where to find the {what}'s model, if not where it was recorded."),
            click.option("--sae", default=None, help=f"Where to find the {what}'s SAE, if not where it was recorded."),
            click.option("--batch-size", type=int, default=32, show_default=True),
            click.option("--device", default=None),
            click.option("--dtype", default="auto", show_default=True),
            click.option("--no-cache", is_flag=True, help="Do not reuse or store per-text features."),
        ]):
            fn = opt(fn)
        return fn
    return deco


def recorded_kwargs(kw: dict) -> dict:
    """The values of ``recorded_model_options`` as keyword arguments of ``extractor_from_record``/``Detector.load``."""
    return {"model": kw["model"], "sae": kw["sae"], "device": kw["device"], "dtype": kw["dtype"],
            "batch_size": kw["batch_size"], "cache": not kw["no_cache"]}


def feature_config(kw: dict):
    from .features import FeatureConfig

    return FeatureConfig(model=kw.pop("model"), sae=kw.pop("sae"), layer=kw.pop("layer"), k=kw.pop("k"),
                         batch_size=kw.pop("batch_size"), max_length=kw.pop("max_length"),
                         skip_first_token=kw.pop("skip_first_token"), device=kw.pop("device"),
                         dtype=kw.pop("dtype"), cache=not kw.pop("no_cache"))


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("datasets").setLevel(logging.ERROR)


class _Group(click.Group):
    """Ctrl-C is not a crash: one line and exit code 130 wherever it lands (click would print "Aborted!" and
    exit 1 for an interrupt that reaches it, e.g. one raised while a command unwinds). A usage error (unknown
    command or option, bad or missing value) is one ``error:`` line and exit code 2 like any other user
    mistake, not click's usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the group's own options are parsed here, before invoke
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:  # the subcommand's arguments are parsed inside invoke
            _usage_error(e)
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)


def _usage_error(e: click.ClickException):
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    msg = " ".join(e.format_message().split())
    click.echo(f"error: {where}{msg}{hint}", err=True)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="safetyscope")
def main():
    """SAE features of language models as safety and toxicity data tools."""
    quiet_libraries()


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output table (.parquet, .csv, .jsonl or a directory).")
@click.option("--text-column", default="text", show_default=True)
@model_options
@ray_options
@user_errors
def features(input_path, output, text_column, engine, address, workers, cpus_per_worker, gpus_per_worker, ray_batch_size,
             **kw):
    """Pooled sparse SAE codes per text: feature_ids and feature_acts (max over tokens)."""
    from .data import read_table, text_list, write_table
    from .features import FeatureExtractor, codes_frame
    from .outputs import check_output

    # Before any work. features has no --overwrite: it replaces a file, or a directory it wrote, as before.
    check_output(output, inputs=[input_path], overwrite=True)
    cfg = feature_config(kw)
    if engine == "ray":
        from .ray_engine import run_features_ray

        s = run_features_ray(input_path, output, cfg, text_column=text_column, address=address, workers=workers,
                             cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, batch_rows=ray_batch_size)
        click.echo(f"wrote {s['rows']} rows to {output} (ray, {workers} worker(s)): "
                   f"mean {s['mean_features']:.1f} features per text", err=True)
        return
    df = read_table(input_path, columns=[text_column])
    texts = text_list(df, text_column, input_path)
    fx = FeatureExtractor.from_config(cfg)
    ex = fx.extract(texts, progress=True)
    codes = ex.codes
    out = codes_frame(codes, df.get_column("id") if "id" in df.columns else None)
    write_table(out, output)
    click.echo(f"wrote {out.height} rows to {output}: {int(ex.n_tokens.sum())} tokens, "
               f"{ex.n_truncated} text(s) truncated at {cfg.max_length} tokens, {ex.n_cached} from cache, "
               f"mean {codes.nnz / max(1, codes.shape[0]):.1f} features per text", err=True)


@main.command()
@click.argument("prompts_path", metavar="PROMPTS")
@click.option("-o", "--output", required=True, help="Output table (.jsonl, .parquet or a directory).")
@click.option("--text-column", default="prompt", show_default=True, help="Prompt column of PROMPTS.")
@click.option("--feature", "adds", multiple=True, metavar="F:ALPHA",
              help="Add ALPHA x feature F's unit decoder direction (negative suppresses); repeatable.")
@click.option("--clamp", "clamps", multiple=True, metavar="F:VALUE",
              help="Set feature F's activation to VALUE (0 removes it where it fires, leaves other text alone); repeatable.")
@click.option("-c", "--classifier", default=None, help="Classifier JSON or shipped name whose features --suppress clamps.")
@click.option("--suppress", is_flag=True, help="Clamp every feature of -c to 0.")
@click.option("--positions", type=click.Choice(["all", "generated"]), default="all", show_default=True,
              help="Edit every position, or only those of generated tokens.")
@click.option("--chat/--raw", default=True, show_default=True, help="Apply the chat template, or continue the raw text.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plain", is_flag=True, help="Also write the unsteered completion and its activations.")
@click.option("--backend", type=click.Choice(["transformers", "vllm", "openai"]), default="transformers",
              show_default=True, help="Only transformers can steer (see README).")
@model_options
@user_errors
def steer(prompts_path, output, text_column, adds, clamps, classifier, suppress, positions, chat, max_new_tokens,
          temperature, seed, plain, backend, **kw):
    """Generation with SAE features added, suppressed or clamped in the residual stream (no weight update)."""
    from .data import read_table, text_list, write_table
    from .features import FeatureExtractor
    from .outputs import check_output
    from .steering import SteerSpec, classifier_features, run_steer

    if backend != "transformers":
        raise SafetyScopeError(f"--backend {backend} cannot steer: vLLM and OpenAI-compatible servers do not expose the "
                               "residual stream to edit; use --backend transformers (on a GPU: --device cuda)")
    if suppress != bool(classifier):
        raise SafetyScopeError("-c CLASSIFIER and --suppress go together")
    specs = [SteerSpec.parse(a) for a in adds] + [SteerSpec.parse(c, clamp=True) for c in clamps]
    if max_new_tokens < 1:
        raise SafetyScopeError("--max-new-tokens must be >= 1")
    check_output(output, inputs=[prompts_path], overwrite=True)
    prompts = text_list(read_table(prompts_path, columns=[text_column]), text_column, prompts_path)
    empty = [i for i, p in enumerate(prompts) if not p or not p.strip()]
    if not prompts or empty:
        raise SafetyScopeError(f"{prompts_path}: no prompts" if not prompts else
                               f"{prompts_path}: {len(empty)} empty prompt(s) (rows {empty[:10]}); drop them first")
    batch = kw["batch_size"]
    fx = FeatureExtractor.from_config(feature_config(kw))
    if suppress:
        specs += [SteerSpec(f, clamp=0.0) for f in classifier_features(classifier, fx)]
    rows, st = run_steer(fx, prompts, specs, positions=positions, chat=chat, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, batch_size=batch, plain=plain, progress=True)
    import polars as pl

    write_table(pl.DataFrame(rows), output)
    mean = [sum(r["target_acts"][j] for r in rows) / len(rows) for j in range(len(specs))]
    click.echo(f"wrote {len(rows)} rows to {output}; steering {rows[0]['steering']} edited {st['edited_positions']} "
               f"positions (mean edit norm {st['mean_edit_norm']:.2f}); mean target activation in completions: "
               + ", ".join(f"{s.feature} {m:.2f}" for s, m in zip(specs, mean)), err=True)


def _register_subcommands() -> None:
    """Job subpackages add their commands here; imports stay lazy inside the commands themselves."""
    from .train import sae_group

    from .discovery.cli import register as register_discovery
    from .eval.cli import eval_command, overlap_command

    main.add_command(sae_group)
    register_discovery(main)
    main.add_command(eval_command)
    __import__("safetyscope.synthesis.cli", fromlist=["register"]).register(main)
    main.add_command(overlap_command)


_register_subcommands()
