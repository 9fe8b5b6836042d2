"""The SAE formula, the four on-disk formats and the loader's error paths."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from conftest import D_MODEL, D_SAE, SAE_K, count_hashes, edit_last_value_in_place, random_sae_tensors
from safetensors.torch import save_file

from safetyscope import SAE, FeatureExtractor, SAEConfig, SafetyScopeError, load_sae
from safetyscope.sae import load_qwen_scope_file


def _x(n=32, d=D_MODEL, seed=7):
    # the scale of the tiny model's residual stream (norm ~0.5): pre-activations of order 1
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.06


def _topk_by_hand(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row, zero the rest, then ReLU (a loop, no topk call)."""
    out = torch.zeros_like(pre)
    for r in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -pre[r, j].item())[:k]
        for j in order:
            out[r, j] = max(pre[r, j].item(), 0.0)
    return out


def _sae(activation="topk", k=SAE_K, seed=0, threshold=None):
    t = random_sae_tensors(seed=seed)
    cfg = SAEConfig(d_model=D_MODEL, d_sae=D_SAE, activation=activation, k=k if activation == "topk" else None)
    return SAE.from_tensors(cfg, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], threshold), t


# -- formula -------------------------------------------------------------------------------------

def test_topk_encode_matches_formula():
    sae, t = _sae()
    x = _x()
    pre = x @ t["W_enc"].T + t["b_enc"]
    expected = _topk_by_hand(pre, SAE_K)
    got = sae.encode(x)
    assert got.shape == (32, D_SAE)
    assert torch.allclose(got, expected, atol=1e-5)
    assert ((got > 0).sum(1) <= SAE_K).all()
    assert ((got > 0).sum(1) > 0).all()  # the test means something: codes are not empty
    vals, idx = sae.encode_sparse(x)
    assert vals.shape == idx.shape == (32, SAE_K)
    dense = torch.zeros(32, D_SAE).scatter_(1, idx, vals)
    assert torch.equal(dense, got)


def test_topk_fewer_positive_than_k():
    sae, t = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
        sae.b_enc[:3] = 1e4  # only 3 features can be positive
    got = sae.encode(_x())
    assert ((got > 0).sum(1) == 3).all()
    assert (got >= 0).all()


def test_jumprelu_encode_matches_formula():
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 2.0
    sae, t = _sae("jumprelu", threshold=threshold)
    x = _x()
    pre = x @ t["W_enc"].T + t["b_enc"]
    expected = torch.where(pre > threshold, pre, torch.zeros_like(pre))
    got = sae.encode(x)
    assert torch.allclose(got, expected, atol=1e-5)
    # a feature above zero but below its threshold stays off
    assert ((pre > 0) & (pre <= threshold)).any()
    assert (got[(pre > 0) & (pre <= threshold)] == 0).all()


def test_relu_encode_matches_formula():
    sae, t = _sae("relu")
    x = _x()
    expected = (x @ t["W_enc"].T + t["b_enc"]).clamp(min=0)
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)


def test_decode_matches_formula():
    sae, t = _sae()
    z = torch.rand(5, D_SAE, generator=torch.Generator().manual_seed(4))
    expected = z @ t["W_dec"].T + t["b_dec"]
    assert torch.allclose(sae.decode(z), expected, atol=1e-5)
    x = _x(5)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-6)


def test_unknown_activation_and_bad_k():
    with pytest.raises(SafetyScopeError, match="unknown SAE activation"):
        SAEConfig(d_model=4, d_sae=8, activation="gelu")
    with pytest.raises(SafetyScopeError, match="k <= d_sae=8"):
        SAEConfig(d_model=4, d_sae=8, activation="topk", k=9)


def test_from_tensors_checks_shapes():
    t = random_sae_tensors()
    cfg = SAEConfig(d_model=D_MODEL, d_sae=D_SAE, k=SAE_K)
    with pytest.raises(SafetyScopeError, match=r"W_dec has shape \(256, 64\), expected \(64, 256\)"):
        SAE.from_tensors(cfg, t["W_enc"], t["b_enc"], t["W_dec"].T, t["b_dec"])


