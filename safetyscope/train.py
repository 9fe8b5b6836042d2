"""Training TopK sparse autoencoders on one decoder layer of a model (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders").

The recipe: TopK activation (the code is ``SAE.encode_sparse``, the one encode formula in sae.py), Adam,
b_dec initialised at the geometric median of the data, W_enc initialised as W_dec.T, unit-norm decoder
columns (the gradient component parallel to each column is removed before every step and the columns are
renormalised after it), and an AuxK loss (weight 1/32) that gives dead latents (no firing in the last
``dead_tokens`` tokens) a gradient by reconstructing the residual error with the top ``k_aux = d_model/2``
of them. Inputs are scaled to mean squared norm ``d_model`` during training and the scale is folded back
into the saved weights, so the saved SAE reads raw activations.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SafetyScopeError
from .sae import SAE, SAEConfig


@dataclass
class TrainConfig:
    model: str | None = None  # hub id, local dir, .gguf; None = embedded default
    layer: int = 6
    d_sae: int = 4608  # width (number of latents)
    k: int = 32
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 2**14) (Gao et al.)
    batch_tokens: int = 4096
    epochs: float = 8.0  # passes over the training tokens
    max_tokens: int | None = None  # cap on training tokens collected (None = the whole corpus)
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # None: d_model // 2
    dead_tokens: int = 200_000  # a latent is dead once it has not fired in this many training tokens
    held_out: float = 0.05  # share of texts (CLI) or tokens (train_topk_sae) kept for evaluation
    seed: int = 0
    max_length: int = 256
    normalize: bool = True  # scale inputs to mean squared norm d_model (folded back when saving)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2**14)


# -- activations ----------------------------------------------------------------------------------

def collect_activations(backbone, layer: int, texts: list[str], max_length: int = 256, batch_size: int = 16,
                        *, progress: bool = False) -> torch.Tensor:
    """Residual activations after decoder layer ``layer`` of every real token of ``texts``
    (padding masked out, position 0 left out: attention-sink tokens have outlier norms).
    Returns float32 (n_tokens, d_model), texts in input order."""
    if max_length < 2:
        raise SafetyScopeError("max_length must be >= 2 (position 0 is left out)")
    ids = backbone.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    ids = [x[:max_length] for x in ids]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # little padding per batch
    out: list[torch.Tensor | None] = [None] * len(ids)
    bar = tqdm(total=sum(max(0, len(x) - 1) for x in ids), unit="tok", unit_scale=True, disable=not progress,
               desc=f"activations L{layer}")
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        input_ids, mask = backbone.pad([ids[i] for i in batch])
        hidden = backbone.capture(input_ids, mask, [layer])[layer].float().cpu()
        for b, i in enumerate(batch):
            out[i] = hidden[b, 1 : len(ids[i])].clone()
        bar.update(sum(max(0, len(ids[i]) - 1) for i in batch))
    bar.close()
    d_model = backbone.d_model
    parts = [t for t in out if t is not None and len(t)]
    return torch.cat(parts) if parts else torch.zeros(0, d_model)


# -- training -------------------------------------------------------------------------------------

def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations, started at the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp(min=eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < 1e-6 * y.norm().clamp(min=1e-12):
            return y_new
        y = y_new
    return y


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum((x - x_hat)^2) / sum((x - mean(x))^2)."""
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp(min=1e-12))


def _decode_sparse(sae: SAE, vals: torch.Tensor, idx: torch.Tensor, W_dec_rows: torch.Tensor | None = None,
                   bias: bool = True) -> torch.Tensor:
    """sum_j vals_j * W_dec[:, idx_j] (+ b_dec) without a dense (n, d_sae) code."""
    # a contiguous (d_sae, d_model) table: embedding_bag on a transposed view is ~10x slower
    rows = sae.W_dec.T.contiguous() if W_dec_rows is None else W_dec_rows
    out = F.embedding_bag(idx, rows, per_sample_weights=vals, mode="sum")
    return out + sae.b_dec if bias else out


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch: int = 8192) -> dict:
    """Held-out FVU, L0, dead fraction (never fires on x) of an SAE on raw activations x."""
    sq_err, fired, l0 = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool), 0.0
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        vals, idx = sae.encode_sparse(xb)
        sq_err += float(((xb - _decode_sparse(sae, vals, idx)) ** 2).sum())
        on = vals > 0
        fired[idx[on]] = True
        l0 += float(on.sum())
    total = float(((x - x.mean(0)) ** 2).sum())
    return {"fvu": sq_err / max(total, 1e-12), "l0": l0 / max(len(x), 1),
            "dead_fraction": float((~fired).float().mean()), "n_tokens": len(x)}


