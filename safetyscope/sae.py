"""Sparse autoencoders: one ``SAE`` class, one encode formula, loaders for four on-disk formats.

Weights are held in the Qwen-Scope orientation, W_enc (d_sae, d_model) and W_dec (d_model, d_sae),
so the encoder is literally ``pre = x @ W_enc.T + b_enc``. Formats that subtract b_dec from the input
first (SAELens, sparsify) are folded at load time: b_enc' = b_enc - W_enc @ b_dec gives the same codes.

Formats: Qwen-Scope ``layer{n}.sae.pt`` (torch.load(weights_only=True)), SAELens (cfg.json +
sae_weights.safetensors), EleutherAI sparsify (cfg.json + sae.safetensors) and safetyscope's own
(config.json + sae.safetensors, written by ``save_pretrained``).

Long because: the four formats' loaders sit beside the one class they build, so a format's quirks (folded
b_dec, refused options) are read next to the encode they must match.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SafetyScopeError
from .hashcache import cached_hash, source_digest

ACTIVATIONS = ("topk", "jumprelu", "relu")
OWN_FORMAT = "safetyscope-sae"
FINGERPRINT_PREFIX = "sha256:"  # full-weight fingerprints; older files hold a 16-hex legacy one
EMBEDDED_SAE_DIR = Path(__file__).parent / "assets" / "sae-smollm2-135m-instruct"
# SAEs shipped in the package, by name: a classifier that records the name (not a path) loads from any directory
SHIPPED_SAES = {"gemma3-270m": Path(__file__).parent / "assets" / "sae-gemma3-270m"}
_LOADER_DIGEST = source_digest(__file__)  # the loaders transform tensors (b_dec folding): part of the cache key


@dataclass
class SAEConfig:
    d_model: int
    d_sae: int
    activation: str = "topk"
    k: int | None = None
    model: str | None = None  # model the SAE was trained on
    layer: int | None = None  # decoder layer whose output it reads
    source: str | None = None  # where it was loaded from
    extra: dict = field(default_factory=dict)  # training record (corpus hash, tokens, FVU ...)

    def __post_init__(self):
        for name in ("d_model", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SafetyScopeError(f"SAE {self.source or ''}: config {name} must be a positive integer; got {v!r}")
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool)):
            raise SafetyScopeError(f"SAE {self.source or ''}: config k must be an integer; got {self.k!r}")
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0):
            raise SafetyScopeError(f"SAE {self.source or ''}: config layer must be a non-negative integer; got {self.layer!r}")
        if self.activation not in ACTIVATIONS:
            raise SafetyScopeError(f"unknown SAE activation {self.activation!r}; use one of {ACTIVATIONS}")
        if self.activation == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise SafetyScopeError(f"a TopK SAE needs 0 < k <= d_sae={self.d_sae}; got k={self.k} "
                                   "(for Qwen-Scope files pass --k or keep the L0_<k> suffix in the name)")


class SAE(torch.nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_model))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(cfg.d_model, cfg.d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))  # used by JumpReLU only

    # -- the formula ---------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (n_tokens, width): the non-zero candidates of the code of each row.

        For TopK the width is k (zeros where fewer than k pre-activations are positive);
        for ReLU/JumpReLU it is d_sae (dense), so prefer TopK SAEs for large batches.
        """
        pre = self.pre_acts(x)
        if self.cfg.activation == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return vals.relu(), idx
        if self.cfg.activation == "jumprelu":
            # ReLU first, as SAELens does: with a negative threshold a negative pre-activation must still be 0
            vals = pre.relu() * (pre > self.threshold)
        else:
            vals = pre.relu()
        idx = torch.arange(self.cfg.d_sae, device=pre.device).expand_as(pre)
        return vals, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense code (..., d_sae)."""
        vals, idx = self.encode_sparse(x)
        return torch.zeros(*vals.shape[:-1], self.cfg.d_sae, dtype=vals.dtype, device=vals.device).scatter_(-1, idx, vals)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec.T + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- identity ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of every value of every tensor (as float32, with names and shapes) and the activation.

        Every byte counts: permuting two features or editing one value gives another fingerprint. For an SAE
        as loaded from files the value is cached per file (see ``hashcache``): editing the loaded tensors in
        memory afterwards is not seen; an edited file is."""
        salt = f"sae|{self.cfg.activation}|{self.cfg.k}|{_LOADER_DIGEST}"
        return cached_hash(getattr(self, "_weight_files", ()), salt, self._hash_weights)

    def _hash_weights(self) -> str:
        h = hashlib.sha256()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name).detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        h.update(f"{self.cfg.activation}{self.cfg.k}".encode())
        return FINGERPRINT_PREFIX + h.hexdigest()

    def legacy_fingerprint(self) -> str:
        """The 16-hex fingerprint of files written before ``sha256:`` ones (shapes, sums and the first 256
        values of each tensor only). Kept so those files still load; never written."""
        h = hashlib.sha256()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name).detach().float().cpu()
            h.update(f"{name}{tuple(t.shape)}{t.double().sum().item():.6e}".encode())
            h.update(t.flatten()[:256].numpy().tobytes())
        h.update(f"{self.cfg.activation}{self.cfg.k}".encode())
        return h.hexdigest()[:16]

    # -- own format ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).detach().to("cpu", dtype).contiguous()
                   for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.cfg.activation == "jumprelu":
            tensors["threshold"] = self.threshold.detach().to("cpu", dtype).contiguous()
        save_file(tensors, d / "sae.safetensors")
        cfg = {"format": OWN_FORMAT, **asdict(self.cfg)}
        cfg.pop("source")
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, spec: str | Path | None = None, *, layer: int | None = None, k: int | None = None,
                        device: str = "cpu") -> "SAE":
        """Load from any supported format; see :func:`load_sae`."""
        return load_sae(spec, layer=layer, k=k, device=device)

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> "SAE":
        """Build from tensors in Qwen-Scope orientation, checking every shape against the config."""
        expect = {"W_enc": (cfg.d_sae, cfg.d_model), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_model, cfg.d_sae),
                  "b_dec": (cfg.d_model,)}
        got = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if threshold is not None:
            expect["threshold"], got["threshold"] = (cfg.d_sae,), threshold
        elif cfg.activation == "jumprelu":
            raise SafetyScopeError(f"SAE {cfg.source or ''}: a JumpReLU SAE needs a threshold tensor; none found")
        for name, shape in expect.items():
            if not isinstance(got[name], torch.Tensor) or tuple(got[name].shape) != shape:
                actual = tuple(got[name].shape) if isinstance(got[name], torch.Tensor) else type(got[name]).__name__
                raise SafetyScopeError(f"SAE {cfg.source or ''}: {name} has shape {actual}, expected {shape}")
        _check_finite(got, cfg.source or "")
        sae = cls(cfg)
        with torch.no_grad():
            for name, t in got.items():
                getattr(sae, name).copy_(t.float())
        return sae.requires_grad_(False).eval()

    @classmethod
    def random_like(cls, sae: "SAE", seed: int = 0) -> "SAE":
        """A control (Korznikov et al. 2026, "Do SAEs beat random baselines?"): an untrained SAE of ``sae``'s
        kind and shapes (d_model, d_sae, activation, k, layer), seeded, set up as ``train.py`` starts training:
        decoder columns random unit vectors, encoder rows along them (tied, W_enc = W_dec.T up to row scale),
        encoding x - b_dec (b_enc = -W_enc @ b_dec). It differs from ``sae`` only in its feature directions:

        - b_dec is ``sae``'s, its learned centre of the activations (the trainer starts from their geometric
          median). Uncentred, every token's top k would be the few random directions nearest the residual
          stream's large mean offset, an easier control to beat than the data allows.
        - each encoder row gets the norm of ``sae``'s row of the same index (and a JumpReLU its thresholds), so
          codes keep the trained scale that sparse_linear's log1p and a JumpReLU's thresholds expect. Random
          directions are less aligned with the data than trained ones, so a random JumpReLU fires less.
        """
        c = sae.cfg
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(c.d_model, c.d_sae, generator=g)
        W_dec /= W_dec.norm(dim=0, keepdim=True).clamp(min=1e-12)
        W_enc = W_dec.T * sae.W_enc.detach().float().cpu().norm(dim=1, keepdim=True)
        b_dec = sae.b_dec.detach().float().cpu()
        extra = {"random_like": sae.fingerprint(), "seed": seed}
        if "position_0_excluded" in c.extra:  # encode the same tokens as the trained SAE
            extra["position_0_excluded"] = c.extra["position_0_excluded"]
        cfg = SAEConfig(d_model=c.d_model, d_sae=c.d_sae, activation=c.activation, k=c.k, model=c.model,
                        layer=c.layer, source=f"random_like({c.source or 'sae'}, seed={seed})", extra=extra)
        threshold = sae.threshold.detach().float().cpu() if c.activation == "jumprelu" else None
        out = cls.from_tensors(cfg, W_enc, -(W_enc @ b_dec), W_dec, b_dec, threshold)
        return out.to(sae.W_enc.device)


