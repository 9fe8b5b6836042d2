"""`steer export`: the hotwire-vllm `.pt` and the llama.cpp control-vector GGUF, read back and replayed the way
each engine applies them (layer numbering included) against `steer` itself, on the tiny random model."""

from __future__ import annotations

import gguf
import pytest
import torch
from conftest import D_MODEL, N_LAYERS, SAE_LAYERS, run_cli

from safetyscope.backbone import decoder_layers
from safetyscope.errors import SafetyScopeError
from safetyscope.steer_export import read_control_vector, read_hotwire, write_control_vector
from safetyscope.steering import SteerSpec, steer

LAYER = SAE_LAYERS[0]
F1, F2 = 3, 17


def _unit(sae, f):
    return sae.W_dec[:, f] / sae.W_dec[:, f].norm()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _add_at_block(model, block: int, vec: torch.Tensor):
    """What both engines do: add ``vec`` to the hidden states leaving decoder block ``block`` (0-based)."""
    def hook(_m, _a, out):
        return (out[0] + vec, *out[1:]) if isinstance(out, tuple) else out + vec
    return decoder_layers(model)[block].register_forward_hook(hook)


def test_exports_read_back_as_decoder_columns_times_strengths(tmp_path, tiny_sae, tiny_backbone, model_args):
    a1, a2 = 2.5, -1.25
    want = a1 * _unit(tiny_sae, F1) + a2 * _unit(tiny_sae, F2)  # unit-norm decoder columns x absolute strengths
    pt, gg = tmp_path / "tox.pt", tmp_path / "tox.gguf"
    args = ["--feature", f"{F1}:{a1}", "--feature", f"{F2}:{a2}", "--abs", *model_args]
    res = run_cli(["steer", "export", "-o", pt, *args])
    assert '"id": "tox", "layer": 1, "scale": 1.0' in res.output
    table = read_hotwire(pt)
    assert table.shape == (N_LAYERS, D_MODEL) and table.dtype == torch.float32
    assert torch.allclose(table[LAYER], want, atol=1e-6)
    assert not table[[n for n in range(N_LAYERS) if n != LAYER]].any()  # only the SAE's layer is steered
    res = run_cli(["steer", "export", "-o", gg, *args])
    assert f"--control-vector-layer-range {LAYER} {LAYER}" in res.output
    dirs = read_control_vector(gg)
    assert list(dirs) == [LAYER] and torch.allclose(dirs[LAYER], want, atol=1e-6)  # direction.1 = output of block 1
    r = gguf.GGUFReader(str(gg))
    text = lambda k: bytes(r.fields[k].parts[-1]).decode()  # noqa: E731
    assert text("general.architecture") == "controlvector" and text("controlvector.model_hint") == "qwen3"
    assert int(r.fields["controlvector.layer_count"].parts[-1][0]) == 1
    assert [t.name for t in r.tensors] == [f"direction.{LAYER}"] and r.tensors[0].data.dtype.name == "float32"
    # relative strengths: S x the feature's typical activation x its decoder norm, as `steer` resolves them
    from safetyscope.features import FeatureExtractor
    from safetyscope.steer_dose import feature_scales

    sc = feature_scales(FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=False))[F1]
    run_cli(["steer", "export", "-o", tmp_path / "rel.pt", "--feature", f"{F1}:2", *model_args])
    assert torch.allclose(read_hotwire(tmp_path / "rel.pt")[LAYER], 2 * sc.unit("add") * _unit(tiny_sae, F1), rtol=1e-5)


def test_each_engines_layer_rule_reproduces_steer(tmp_path, tiny_sae, full_model, tiny_model_dir, model_args):
    """hotwire: request {"layer": L} adds scale x table[L] after decoder layer L. llama.cpp: direction.k lands in
    tensors[k] (common_control_vector_load_one: data offset n_embd*(k-1); llama_adapter_cvec::apply: tensors[il]
    from offset n_embd*(il-1)) and build_cvec(cur, il) adds tensors[il] to l_out of block il. Both must equal
    `steer` at the SAE's layer; one block off must not."""
    specs = [SteerSpec(F1, alpha=3.0), SteerSpec(F2, alpha=-2.0)]
    ids = torch.tensor([[2, 5, 9, 11, 4, 7]])
    with steer(full_model, tiny_sae, LAYER, specs):
        ref = _logits(full_model, ids)
    plain = _logits(full_model, ids)
    pt, gg = tmp_path / "v.pt", tmp_path / "v.gguf"
    args = ["--feature", f"{F1}:3", "--feature", f"{F2}:-2", "--abs", *model_args]
    run_cli(["steer", "export", "-o", pt, *args])
    run_cli(["steer", "export", "-o", gg, *args])
    request = {"id": "v", "layer": LAYER, "scale": 1.0}
    table = read_hotwire(pt)
    h = _add_at_block(full_model, request["layer"], request["scale"] * table[request["layer"]])
    try:
        assert torch.allclose(_logits(full_model, ids), ref, atol=1e-5)
    finally:
        h.remove()
    data = torch.zeros((max(read_control_vector(gg)) * D_MODEL,))  # llama.cpp's buffer: layer 1 at offset 0
    for k, v in read_control_vector(gg).items():
        data[D_MODEL * (k - 1): D_MODEL * k] += v
    tensors = {il: data[D_MODEL * (il - 1): D_MODEL * il] for il in range(1, N_LAYERS) if D_MODEL * il <= data.numel()}
    hooks = [_add_at_block(full_model, il, t) for il, t in tensors.items()]
    try:
        assert torch.allclose(_logits(full_model, ids), ref, atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
    h = _add_at_block(full_model, LAYER - 1, table[LAYER])  # the off-by-one a wrong mapping would make
    try:
        wrong = _logits(full_model, ids)
    finally:
        h.remove()
    assert not torch.allclose(wrong, ref, atol=1e-3) and not torch.allclose(plain, ref, atol=1e-3)


def test_export_refusals(tmp_path, tiny_sae, model_args):
    cases = [
        (["--clamp", f"{F1}:0", "-o", tmp_path / "c.pt"], "--feature F:S edits only"),
        (["--feature", f"{F1}:1", "-o", tmp_path / "x.safetensors"], "-o FILE.pt"),
        (["--feature", f"{F1}:1", "--positions", "generated", "-o", tmp_path / "g.pt"], "every position"),
        (["-o", tmp_path / "n.pt"], "nothing to export"),
    ]
    for extra, msg in cases:
        res = run_cli(["steer", "export", *extra, *model_args], ok=False)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (extra, res.output)
    with pytest.raises(SafetyScopeError, match="direction.0 is refused"):
        write_control_vector(tmp_path / "l0.gguf", torch.ones(D_MODEL), 0, "qwen3")
    assert not (tmp_path / "l0.gguf").exists()
    (tmp_path / "keep.pt").write_bytes(b"user file")
    res = run_cli(["steer", "export", "--feature", f"{F1}:1", "-o", tmp_path / "keep.pt", *model_args], ok=False)
    assert res.exit_code == 2 and "already exists" in res.output and (tmp_path / "keep.pt").read_bytes() == b"user file"
