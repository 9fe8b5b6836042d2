"""Per-text sparse SAE features: texts -> residual activations -> max-pooled SAE codes (CSR).

A feature *fires* on a text when its activation is > 0 at any token; the pooled value is its max
over tokens. Texts are tokenised once, sorted by length so batches carry little padding, and only
real tokens are encoded. Results are cached per text in SQLite, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .backbone import Backbone, cache_dir, length_batches
from .errors import SafetyScopeError
from .sae import SAE, load_sae


def _warn(msg: str) -> None:
    """One line on stderr (not a logging record or a warnings.warn, which print source lines or nothing)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


Pool = Literal["max", "last"]


@dataclass
class FeatureConfig:
    """Everything that decides the codes (and so keys the cache)."""

    model: str | None = None  # hub id, local dir, .gguf; None = embedded default
    sae: str | None = None  # see sae.load_sae; None = embedded default
    layer: int | None = None  # None = the SAE's own layer
    k: int | None = None  # override a TopK SAE's k
    batch_size: int = 32  # at most this many texts per model batch
    # ... and at most about this many padded tokens (longest text x texts): long texts go in small batches,
    # short ones in full groups of batch_size (backbone.length_batches)
    # 4096, not less: on short texts a smaller budget only multiplies batches, and each batch has a fixed cost of
    # hundreds of small ops (bf16, 400 English texts: 512 took 1.7x as long as no budget; benchmarks/README.md)
    batch_tokens: int | None = 4096  # None: batch_size texts per batch whatever their length
    max_length: int = 256
    # the first position is an attention sink with outlier norms; None = as the SAE was trained
    # (left out when its training record says position 0 was excluded, as for the embedded SAEs)
    skip_first_token: bool | None = None
    pool: Pool = "max"  # "max": max over tokens (fires anywhere); "last": the last token's code only
    device: str | None = None
    dtype: str | None = "auto"
    cache: bool = True

    def __post_init__(self):
        from .errors import check_number

        check_number("--batch-size", self.batch_size, low=1, integer=True)
        check_number("--batch-tokens", self.batch_tokens, low=1, integer=True, none_ok=True)
        check_number("--max-length", self.max_length, low=1, integer=True)
        check_number("--k", self.k, low=1, integer=True, none_ok=True)
        check_number("--layer", self.layer, low=0, integer=True, none_ok=True)


@dataclass
class Extraction:
    codes: sp.csr_matrix  # (n_texts, d_sae) max over tokens of the SAE code
    mean_acts: np.ndarray  # (n_texts, d_model) mean residual activation over tokens (for probes)
    n_tokens: np.ndarray  # tokens used per text
    n_truncated: int  # texts cut at max_length
    n_cached: int  # texts served from the cache


