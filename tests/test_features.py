"""Per-text pooled SAE codes against a naive reference (full model, every real token, max over tokens)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CORPUS, D_SAE, SAE_LAYERS

from safetyscope import FeatureConfig, FeatureExtractor, SafetyScopeError

LAYER = SAE_LAYERS[0]

# lengths differ a lot (and out-of-vocabulary words map to <unk>); the order is not sorted by length
TEXTS = [
    "thank you",
    "the quick brown fox jumps over the lazy dog and the lazy dog sleeps on the sofa every afternoon",
    "you are a stupid idiot",
    "hello",
    "what is the capital city of france ? i love reading books about history and science",
    "zebra xylophone quantum",  # all unknown words
    "go away you worthless piece of garbage",
]


def naive(full_model, tokenizer, sae, texts, layer=LAYER, max_length=256, skip_first=False):
    """One text at a time, no padding: dense code of every kept token, max over tokens, mean residual."""
    codes, means, n_tok = [], [], []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"][:max_length]
        with torch.no_grad():
            hs = full_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
            if skip_first:
                hs = hs[1:]
            z = sae.encode(hs.float())
        codes.append(z.max(0).values.numpy())
        means.append(hs.float().mean(0).numpy())
        n_tok.append(len(hs))
    return np.stack(codes), np.stack(means), np.array(n_tok)


@pytest.fixture(scope="module")
def reference(full_model, tiny_backbone, tiny_sae):
    return naive(full_model, tiny_backbone.tokenizer, tiny_sae, TEXTS)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_codes_equal_naive(tiny_backbone, tiny_sae, reference, batch_size):
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=batch_size, cache=False)
    ex = fx.extract(TEXTS)
    ref_codes, ref_means, ref_n = reference
    assert ex.codes.shape == (len(TEXTS), D_SAE)
    got = ex.codes.toarray()
    np.testing.assert_allclose(got, ref_codes, atol=1e-4)
    np.testing.assert_allclose(ex.mean_acts, ref_means, atol=1e-5)
    np.testing.assert_array_equal(ex.n_tokens, ref_n)
    assert ex.n_truncated == 0 and ex.n_cached == 0
    # feature ids are exactly the features whose max activation is > 0
    for i in range(len(TEXTS)):
        row = ex.codes.getrow(i)
        assert sorted(row.indices.tolist()) == np.flatnonzero(ref_codes[i] > 0).tolist()
        assert (row.data > 0).all()
    # the rows really differ from text to text (row order is checked, not trivially satisfied)
    assert len({tuple(np.flatnonzero(r)) for r in ref_codes}) == len(TEXTS)
    assert np.array_equal(fx.transform(TEXTS).toarray(), got)


def test_batch_sizes_agree_on_reordered_input(tiny_backbone, tiny_sae):
    texts = TEXTS[::-1] + TEXTS[:2]  # duplicates, reversed order
    a = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=1, cache=False).extract(texts).codes.toarray()
    b = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=4, cache=False).extract(texts).codes.toarray()
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(a[-2:], a[len(TEXTS) - 1 : len(TEXTS) - 3 : -1])


def test_cache_roundtrip(tiny_backbone, tiny_sae):
    texts = [f"{t} cache-test" for t in TEXTS]
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=3, cache=True)
    first = fx.extract(texts)
    assert first.n_cached == 0
    second = fx.extract(texts)
    assert second.n_cached == len(texts)
    assert (first.codes != second.codes).nnz == 0
    np.testing.assert_array_equal(first.codes.indptr, second.codes.indptr)
    np.testing.assert_array_equal(first.mean_acts, second.mean_acts)
    np.testing.assert_array_equal(first.n_tokens, second.n_tokens)
    # a new extractor with the same config reads the same cache; a new text is computed, in place. One text per
    # batch here: a batch holding a text to compute is run whole (cached texts in it too), so that a resumed run
    # batches as the uninterrupted one did (tests/test_kill_resume.py)
    mixed = [texts[2], "a brand new text for the cache", texts[0]]
    third = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=1, cache=True).extract(mixed)
    assert third.n_cached == 2
    np.testing.assert_array_equal(third.codes[0].toarray(), first.codes[2].toarray())
    np.testing.assert_array_equal(third.codes[2].toarray(), first.codes[0].toarray())
    # a setting that changes the codes changes the cache key
    other = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, skip_first_token=True, cache=True)
    assert other.cache_key() != fx.cache_key()
    assert other.extract(texts).n_cached == 0


def test_skip_first_token(tiny_backbone, tiny_sae, full_model, reference):
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=3, skip_first_token=True, cache=False)
    ex = fx.extract(TEXTS)
    ref_codes, ref_means, ref_n = naive(full_model, tiny_backbone.tokenizer, tiny_sae, TEXTS, skip_first=True)
    np.testing.assert_allclose(ex.codes.toarray(), ref_codes, atol=1e-4)
    np.testing.assert_allclose(ex.mean_acts, ref_means, atol=1e-5)
    np.testing.assert_array_equal(ex.n_tokens, reference[2] - 1)
    # pooling over fewer tokens: never more, and something disappears (position 0 is the same BOS in every text)
    full = reference[0]
    assert (ex.codes.toarray() <= full + 1e-6).all()
    assert not np.allclose(ex.codes.toarray(), full, atol=1e-4)
    # token_codes: only the first row is blanked
    toks, z_skip = fx.token_codes(TEXTS[1])
    _, z_all = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=False).token_codes(TEXTS[1])
    assert toks[0] == "<s>" and len(toks) == z_all.shape[0]
    assert (z_skip[0] == 0).all() and (z_all[0] > 0).any()
    assert torch.equal(z_skip[1:], z_all[1:])


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_null_or_empty_text(tiny_backbone, tiny_sae, bad):
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=True)
    with pytest.raises(SafetyScopeError, match=r"1 text\(s\) are null or empty \(rows \[1\]\)"):
        fx.extract(["fine text", bad, "another"])


def test_truncation(tiny_backbone, tiny_sae, full_model):
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, max_length=5, batch_size=3, cache=False)
    ex = fx.extract(TEXTS)
    lengths = np.array([len(tiny_backbone.tokenizer(t)["input_ids"]) for t in TEXTS])
    assert ex.n_truncated == int((lengths > 5).sum()) > 0
    np.testing.assert_array_equal(ex.n_tokens, np.minimum(lengths, 5))
    ref_codes, _, _ = naive(full_model, tiny_backbone.tokenizer, tiny_sae, TEXTS, max_length=5)
    np.testing.assert_allclose(ex.codes.toarray(), ref_codes, atol=1e-4)


def test_empty_input(tiny_backbone, tiny_sae):
    ex = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=False).extract([])
    assert ex.codes.shape == (0, D_SAE) and ex.n_tokens.shape == (0,)


def test_bad_settings(tiny_backbone, tiny_sae):
    with pytest.raises(SafetyScopeError, match=r"layer 4 out of range.*0\.\.3"):
        FeatureExtractor(tiny_backbone, tiny_sae, 4)
    with pytest.raises(SafetyScopeError, match="batch_size"):
        FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=0)


def test_from_config(tiny_model_dir, qwen_scope_sae_dir, tiny_backbone, tiny_sae):
    cfg = FeatureConfig(model=str(tiny_model_dir), sae=str(qwen_scope_sae_dir / "layer1.sae.pt"), dtype="float32",
                        cache=False)
    fx = FeatureExtractor.from_config(cfg)
    assert fx.layer == 1 and fx.sae.cfg.k == 8  # layer from the file name, k from the L0_8 directory
    ref = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=False).extract(TEXTS).codes.toarray()
    np.testing.assert_allclose(fx.extract(TEXTS).codes.toarray(), ref, atol=1e-5)
    with pytest.raises(SafetyScopeError, match="pass --layer"):
        FeatureExtractor.from_config(FeatureConfig(model=str(tiny_model_dir), sae=str(qwen_scope_sae_dir)))


def test_extract_shared_runs_the_model_once_for_several_saes(tiny_backbone, tiny_sae, full_model,
                                                             monkeypatch):
    from safetyscope import SAE
    from safetyscope.features import extract_shared

    rand = SAE.random_like(tiny_sae, seed=0)
    texts = [f"{t} shared-test" for t in TEXTS]
    fxs = [FeatureExtractor(tiny_backbone, s, LAYER, batch_size=3, cache=True) for s in (tiny_sae, rand)]
    calls = []
    capture = tiny_backbone.capture
    monkeypatch.setattr(tiny_backbone, "capture", lambda *a: calls.append(1) or capture(*a))
    ex, rex = extract_shared(fxs, texts)
    assert len(calls) == 3  # 7 texts in batches of 3: one forward pass per batch, not per SAE
    for sae, got in ((tiny_sae, ex), (rand, rex)):  # each SAE's codes as if extracted alone
        ref_codes, ref_means, ref_n = naive(full_model, tiny_backbone.tokenizer, sae, texts)
        np.testing.assert_allclose(got.codes.toarray(), ref_codes, atol=1e-4)
        np.testing.assert_allclose(got.mean_acts, ref_means, atol=1e-5)
        np.testing.assert_array_equal(got.n_tokens, ref_n)
    assert (ex.codes != rex.codes).nnz > 0
    # each SAE has its own cache: the random one is served from it alone, the trained one recomputes a new text
    calls.clear()
    again = fxs[1].extract(texts)
    assert again.n_cached == len(texts) and not calls and (again.codes != rex.codes).nnz == 0
    ex2, rex2 = extract_shared(fxs, texts + ["one more new text"])
    # one forward pass: the new text's batch, run whole (its cached texts too); every other batch is served
    assert ex2.n_cached == rex2.n_cached >= len(texts) - 2 and len(calls) == 1
    other = FeatureExtractor(tiny_backbone, rand, LAYER, max_length=5, cache=False)
    with pytest.raises(SafetyScopeError, match=r"differ only in their SAE.*max_length"):
        extract_shared([fxs[0], other], texts)


# -- batching and several layers ---------------------------------------------------------------------------
def test_length_batches_sort_longest_first_and_respect_both_limits():
    from safetyscope.backbone import length_batches

    lengths = [5, 30, 2, 30, 9, 1, 12, 7, 3, 3]
    plain = length_batches(lengths, batch_size=4)
    assert plain == [[1, 3, 6, 4], [7, 0, 8, 9], [2, 5]]  # longest first, ties in input order
    budget = length_batches(lengths, batch_size=4, batch_tokens=24)
    assert sorted(i for b in budget for i in b) == list(range(len(lengths)))
    for b in budget:
        assert len(b) <= 4 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 24)
        assert lengths[b[0]] == max(lengths[i] for i in b)  # the first text is the batch's longest
    # a batch never straddles a group of batch_size texts (Ray blocks of whole groups batch alike)
    groups = [set(g) for g in plain]
    assert all(any(set(b) <= g for g in groups) for b in budget)
    assert budget == [[1], [3], [6, 4], [7, 0, 8], [9], [2, 5]]


def test_batch_tokens_keep_the_fired_features(tiny_backbone, tiny_sae):
    """float32: the same features fire whatever the batching (values move by float rounding only)."""
    texts = TEXTS * 3 + ["hello there", "the cat"]
    ref = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=1, cache=False).transform(texts)
    for bs, bt in ((32, 8), (32, 40), (5, 64), (64, None)):
        got = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, batch_size=bs, batch_tokens=bt, cache=False).transform(texts)
        assert ((got > 0) != (ref > 0)).nnz == 0
        np.testing.assert_allclose(got.toarray(), ref.toarray(), atol=1e-5)


def test_several_layers_in_one_forward_pass_equal_single_layer_runs(tiny_model_dir, qwen_scope_sae_dir, tiny_backbone,
                                                                    monkeypatch):
    from safetyscope.features import extract_shared, layer_extractors

    cfg = FeatureConfig(model=str(tiny_model_dir), sae=str(qwen_scope_sae_dir), dtype="float32", cache=False, batch_size=3)
    fxs = layer_extractors(cfg, list(SAE_LAYERS), backbone=tiny_backbone)
    calls = []
    capture = tiny_backbone.capture
    monkeypatch.setattr(tiny_backbone, "capture", lambda ids, mask, layers: calls.append(list(layers)) or capture(ids, mask, layers))
    exs = extract_shared(fxs, TEXTS)
    assert calls == [list(SAE_LAYERS)] * 3  # 7 texts in batches of 3: one pass per batch for both layers
    calls.clear()
    for fx, ex in zip(fxs, exs):
        alone = FeatureExtractor.from_config(replace(cfg, layer=fx.layer), backbone=tiny_backbone).extract(TEXTS)
        assert calls[-1] == [fx.layer]
        np.testing.assert_array_equal(ex.codes.toarray(), alone.codes.toarray())
        np.testing.assert_array_equal(ex.mean_acts, alone.mean_acts)
        np.testing.assert_array_equal(ex.n_tokens, alone.n_tokens)
    assert (exs[0].codes != exs[1].codes).nnz > 0 and not np.allclose(exs[0].mean_acts, exs[1].mean_acts)
    with pytest.raises(SafetyScopeError, match="1 SAE.*for 2 layer"):
        layer_extractors(cfg, list(SAE_LAYERS), [str(qwen_scope_sae_dir)], backbone=tiny_backbone)
    with pytest.raises(SafetyScopeError, match="repeat"):
        layer_extractors(cfg, [1, 1], backbone=tiny_backbone)
    with pytest.raises(SafetyScopeError, match="no layer2.sae.pt"):
        layer_extractors(cfg, [1, 2], backbone=tiny_backbone)


def test_a_bf16_run_killed_mid_chunk_resumes_bit_identical(tiny_model_dir, qwen_scope_sae_dir, tmp_path, monkeypatch):
    """In bfloat16 a text's codes depend on the batch it is in. A run killed after two batches has cached their
    texts; the rerun must batch the rest as the uninterrupted run did, or its values differ (they did: 157 of
    2,000 rows of a real run). The precondition is checked too: batched differently, the codes do differ here."""
    from safetyscope.features import FeatureConfig, FeatureExtractor

    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))
    texts = [f"{CORPUS[i % len(CORPUS)]} number {i} " + "word " * (i % 7) for i in range(40)]

    def fx(cache: bool):
        return FeatureExtractor.from_config(FeatureConfig(model=str(tiny_model_dir), sae=str(qwen_scope_sae_dir),
                                                          layer=SAE_LAYERS[0], dtype="bfloat16", cache=cache,
                                                          batch_size=8, batch_tokens=48))

    plain = fx(False)  # 48 tokens a batch: each group of 8 texts is cut into batches of about 3
    want = plain.extract(texts)
    rest = plain.extract(texts[16:])  # what the old resume did: the uncached texts batched on their own
    assert (want.codes[16:] != rest.codes).nnz > 0, "precondition: bf16 codes depend on the batch here"

    cached = fx(True)
    real_capture, calls = cached.backbone.capture, {"n": 0}

    def dies_after_two_batches(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt  # kill -9 after two batches were computed and cached
        return real_capture(*a, **k)

    monkeypatch.setattr(cached.backbone, "capture", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        cached.extract(texts)
    monkeypatch.setattr(cached.backbone, "capture", real_capture)
    got = cached.extract(texts)
    assert 0 < got.n_cached < 8  # the two finished batches (part of the first group of 8) came from the cache
    assert (got.codes != want.codes).nnz == 0
    np.testing.assert_array_equal(got.mean_acts, want.mean_acts)
