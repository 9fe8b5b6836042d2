"""Provenance of a saved feature-level artefact (a classifier, a targets file).

Feature ids only mean something for the SAE they were found in, on the model and layer it reads. Every
JSON document safetyscope writes about features therefore records the model and SAE (ids and weight
fingerprints), the layer and the extraction settings; loading it rebuilds that extractor and refuses
another model or SAE. One place for the record, the checks and the JSON reading and writing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import SafetyScopeError, check_number
from .features import FeatureConfig, FeatureExtractor
from .sae import FINGERPRINT_PREFIX


def extractor_record(fx: FeatureExtractor, sae_id: str | None) -> dict:
    """The header every document carries: package version, model, SAE, layer, extraction settings."""
    from . import __version__

    return {"package_version": __version__,
            "model": {"id": fx.backbone.model_id, "fingerprint": fx.backbone.fingerprint()},
            "sae": {"id": sae_id or "default", "fingerprint": fx.sae.fingerprint(), "d_sae": fx.sae.cfg.d_sae,
                    "k": fx.sae.cfg.k, "activation": fx.sae.cfg.activation},
            "layer": fx.layer,
            "extraction": {"max_length": fx.max_length, "skip_first_token": fx.skip_first_token}}


def _same_weights(recorded: str, obj) -> tuple[bool, str]:
    """(match, the loaded object's fingerprint in the recorded scheme): ``sha256:`` fingerprints compare
    with the full hash, the 16-hex ones of older files with the legacy sampled hash."""
    loaded = obj.fingerprint() if recorded.startswith(FINGERPRINT_PREFIX) else obj.legacy_fingerprint()
    return recorded == loaded, loaded


def check_compatible(d: dict, fx: FeatureExtractor, path) -> None:
    m_ok, m_fp = _same_weights(d["model"]["fingerprint"], fx.backbone)
    s_ok, s_fp = _same_weights(d["sae"]["fingerprint"], fx.sae)
    if not m_ok:
        import torch

        if next(fx.backbone.model.parameters()).dtype == torch.float16:  # float16 rounds the weights differently
            raise SafetyScopeError(f"{path}: the model loaded in float16 (--dtype float16) does not match the one this "
                                   "file was made with: float16 rounds its weights differently from float32/bfloat16; "
                                   "use --dtype auto, float32 or bfloat16")
        raise SafetyScopeError(f"{path}: made with model {d['model']['id']} (fingerprint {d['model']['fingerprint']}) "
                               f"but {fx.backbone.model_id} (fingerprint {m_fp}) was loaded; its features mean nothing here")
    if not s_ok:
        raise SafetyScopeError(f"{path}: made with SAE {d['sae']['id']} (fingerprint {d['sae']['fingerprint']}) "
                               f"but a different SAE (fingerprint {s_fp}) was loaded; its feature ids mean nothing here")
    if d["layer"] != fx.layer:
        raise SafetyScopeError(f"{path}: made at layer {d['layer']}, not {fx.layer}")
    d_sae = d["sae"].get("d_sae")
    if isinstance(d_sae, int) and d_sae != fx.sae.cfg.d_sae:
        raise SafetyScopeError(f"{path}: key sae.d_sae is {d_sae} but the SAE it names has {fx.sae.cfg.d_sae} features")


def check_header(d: dict, path) -> None:
    """Missing or mistyped header keys as one-line errors naming the key (not a KeyError traceback)."""
    for part in ("model", "sae"):
        if not isinstance(d.get(part), dict):
            raise SafetyScopeError(f"{path}: key {part!r} must be an object; got {d.get(part)!r:.80}")
        for key in ("id", "fingerprint"):
            if not isinstance(d[part].get(key), str):
                raise SafetyScopeError(f"{path}: key {part}.{key} must be a string; got {d[part].get(key)!r:.80}")
    if not isinstance(d.get("layer"), int) or isinstance(d.get("layer"), bool) or d["layer"] < 0:
        raise SafetyScopeError(f"{path}: key 'layer' must be a non-negative integer; got {d.get('layer')!r:.80}")
    k = d["sae"].get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
        raise SafetyScopeError(f"{path}: key sae.k must be an integer; got {k!r:.80}")
    if k is not None and k < 1:
        raise SafetyScopeError(f"{path}: key sae.k must be >= 1; got {k!r}")
    d_sae = d["sae"].get("d_sae")
    if d_sae is not None and (not isinstance(d_sae, int) or isinstance(d_sae, bool) or d_sae < 1):
        raise SafetyScopeError(f"{path}: key sae.d_sae must be a positive integer; got {d_sae!r:.80}")
    if "extraction" in d and not isinstance(d["extraction"], dict):
        raise SafetyScopeError(f"{path}: key 'extraction' must be an object")
    ex = d.get("extraction", {})
    if "max_length" in ex:
        try:
            check_number("key extraction.max_length", ex["max_length"], low=1, integer=True)
        except SafetyScopeError as e:
            raise SafetyScopeError(f"{path}: {e}") from None
    # a string "false" is truthy: only a JSON boolean says whether position 0 is left out
    if "skip_first_token" in ex and not isinstance(ex["skip_first_token"], bool):
        raise SafetyScopeError(f"{path}: key extraction.skip_first_token must be true or false; got "
                               f"{ex['skip_first_token']!r:.80}")
    for key in ("discovery_data", "validation", "settings"):
        if key in d and not isinstance(d[key], dict):
            raise SafetyScopeError(f"{path}: key {key!r} must be an object; got {d[key]!r:.80}")
    per_lang = d.get("discovery_data", {}).get("per_lang")
    if per_lang is not None and not isinstance(per_lang, dict):
        raise SafetyScopeError(f"{path}: key discovery_data.per_lang must be an object; got {per_lang!r:.80}")
    langs = d.get("validation", {}).get("languages")
    if langs is not None and (not isinstance(langs, list) or not all(isinstance(x, str) for x in langs)):
        # "en" would be read as ['e', 'n'] and every row marked unvalidated
        raise SafetyScopeError(f"{path}: key validation.languages must be a list of language codes; got {langs!r:.80}")


def extractor_from_record(d: dict, path, *, model: str | None = None, sae: str | None = None,
                          device: str | None = None, dtype: str | None = FeatureConfig.dtype,
                          batch_size: int = FeatureConfig.batch_size, cache: bool = FeatureConfig.cache,
                          batch_tokens: int | None = FeatureConfig.batch_tokens, backbone=None) -> FeatureExtractor:
    """The extractor a document was made with. ``model``/``sae`` override where the recorded ones are found
    (e.g. a moved directory), but their weights must match the recorded fingerprints. ``backbone``: that model,
    already loaded (several documents of one model share it); checked against the record like a loaded one."""
    check_header(d, path)
    ex = d.get("extraction", {})
    fx = FeatureExtractor.from_config(FeatureConfig(
        model=model if model is not None else d["model"]["id"], sae=sae if sae is not None else d["sae"]["id"],
        layer=d["layer"], k=d["sae"].get("k"), batch_size=batch_size, batch_tokens=batch_tokens,
        max_length=ex.get("max_length", FeatureConfig.max_length),
        skip_first_token=ex.get("skip_first_token", False), device=device, dtype=dtype, cache=cache), backbone)
    check_compatible(d, fx, path)
    return fx


def read_document(path: str | Path, fmt: str, kind: str, hint: str = "") -> dict:
    """A JSON document whose ``format`` is ``fmt``; a clear error for anything else."""
    p = Path(path)
    if not p.is_file():
        raise SafetyScopeError(f"{p}: no such {kind} file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetyScopeError(f"{p}: not a {kind} file (invalid JSON: {e})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise SafetyScopeError(f"{p}: not a safetyscope {kind} file{hint}")
    return d


def write_document(doc: dict, path: str | Path) -> None:
    """Written beside ``path`` and renamed into place: a crash never leaves half a classifier or targets file."""
    from .outputs import output_errors, remove_temp, temp_path

    p = Path(path)
    text = json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    tmp = temp_path(p)
    with output_errors(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(text)
            os.replace(tmp, p)
        except BaseException:
            remove_temp(tmp)
            raise


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
