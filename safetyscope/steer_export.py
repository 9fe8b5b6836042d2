"""Steering vectors for serving engines: the additive edit of ``steer --feature``, as a file an engine loads.

The vector is ``v = sum_i alpha_i x u_i``: each feature's unit decoder column ``u_i = W_dec[:, F_i] / |W_dec[:, F_i]|``
times its absolute strength ``alpha_i`` (what ``steer`` adds, positions "all"), so an engine that adds ``v`` to the
output of decoder layer n at every position does what ``steer`` does with the same flags. A clamp reads the
feature's activation per token, which no engine does: clamps are not exported.

Layer numbering (checked against both engines' sources; tests/test_steer_export.py replays each engine's rule):

- our SAE of layer n reads the output of decoder block n (0-based, ``model.model.layers[n]``);
- hotwire-vllm (the vLLM plugin that steers per request with CUDA graphs on) loads each ``.pt`` of
  ``$HOTWIRE_VECTORS`` as a ``(n_layers, hidden)`` tensor named by its file stem, and a request
  ``{"id": STEM, "layer": L, "scale": S}`` adds ``S x tensor[L]`` to the hidden states leaving decoder layer L
  (its ``layers.L`` module, 0-based): so row n holds v and the request says ``"layer": n``;
- llama.cpp's loader puts GGUF tensor ``direction.k`` at ``tensors[k]``, and ``build_cvec(cur, il)`` adds
  ``tensors[il]`` to ``l_out`` of block ``il`` (0-based) right after its last residual add; ``direction.0`` is
  refused ("there's never a tensor for layer 0"). So v is ``direction.n``, the same number, and layer 0 cannot be
  exported to llama.cpp. ``--control-vector-layer-range n n`` keeps it to that layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import SafetyScopeError
from .steering import SteerSpec, _unit


def steering_vector(sae, specs: list[SteerSpec]) -> torch.Tensor:
    """``sum alpha_i x u_i`` (float32, d_model) of additive specs."""
    if not specs or any(s.clamp is not None or s.alpha is None for s in specs):
        raise SafetyScopeError("only --feature F:STRENGTH edits can be exported: a clamp reads the feature's activation "
                               "at every token, and serving engines add a fixed vector")
    return sum((float(s.alpha or 0.0) * _unit(sae, s.feature) for s in specs), torch.zeros(sae.cfg.d_model))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_hotwire(path: str | os.PathLike, vector: torch.Tensor, layer: int, n_layers: int) -> dict:
    """A ``(n_layers, hidden)`` float32 tensor, zero but for row ``layer``; returns the request to send."""
    path = Path(path)
    if not 0 <= layer < n_layers:
        raise SafetyScopeError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    table = torch.zeros(n_layers, vector.numel(), dtype=torch.float32)
    table[layer] = vector.float()
    _atomic(path, lambda tmp: torch.save(table, tmp))
    return {"id": path.stem, "layer": layer, "scale": 1.0}


def write_control_vector(path: str | os.PathLike, vector: torch.Tensor, layer: int, model_hint: str,
                         metadata: dict[str, str] | None = None) -> None:
    """A llama.cpp control vector: arch ``controlvector``, one F32 tensor ``direction.{layer}``."""
    import gguf

    if layer < 1:
        raise SafetyScopeError(f"llama.cpp cannot steer the output of block {layer}: its control vectors start at "
                               "block 1 (direction.0 is refused); use an SAE of a later layer")
    path = Path(path)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", model_hint)
        w.add_uint32("controlvector.layer_count", 1)  # number of direction tensors, as llama.cpp's generator writes
        for k, v in (metadata or {}).items():
            w.add_string(f"safetyscope.{k}", v)
        w.add_tensor(f"direction.{layer}", vector.detach().float().cpu().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic(path, write)


def read_control_vector(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """{block index: vector} of a control-vector GGUF, read the way llama.cpp reads it (tests, and a user's check)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        name, _, idx = t.name.partition(".")
        if name != "direction" or not idx.isdigit() or int(idx) == 0:
            raise SafetyScopeError(f"{path}: tensor {t.name!r} is not direction.N with N >= 1")
        out[int(idx)] = torch.from_numpy(t.data.copy()).float()
    return out


def read_hotwire(path: str | os.PathLike) -> torch.Tensor:
    """The ``(n_layers, hidden)`` table, loaded as the plugin loads it (no pickle code runs)."""
    t = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(t, dict):
        t = next(v for v in t.values() if isinstance(v, torch.Tensor))
    return t
