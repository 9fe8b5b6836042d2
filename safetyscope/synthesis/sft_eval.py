"""`synth sft-eval`: does an arm of `synth compare` make a model safer once it is fine-tuned on it?

Every arm gets the same base rows (benign instructions of the ``seed`` split, answered by the untouched model itself,
so they teach the format and keep helpfulness without new knowledge) plus its own rows, capped at the size of the
smallest arm (the equal budget); the base-only control gets that many extra base rows instead. Same seed, LoRA
hyper-parameters and number of optimizer steps for every arm, so each sees the same number of examples.

Held-out prompts come from the half of ``pool`` that `synth compare` did not search for T (half 1 of its id hash),
minus the rows the natural arm drew and any prompt of any training set: harmful prompts (HarmBench, StrongREJECT,
AdvBench), XSTest ``safe`` prompts (benign) and benign instructions (alpaca). Greedy answers through the tokenizer's
chat template; the judgement is `refused(prompt, response)` below, the same for every arm.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ..data import id_half, read_table
from ..errors import SafetyScopeError
from ..generators import GeneratorConfig, TransformersGenerator
from ..reports import pyplot, save_figure, write_json, write_text
from .synthesize import TEMPLATE_REFUSAL
from .textrules import is_refusal

ARM_FILES = {"targeted": "targeted.jsonl", "random": "random.jsonl", "natural": "natural.jsonl"}
HARMFUL_SOURCES = ("harmbench", "strongreject", "advbench")


@dataclass
class SFTEvalConfig:
    arms_dir: str  # a `synth compare` output directory
    data: str  # the safety prompts table compare ran on
    output_dir: str
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    arms: list[str] = field(default_factory=lambda: ["targeted", "random", "natural"])
    base_rows: int = 32
    max_arm_rows: int | None = None  # cap every arm at min(smallest arm, this) rows (CPU time)
    lora_r: int = 8
    lora_alpha: int = 16
    max_steps: int = 24
    batch_size: int = 4
    lr: float = 2e-4
    max_seq_len: int = 256
    seed: int = 0
    n_harmful: int = 40
    n_xstest: int = 40
    n_benign: int = 30
    max_new_tokens: int = 32  # the judgement reads the opening sentence only
    answer_tokens: int = 64  # the untouched model's answers that become base-row completions
    gen_batch_size: int = 16
    bootstrap: int = 1000
    save_adapters: bool = False
    overwrite: bool = False  # write into an existing directory safetyscope did not make (outputs.check_report_dir)


def refused(prompt: str, response: str, harmful_detector=None) -> bool:
    """The refusal judgement, the same for every arm: a decline in the opening sentence (`is_refusal`).

    ``harmful_detector`` (optional, ``callable(list[str]) -> list[bool]``) is applied to the *prompt*: it does not
    change this judgement but decides, in `held_out_sets`, which harmful prompts count (only those it flags)."""
    return is_refusal(response)


def _sha(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def read_arm(path: Path) -> list[dict]:
    """Rows of one arm as (prompt, completion, label); natural rows have no completion: a harmful one gets the fixed
    refusal of synthesis, a benign one is answered later by the untouched model (completion None)."""
    if not path.exists():
        raise SafetyScopeError(f"arm file {path} not found (run `synth compare` first)")
    df = pl.read_ndjson(path)
    out = []
    for r in df.iter_rows(named=True):
        msgs = r.get("messages")
        if msgs:
            user = next(m["content"] for m in msgs if m["role"] == "user")
            comp = next((m["content"] for m in msgs if m["role"] == "assistant"), None)
        else:
            user, comp = r["prompt"], r.get("completion")
        if comp is None and r.get("label") == "harmful":
            comp = TEMPLATE_REFUSAL
        out.append({"prompt": user, "completion": comp, "label": r.get("label"), "id": r.get("id")})
    return out


def held_out_sets(df: pl.DataFrame, exclude_ids: set, exclude_prompts: set, cfg: SFTEvalConfig,
                  harmful_detector=None) -> dict[str, list[str]]:
    pool = df.filter((pl.col("split") == "pool") & (pl.col("lang") == "en"))
    pool = pool.filter(pl.col("id").map_elements(id_half, return_dtype=pl.Int64) == 1)
    pool = pool.filter(~pl.col("id").is_in(list(exclude_ids)) & ~pl.col("prompt").is_in(list(exclude_prompts)))

    def take(sub: pl.DataFrame, n: int) -> list[str]:
        return sub.sort("id").sample(min(n, sub.height), seed=cfg.seed, shuffle=True)["prompt"].to_list()

    harmful = pool.filter((pl.col("label") == "harmful") & pl.col("source").is_in(list(HARMFUL_SOURCES)))
    if harmful_detector is not None:
        flags = harmful_detector(harmful["prompt"].to_list())
        harmful = harmful.filter(pl.Series(flags, dtype=pl.Boolean))
    sets = {"harmful": take(harmful, cfg.n_harmful),
            "xstest_safe": take(pool.filter((pl.col("source") == "xstest") & (pl.col("label") == "benign")), cfg.n_xstest),
            "benign": take(pool.filter(pl.col("source") == "alpaca_refusal_dir"), cfg.n_benign)}
    for k, v in sets.items():
        if not v:
            raise SafetyScopeError(f"held-out set {k!r} is empty")
    return sets


def bootstrap_ci(flags: list[bool], reps: int, seed: int) -> tuple[float, float, float]:
    """Share and its 95 % percentile bootstrap interval."""
    a = np.asarray(flags, dtype=float)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(reps, len(a)))].mean(axis=1)
    return float(a.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _need_sft():
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise SafetyScopeError(f"sft-eval needs trl and peft: pip install -e '.[sft]' ({e})") from None


def _generate_with(gen: TransformersGenerator, model, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy, batched answers of ``model`` through the generator's batching and chat template."""
    old = gen.model
    gen.model = model.eval()
    try:
        outs = gen.generate([[{"role": "user", "content": p}] for p in prompts], n=1, temperature=0,
                            max_new_tokens=max_new_tokens)
    finally:
        gen.model = old
    return [o[0] for o in outs]