# -- loaders -------------------------------------------------------------------------------------

def _k_from_name(name: str) -> int | None:
    m = re.search(r"L0[_-]?(\d+)", name)
    return int(m.group(1)) if m else None


def load_qwen_scope_file(path: str | Path, *, k: int | None = None, layer: int | None = None,
                         name_for_k: str | None = None) -> SAE:
    """A Qwen-Scope ``layer{n}.sae.pt`` dict; k from ``k`` or an ``L0_<k>`` in the repo/dir name."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler blocks any GLOBAL (class/function reference): that is pickled code.
        # Other unpickling failures (bad opcodes, random bytes) are just a corrupt file.
        blocked = re.search(r"(?:unsupported GLOBAL|Unsupported global:?)\s+(?:GLOBAL\s+)?([\w.]+)", str(e), re.I)
        if blocked:
            raise SafetyScopeError(f"{path}: refused to load: the file holds more than tensors (it references "
                                   f"{blocked.group(1)}, possible pickled code); only plain tensor dicts are accepted") from None
        detail = [ln for ln in str(e).splitlines() if ln.strip()][-2:-1] or [str(e)[:160]]
        raise SafetyScopeError(f"{path}: not a readable torch file (corrupt or not a torch.save file: "
                               f"{detail[0].strip()[:160]})") from None
    except Exception as e:
        raise SafetyScopeError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:160]})") from None
    need = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if not isinstance(state, dict) or not need <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise SafetyScopeError(f"{path}: a Qwen-Scope SAE file needs keys {sorted(need)}; found {have}")
    _check_finite(state, path)
    m = re.match(r"layer(\d+)\.sae\.pt$", path.name)
    if m:  # the file's own record of its layer wins: a different --layer is caught by FeatureExtractor.from_config
        layer = int(m.group(1))
    k = k or _k_from_name(name_for_k or str(path.resolve()))
    d_sae, d_model = state["W_enc"].shape
    cfg = SAEConfig(d_model=d_model, d_sae=d_sae, activation="topk", k=k, layer=layer, source=str(path))
    return _read_from(SAE.from_tensors(cfg, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]), path)


def _load_safetensors(path: Path, need: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        t = load_file(path)
    except Exception as e:
        raise SafetyScopeError(f"{path}: not a readable safetensors file ({str(e)[:160]})") from None
    missing = [n for n in need if n not in t]
    if missing:
        raise SafetyScopeError(f"{path}: missing tensor(s) {missing}; found {sorted(t)}")
    _check_finite(t, path)
    return t


def _check_finite(tensors: dict, where) -> None:
    """Before any folding (b_dec into b_enc) so the error names the tensor as stored."""
    for name, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise SafetyScopeError(f"SAE {where}: tensor {name} holds {bad} non-finite values (NaN/inf)")


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SafetyScopeError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise SafetyScopeError(f"{path}: an SAE config must be a JSON object; got {type(d).__name__}")
    return d


def _refuse(directory: Path, option: str, why: str):
    raise SafetyScopeError(f"{directory}: SAE option {option} is not supported ({why}); its codes would be wrong")


def load_own(directory: Path) -> SAE:
    cfg = _read_json(directory / "config.json")
    fmt = cfg.pop("format", OWN_FORMAT)  # files written before the key existed have none
    if fmt != OWN_FORMAT:
        raise SafetyScopeError(f"{directory / 'config.json'}: key format is {fmt!r}, not 'safetyscope-sae': not a "
                               "safetyscope SAE config")
    known = {f for f in SAEConfig.__dataclass_fields__}
    cfg.pop("source", None)
    try:
        cfg = SAEConfig(**{k: v for k, v in cfg.items() if k in known}, source=str(directory))
    except TypeError as e:  # a required field (d_model, d_sae) is absent
        raise SafetyScopeError(f"{directory / 'config.json'}: bad SAE config ({e})") from None
    t = _load_safetensors(directory / "sae.safetensors", ("W_enc", "b_enc", "W_dec", "b_dec"))
    sae = SAE.from_tensors(cfg, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"))
    return _read_from(sae, directory / "config.json", directory / "sae.safetensors")


def load_saelens(directory: Path) -> SAE:
    """SAELens 4-6 ``cfg.json`` + ``sae_weights.safetensors``. Options that change the encode and are not
    implemented here (activation normalisation, decoder-norm rescaling, gated/batchtopk) are refused."""
    c = _read_json(directory / "cfg.json")
    meta = c.get("metadata") if isinstance(c.get("metadata"), dict) else {}  # SAELens 6 moved these here
    arch = c.get("architecture", "standard")
    act = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}.get(arch)
    if act is None:
        raise SafetyScopeError(f"{directory}: SAELens architecture {arch!r} is not supported (standard, jumprelu, topk)")
    act_fn = c.get("activation_fn_str", c.get("activation_fn"))
    if arch == "standard" and act_fn not in (None, "relu"):
        if act_fn != "topk":  # SAELens < 6 stored TopK SAEs as architecture "standard" + activation_fn_str "topk"
            _refuse(directory, f"activation_fn_str={act_fn!r}", "only relu and topk are implemented")
        act = "topk"
    if c.get("rescale_acts_by_decoder_norm"):
        _refuse(directory, "rescale_acts_by_decoder_norm=True", "codes scaled by decoder norms are not implemented")
    norm = c.get("normalize_activations")
    if norm not in (None, "none"):
        _refuse(directory, f"normalize_activations={norm!r}", "input activation normalisation is not implemented")
    k = c.get("k") or (c.get("activation_fn_kwargs") or {}).get("k")
    t = _load_safetensors(directory / "sae_weights.safetensors", ("W_enc", "b_enc", "W_dec", "b_dec"))
    W_enc, W_dec = t["W_enc"].T, t["W_dec"].T  # SAELens: W_enc (d_in, d_sae), W_dec (d_sae, d_in)
    b_enc, b_dec = t["b_enc"], t["b_dec"]
    for key, actual in (("d_in", W_enc.shape[1]), ("d_sae", W_enc.shape[0])):
        if c.get(key) is not None and c[key] != actual:
            raise SafetyScopeError(f"{directory}: cfg.json {key}={c[key]!r} but W_enc has {key} {actual}")
    if c.get("apply_b_dec_to_input", True):  # SAELens' default when the key is absent, for every architecture
        b_enc = b_enc - W_enc.float() @ b_dec.float()
    threshold = t.get("threshold")
    if threshold is None and "log_threshold" in t:
        threshold = t["log_threshold"].exp()
    hook = c.get("hook_name") or meta.get("hook_name") or ""
    cfg = SAEConfig(d_model=W_enc.shape[1], d_sae=W_enc.shape[0], activation=act, k=k,
                    model=c.get("model_name") or meta.get("model_name"), layer=_layer_from_hook(hook, directory),
                    source=str(directory))
    sae = SAE.from_tensors(cfg, W_enc, b_enc, W_dec, b_dec, threshold)
    return _read_from(sae, directory / "cfg.json", directory / "sae_weights.safetensors")


def load_sparsify(directory: Path) -> SAE:
    """EleutherAI sparsify ``cfg.json`` + ``sae.safetensors`` (SAE or transcoder, TopK)."""
    c = _read_json(directory / "cfg.json")
    if c.get("activation", "topk") != "topk":
        _refuse(directory, f"activation={c['activation']!r}", "only sparsify's topk activation is implemented")
    t = _load_safetensors(directory / "sae.safetensors", ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    if c.get("skip_connection") or "W_skip" in t:
        _refuse(directory, "skip_connection=True", "the decoder's skip term is not implemented")
    W_enc, b_enc = t["encoder.weight"], t["encoder.bias"]  # nn.Linear(d_in, num_latents)
    W_dec, b_dec = t["W_dec"].T, t["b_dec"]  # sparsify: W_dec (num_latents, d_in)
    if not c.get("transcode"):  # an autoencoder encodes x - b_dec; a transcoder encodes x as is
        b_enc = b_enc - W_enc.float() @ b_dec.float()
    cfg = SAEConfig(d_model=W_enc.shape[1], d_sae=W_enc.shape[0], activation="topk", k=c.get("k"),
                    layer=_layer_from_hook(directory.name, directory), source=str(directory))
    return _read_from(SAE.from_tensors(cfg, W_enc, b_enc, W_dec, b_dec), directory / "cfg.json", directory / "sae.safetensors")


def _read_from(sae: SAE, *files: Path) -> SAE:
    """Record the files the weights came from: the key of the SAE's cached fingerprint."""
    sae._weight_files = tuple(Path(f) for f in files)
    return sae


