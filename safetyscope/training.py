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
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SafetyScopeError
from .sae import SAE, SAEConfig

SaveDtype = Literal["float32", "float16"]


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
    batch_size: int = 16  # texts per forward pass while collecting activations
    model_dtype: str = "float32"  # dtype of the model that produces the activations
    save_dtype: SaveDtype = "float32"  # dtype of the saved weights

    def __post_init__(self):
        from .errors import check_number

        check_number("--width", self.d_sae, low=1, integer=True)
        check_number("--k", self.k, low=1, high=self.d_sae, integer=True)
        check_number("--lr", self.lr, low=0, low_open=True, none_ok=True)
        check_number("--epochs", self.epochs, low=0, low_open=True)
        check_number("--max-tokens", self.max_tokens, low=1, integer=True, none_ok=True)
        check_number("--batch-tokens", self.batch_tokens, low=1, integer=True)
        check_number("--auxk-alpha", self.auxk_alpha, low=0)
        check_number("--dead-tokens", self.dead_tokens, low=1, integer=True)
        check_number("--held-out", self.held_out, low=0, high=1, high_open=True)
        check_number("--seed", self.seed, low=0, high=2**32 - 1, integer=True)
        check_number("--max-length", self.max_length, low=1, integer=True)
        check_number("--batch-size", self.batch_size, low=1, integer=True)

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
    ids, _ = backbone.tokenize(texts, max_length)
    out: list[torch.Tensor | None] = [None] * len(ids)
    bar = tqdm(total=sum(max(0, len(x) - 1) for x in ids), unit="tok", unit_scale=True, disable=not progress,
               desc=f"activations L{layer}")
    for batch, input_ids, mask in backbone.batches(ids, batch_size=batch_size):  # sorted by length: little padding
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


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        fh = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        h.update(fh.encode())
    return h.hexdigest()