def train_topk_sae(acts: torch.Tensor, cfg: TrainConfig, *, held_out: torch.Tensor | None = None,
                   progress: bool = False, sae_config: SAEConfig | None = None) -> tuple[SAE, dict]:
    """Train a TopK SAE on ``acts`` (n_tokens, d_model). Held-out tokens are ``held_out`` if given, else a
    random ``cfg.held_out`` share of ``acts``. Returns the SAE (on raw activations) and its metrics."""
    if acts.ndim != 2 or len(acts) < 2:
        raise SafetyScopeError(f"need a (n_tokens, d_model) activation matrix with >= 2 rows; got {tuple(acts.shape)}")
    if not 0 < cfg.k <= cfg.d_sae:
        raise SafetyScopeError(f"need 0 < k <= width; got k={cfg.k}, width={cfg.d_sae}")
    if cfg.epochs <= 0 or cfg.batch_tokens < 1:
        raise SafetyScopeError("epochs must be > 0 and batch_tokens >= 1")
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    acts = acts.float()
    if held_out is None:
        perm = torch.randperm(len(acts), generator=gen)
        n_held = max(1, int(round(cfg.held_out * len(acts)))) if cfg.held_out > 0 else 0
        held_out, train = acts[perm[:n_held]], acts[perm[n_held:]]
    else:
        train = acts
    n, d = train.shape
    # input scale: mean squared norm of the (centred) data -> d_model; folded back at the end
    sample = train[torch.randperm(n, generator=gen)[: min(n, 50_000)]]
    scale = math.sqrt(d / float(((sample - sample.mean(0)) ** 2).sum(1).mean())) if cfg.normalize else 1.0

    sc = sae_config or SAEConfig(d_model=d, d_sae=cfg.d_sae, activation="topk", k=cfg.k, layer=cfg.layer)
    sae = SAE(sc)
    with torch.no_grad():
        W = torch.randn(d, cfg.d_sae, generator=gen)
        W /= W.norm(dim=0, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        b_dec = geometric_median(sample[:20_000] * scale)
        sae.b_dec.copy_(b_dec)
        sae.b_enc.copy_(-(sae.W_enc @ b_dec))  # encode x - b_dec at init
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for p in params:
        p.requires_grad_(True)
    lr = cfg.learning_rate()
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    bt = min(cfg.batch_tokens, n)
    steps_per_epoch = max(1, n // bt)
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    decay_from = int(0.8 * total_steps)  # linear decay to 0 over the last 20 %
    k_aux = cfg.k_aux or d // 2
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    log_every = max(1, total_steps // 20)
    history = []
    bar = tqdm(total=total_steps, disable=not progress, desc="train SAE", unit="step")
    step, perm = 0, torch.randperm(n, generator=gen)
    pos = 0
    while step < total_steps:
        if pos + bt > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        x = train[perm[pos : pos + bt]] * scale
        pos += bt
        vals, idx = sae.encode_sparse(x)
        x_hat = _decode_sparse(sae, vals, idx)
        err = x - x_hat
        denom = ((x - x.mean(0)) ** 2).sum()
        loss = (err**2).sum() / denom
        # dead-latent bookkeeping and AuxK
        with torch.no_grad():
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
            fired[idx[vals > 0]] = True
            since_fired += bt
            since_fired[fired] = 0
            dead = (since_fired > cfg.dead_tokens).nonzero().flatten()
        aux = torch.zeros(())
        if len(dead) and cfg.auxk_alpha > 0:
            # pre-activations of the dead latents through the one formula (SAE.pre_acts) on their rows
            sub = types.SimpleNamespace(W_enc=sae.W_enc[dead], b_enc=sae.b_enc[dead])
            pre_dead = SAE.pre_acts(sub, x)
            a_vals, a_idx = pre_dead.topk(min(k_aux, len(dead)), dim=-1, sorted=False)
            e_hat = _decode_sparse(sae, a_vals.relu(), a_idx, W_dec_rows=sae.W_dec.T[dead].contiguous(), bias=False)
            e = err.detach()
            aux = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum().clamp(min=1e-12)
            aux = torch.nan_to_num(aux, nan=0.0)
        total = loss + cfg.auxk_alpha * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        with torch.no_grad():
            g, Wd = sae.W_dec.grad, sae.W_dec
            g -= (g * Wd).sum(0, keepdim=True) * Wd  # no gradient along the (unit) columns
        if step >= decay_from:
            for group in opt.param_groups:
                group["lr"] = lr * (total_steps - step) / max(1, total_steps - decay_from)
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=0, keepdim=True).clamp(min=1e-12)
        step += 1
        if step % log_every == 0 or step == total_steps:
            rec = {"step": step, "fvu": loss.item(), "aux": aux.item(), "dead": int(len(dead))}
            history.append(rec)
            bar.set_postfix(fvu=f"{rec['fvu']:.3f}", dead=rec["dead"])
        bar.update(1)
    bar.close()

    # fold the input scale back: the saved SAE reads raw activations (TopK and ReLU commute with scaling)
    with torch.no_grad():
        sae.b_enc /= scale
        sae.b_dec /= scale
    sae.requires_grad_(False).eval()
    metrics = {"train_seconds": round(time.time() - t0, 1), "train_tokens": n, "steps": total_steps,
               "lr": lr, "input_scale": scale, "history": history}
    if held_out is not None and len(held_out):
        ev = evaluate(sae, held_out.float())
        metrics.update({"held_out_fvu": ev["fvu"], "held_out_l0": ev["l0"], "dead_fraction": ev["dead_fraction"],
                        "held_out_tokens": ev["n_tokens"]})
    return sae, metrics


# -- CLI ------------------------------------------------------------------------------------------

def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        fh = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        h.update(fh.encode())
    return h.hexdigest()


def _user_errors(fn):
    from .cli import user_errors  # cli imports this module at import time: import lazily

    return user_errors(fn)


def _lazy_user_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        return _user_errors(fn)(*a, **kw)

    return wrapper


@click.group("sae")
def sae_group():
    """Train and inspect SAEs."""


@sae_group.command("train")
@click.option("--model", default=None, help="Hub id, local HF directory or .gguf [default: embedded SmolLM2-135M-Instruct].")
@click.option("--layer", type=int, required=True, help="Decoder layer whose output the SAE reads.")
@click.option("--corpus", "corpora", multiple=True, required=True, help="Text table(s): parquet, csv, jsonl (repeatable).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--width", type=int, default=4608, show_default=True, help="Number of latents (d_sae).")
@click.option("--k", type=int, default=32, show_default=True, help="Active latents per token.")
@click.option("--max-tokens", type=int, default=None, help="Training tokens to collect [default: the whole corpus].")
@click.option("--epochs", type=float, default=8.0, show_default=True, help="Passes over the training tokens.")
@click.option("--batch-tokens", type=int, default=4096, show_default=True)
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 2e-4/sqrt(width/2^14)].")
@click.option("--auxk-alpha", type=float, default=1 / 32, show_default=True)
@click.option("--dead-tokens", type=int, default=200_000, show_default=True,
              help="A latent that has not fired in this many tokens is dead (gets the AuxK loss).")
@click.option("--held-out", type=float, default=0.05, show_default=True, help="Share of texts kept for evaluation.")
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Texts per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda ... [default: cuda if available].")
@click.option("--model-dtype", default="float32", show_default=True, help="dtype of the model for the activations.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="dtype of the saved weights.")
@click.option("-o", "--output", required=True, help="Output directory (config.json + sae.safetensors).")
@_lazy_user_errors
def train_cmd(model, layer, corpora, text_column, width, k, max_tokens, epochs, batch_tokens, lr, auxk_alpha,
              dead_tokens, held_out, max_length, batch_size, seed, device, model_dtype, dtype, output):
    """Train a TopK SAE on the residual stream after decoder layer LAYER."""
    import json
    import random

    from .backbone import Backbone
    from .data import read_table, text_list

    if not 0 <= held_out < 1:
        raise SafetyScopeError("--held-out must be in [0, 1)")
    cfg = TrainConfig(model=model, layer=layer, d_sae=width, k=k, lr=lr, batch_tokens=batch_tokens, epochs=epochs,
                      max_tokens=max_tokens, auxk_alpha=auxk_alpha, dead_tokens=dead_tokens, held_out=held_out,
                      seed=seed, max_length=max_length)
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
        "trainer": "safetyscope.train (TopK + AuxK, Gao et al. 2024)",
        "model": backbone.model_id, "layer": layer, "k": k, "width": width,
        "corpus": [Path(c).name for c in corpora], "corpus_sha256": _sha256_files(corpora),
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
    sae.save_pretrained(output, dtype=torch.float16 if dtype == "float16" else torch.float32)
    (Path(output) / "train_history.json").write_text(json.dumps(metrics["history"], indent=1) + "\n")
    e = sae.cfg.extra
    click.echo(f"wrote {output}: {e['train_tokens']} training tokens, held-out FVU {e['held_out_fvu']}, "
               f"L0 {e['held_out_l0']}, dead {e['dead_fraction']}, "
               f"{e['collect_seconds']:.0f} s activations + {e['train_seconds']:.0f} s training", err=True)


@sae_group.command("info")
@click.argument("spec", required=False, default=None, metavar="DIR_OR_SPEC")
@click.option("--layer", type=int, default=None)
@click.option("--k", type=int, default=None)
@_lazy_user_errors
def info_cmd(spec, layer, k):
    """Print the config of an SAE (default: the embedded one)."""
    import json

    from .sae import load_sae

    sae = load_sae(spec, layer=layer, k=k)
    d = asdict(sae.cfg)
    d["fingerprint"] = sae.fingerprint()
    click.echo(json.dumps(d, indent=2))