def _layer_from_hook(hook: str, directory: Path | None = None) -> int | None:
    """The decoder layer whose output the hook reads. TransformerLens ``blocks.N.hook_resid_pre`` is the input
    of block N, i.e. the output of layer N-1; ``blocks.N.hook_resid_post`` the output of layer N; HF-style
    ``layers.N`` (a sparsify hook point) the output of layer N. Any other point inside a block (attention,
    MLP, resid_mid, e.g. ``blocks.N.attn.hook_z`` or sparsify's ``layers.N.mlp``) reads something else: refused."""
    m = re.search(r"blocks\.(\d+)\.([\w.]+)$", hook)
    if m:
        n, point = int(m.group(1)), m.group(2)
        if point == "hook_resid_post":
            return n
        if point == "hook_resid_pre":
            if n == 0:
                _refuse(directory, f"hook_name={hook!r}", "it reads the embeddings, not a decoder layer's output")
            return n - 1
        _refuse(directory, f"hook_name={hook!r}", "only residual-stream hooks (resid_pre, resid_post) are read")
    m = re.search(r"(?:layers?|blocks)[._](\d+)((?:\.\w+)*)$", hook)
    if m and m.group(2):
        _refuse(directory, f"hook point {hook!r}", "only a decoder layer's output, the residual stream, is read")
    return int(m.group(1)) if m else None