class FeatureExtractor:
    def __init__(self, backbone: Backbone, sae: SAE, layer: int, *, batch_size: int = 32, max_length: int = 256,
                 skip_first_token: bool | None = None, pool: str = "max", cache: bool = True,
                 batch_tokens: int | None = FeatureConfig.batch_tokens):
        if sae.cfg.d_model != backbone.d_model:
            raise SafetyScopeError(f"SAE width mismatch: the SAE reads d_model={sae.cfg.d_model} but "
                                   f"{backbone.model_id} has hidden size {backbone.d_model}")
        if not 0 <= layer < backbone.n_layers:
            raise SafetyScopeError(f"layer {layer} out of range: {backbone.model_id} has layers 0..{backbone.n_layers - 1}")
        if pool not in get_args(Pool):
            raise SafetyScopeError(f"pool must be 'max' or 'last', not {pool!r}")
        if batch_size < 1 or max_length < 2 or (batch_tokens is not None and batch_tokens < 1):
            raise SafetyScopeError("batch_size and batch_tokens must be >= 1 and max_length >= 2")
        if skip_first_token is None:  # encode the tokens the SAE was trained on
            skip_first_token = bool(sae.cfg.extra.get("position_0_excluded", False))
        self.backbone, self.sae, self.layer = backbone, sae.to(backbone.device), layer
        self.batch_size, self.max_length, self.skip_first_token = batch_size, max_length, skip_first_token
        self.pool, self.batch_tokens = pool, batch_tokens
        self._cache = _FeatureCache(self.cache_key()) if cache else None

    @classmethod
    def from_config(cls, cfg: FeatureConfig, backbone: Backbone | None = None) -> "FeatureExtractor":
        """``backbone``: a model already loaded from ``cfg`` (several layers' extractors share one)."""
        backbone = backbone or Backbone.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype)
        sae = load_sae(cfg.sae, layer=cfg.layer, k=cfg.k)
        layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
        if sae.cfg.layer is not None and layer != sae.cfg.layer:
            raise SafetyScopeError(f"layer {layer} asked for, but the SAE {cfg.sae or 'default'} reads layer "
                                   f"{sae.cfg.layer}: its features mean nothing at another layer")
        if layer is None:
            raise SafetyScopeError("the SAE does not record its layer: pass --layer")
        if cfg.sae in (None, "", "default") and cfg.model not in (None, "", "default") and sae.cfg.model != backbone.model_id:
            raise SafetyScopeError(f"the embedded SAE belongs to {sae.cfg.model}; pass --sae for {backbone.model_id}")
        if sae.cfg.model and _model_name(sae.cfg.model) != _model_name(backbone.model_id):
            # a local directory may carry any name, so this is said, not refused: same width, another model's
            # residual stream would give codes that mean nothing
            print(f"warning: the SAE {cfg.sae} was trained on {sae.cfg.model}, but the model loaded is "
                  f"{backbone.model_id}; its features mean nothing on another model", file=sys.stderr)
        return cls(backbone, sae, layer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                   skip_first_token=cfg.skip_first_token, pool=cfg.pool, cache=cfg.cache, batch_tokens=cfg.batch_tokens)

    def run_settings(self) -> dict:
        """The extraction settings that decide the codes beside the model and SAE, as the resume manifests of
        `features` and `classify` record them (dtype, device and batching move activations near 0 across the firing
        threshold); one list, so the two manifests cannot drift apart."""
        return {"max_length": self.max_length, "skip_first_token": self.skip_first_token, "pool": self.pool,
                "dtype": str(next(self.backbone.model.parameters()).dtype), "device": self.backbone.device.split(":")[0],
                "batch_size": self.batch_size, "batch_tokens": self.batch_tokens}

    def cache_key(self) -> str:
        dtype = next(self.backbone.model.parameters()).dtype
        parts = [self.backbone.fingerprint(), self.sae.fingerprint(), self.layer, self.max_length,
                 self.skip_first_token, str(dtype), self.sae.cfg.k] + ([self.pool] if self.pool != "max" else [])
        if dtype != torch.float32:
            # in bf16/fp16 a text's codes depend on what it is batched with (padding changes the kernels'
            # reduction order): 53 of 150 English texts fired a different feature set at batch size 1 vs 32
            # on SmolLM2 in bf16, none in fp32 (max |diff| 1e-4). So a half-precision cache is per batching
            # (both knobs decide the batches, see backbone.length_batches).
            parts.append(("batch_size", self.batch_size))
            parts.append(("batch_tokens", self.batch_tokens))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]

    # -- tokenisation ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text, cut at max_length, and how many texts were cut."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise SafetyScopeError(f"{len(bad)} text(s) are null or empty (rows {bad[:10]}{' ...' if len(bad) > 10 else ''}); "
                                   "drop them first")
        return self.backbone.tokenize(texts, self.max_length)

    # -- extraction ------------------------------------------------------------------------------
    def transform(self, texts: list[str], *, progress: bool = False) -> sp.csr_matrix:
        """scikit-learn style: texts -> CSR (n_texts, d_sae) of max-pooled codes."""
        return self.extract(texts, progress=progress).codes

    def extract(self, texts: list[str], *, progress: bool = False) -> Extraction:
        return extract_shared([self], texts, progress=progress)[0]

    @torch.inference_mode()
    def _pool(self, hidden: torch.Tensor, keep: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text of the batch: (feature ids, max over the kept tokens of this extractor's SAE codes) of
        the features that fired."""
        n = hidden.shape[0]
        text_of_token = torch.arange(n, device=hidden.device)[:, None].expand_as(keep)[keep]
        vals, idx = self.sae.encode_sparse(hidden[keep])  # all real tokens in one GEMM: padding costs nothing
        d_sae = self.sae.cfg.d_sae
        pooled = torch.zeros(n * d_sae, device=hidden.device, dtype=vals.dtype)
        pooled.scatter_reduce_(0, (text_of_token[:, None] * d_sae + idx).flatten(), vals.flatten(), "amax")
        pooled = pooled.view(n, d_sae).float().cpu()
        nz = torch.nonzero(pooled)  # row-major: per text, its features in increasing id order
        ids = nz[:, 1].numpy().astype(np.int32)
        acts = pooled[nz[:, 0], nz[:, 1]].numpy().astype(np.float32)
        cuts = np.cumsum(np.bincount(nz[:, 0].numpy(), minlength=n))[:-1]
        return list(zip(np.split(ids, cuts), np.split(acts, cuts)))

    @torch.inference_mode()
    def token_codes(self, text: str) -> tuple[list[str], torch.Tensor]:
        """Tokens of one text and their dense SAE codes (n_tokens, d_sae): what `explain` shows."""
        (ids,), _ = self.tokenize([text])
        input_ids, mask = self.backbone.pad([ids])
        hidden = self.backbone.capture(input_ids, mask, [self.layer])[self.layer][0].float()
        codes = self.sae.encode(hidden).cpu()
        if self.skip_first_token:
            codes[0] = 0
        tokens = [self.backbone.tokenizer.decode([t]) for t in ids]
        return tokens, codes


def _model_name(model_id: str) -> str:
    """A model's name without its hub owner or directory: "Qwen/Qwen3-1.7B" and "/models/qwen3-1.7b" match."""
    return Path(str(model_id).rstrip("/")).name.lower().removesuffix(".gguf")


def _token_masks(mask: torch.Tensor, skip_first_token: bool, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens to SAE-encode and pool, tokens to average for mean_acts) of a right-padded batch."""
    keep = mask.bool()
    if skip_first_token:
        keep[:, 0] = False
    means_keep = keep
    if pool == "last":  # right padding: the last real token sits at length - 1
        keep = torch.zeros_like(keep)
        keep[torch.arange(len(mask)), mask.sum(1) - 1] = True
    return keep, means_keep


@torch.inference_mode()
def extract_shared(extractors: list[FeatureExtractor], texts: list[str], *,
                   progress: bool = False) -> list[Extraction]:
    """One Extraction per extractor, for extractors that share one model object and their tokenisation, batching
    and pooling (max_length, first-token choice, pool, batch_size, batch_tokens) and differ in their SAE and/or
    layer: each batch goes through the model once, up to the deepest layer asked for, and every SAE encodes
    its layer's residual stream. Each SAE's codes are cached under its own key; a text is run when any
    extractor lacks it, and only the extractors that lacked it store it. ``mean_acts`` is each extractor's
    layer's."""
    lead = extractors[0]
    same = ("backbone", "max_length", "skip_first_token", "pool", "batch_size", "batch_tokens")
    for fx in extractors[1:]:
        diff = [a for a in same if (getattr(fx, a) is not getattr(lead, a) if a == "backbone"
                                    else getattr(fx, a) != getattr(lead, a))]
        if diff:
            raise SafetyScopeError(f"extractors sharing a forward pass must differ only in their SAE and layer; they differ in {diff}")
    n, d_model = len(texts), lead.backbone.d_model
    layers = sorted({fx.layer for fx in extractors})
    keys = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest() if isinstance(t, str) else "" for t in texts]
    rows = [[None] * n for _ in extractors]  # per extractor, per text: (feature ids, acts)
    mean_acts = {la: np.zeros((n, d_model), dtype=np.float32) for la in layers}
    n_tokens = np.zeros(n, dtype=np.int64)  # the same at every layer
    for e, fx in enumerate(extractors):
        if fx._cache is not None:
            for i, (r, m, t) in fx._cache.get_many(keys).items():
                rows[e][i], mean_acts[fx.layer][i], n_tokens[i] = r, m, t  # mean, n_tokens: the same for every SAE
    todo = {i for i in range(n) if any(r[i] is None for r in rows)}
    # A text's codes depend on its batch (padding changes the kernels' reduction order: in half precision a
    # fired feature can change, in float32 the last bits of an activation do), so a run resumed after a kill (part
    # of its chunk cached) must batch the rest as the uninterrupted run did to be bit-identical to it: batches are
    # planned over every text of the call, whatever the cache holds, and a batch with any text to compute is run
    # whole (tests/test_kill_resume.py, every dtype).
    planned = list(range(n)) if todo else []
    part_ids, n_trunc = lead.tokenize([texts[i] for i in planned]) if planned else ([], 0)
    if todo and len(todo) < n:  # truncation is counted over this run's texts, as tokens are
        n_trunc = lead.tokenize([texts[i] for i in sorted(todo)])[1]
    ids: dict[int, list[int]] = dict(zip(planned, part_ids))
    plan = [[planned[j] for j in b] for b in length_batches([len(x) for x in part_ids], batch_size=lead.batch_size,
                                                            batch_tokens=lead.batch_tokens)]
    plan = [b for b in plan if any(i in todo for i in b)]
    recomputed = {i for b in plan for i in b}
    n_cached = [sum(1 for i in range(n) if i not in recomputed and r[i] is not None) for r in rows]
    bar = tqdm(total=sum(len(ids[i]) for i in recomputed), unit="tok", unit_scale=True, disable=not progress,
               desc="features")
    for batch in plan:
        input_ids, mask = lead.backbone.pad([ids[i] for i in batch])
        hidden_at = lead.backbone.capture(input_ids, mask, layers)  # stops after the deepest layer
        keep, means_keep = _token_masks(mask.to(lead.backbone.device), lead.skip_first_token, lead.pool)
        counts = means_keep.sum(1)
        for b, i in enumerate(batch):
            n_tokens[i] = int(counts[b])
        for layer in layers:
            hidden = hidden_at[layer].float()
            means = ((hidden * means_keep[..., None]).sum(1) / counts.clamp(min=1)[:, None]).cpu().numpy()
            mean_acts[layer][batch] = means
            for e, fx in enumerate(extractors):
                if fx.layer != layer:
                    continue
                pooled, new = fx._pool(hidden, keep), {}
                for b, i in enumerate(batch):  # every text of a run batch takes this batch's values
                    rows[e][i] = pooled[b]
                    new[keys[i]] = (rows[e][i], mean_acts[layer][i], n_tokens[i])
                if fx._cache is not None:
                    fx._cache.put_many(new)
        bar.update(sum(len(ids[i]) for i in batch))
    bar.close()
    return [Extraction(_rows_to_csr(r, fx.sae.cfg.d_sae), mean_acts[fx.layer], n_tokens, n_trunc, c)
            for r, fx, c in zip(rows, extractors, n_cached)]


def layer_extractors(cfg: FeatureConfig, layers: list[int], saes: list[str | None] | None = None,
                     backbone: Backbone | None = None) -> list[FeatureExtractor]:
    """One extractor per layer, all on one loaded model (for ``extract_shared``: one forward pass serves them
    all). ``saes``: one SAE source per layer; default ``cfg.sae`` for each, which must then resolve to an SAE
    per layer (a Qwen-Scope directory or hub repo with ``layer{n}.sae.pt``, a sparsify checkpoint with
    ``layers.{n}``; the embedded SAE has layer 6 only)."""
    if not layers:
        raise SafetyScopeError("no layers given")
    if len(set(layers)) != len(layers):
        raise SafetyScopeError(f"layers {list(layers)} repeat a layer")
    saes = list(saes) if saes is not None else [cfg.sae] * len(layers)
    if len(saes) != len(layers):
        raise SafetyScopeError(f"{len(saes)} SAE(s) for {len(layers)} layer(s): give one SAE, or one per layer")
    backbone = backbone or Backbone.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype)
    return [FeatureExtractor.from_config(replace(cfg, layer=la, sae=sae), backbone=backbone)
            for la, sae in zip(layers, saes)]


