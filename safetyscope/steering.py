"""Feature steering: change an SAE feature in the residual stream at inference time, no weight update.

The SAE of layer ``n`` reads the output of decoder layer ``n`` (backbone.py), so a forward hook on that
layer edits exactly the stream the SAE encodes. Two kinds of edit, per feature F with unit decoder
direction ``u = W_dec[:, F] / |W_dec[:, F]|``:

- add:   ``h' = h + alpha * u`` (negative alpha suppresses);
- clamp: set F's activation to ``c``: ``h' = h + (c - z_F(h)) / (W_enc[F] . u) * u``, with ``z_F`` from the
  SAE's one encode formula. The step is divided by ``W_enc[F] . u`` so that F's pre-activation moves by
  exactly ``c - z_F(h)``: re-encoding ``h'`` gives 0 for ``c = 0`` (and ``c`` while F stays in the top-k).
  Where F does not fire and ``c = 0`` nothing changes, so text without the feature is left untouched.

``positions="generated"`` edits only the positions of generated tokens (read from the KV cache length:
the prefill of the prompt is left as it is).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from .backbone import Backbone, decoder_layers
from .errors import SafetyScopeError, check_number

Positions = Literal["all", "generated"]  # edit every position, or only generated ones
POSITIONS = get_args(Positions)


@dataclass
class SteerConfig:
    """How steered text is generated: the one place for these settings and their defaults, read by `steer`'s
    options, ``run_steer`` and ``steer_calibrate.CalibrationConfig`` (which adds its sweep); checked here, once."""

    positions: Positions = "all"
    """Edit every position, or only those of generated tokens."""
    chat: bool = True
    """Apply the chat template, or continue the raw text."""
    max_new_tokens: int = 48
    """Tokens generated per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    seed: int = 0
    """Random seed of sampling (with temperature > 0)."""
    batch_size: int = 16
    """Prompts generated together."""

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise SafetyScopeError(f"positions must be one of {', '.join(POSITIONS)}; got {self.positions!r}")
        check_number("--max-new-tokens", self.max_new_tokens, low=1, integer=True)
        check_number("--temperature", self.temperature, low=0)
        check_number("--seed", self.seed, low=0, integer=True)
        check_number("--batch-size", self.batch_size, low=1, integer=True)


@dataclass(frozen=True)
class SteerSpec:
    feature: int
    alpha: float | None = None  # add alpha * u
    clamp: float | None = None  # set z_F to this value

    def __str__(self) -> str:
        return f"{self.feature}:{self.alpha:+g}" if self.clamp is None else f"{self.feature}={self.clamp:g}"

    @classmethod
    def parse(cls, text: str, *, clamp: bool = False) -> "SteerSpec":
        """``F:ALPHA`` (add) or, with ``clamp``, ``F:VALUE``."""
        m = re.fullmatch(r"\s*(\d+)\s*[:=]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", str(text))
        if not m:
            raise SafetyScopeError(f"bad steering spec {text!r}: use FEATURE:{'VALUE' if clamp else 'ALPHA'}, "
                                   f"e.g. 161:{'0' if clamp else '-8'}")
        f, v = int(m.group(1)), float(m.group(2))
        return cls(f, clamp=v) if clamp else cls(f, alpha=v)


def describe(specs: list[SteerSpec], positions: str = "all") -> str:
    """One string for an output row: ``161=0,2752:-8@generated``."""
    return ",".join(map(str, specs)) + ("" if positions == "all" else f"@{positions}")


def check_specs(specs: list[SteerSpec], sae) -> None:
    if not specs:
        raise SafetyScopeError("nothing to steer: pass --feature F:ALPHA, --clamp F:VALUE or -c CLASSIFIER --suppress")
    bad = [s.feature for s in specs if not 0 <= s.feature < sae.cfg.d_sae]
    if bad:
        raise SafetyScopeError(f"unknown feature id(s) {bad}: the SAE has features 0..{sae.cfg.d_sae - 1}")
    for s in specs:
        if s.clamp is not None and s.clamp < 0:
            raise SafetyScopeError(f"clamp value {s.clamp} of feature {s.feature} is negative; SAE activations are >= 0")
        if s.clamp is not None and float(sae.W_enc[s.feature] @ _unit(sae, s.feature)) <= 1e-3:
            raise SafetyScopeError(f"feature {s.feature}: its encoder and decoder directions are orthogonal or opposed, so "
                                   "clamping cannot set its activation; steer it with --feature F:ALPHA instead")


