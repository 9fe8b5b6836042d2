"""Residual capture: the output of decoder layer n, with nothing after the deepest requested layer running."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import N_LAYERS, count_hashes, edit_last_value_in_place

from safetyscope import Backbone, SafetyScopeError
from safetyscope.backbone import decoder_layers

TEXTS = ["the quick brown fox jumps over the lazy dog", "thank you", "what is the capital city of france ?"]


def _batch(backbone):
    enc = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding"
    return enc["input_ids"], mask


def test_backbone_basics(tiny_backbone):
    assert tiny_backbone.n_layers == N_LAYERS
    assert tiny_backbone.d_model == 64
    assert next(tiny_backbone.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("layer", range(N_LAYERS - 1))
def test_capture_equals_hidden_states(tiny_backbone, full_model, layer):
    ids, mask = _batch(tiny_backbone)
    got = tiny_backbone.capture(ids, mask, [layer])
    assert set(got) == {layer}
    with torch.no_grad():
        ref = full_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    real = mask.bool()
    assert got[layer].shape == ref.shape
    assert torch.equal(got[layer][real], ref[real])


def test_several_layers_one_pass(tiny_backbone, full_model):
    ids, mask = _batch(tiny_backbone)
    calls = []
    h = tiny_backbone.model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = tiny_backbone.capture(ids, mask, [2, 0, 1])
    finally:
        h.remove()
    assert len(calls) == 1, "several layers must be captured in one forward pass"
    assert set(got) == {0, 1, 2}
    with torch.no_grad():
        hs = full_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for n in (0, 1, 2):
        assert torch.equal(got[n][real], hs[n + 1][real])
    assert not torch.equal(got[0][real], got[2][real])


def test_later_layers_never_run(tiny_backbone):
    ids, mask = _batch(tiny_backbone)
    blocks = decoder_layers(tiny_backbone.model)
    ran = {n: 0 for n in range(N_LAYERS)}
    norm_ran = []
    handles = [blocks[n].register_forward_hook(lambda m, i, o, n=n: ran.__setitem__(n, ran[n] + 1)) for n in range(N_LAYERS)]
    handles.append(tiny_backbone.model.model.norm.register_forward_hook(lambda *a: norm_ran.append(1)))
    try:
        tiny_backbone.capture(ids, mask, [1])
    finally:
        for h in handles:
            h.remove()
    assert ran == {0: 1, 1: 1, 2: 0, 3: 0}
    assert norm_ran == []
    # the capture hooks are removed afterwards: a normal forward runs every layer again
    with torch.no_grad():
        tiny_backbone.model(input_ids=ids, attention_mask=mask)
    assert not blocks[1]._forward_hooks


def test_last_layer_is_pre_norm(tiny_backbone, full_model):
    ids, mask = _batch(tiny_backbone)
    last = N_LAYERS - 1
    got = tiny_backbone.capture(ids, mask, [last])[last]
    real = mask.bool()
    with torch.no_grad():
        final = full_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        # hidden_states[-1] has the final norm applied; the capture is the raw output of the last block
        assert not torch.allclose(got[real], final[real], atol=1e-3)
        assert torch.allclose(full_model.model.norm(got)[real], final[real], atol=1e-6)
        # hook-free reference: the same model with the final norm replaced by identity
        norm = full_model.model.norm
        full_model.model.norm = torch.nn.Identity()
        try:
            raw = full_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        finally:
            full_model.model.norm = norm
    assert torch.equal(got[real], raw[real])


@pytest.mark.parametrize("bad", [[N_LAYERS], [-1], [0, N_LAYERS + 5]])
def test_out_of_range_layer(tiny_backbone, bad):
    ids, mask = _batch(tiny_backbone)
    with pytest.raises(SafetyScopeError, match=r"out of range.*0\.\.3"):
        tiny_backbone.capture(ids, mask, bad)


def test_model_without_decoder_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    bb = Backbone(gpt2, tokenizer=None, model_id="tiny-gpt2")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(SafetyScopeError, match=r"cannot find the decoder layers of GPT2LMHeadModel.*model\.model\.layers"):
        bb.capture(ids, torch.ones_like(ids), [0])
    with pytest.raises(SafetyScopeError, match="decoder layers"):
        bb.n_layers


def test_missing_model_dir(tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(SafetyScopeError, match="config.json"):
        Backbone.from_pretrained(str(tmp_path / "notamodel"))
    with pytest.raises(SafetyScopeError, match="no such GGUF"):
        Backbone.from_pretrained(str(tmp_path / "missing.gguf"))


def test_fingerprint_covers_every_parameter_value_and_is_cached_per_file(tiny_model_dir, tmp_path, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    calls = count_hashes(monkeypatch, Backbone)
    a = Backbone.from_pretrained(str(d), dtype="float32")
    fp, legacy = a.fingerprint(), a.legacy_fingerprint()
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64 and len(calls) == 1
    b = Backbone.from_pretrained(str(d), dtype="float32")
    assert b.fingerprint() == fp and len(calls) == 1  # an unchanged file: the cache answers
    assert b._hash_weights() == fp  # and its answer is the hash itself
    assert Backbone.from_pretrained(str(d), dtype="bfloat16").fingerprint() == fp  # dtype-independent
    assert Backbone.from_pretrained(str(tiny_model_dir), dtype="float32").fingerprint() == fp  # another path
    n = len(calls)
    # edit one value deep inside a later layer, in place in the file (same size, same inode: only the mtime
    # tells), beyond the first 64 values the legacy hash sampled
    new_value = edit_last_value_in_place(d / "model.safetensors", f"model.layers.{N_LAYERS - 1}.mlp.down_proj.weight")
    c = Backbone.from_pretrained(str(d), dtype="float32")
    assert float(decoder_layers(c.model)[N_LAYERS - 1].mlp.down_proj.weight.detach().view(-1)[-1]) == new_value
    assert c.legacy_fingerprint() == legacy  # the old hash could not tell
    assert c.fingerprint() != fp and len(calls) == n + 1  # the edited file is hashed again


def test_fingerprint_without_a_usable_cache(tiny_model_dir, tmp_path, monkeypatch):
    a = Backbone.from_pretrained(str(tiny_model_dir), dtype="float32")
    fp = a.fingerprint()
    (tmp_path / "not-a-dir").write_text("x")
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "not-a-dir"))
    calls = count_hashes(monkeypatch, Backbone)
    assert Backbone.from_pretrained(str(tiny_model_dir), dtype="float32").fingerprint() == fp and len(calls) == 1


def test_loading_a_model_prints_no_transformers_progress_bar(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as a user's session has it (the CLI, run in-process by other tests, turns it off)
    try:
        Backbone.from_pretrained(str(tiny_model_dir), dtype="float32")
        err = capfd.readouterr().err
        assert "Loading weights" not in err
        assert hf_logging.is_progress_bar_enabled()  # restored for the user's own transformers calls
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