def codes_frame(codes: sp.csr_matrix, ids=None, suffix: str = ""):
    """The `features` command's output table: per text, the ids and pooled activations of the features
    that fired (one row per CSR row), after the input's ``id`` column when it has one. ``suffix`` names the
    columns ``feature_ids{suffix}`` / ``feature_acts{suffix}`` (``--layers``: ``_l<n>``)."""
    import polars as pl

    rows = range(codes.shape[0])
    i_col, a_col = f"feature_ids{suffix}", f"feature_acts{suffix}"
    out = pl.DataFrame({i_col: [codes.indices[codes.indptr[i]: codes.indptr[i + 1]].tolist() for i in rows],
                        a_col: [codes.data[codes.indptr[i]: codes.indptr[i + 1]].tolist() for i in rows]},
                       schema={i_col: pl.List(pl.Int32), a_col: pl.List(pl.Float32)})
    return out if ids is None else out.insert_column(0, ids)


def layers_frame(extractions: list[Extraction], layers: list[int], ids=None):
    """``features --layers``: one feature_ids_l<n> / feature_acts_l<n> pair of columns per layer, in order."""
    import polars as pl

    out = pl.concat([codes_frame(e.codes, suffix=f"_l{la}") for e, la in zip(extractions, layers)], how="horizontal")
    return out if ids is None else out.insert_column(0, ids)


