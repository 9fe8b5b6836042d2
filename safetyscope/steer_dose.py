"""Steering strengths in the feature's own units.

An absolute alpha is a length in residual units, and those differ per model, layer and feature (on the embedded
model one feature needed more than 32 to do anything and broke the text at 128). So ``steer`` reads a strength S
as a multiple of what the feature itself writes into the stream when it fires:

- ``--feature F:S`` adds ``S x a_F x |W_dec[:, F]|`` along the unit decoder direction u_F, i.e. S times the
  feature's decoder vector at its typical activation: 1.0 = the feature as strongly as it typically is when it
  fires, added at every edited position;
- ``--clamp F:S`` sets F's activation to ``S x a_F``.

``a_F``, the typical activation, is F's mean max-over-tokens activation over the reference texts on which it
fires (the same scale ``synthesize`` steers its targets by). The reference texts ship with the package
(``assets/steering-reference.txt``: everyday and toxic sentences, a few in other languages): they must exist offline
and without user data, and they are fixed so that one S means the same alpha for any prompts (the prompts
themselves would not do: the features one steers towards mostly do not fire on them, which is why one steers).
A feature that fires on no reference text gets the SAE's median typical activation instead, said on stderr.
The per-feature values are computed once per model, SAE, layer and encoding settings and cached on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .backbone import cache_dir
from .errors import SafetyScopeError
from .steering import SteerSpec

REFERENCE_FILE = "steering-reference.txt"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def reference_texts() -> list[str]:
    text = resources.files("safetyscope").joinpath("assets", REFERENCE_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class Dose:
    """One ``--feature``/``--clamp`` value as typed: ``value`` is relative (x the feature's typical activation)
    unless ``absolute``; None only for a feature named without a strength (``--calibrate``)."""

    feature: int
    value: float | None
    kind: str = "add"  # add | clamp
    absolute: bool = False

    @classmethod
    def parse(cls, text: str, *, kind: str = "add", absolute: bool = False, value_required: bool = True) -> "Dose":
        m = re.fullmatch(rf"\s*(\d+)\s*(?:[:=]\s*({_NUMBER}))?\s*", str(text))
        if not m or (value_required and m.group(2) is None):
            unit = "VALUE" if kind == "clamp" else "STRENGTH"
            raise SafetyScopeError(f"--{'clamp' if kind == 'clamp' else 'feature'}: bad steering spec {text!r}: use "
                                   f"FEATURE:{unit}, e.g. 161:{'0' if kind == 'clamp' else '2'}")
        return cls(int(m.group(1)), None if m.group(2) is None else float(m.group(2)), kind, absolute)


@dataclass(frozen=True)
class FeatureScale:
    feature: int
    typical: float  # a_F: mean max-activation where it fires on the reference texts
    decoder_norm: float  # |W_dec[:, F]|
    n_fired: int  # reference texts on which it fires
    source: str  # "reference" or "sae_median" (fired on none)

    def unit(self, kind: str) -> float:
        """What 1.0 is: a residual length for add, an activation for clamp."""
        return self.typical * self.decoder_norm if kind == "add" else self.typical


class Scales:
    """Every feature's typical activation on the reference texts (one pass computes them all)."""

    def __init__(self, typical: np.ndarray, fired: np.ndarray, decoder_norms: np.ndarray):
        self.typical, self.fired, self.decoder_norms = typical, fired, decoder_norms
        seen = typical[fired > 0]
        self.median = float(np.median(seen)) if seen.size else 1.0

    def __getitem__(self, f: int) -> FeatureScale:
        if self.fired[f] > 0:
            return FeatureScale(f, float(self.typical[f]), float(self.decoder_norms[f]), int(self.fired[f]), "reference")
        return FeatureScale(f, self.median, float(self.decoder_norms[f]), 0, "sae_median")


def _cache_file(fx) -> os.PathLike | None:
    if getattr(fx, "_cache", None) is None:  # --no-cache: neither reuse nor store
        return None
    digest = hashlib.sha256("\n".join(reference_texts()).encode()).hexdigest()[:16]
    key = hashlib.sha256(f"{fx.cache_key()}|{digest}|v1".encode()).hexdigest()[:24]
    return cache_dir() / "steer-scales" / f"{key}.npz"


def feature_scales(fx) -> Scales:
    """Typical activations of every feature of ``fx``'s SAE, from the disk cache when there."""
    norms = fx.sae.W_dec.detach().float().norm(dim=0).cpu().numpy()
    path = _cache_file(fx)
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as z:
                return Scales(z["typical"], z["fired"], norms)
        except (OSError, KeyError, ValueError):
            pass  # absent or unreadable: compute again
    codes = fx.transform(reference_texts()).tocsc()
    fired = np.diff(codes.indptr).astype(np.int64)  # nonzeros per column = texts where the feature fires
    sums = np.asarray(codes.sum(axis=0)).ravel()
    typical = np.where(fired > 0, sums / np.maximum(fired, 1), 0.0).astype(np.float32)
    if path is not None:
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        try:  # tmp + rename: a concurrent reader never sees half a file; a failed write only costs a recompute
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(tmp, typical=typical, fired=fired)
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    return Scales(typical, fired, norms)


@dataclass(frozen=True)
class Resolved:
    spec: SteerSpec  # absolute, what the hook applies
    strength: float  # x the feature's typical activation
    strength_abs: float  # residual length (add) or activation (clamp)
    scale: FeatureScale | None  # None where no unit was needed (an absolute 0 clamp)


def resolve(doses: list[Dose], scales: Scales | None) -> list[Resolved]:
    """Absolute SteerSpecs and both numbers of each dose. A feature with no reference firing is said once."""
    if scales is not None:
        bad = [d.feature for d in doses if not 0 <= d.feature < len(scales.typical)]
        if bad:
            raise SafetyScopeError(f"unknown feature id(s) {bad}: the SAE has features 0..{len(scales.typical) - 1}")
    out = []
    for d in doses:
        if d.value is None:
            raise SafetyScopeError(f"feature {d.feature} has no strength: use --feature {d.feature}:STRENGTH")
        sc = scales[d.feature] if scales is not None else None
        unit = sc.unit(d.kind) if sc is not None else None
        if d.absolute:
            rel = d.value / unit if unit else float("nan")
            ab = d.value
        else:
            if not unit:
                raise SafetyScopeError(f"feature {d.feature}: no typical activation to scale by; pass --abs")
            rel, ab = d.value, d.value * unit
        spec = SteerSpec(d.feature, clamp=ab) if d.kind == "clamp" else SteerSpec(d.feature, alpha=ab)
        out.append(Resolved(spec, rel, ab, sc))
    unseen = sorted({r.spec.feature for r in out if r.scale is not None and r.scale.source == "sae_median"})
    if unseen:
        print(f"warning: feature(s) {unseen} fire on none of the {len(reference_texts())} reference texts; their "
              f"strength unit is the SAE's median typical activation ({scales.median if scales else 0:.3g})",
              file=sys.stderr, flush=True)
    return out