def load_sae(spec: str | Path | None = None, *, layer: int | None = None, k: int | None = None,
             device: str = "cpu") -> SAE:
    """Load an SAE from: None/'default' (the embedded one), a shipped SAE's name (SHIPPED_SAES, e.g. gemma3-270m),
    a directory in any of the four formats, a Qwen-Scope ``.pt`` file, a Qwen-Scope directory or hub repo plus
    ``layer``, or a sparsify checkpoint directory with one sub-directory per hook point plus ``layer``."""
    sae = _load_any(spec, layer, k)
    if k is not None and sae.cfg.activation == "topk":
        if not 0 < k <= sae.cfg.d_sae:
            raise SafetyScopeError(f"--k {k} is out of range for this TopK SAE: need 0 < k <= d_sae={sae.cfg.d_sae}")
        sae.cfg.k = k
    return sae.to(device)


def _has(*names: str) -> Callable[[Path], bool]:
    return lambda p: all((p / n).exists() for n in names)


def _load_qwen_scope_dir(p: Path, *, layer: int | None, k: int | None, name: str) -> SAE:
    """A directory of Qwen-Scope ``layer<n>.sae.pt`` files: the one of ``layer``."""
    pts = sorted(p.glob("layer*.sae.pt"))
    if layer is None:
        raise SafetyScopeError(f"{name}: holds Qwen-Scope SAEs for several layers ({[f.name for f in pts]}); "
                               "pass --layer")
    f = p / f"layer{layer}.sae.pt"
    if not f.exists():
        raise SafetyScopeError(f"{name}: no layer{layer}.sae.pt (found {[f.name for f in pts]})")
    return load_qwen_scope_file(f, k=k, layer=layer)