def _rows_to_csr(rows, d_sae: int) -> sp.csr_matrix:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r[0]) for r in rows], out=indptr[1:])
    indices = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int32)
    data = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), d_sae))


class _FeatureCache:
    """Text hash -> (feature ids, acts, mean activation, n_tokens), in one SQLite file per config.

    The cache only saves time, so a fault in it never stops a run: a corrupt file (not a database, malformed)
    is moved aside to ``<name>.corrupt`` and rebuilt; a cache that cannot be written (read-only file or
    directory, locked) is left alone and the run goes on without it, after one warning line."""

    def __init__(self, key: str):
        self.path = cache_dir() / "features" / f"{key}.sqlite"
        self.db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except sqlite3.DatabaseError as e:
            if not self.path.exists() or isinstance(e, sqlite3.OperationalError):  # not corrupt: cannot open/write
                self._disable(e)
                return
            aside = self.path.with_name(self.path.name + ".corrupt")
            try:
                os.replace(self.path, aside)
                self._open()
                _warn(f"feature cache {self.path} was corrupt ({e}); moved it to {aside} and started a new one")
            except (OSError, sqlite3.Error) as e2:
                self._disable(e2)
        except OSError as e:
            self._disable(e)

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS codes (h TEXT PRIMARY KEY, ids BLOB, acts BLOB, mean BLOB, n INTEGER)")
        self.db.execute("SELECT count(*) FROM codes").fetchone()  # reads the pages: a malformed file fails here

    def _disable(self, e: Exception) -> None:
        if self.db is not None:
            self.db.close()
        self.db = None
        _warn(f"feature cache {self.path} unusable ({e}); continuing without it "
                     f"(fix its permissions or delete it, or pass --no-cache)")

    def get_many(self, keys: list[str]) -> dict[int, tuple]:
        where: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k:
                where.setdefault(k, []).append(i)
        out = {}
        if self.db is None:
            return out
        uniq = list(where)
        for s in range(0, len(uniq), 500):
            chunk = uniq[s : s + 500]
            q = f"SELECT h, ids, acts, mean, n FROM codes WHERE h IN ({','.join('?' * len(chunk))})"
            try:
                found = self.db.execute(q, chunk).fetchall()
            except sqlite3.Error as e:
                self._disable(e)
                return {}
            for h, ids, acts, mean, n in found:
                hit = ((np.frombuffer(ids, np.int32), np.frombuffer(acts, np.float32)), np.frombuffer(mean, np.float32), n)
                for i in where[h]:
                    out[i] = hit
        return out

    def put_many(self, items: dict[str, tuple]) -> None:
        if self.db is None:
            return
        try:
            self.db.executemany(
                "INSERT OR REPLACE INTO codes VALUES (?, ?, ?, ?, ?)",
                [(h, r[0].tobytes(), r[1].tobytes(), np.asarray(m, np.float32).tobytes(), int(t)) for h, (r, m, t) in items.items()],
            )
            self.db.commit()
        except sqlite3.Error as e:  # read-only, locked: the results are still returned, just not stored
            self._disable(e)