def _unit(sae, f: int) -> torch.Tensor:
    d = sae.W_dec[:, f].float()
    return d / d.norm().clamp(min=1e-12)


class SteerStats:
    """What the hook did: edited positions and the mean norm of the edit (compare interventions by size)."""

    def __init__(self):
        self.positions, self.norm_sum = 0, 0.0

    @property
    def mean_edit_norm(self) -> float:
        return self.norm_sum / self.positions if self.positions else 0.0


@contextmanager
def steer(model, sae, layer: int, specs: list[SteerSpec], positions: str = "all"):
    """Steer ``model`` (a causal LM, or a Backbone) inside the block; yields SteerStats. The hooks are removed on
    exit, also after an exception. Non-finite hidden states or logits raise a one-line SafetyScopeError."""
    model = model.model if isinstance(model, Backbone) else model
    if positions not in POSITIONS:
        raise SafetyScopeError(f"positions must be one of {POSITIONS}, not {positions!r}")
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise SafetyScopeError(f"layer {layer} out of range: the model has layers 0..{len(blocks) - 1}")
    hidden_size = int(model.config.get_text_config().hidden_size)
    if sae.cfg.d_model != hidden_size:
        raise SafetyScopeError(f"wrong SAE for this model: the SAE reads d_model={sae.cfg.d_model}, the model has "
                               f"hidden size {hidden_size}")
    check_specs(specs, sae)
    dev = next(model.parameters()).device
    feats = torch.tensor([s.feature for s in specs], device=dev)
    U = torch.stack([_unit(sae, s.feature) for s in specs]).to(dev)  # (n, d_model)
    add = torch.tensor([s.alpha or 0.0 for s in specs], device=dev)
    is_clamp = torch.tensor([s.clamp is not None for s in specs], device=dev)
    target = torch.tensor([s.clamp or 0.0 for s in specs], device=dev)
    gain = (sae.W_enc[feats.to(sae.W_enc.device)].float().to(dev) * U).sum(-1)  # W_enc[F] . u
    stats, state = SteerStats(), {"prompt_len": 0}
    spec_text = describe(specs, positions)

    def edit(_module, _args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        x = h.float()
        T = x.shape[1]
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if positions == "generated":
            cache = kwargs.get("past_key_values")
            start = cache.get_seq_length(layer) - T if cache is not None else 0
            if start <= 0:  # a prefill: the prompt ends here, nothing generated yet
                state["prompt_len"] = T
            idx = torch.arange(start, start + T, device=x.device)
            keep = (idx >= state["prompt_len"])[None, :].expand_as(keep)
        coef = add.expand(*x.shape[:2], -1).clone()  # (batch, seq, n)
        if bool(is_clamp.any()):
            z = sae.encode(x.to(sae.W_enc.device))[..., feats.to(sae.W_enc.device)].float().to(x.device)
            coef = torch.where(is_clamp, (target - z) / gain, coef)
        coef = coef * keep[..., None]
        delta = coef @ U
        x = x + delta
        if not torch.isfinite(x).all():
            raise SafetyScopeError(f"steering {spec_text} made the hidden states non-finite (NaN/inf): use a smaller alpha")
        norms = delta.norm(dim=-1)[keep]
        stats.positions += int(keep.sum())
        stats.norm_sum += float(norms.sum())
        out = x.to(h.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def check_logits(_module, _args, output):
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and not torch.isfinite(logits).all():
            raise SafetyScopeError(f"steering {spec_text} made the logits non-finite (NaN/inf): use a smaller alpha")

    handles = [blocks[layer].register_forward_hook(edit, with_kwargs=True), model.register_forward_hook(check_logits)]
    try:
        yield stats
    finally:
        for hd in handles:
            hd.remove()


def cannot_steer(gen, backbone: Backbone) -> str | None:
    """Why ``gen`` cannot be steered with an SAE that reads ``backbone``'s model (None: it can)."""
    model = getattr(gen, "model", None)
    if not isinstance(model, torch.nn.Module):
        return (f"the {type(gen).__name__} generator cannot steer: vLLM and OpenAI-compatible servers do not expose "
                "the residual stream to edit; use --backend transformers (on a GPU: --device cuda)")
    if model is not backbone.model and Backbone(model, None, gen.name).fingerprint() != backbone.fingerprint():
        return f"the generator {gen.name} is not the model the SAE reads ({backbone.model_id}); steering needs the same model"
    return None


def classifier_features(path, fx) -> list[int]:
    """The ids of the features that make a classifier (made with ``fx``'s model, SAE and layer, else a one-line
    error) flag a text: every feature of an OR-rule; a sparse linear rule's features with a positive weight (its
    negative-weight features push towards clean, so suppressing them would push towards toxic). A per-language
    file: those of its fallback rule, then of each language's rule, each id once."""
    from .discovery.detector import read_classifier, read_rules
    from .provenance import check_compatible, check_header

    d = read_classifier(path)
    check_header(d, path)
    check_compatible(d, fx, path)
    rule, by_lang = read_rules(d, path, fx.sae.cfg.d_sae)
    out: dict[int, None] = {}  # ordered set
    for r in (rule, *by_lang.values()):
        towards_toxic = getattr(r, "weights_", np.ones(len(r.features_))) > 0
        out.update(dict.fromkeys(int(f) for f in r.features_[towards_toxic]))
    return list(out)


def run_steer(fx, prompts: list[str], specs: list[SteerSpec], cfg: SteerConfig | None = None, *,
              plain: bool = False, progress: bool = False,
              strengths: list[float] | None = None) -> tuple[list[dict], dict]:
    """Steered (and with ``plain`` also unsteered) completions of ``prompts`` by ``fx``'s model; per row the
    target features' max activation in the completion, re-encoded without steering, and each spec's strength:
    ``strength_abs`` (alpha, or the clamp value) and ``strength`` (``strengths``: the same in the feature's own
    units, see steer_dose.py; None where not given). Returns (rows, stats)."""
    from tqdm.auto import tqdm

    from .generators import TransformersGenerator

    cfg = cfg or SteerConfig()
    check_specs(specs, fx.sae)
    gen = TransformersGenerator.from_backbone(fx.backbone, cfg.batch_size)
    texts = [gen._render([{"role": "user", "content": p}]) if cfg.chat else p for p in prompts]
    special = not (cfg.chat and getattr(gen.tok, "chat_template", None))
    bar = tqdm(total=len(prompts) * (2 if plain else 1), disable=not progress, desc="steer", unit="seq")

    def run():
        outs = gen.generate_texts(texts, 1, cfg.temperature, cfg.max_new_tokens, cfg.seed, add_special_tokens=special,
                                  progress=bar)
        return [o[0] for o in outs]

    with steer(fx.backbone.model, fx.sae, fx.layer, specs, cfg.positions) as st:
        steered = run()
    unsteered = run() if plain else None
    bar.close()
    feats = [s.feature for s in specs]
    spec_text = describe(specs, cfg.positions)
    absolute = [float(s.alpha if s.clamp is None else s.clamp) for s in specs]  # type: ignore[arg-type]
    relative = list(strengths) if strengths is not None else [None] * len(specs)
    rows = [{"prompt": p, "completion": c, "steering": spec_text, "target_features": feats, "strength": relative,
             "strength_abs": absolute, "target_acts": a}
            for p, c, a in zip(prompts, steered, target_acts(fx, steered, feats))]
    if plain:
        for r, c, a in zip(rows, unsteered, target_acts(fx, unsteered, feats)):
            r["plain_completion"], r["plain_acts"] = c, a
    return rows, {"edited_positions": st.positions, "mean_edit_norm": st.mean_edit_norm}


def target_acts(fx, texts: list[str], feats: list[int]) -> list[list[float]]:
    """Max activation of each feature over each text's tokens (0 for an empty text), encoded without steering."""
    ok = [i for i, t in enumerate(texts) if t and t.strip()]
    out = [[0.0] * len(feats) for _ in texts]
    if ok:
        codes = fx.transform([texts[i] for i in ok])[:, feats].toarray()
        for row, i in zip(codes, ok):
            out[i] = [float(v) for v in row]
    return out