# -- the four formats hold the same SAE ------------------------------------------------------------

def _write_qwen_scope(root, t):
    d = root / f"SAE-Res-Tiny-W{D_SAE}-L0_{SAE_K}"
    d.mkdir()
    torch.save({k: v.clone() for k, v in t.items()}, d / "layer2.sae.pt")
    return d


def _write_saelens(root, t):
    d = root / "saelens-blocks.2"
    d.mkdir()
    # SAELens encodes (x - b_dec) @ W_enc + b_enc: pick its b_enc so the SAE is the same function
    b_enc = t["b_enc"] + t["W_enc"] @ t["b_dec"]
    save_file({"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"].T.contiguous(), "b_enc": b_enc,
               "b_dec": t["b_dec"].clone()}, d / "sae_weights.safetensors")
    (d / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": D_SAE, "architecture": "topk", "k": SAE_K,
                                            "apply_b_dec_to_input": True, "hook_name": "blocks.2.hook_resid_post",
                                            "model_name": "tiny"}))
    return d, b_enc


def _write_sparsify(root, t):
    d = root / "sparsify-ckpt" / "layers.2"
    d.mkdir(parents=True)
    b_enc = t["b_enc"] + t["W_enc"] @ t["b_dec"]  # sparsify encodes x - b_dec too
    save_file({"encoder.weight": t["W_enc"].clone(), "encoder.bias": b_enc, "W_dec": t["W_dec"].T.contiguous(),
               "b_dec": t["b_dec"].clone()}, d / "sae.safetensors")
    (d / "cfg.json").write_text(json.dumps({"k": SAE_K, "num_latents": D_SAE, "d_in": D_MODEL, "expansion_factor": 4}))
    return d, b_enc


def _write_own(root, t):
    cfg = SAEConfig(d_model=D_MODEL, d_sae=D_SAE, activation="topk", k=SAE_K, model="tiny", layer=2)
    return SAE.from_tensors(cfg, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]).save_pretrained(root / "own")


def test_four_formats_give_the_same_codes(tmp_path):
    t = random_sae_tensors(seed=11)
    x = _x(64, seed=12)
    expected = _topk_by_hand(x @ t["W_enc"].T + t["b_enc"], SAE_K)

    qdir = _write_qwen_scope(tmp_path, t)
    sl_dir, sl_b_enc = _write_saelens(tmp_path, t)
    sp_dir, sp_b_enc = _write_sparsify(tmp_path, t)
    own_dir = _write_own(tmp_path, t)

    # each format's own formula on its own stored tensors is the same function
    sl_native = _topk_by_hand((x - t["b_dec"]) @ t["W_enc"].T + sl_b_enc, SAE_K)
    sp_native = _topk_by_hand(((x - t["b_dec"]) @ t["W_enc"].T + sp_b_enc).relu(), SAE_K)
    assert torch.allclose(sl_native, expected, atol=1e-5)
    assert torch.allclose(sp_native, expected, atol=1e-5)

    loaded = {
        "qwen-scope": load_sae(qdir, layer=2),
        "qwen-scope-file": load_sae(qdir / "layer2.sae.pt"),
        "saelens": load_sae(sl_dir),
        "sparsify": load_sae(sp_dir),
        "sparsify-parent": load_sae(tmp_path / "sparsify-ckpt", layer=2),
        "own": load_sae(own_dir),
    }
    for name, sae in loaded.items():
        assert sae.cfg.activation == "topk", name
        assert sae.cfg.k == SAE_K, name
        assert (sae.cfg.d_model, sae.cfg.d_sae) == (D_MODEL, D_SAE), name
        assert sae.cfg.layer == 2, name
        assert torch.allclose(sae.encode(x), expected, atol=1e-5), name
        z = expected[:4]
        assert torch.allclose(sae.decode(z), z @ t["W_dec"].T + t["b_dec"], atol=1e-5), name
    assert loaded["saelens"].cfg.model == "tiny"
    assert loaded["own"].cfg.model == "tiny"