def train_arm(name: str, rows: list[dict], gen: TransformersGenerator, model_path: str, cfg: SFTEvalConfig, out: Path):
    """LoRA fine-tune a fresh copy of the model on rows; returns (peft model, the dataset the trainer received)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    # prompt = the exact rendered chat prefix used at generation time, so training and evaluation see one format
    # (and tokenizers without a chat template work); loss on the completion only
    ds = Dataset.from_list([{"prompt": gen._render([{"role": "user", "content": r["prompt"]}]),
                             "completion": r["completion"]} for r in rows])
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out / "trainer" / name), max_steps=cfg.max_steps,
                     per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, max_length=cfg.max_seq_len,
                     seed=cfg.seed, data_seed=cfg.seed, report_to=[], save_strategy="no", logging_steps=max(1, cfg.max_steps // 4),
                     # float32 like the untouched model it is compared with (TRL defaults to bf16)
                     use_cpu=True, bf16=False, fp16=False, completion_only_loss=True, dataloader_num_workers=0, disable_tqdm=True,
                     # a tokenizer without an eos token (tiny test models) ends completions with its bos token
                     eos_token=gen.tok.eos_token or gen.tok.bos_token)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=gen.tok, peft_config=lora)
    hist = trainer.train()
    if cfg.save_adapters:
        trainer.model.save_pretrained(out / "adapters" / name)
    return trainer.model, trainer.train_dataset, float(hist.training_loss)


def run_sft_eval(cfg: SFTEvalConfig, harmful_detector=None, progress=print) -> dict:
    from ..outputs import check_report_dir

    out = check_report_dir(cfg.output_dir, inputs=[cfg.data, cfg.arms_dir], overwrite=cfg.overwrite)
    _need_sft()
    from ..backbone import resolve_model

    timing: dict[str, float] = {}
    t0 = t_start = time.perf_counter()

    def stage(name: str):
        nonlocal t0
        timing[name] = round(time.perf_counter() - t0, 1)
        progress(f"[sft-eval] {name}: {timing[name]:.1f}s")
        t0 = time.perf_counter()

    arms = {a: read_arm(Path(cfg.arms_dir) / ARM_FILES.get(a, f"{a}.jsonl")) for a in cfg.arms}
    n_arm = min([len(r) for r in arms.values()] + ([cfg.max_arm_rows] if cfg.max_arm_rows else []))
    if n_arm == 0:
        raise SafetyScopeError("an arm has no rows")
    # equal budget: every arm capped at the smallest arm's size (seeded draw, file order otherwise kept)
    rng = np.random.default_rng(cfg.seed)
    arms = {a: [r[i] for i in sorted(rng.choice(len(r), n_arm, replace=False))] for a, r in arms.items()}

    df = read_table(cfg.data, columns=["id", "prompt", "label", "lang", "source", "split"])
    arm_prompts = {r["prompt"] for rs in arms.values() for r in rs}
    base_pool = df.filter((pl.col("split") == "seed") & (pl.col("label") == "benign") & (pl.col("lang") == "en")
                          & (pl.col("source") == "alpaca_refusal_dir") & ~pl.col("prompt").is_in(list(arm_prompts)))
    need = cfg.base_rows + n_arm  # the control's extra base rows come from the same draw
    if base_pool.height < need:
        raise SafetyScopeError(f"only {base_pool.height} benign seed rows, need {need}")
    base_prompts = base_pool.sort("id").sample(need, seed=cfg.seed, shuffle=True)["prompt"].to_list()

    name, model_path = resolve_model(cfg.model)
    gen = TransformersGenerator(GeneratorConfig(model=cfg.model, batch_size=cfg.gen_batch_size, device="cpu", dtype="float32"))
    stage("load")
    # answers of the untouched model: the base rows, and the benign natural rows (which have no completion)
    todo = base_prompts + [r["prompt"] for rs in arms.values() for r in rs if r["completion"] is None]
    answers = dict(zip(todo, _generate_with(gen, gen.model, todo, cfg.answer_tokens)))
    base = [{"prompt": p, "completion": answers[p], "label": "benign"} for p in base_prompts]
    for rs in arms.values():
        for r in rs:
            if r["completion"] is None:
                r["completion"] = answers[r["prompt"]]
    stage("base answers")

    train_sets = {"base only": base}
    train_sets.update({a: base[: cfg.base_rows] + rs for a, rs in arms.items()})
    exclude_ids = {r["id"] for rs in arms.values() for r in rs if r.get("id")}
    natural_file = Path(cfg.arms_dir) / ARM_FILES["natural"]
    if natural_file.exists():  # every row natural sampling drew, also those the cap left out
        exclude_ids |= set(pl.read_ndjson(natural_file)["id"].to_list())
    all_train = {r["prompt"] for rs in train_sets.values() for r in rs}
    sets = held_out_sets(df, exclude_ids, all_train, cfg, harmful_detector)
    stage("held-out sets")

    def evaluate(model) -> dict:
        res = {}
        for k, prompts in sets.items():
            resp = _generate_with(gen, model, prompts, cfg.max_new_tokens)
            flags = [refused(p, r) for p, r in zip(prompts, resp)]
            if k == "benign":
                flags = [not f for f in flags]  # share answered
            share, lo, hi = bootstrap_ci(flags, cfg.bootstrap, cfg.seed)
            res[k] = {"share": share, "ci95": [lo, hi], "n": len(flags), "examples": [
                {"prompt": p, "response": r} for p, r in list(zip(prompts, resp))[:3]]}
        return res

    results = {"untouched": {"eval": evaluate(gen.model), "rows": 0}}
    stage("eval untouched")
    for arm, rows in train_sets.items():
        model, ds, loss = train_arm(arm.replace(" ", "_"), rows, gen, model_path, cfg, out)
        stage(f"train {arm}")
        results[arm] = {"eval": evaluate(model), "rows": len(ds), "train_loss": loss,
                        "rows_sha256": _sha([r["prompt"] for r in rows]),
                        "arm_rows": len(rows) - cfg.base_rows if arm != "base only" else 0}
        results[arm]["_dataset"] = ds  # in memory only (tests assert on what the trainer received)
        results[arm]["_model"] = model
        stage(f"eval {arm}")
    timing["total"] = round(time.perf_counter() - t_start, 1)
    doc = {"config": asdict(cfg), "model": name, "rows_per_arm": n_arm, "base_rows": cfg.base_rows,
           "held_out": {k: len(v) for k, v in sets.items()},
           "judgement": ("refused = is_refusal(response): a decline marker in the opening sentence; "
                         "benign = share answered (not refused)"),
           "harmful_detector": harmful_detector is not None,
           "arms": {a: {k: v for k, v in r.items() if not k.startswith("_")} for a, r in results.items()},
           "timing_seconds": timing}
    write_json(out / "results.json", doc)
    md = markdown(doc)
    write_text(out / "report.md", md)
    plot(doc, out / "sft_eval.png")
    doc["markdown"] = md
    doc["_results"], doc["_sets"] = results, sets  # in memory only
    return doc


def markdown(doc: dict) -> str:
    h = doc["held_out"]
    c = doc["config"]
    lines = [(f"Model {doc['model']}; {doc['base_rows']} base rows + {doc['rows_per_arm']} rows per arm; "
              f"{c['max_steps']} steps x {c['batch_size']} rows, LoRA r={c['lora_r']}, lr {c['lr']}; "
              f"run time {doc['timing_seconds']['total']:.0f} s."), "",
             (f"| model | harmful refused (n={h['harmful']}) | XSTest safe refused (n={h['xstest_safe']}) | "
              f"benign answered (n={h['benign']}) |"), "|---|---|---|---|"]
    for a, r in doc["arms"].items():
        cells = [f"{r['eval'][k]['share']:.1%} [{r['eval'][k]['ci95'][0]:.1%}, {r['eval'][k]['ci95'][1]:.1%}]"
                 for k in ("harmful", "xstest_safe", "benign")]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    names = list(doc["arms"])
    keys = [("harmful", "harmful refused"), ("xstest_safe", "XSTest safe refused"), ("benign", "benign answered")]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        s = [doc["arms"][a]["eval"][k]["share"] for a in names]
        lo = [s[i] - doc["arms"][a]["eval"][k]["ci95"][0] for i, a in enumerate(names)]
        hi = [doc["arms"][a]["eval"][k]["ci95"][1] - s[i] for i, a in enumerate(names)]
        ax.bar([i + (j - 1) * w for i in range(len(names))], s, w, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share (95% bootstrap CI)")
    ax.legend(fontsize=8)
    ax.set_title("Effect of SFT data (LoRA)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
