"""What every command shares: user_errors (one `error:` line, exit 2), the model/extraction options, the
Ray options and the mapping of their values onto the config dataclasses."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys

import click

from ..errors import SafetyScopeError, check_number
from ..features import FeatureConfig
from ..ray_engine import RayConfig

INTERRUPTED = "interrupted: rerun the same command to resume"


def field_default(cls, name: str):
    """The default of dataclass field ``name`` (default_factory included): the one source of an option's default."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _close_progress_bars() -> None:
    """End the progress bars an error left open, so its message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def user_errors(fn):
    """Turn SafetyScopeError (a user mistake) into one line on stderr and exit code 2 (Ctrl-C: ``_Group``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SafetyScopeError as e:
            _close_progress_bars()
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
        bad = [v for v in out if not math.isfinite(v) or (self.low is not None and v <= self.low)
               or (self.high is not None and v > self.high)]
        if bad:
            self.fail(f"{bad} outside ({self.low}, {self.high}]", param, ctx)
        return out


def finite(low: float | None = None, high: float | None = None, *, low_open: bool = False, integer: bool = False):
    """A click callback: the value must be a finite number in range (click's FloatRange lets NaN through)."""
    def check(ctx, param, value):
        try:
            return check_number("value", value, low=low, high=high, low_open=low_open, integer=integer, none_ok=True)
        except SafetyScopeError as e:  # click names the option: "Invalid value for '--x': must be >= 0; got nan"
            raise click.BadParameter(str(e).removeprefix("value "), ctx, param) from None
    return check


def report_overwrite_option(fn):
    """``--overwrite`` of a report directory (eval, overlap, synth compare): write into a directory this tool did
    not make; only the report's own files are replaced there, nothing is deleted."""
    return click.option("--overwrite", is_flag=True,
                        help="Write into an existing OUTPUT directory safetyscope did not make (only files of the "
                             "report's names are replaced; nothing is deleted).")(fn)


def overwrite_option(fn):
    """``--overwrite``: the one way to replace an existing output the user did not ask this tool to rewrite."""
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing OUTPUT: a file, or a directory safetyscope wrote that holds nothing "
                             "else (files added to it later are never deleted).")(fn)


def model_options(fn):
    """--model/--sae/--layer/--k and the extraction knobs shared by every command that reads texts."""
    opts = [
        click.option("--model", default=None, help="Hub id, local HF directory or .gguf file [default: embedded SmolLM2-135M-Instruct]."),
        click.option("--sae", default=None, help="SAE directory, Qwen-Scope .pt file/dir or hub repo [default: embedded]."),
        click.option("--layer", type=int, default=None, help="Decoder layer whose output the SAE reads [default: the SAE's]."),
        click.option("--k", type=int, default=None, help="Override k of a TopK SAE (Qwen-Scope files do not store it)."),
        click.option("--batch-size", type=int, default=FeatureConfig.batch_size, show_default=True, help="Most texts per model batch."),
        click.option("--batch-tokens", type=int, default=FeatureConfig.batch_tokens, show_default=True,
                     help="About this many padded tokens per model batch at most (texts sorted by length)."),
        click.option("--max-length", type=int, default=FeatureConfig.max_length, show_default=True, help="Tokens kept per text."),
        click.option("--skip-first-token/--keep-first-token", default=None,
                     help="Leave out position 0 (attention sink) when pooling [default: as the SAE was trained]."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available]."),
        click.option("--dtype", default=FeatureConfig.dtype, show_default=True,
                     help="auto (bf16 on GPUs; on CPUs bf16 with native bf16 for features, float32 for generation), "
                          "float32, bfloat16, float16."),
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
            click.option("--batch-size", type=int, default=FeatureConfig.batch_size, show_default=True, help="Most texts per model batch."),
            click.option("--batch-tokens", type=int, default=FeatureConfig.batch_tokens, show_default=True,
                         help="About this many padded tokens per model batch at most."),
            click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available]."),
            click.option("--dtype", default=FeatureConfig.dtype, show_default=True,
                         help="auto (bf16 on GPUs; on CPUs bf16 with native bf16 for features, float32 for generation), "
                              "float32, bfloat16, float16."),
            click.option("--no-cache", is_flag=True, help="Do not reuse or store per-text features."),
        ]):
            fn = opt(fn)
        return fn
    return deco


def recorded_kwargs(kw: dict) -> dict:
    """The values of ``recorded_model_options`` as keyword arguments of ``extractor_from_record``/``Detector.load``."""
    return {"model": kw["model"], "sae": kw["sae"], "device": kw["device"], "dtype": kw["dtype"],
            "batch_size": kw["batch_size"], "batch_tokens": kw["batch_tokens"], "cache": not kw["no_cache"]}


def feature_config(kw: dict):
    return FeatureConfig(model=kw.pop("model"), sae=kw.pop("sae"), layer=kw.pop("layer"), k=kw.pop("k"),
                         batch_size=kw.pop("batch_size"), batch_tokens=kw.pop("batch_tokens"), max_length=kw.pop("max_length"),
                         skip_first_token=kw.pop("skip_first_token"), device=kw.pop("device"),
                         dtype=kw.pop("dtype"), cache=not kw.pop("no_cache"))


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def ray_options(fn):
    """--engine and the Ray knobs, shared by `features` and `classify`."""
    for opt in reversed([
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="ray: Ray Data actor pool on a Ray cluster (pip install 'safetyscope[ray]')."),
        click.option("--address", default=None, help="Ray address: ray://host:10001, auto, ... [default: start or join a local Ray]."),
        click.option("--workers", type=int, default=RayConfig.workers, show_default=True, help="Ray actors, each holding one model copy."),
        click.option("--cpus-per-worker", type=float, default=RayConfig.cpus_per_worker, show_default=True,
                     help="CPUs Ray reserves per actor; also its torch threads (OMP_NUM_THREADS)."),
        click.option("--gpus-per-worker", type=float, default=RayConfig.gpus_per_worker, show_default=True,
                     help="GPUs per actor (e.g. 1, or 0.5 to pack two actors on a GPU)."),
        click.option("--ray-batch-size", type=int, default=None,
                     help="Rows per Ray batch, rounded up to whole --chunk-rows chunks [default: --chunk-rows]."),
    ]):
        fn = opt(fn)
    return fn