def test_own_format_roundtrip_jumprelu(tmp_path):
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(5))
    sae, _ = _sae("jumprelu", threshold=threshold)
    sae.cfg.extra = {"fvu": 0.1}
    back = load_sae(sae.save_pretrained(tmp_path / "j"))
    assert back.cfg.activation == "jumprelu" and back.cfg.extra == {"fvu": 0.1}
    assert torch.equal(back.threshold, threshold)
    x = _x()
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-6)
    assert back.fingerprint() == sae.fingerprint()


def test_saelens_jumprelu_and_standard(tmp_path):
    t = random_sae_tensors(seed=21)
    x = _x(seed=22)
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(23))
    pre = (x - t["b_dec"]) @ t["W_enc"].T + t["b_enc"]  # SAELens default: b_dec applied to the input
    for arch, extra, expected in [
        ("jumprelu", {"threshold": threshold}, torch.where(pre > threshold, pre, torch.zeros_like(pre))),
        ("standard", {}, pre.relu()),
    ]:
        d = tmp_path / arch
        d.mkdir()
        save_file({"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"].T.contiguous(), "b_enc": t["b_enc"],
                   "b_dec": t["b_dec"], **extra}, d / "sae_weights.safetensors")
        (d / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": D_SAE, "architecture": arch}))
        sae = load_sae(d)
        assert sae.cfg.activation == {"jumprelu": "jumprelu", "standard": "relu"}[arch]
        assert torch.allclose(sae.encode(x), expected, atol=1e-5), arch


# -- k -------------------------------------------------------------------------------------------

def test_k_from_dir_name_and_override(qwen_scope_sae_dir):
    sae = load_sae(qwen_scope_sae_dir, layer=1)
    assert sae.cfg.k == SAE_K == 8
    assert sae.cfg.layer == 1
    small = load_sae(qwen_scope_sae_dir, layer=1, k=3)
    assert small.cfg.k == 3
    x = _x()
    full, few = sae.encode(x), small.encode(x)
    assert ((few > 0).sum(1) <= 3).all() and ((full > 0).sum(1) > 3).any()
    # the 3 kept are the 3 largest of the k=8 code
    assert torch.allclose(few, _topk_by_hand(full, 3), atol=1e-6)
    assert small.fingerprint() != sae.fingerprint()


def test_k_override_on_other_formats(tmp_path):
    own = _write_own(tmp_path, random_sae_tensors(seed=31))
    assert load_sae(own, k=2).cfg.k == 2
    with pytest.raises(SafetyScopeError, match="k <= d_sae"):
        load_sae(own, k=D_SAE + 1)


def test_missing_k_is_a_clear_error(tmp_path):
    d = tmp_path / "SAE-Res-Tiny-W256"  # no L0_<k> suffix
    d.mkdir()
    torch.save(random_sae_tensors(), d / "layer1.sae.pt")
    with pytest.raises(SafetyScopeError, match=r"needs 0 < k.*--k"):
        load_sae(d, layer=1)
    assert load_sae(d, layer=1, k=5).cfg.k == 5


# -- errors --------------------------------------------------------------------------------------

def test_wrong_width_names_both_sizes(tiny_backbone):
    t = random_sae_tensors(d_model=32, d_sae=128)
    sae = SAE.from_tensors(SAEConfig(d_model=32, d_sae=128, k=4), t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"])
    with pytest.raises(SafetyScopeError, match=r"d_model=32.*hidden size 64"):
        FeatureExtractor(tiny_backbone, sae, 1, cache=False)


def test_corrupt_pt_file(tmp_path):
    d = tmp_path / "SAE-L0_8"
    d.mkdir()
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    (d / "layer1.sae.pt").write_bytes(bytes(noise.tolist()))
    with pytest.raises(SafetyScopeError, match="not a readable torch file") as e:
        load_sae(d, layer=1)
    assert "refused" not in str(e.value)
    # a truncated real checkpoint
    good = tmp_path / "good.pt"
    torch.save(random_sae_tensors(), good)
    (d / "layer2.sae.pt").write_bytes(good.read_bytes()[:500])
    with pytest.raises(SafetyScopeError, match="not a readable torch file"):
        load_sae(d, layer=2)


class _Payload:
    """Unpickling this calls open(marker, 'w'): code execution, harmless but observable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "SAE-L0_8"
    d.mkdir()
    t = random_sae_tensors()
    t["b_dec"] = _Payload(marker)
    torch.save(t, d / "layer1.sae.pt")
    assert not marker.exists()
    with pytest.raises(SafetyScopeError, match="refused") as e:
        load_sae(d, layer=1)
    assert "open" in str(e.value)
    assert not marker.exists(), "the pickled payload ran"
    # the payload is live: an unsafe load would have run it
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()


def test_missing_keys(tmp_path):
    d = tmp_path / "SAE-L0_8"
    d.mkdir()
    t = random_sae_tensors()
    del t["b_dec"]
    torch.save(t, d / "layer1.sae.pt")
    with pytest.raises(SafetyScopeError, match=r"needs keys \['W_dec', 'W_enc', 'b_dec', 'b_enc'\]; found \['W_dec', 'W_enc', 'b_enc'\]"):
        load_sae(d, layer=1)
    torch.save(torch.zeros(3), d / "layer2.sae.pt")
    with pytest.raises(SafetyScopeError, match="found Tensor"):
        load_qwen_scope_file(d / "layer2.sae.pt")


def test_loader_path_errors(tmp_path, qwen_scope_sae_dir):
    with pytest.raises(SafetyScopeError, match="pass --layer"):
        load_sae(qwen_scope_sae_dir)
    with pytest.raises(SafetyScopeError, match=r"no layer2\.sae\.pt"):
        load_sae(qwen_scope_sae_dir, layer=2)
    with pytest.raises(SafetyScopeError, match="no such SAE"):
        load_sae(tmp_path / "nothing" / "here.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafetyScopeError, match="no SAE found"):
        load_sae(tmp_path / "empty")
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(SafetyScopeError, match="must be a Qwen-Scope .pt"):
        load_sae(tmp_path / "w.safetensors")


# -- formats: every option that changes the encode is implemented exactly or refused ---------------
# Expected codes below follow each library's own encode (SAELens 6 SAE.encode / JumpReLUSAE.encode /
# TopKSAE.encode, sparsify 1.x SparseCoder.encode), written out by hand: the libraries are not installed here.

def _saelens_dir(root, name, t, cfg, extra=None):
    d = root / name
    d.mkdir()
    save_file({"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"].T.contiguous(), "b_enc": t["b_enc"].clone(),
               "b_dec": t["b_dec"].clone(), **(extra or {})}, d / "sae_weights.safetensors")
    (d / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": D_SAE, **cfg}))
    return d


def test_saelens_pre6_topk_config_is_topk(tmp_path):
    t = random_sae_tensors(seed=31)
    x = _x(seed=32)
    d = _saelens_dir(tmp_path, "old-topk", t, {"architecture": "standard", "activation_fn_str": "topk",
                                               "activation_fn_kwargs": {"k": SAE_K}, "apply_b_dec_to_input": True,
                                               "hook_name": "blocks.3.hook_resid_post"})
    sae = load_sae(d)
    assert (sae.cfg.activation, sae.cfg.k, sae.cfg.layer) == ("topk", SAE_K, 3)
    expected = _topk_by_hand((x - t["b_dec"]) @ t["W_enc"].T + t["b_enc"], SAE_K)
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)
    assert int((sae.encode(x) > 0).sum(-1).max()) <= SAE_K  # read as ReLU before: ~half of 256 features fired


@pytest.mark.parametrize("cfg, option", [
    ({"architecture": "topk", "k": SAE_K, "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    ({"architecture": "standard", "normalize_activations": "constant_norm_rescale"}, "normalize_activations='constant_norm_rescale'"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ({"architecture": "standard", "activation_fn_str": "tanh-relu"}, "activation_fn_str='tanh-relu'"),
    ({"architecture": "gated"}, "architecture 'gated'"),
    ({"architecture": "standard", "hook_name": "blocks.2.hook_mlp_out"}, "hook_name='blocks.2.hook_mlp_out'"),
    ({"architecture": "standard", "hook_name": "blocks.0.hook_resid_pre"}, "embeddings"),
])
def test_saelens_unsupported_options_are_refused(tmp_path, cfg, option):
    d = _saelens_dir(tmp_path, "x", random_sae_tensors(seed=33), cfg)
    with pytest.raises(SafetyScopeError, match=re.escape(option)) as e:
        load_sae(d)
    assert "\n" not in str(e.value)


def test_saelens6_metadata_and_resid_pre_layer(tmp_path):
    t = random_sae_tensors(seed=34)
    d = _saelens_dir(tmp_path, "v6", t, {"architecture": "topk", "k": SAE_K, "normalize_activations": "none",
                                         "metadata": {"hook_name": "blocks.5.hook_resid_pre", "model_name": "tiny"}})
    sae = load_sae(d)
    assert sae.cfg.layer == 4  # input of block 5 = output of decoder layer 4
    assert sae.cfg.model == "tiny"


def test_jumprelu_negative_threshold_relus_first(tmp_path):
    t = random_sae_tensors(seed=35)
    x = _x(seed=36)
    threshold = torch.full((D_SAE,), -0.5)
    d = _saelens_dir(tmp_path, "jr", t, {"architecture": "jumprelu"}, {"threshold": threshold})
    pre = (x - t["b_dec"]) @ t["W_enc"].T + t["b_enc"]
    assert bool(((pre < 0) & (pre > threshold)).any())  # the case that differs
    expected = pre.relu() * (pre > threshold)  # SAELens JumpReLUSAE.encode
    code = load_sae(d).encode(x)
    assert torch.allclose(code, expected, atol=1e-5)
    assert bool((code >= 0).all())


def _sparsify_dir(root, t, cfg, extra=None):
    d = root / "ckpt" / "layers.2"
    d.mkdir(parents=True)
    save_file({"encoder.weight": t["W_enc"].clone(), "encoder.bias": t["b_enc"].clone(),
               "W_dec": t["W_dec"].T.contiguous(), "b_dec": t["b_dec"].clone(), **(extra or {})}, d / "sae.safetensors")
    (d / "cfg.json").write_text(json.dumps({"k": SAE_K, "num_latents": D_SAE, **cfg}))
    return d


def test_sparsify_transcoder_does_not_subtract_b_dec(tmp_path):
    t = random_sae_tensors(seed=37)
    x = _x(seed=38)
    d = _sparsify_dir(tmp_path, t, {"transcode": True})
    expected = _topk_by_hand((x @ t["W_enc"].T + t["b_enc"]).relu(), SAE_K)  # sparsify: relu(encoder(x)), top-k
    assert torch.allclose(load_sae(d).encode(x), expected, atol=1e-5)
    autoenc = _sparsify_dir(tmp_path / "ae", t, {"transcode": False})
    assert not torch.allclose(load_sae(autoenc).encode(x), expected, atol=1e-5)


@pytest.mark.parametrize("cfg, extra, option", [
    ({"activation": "groupmax"}, None, "activation='groupmax'"),
    ({"skip_connection": True}, {"W_skip": torch.zeros(D_MODEL, D_MODEL)}, "skip_connection"),
])
def test_sparsify_unsupported_options_are_refused(tmp_path, cfg, extra, option):
    d = _sparsify_dir(tmp_path, random_sae_tensors(seed=39), cfg, extra)
    with pytest.raises(SafetyScopeError, match=re.escape(option)):
        load_sae(d)


def test_sparsify_checkpoint_without_layer_says_so(tmp_path):
    _sparsify_dir(tmp_path, random_sae_tensors(seed=40), {})
    with pytest.raises(SafetyScopeError, match=r"sparsify checkpoint.*pass --layer"):
        load_sae(tmp_path / "ckpt")


# -- malformed weights and configs -------------------------------------------------------------------

@pytest.mark.parametrize("name, bad", [("W_enc", float("nan")), ("b_enc", float("inf")), ("W_dec", float("-inf")),
                                       ("b_dec", float("nan")), ("threshold", float("nan"))])
def test_non_finite_tensors_are_refused(tmp_path, name, bad):
    t = random_sae_tensors(seed=41)
    extra = {"threshold": torch.rand(D_SAE)}
    target = extra if name == "threshold" else t
    target[name] = target[name].clone()
    target[name].view(-1)[300 % target[name].numel()] = bad  # beyond the first 256 values, too
    d = _saelens_dir(tmp_path, "nf", t, {"architecture": "jumprelu"}, extra)
    with pytest.raises(SafetyScopeError, match=rf"tensor {name} holds 1 non-finite"):
        load_sae(d)


def test_missing_tensor_and_bad_config(tmp_path):
    t = random_sae_tensors(seed=42)
    d = _saelens_dir(tmp_path, "jr", t, {"architecture": "jumprelu"})
    with pytest.raises(SafetyScopeError, match="needs a threshold tensor"):
        load_sae(d)
    d2 = tmp_path / "nobdec"
    d2.mkdir()
    save_file({"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"].T.contiguous(), "b_enc": t["b_enc"]},
              d2 / "sae_weights.safetensors")
    (d2 / "cfg.json").write_text("{}")
    with pytest.raises(SafetyScopeError, match=r"missing tensor\(s\) \['b_dec'\]"):
        load_sae(d2)
    d3 = _saelens_dir(tmp_path, "wrongdin", t, {"architecture": "standard", "d_in": D_MODEL + 1})
    with pytest.raises(SafetyScopeError, match=r"d_in=65 but W_enc has d_in 64"):
        load_sae(d3)
    own = _write_own(tmp_path, t)
    cfg = json.loads((own / "config.json").read_text())
    for key, value, msg in [("k", 2.5, "config k must be an integer"), ("d_sae", "256", "config d_sae must be"),
                            ("layer", -1, "config layer must be")]:
        (own / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(SafetyScopeError, match=msg):
            load_sae(own)
    (own / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_model"}))
    with pytest.raises(SafetyScopeError, match="bad SAE config"):
        load_sae(own)
    (own / "config.json").write_text("[1, 2]")
    with pytest.raises(SafetyScopeError, match="must be a JSON object"):
        load_sae(own)


# -- fingerprints ----------------------------------------------------------------------------------

def test_fingerprint_hashes_every_value():
    d_sae = 1024
    t = random_sae_tensors(d_sae=d_sae, seed=50)
    sae = SAE.from_tensors(SAEConfig(d_model=D_MODEL, d_sae=d_sae, k=SAE_K), t["W_enc"], t["b_enc"], t["W_dec"],
                           t["b_dec"])
    fp, legacy = sae.fingerprint(), sae.legacy_fingerprint()
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64 and len(legacy) == 16
    # swap features 1000 and 1001: the legacy hash (shapes, sums, first 256 values) cannot see it
    idx = torch.arange(d_sae)
    idx[1000], idx[1001] = 1001, 1000
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[idx])
        sae.b_enc.copy_(sae.b_enc[idx])
        sae.W_dec.copy_(sae.W_dec[:, idx])
    assert sae.legacy_fingerprint() == legacy
    assert sae.fingerprint() != fp


# -- random control --------------------------------------------------------------------------------

def test_random_like_is_seeded_and_keeps_kind_and_shapes(tiny_sae, tiny_backbone):
    a, a2, b = SAE.random_like(tiny_sae, 0), SAE.random_like(tiny_sae, 0), SAE.random_like(tiny_sae, 1)
    assert a.fingerprint() == a2.fingerprint() != b.fingerprint() != tiny_sae.fingerprint()
    assert torch.equal(a.W_enc, a2.W_enc) and not torch.allclose(a.W_enc, b.W_enc)
    for r in (a, b):
        c = r.cfg
        assert (c.d_model, c.d_sae, c.activation, c.k, c.layer) == (D_MODEL, D_SAE, "topk", SAE_K, tiny_sae.cfg.layer)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert getattr(r, name).shape == getattr(tiny_sae, name).shape
        assert c.extra["random_like"] == tiny_sae.fingerprint() and not r.W_enc.requires_grad
    # the init: unit decoder columns, encoder rows along them with the trained rows' norms, the trained b_dec
    # as centre (x = b_dec encodes to all-zero pre-activations)
    torch.testing.assert_close(a.W_dec.norm(dim=0), torch.ones(D_SAE))
    torch.testing.assert_close(a.W_enc.norm(dim=1), tiny_sae.W_enc.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(a.W_enc, a.W_dec.T, dim=1)
    torch.testing.assert_close(cos, torch.ones(D_SAE))
    assert torch.equal(a.b_dec, tiny_sae.b_dec)
    torch.testing.assert_close(a.pre_acts(tiny_sae.b_dec[None]), torch.zeros(1, D_SAE), atol=1e-4, rtol=0)
    # on the tiny model's real activations: exactly k features per token, and different ones from token to token
    ids, mask = tiny_backbone.pad([tiny_backbone.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    x = tiny_backbone.capture(ids, mask, [tiny_sae.cfg.layer])[tiny_sae.cfg.layer][0].float()
    z = a.encode(x)
    assert ((z > 0).sum(1) == SAE_K).all()
    assert len({tuple(torch.nonzero(r).flatten().tolist()) for r in z}) == len(x)
    assert not torch.equal(z > 0, tiny_sae.encode(x) > 0)


def test_random_like_jumprelu_keeps_thresholds():
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 0.1
    sae, _ = _sae("jumprelu", threshold=threshold)
    r = SAE.random_like(sae, seed=5)
    assert r.cfg.activation == "jumprelu" and r.cfg.k is None
    assert torch.equal(r.threshold, threshold) and r.fingerprint() != sae.fingerprint()
    z = r.encode(_x() + sae.b_dec)
    assert ((z > 0) <= (r.pre_acts(_x() + sae.b_dec) > threshold)).all() and (z > 0).any()


def test_fingerprint_is_cached_per_file(tmp_path, monkeypatch):
    own = _write_own(tmp_path, random_sae_tensors(seed=51))
    sl_dir, _ = _write_saelens(tmp_path, random_sae_tensors(seed=51))
    calls = count_hashes(monkeypatch, SAE)
    fp = load_sae(own).fingerprint()
    assert len(calls) == 1
    again = load_sae(own)
    assert again.fingerprint() == fp and len(calls) == 1  # an unchanged file: the cache answers
    assert again._hash_weights() == fp  # with the hash itself
    assert load_sae(own, k=3).fingerprint() != fp  # k is part of the fingerprint, so of the key
    n = len(calls)
    assert load_sae(sl_dir).fingerprint() and len(calls) == n + 1  # other files: hashed on their own
    new_value = edit_last_value_in_place(own / "sae.safetensors", "W_dec")  # same size and inode: only mtime tells
    edited = load_sae(own)
    assert float(edited.W_dec[-1, -1]) == new_value
    assert edited.fingerprint() != fp and len(calls) == n + 2  # the edited file is hashed again
    assert edited.fingerprint() == edited._hash_weights()


def test_directory_formats_are_one_registry_tried_in_order():
    """load_sae finds a directory's format in SAE_LOADERS (name -> (detector, loader)), first match wins: a
    safetyscope directory (config.json) before SAELens / sparsify (cfg.json), Qwen-Scope layer files last."""
    from safetyscope.sae import SAE_LOADERS

    assert list(SAE_LOADERS) == ["safetyscope", "saelens", "sparsify", "qwen-scope"]
    assert all(callable(detect) and callable(load) for detect, load in SAE_LOADERS.values())
