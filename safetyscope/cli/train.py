"""`safetyscope sae train` and `sae info`."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import get_args

import click
import torch

from ..errors import SafetyScopeError
from ..outputs import check_output, output_errors, remove_temp, replace, temp_path
from ..sae import SAEConfig
from ..training import SaveDtype, TrainConfig, collect_activations, sha256_files, train_topk_sae
from .options import overwrite_option, user_errors


@click.group("sae")
def sae_group():
    """Train and inspect SAEs."""


@sae_group.command("train")
@click.option("--model", default=None, help="Hub id, local HF directory or .gguf [default: embedded SmolLM2-135M-Instruct].")
@click.option("--layer", type=int, required=True, help="Decoder layer whose output the SAE reads.")
@click.option("--corpus", "corpora", multiple=True, required=True, help="Text table(s): parquet, csv, jsonl (repeatable).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the corpus texts.")
@click.option("--width", type=int, default=TrainConfig.d_sae, show_default=True, help="Number of latents (d_sae).")
@click.option("--k", type=int, default=TrainConfig.k, show_default=True, help="Active latents per token.")
@click.option("--max-tokens", type=int, default=None, help="Training tokens to collect [default: the whole corpus].")
@click.option("--epochs", type=float, default=TrainConfig.epochs, show_default=True, help="Passes over the training tokens.")
@click.option("--batch-tokens", type=int, default=TrainConfig.batch_tokens, show_default=True,
              help="Activation vectors (tokens) per SAE training step.")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 2e-4/sqrt(width/2^14)].")
@click.option("--auxk-alpha", type=float, default=TrainConfig.auxk_alpha, show_default=True,
              help="Weight of the auxiliary top-k loss that revives dead latents (0 turns it off).")
@click.option("--dead-tokens", type=int, default=TrainConfig.dead_tokens, show_default=True,
              help="A latent that has not fired in this many tokens is dead (gets the AuxK loss).")
@click.option("--held-out", type=float, default=TrainConfig.held_out, show_default=True, help="Share of texts kept for evaluation.")
@click.option("--max-length", type=int, default=TrainConfig.max_length, show_default=True,
              help="Tokens kept per corpus text.")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True, help="Texts per forward pass.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=TrainConfig.seed, show_default=True,
              help="Random seed of initialisation and shuffling.")
@click.option("--device", default=None, help="cpu, cuda ... [default: cuda if available].")
@click.option("--model-dtype", default=TrainConfig.model_dtype, show_default=True, help="dtype of the model for the activations.")
@click.option("--dtype", type=click.Choice(get_args(SaveDtype)), default=TrainConfig.save_dtype, show_default=True,
              help="dtype of the saved weights.")
@click.option("-o", "--output", required=True, help="Output directory (config.json + sae.safetensors).")
@overwrite_option
@user_errors
def train_cmd(model, layer, corpora, text_column, width, k, max_tokens, epochs, batch_tokens, lr, auxk_alpha,
              dead_tokens, held_out, max_length, batch_size, seed, device, model_dtype, dtype, output, overwrite):
    """Train a TopK SAE on the residual stream after decoder layer LAYER."""
    import json
    import random

    from ..backbone import Backbone
    from ..data import read_table, text_list

    if not 0 <= held_out < 1:
        raise SafetyScopeError("--held-out must be in [0, 1)")
    # before any work: never onto a corpus, a user's directory, or a directory of ours a user added files to
    check_output(output, inputs=corpora, overwrite=overwrite, kind="SAE directory")
    cfg = TrainConfig(model=model, layer=layer, d_sae=width, k=k, lr=lr, batch_tokens=batch_tokens, epochs=epochs,
                      max_tokens=max_tokens, auxk_alpha=auxk_alpha, dead_tokens=dead_tokens, held_out=held_out,
                      seed=seed, max_length=max_length, batch_size=batch_size, model_dtype=model_dtype, save_dtype=dtype)
    texts: list[str] = []
    for c in corpora:
        df = read_table(c, columns=[text_column])
        texts += [t for t in text_list(df, text_column, c) if isinstance(t, str) and t.strip()]
    if len(texts) < 2:
        raise SafetyScopeError("the corpus holds fewer than 2 non-empty texts")
    t_start = time.time()
    backbone = Backbone.from_pretrained(model, device=device, dtype=model_dtype)
    if not 0 <= layer < backbone.n_layers:
        raise SafetyScopeError(f"layer {layer} out of range: {backbone.model_id} has layers 0..{backbone.n_layers - 1}")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_held = int(round(held_out * len(texts)))
    held_texts = [texts[i] for i in order[:n_held]]
    train_idx = order[n_held:]
    if max_tokens:  # cap by token count (position 0 is not used)
        lens = backbone.tokenizer([texts[i] for i in train_idx], add_special_tokens=True)["input_ids"]
        kept, tot = [], 0
        for i, ids in zip(train_idx, lens):
            if tot >= max_tokens:
                break
            kept.append(i)
            tot += max(0, min(len(ids), max_length) - 1)
        train_idx = kept
    train_texts = [texts[i] for i in train_idx]
    click.echo(f"{len(train_texts)} training texts, {len(held_texts)} held-out texts", err=True)
    acts = collect_activations(backbone, layer, train_texts, max_length, batch_size, progress=True)
    held = collect_activations(backbone, layer, held_texts, max_length, batch_size, progress=True) if held_texts else None
    t_collect = time.time() - t_start
    sc = SAEConfig(d_model=backbone.d_model, d_sae=width, activation="topk", k=k, model=backbone.model_id, layer=layer)
    sae, metrics = train_topk_sae(acts, cfg, held_out=held, progress=True, sae_config=sc)
    sae.cfg.extra = {
        "trainer": "safetyscope.train (TopK + AuxK, Gao et al. 2024)",  # the name files record (now safetyscope.training)
        "model": backbone.model_id, "layer": layer, "k": k, "width": width,
        "corpus": [Path(c).name for c in corpora], "corpus_sha256": sha256_files(corpora),
        "corpus_texts": len(texts), "train_texts": len(train_texts), "held_out_texts": len(held_texts),
        "train_tokens": int(len(acts)), "held_out_tokens": int(metrics.get("held_out_tokens", 0)),
        "held_out_fvu": round(metrics["held_out_fvu"], 4) if "held_out_fvu" in metrics else None,
        "held_out_l0": round(metrics["held_out_l0"], 2) if "held_out_l0" in metrics else None,
        "dead_fraction": round(metrics["dead_fraction"], 4) if "dead_fraction" in metrics else None,
        "position_0_excluded": True, "model_dtype": model_dtype,
        "train_config": {k_: v for k_, v in asdict(cfg).items()},
        "steps": metrics["steps"], "lr": metrics["lr"],
        "collect_seconds": round(t_collect, 1), "train_seconds": metrics["train_seconds"],
        "torch": torch.__version__,
        "command": "safetyscope " + " ".join(sys.argv[1:]),
    }
    tmp = temp_path(Path(output))  # built beside OUTPUT, then one rename: a crash leaves no half-written SAE
    remove_temp(tmp)
    try:
        with output_errors(output):
            sae.save_pretrained(tmp, dtype=torch.float16 if dtype == "float16" else torch.float32)
            (tmp / "train_history.json").write_text(json.dumps(metrics["history"], indent=1) + "\n")
            replace(tmp, Path(output))
    except BaseException:
        remove_temp(tmp)
        raise
    e = sae.cfg.extra
    click.echo(f"wrote {output}: {e['train_tokens']} training tokens, held-out FVU {e['held_out_fvu']}, "
               f"L0 {e['held_out_l0']}, dead {e['dead_fraction']}, "
               f"{e['collect_seconds']:.0f} s activations + {e['train_seconds']:.0f} s training", err=True)


@sae_group.command("info")
@click.argument("spec", required=False, default=None, metavar="DIR_OR_SPEC")
@click.option("--layer", type=int, default=None, help="Layer, for a Qwen-Scope or sparsify directory that holds one SAE per layer.")
@click.option("--k", type=int, default=None, help="Top-k of a TopK SAE (Qwen-Scope files do not record it).")
@user_errors
def info_cmd(spec, layer, k):
    """Print the config of an SAE (default: the embedded one)."""
    import json

    from ..sae import load_sae

    sae = load_sae(spec, layer=layer, k=k)
    d = asdict(sae.cfg)
    d["fingerprint"] = sae.fingerprint()
    click.echo(json.dumps(d, indent=2))