# The directory formats, tried in this order: format name -> (detector: does this directory hold one?, loader).
# SAELens' NAMED_PRETRAINED_SAE_LOADERS idea: a new format is one entry here. Loaders take the directory and
# (keyword) the requested layer, k and the spec as the user wrote it (for messages).
SAE_LOADERS: dict[str, tuple[Callable[[Path], bool], Callable[..., SAE]]] = {
    "safetyscope": (_has("config.json", "sae.safetensors"), lambda p, **_: load_own(p)),
    "saelens": (_has("cfg.json", "sae_weights.safetensors"), lambda p, **_: load_saelens(p)),
    "sparsify": (_has("cfg.json", "sae.safetensors"), lambda p, **_: load_sparsify(p)),
    "qwen-scope": (lambda p: any(p.glob("layer*.sae.pt")), _load_qwen_scope_dir),
}


def _load_any(spec, layer, k) -> SAE:
    if spec in (None, "", "default"):
        if not (EMBEDDED_SAE_DIR / "config.json").exists():
            raise SafetyScopeError("the embedded default SAE is missing from this installation")
        return load_own(EMBEDDED_SAE_DIR)
    if str(spec) in SHIPPED_SAES:
        return load_own(SHIPPED_SAES[str(spec)])
    p = Path(spec)
    if p.is_file():
        if p.suffix == ".pt":
            return load_qwen_scope_file(p, k=k, layer=layer)
        raise SafetyScopeError(f"{spec}: a single SAE file must be a Qwen-Scope .pt; other formats are directories")
    if p.is_dir():
        for detect, load in SAE_LOADERS.values():
            if detect(p):
                return load(p, layer=layer, k=k, name=str(spec))
        if layer is not None:
            for sub in (p / f"layers.{layer}", p / f"model.layers.{layer}"):
                if sub.is_dir():
                    return _load_any(sub, layer, k)
        hooks = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "cfg.json").exists())
        if hooks and layer is None:
            raise SafetyScopeError(f"{spec}: a sparsify checkpoint with one SAE per hook point ({hooks[:8]}); pass --layer")
        raise SafetyScopeError(f"{spec}: no SAE found (expected layer<n>.sae.pt, config.json+sae.safetensors, "
                               "cfg.json+sae_weights.safetensors or cfg.json+sae.safetensors)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)):
        return _load_hub(str(spec), layer, k)
    raise SafetyScopeError(f"{spec}: no such SAE file, directory or hub repository")


def _load_hub(repo: str, layer: int | None, k: int | None) -> SAE:
    from huggingface_hub import hf_hub_download

    if layer is None:
        raise SafetyScopeError(f"{repo}: pass --layer to pick one of the repository's SAE files")
    try:
        path = hf_hub_download(repo, f"layer{layer}.sae.pt")
    except Exception as e:
        raise SafetyScopeError(f"cannot fetch layer{layer}.sae.pt from hub repo {repo} "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return load_qwen_scope_file(path, k=k, layer=layer, name_for_k=repo)
