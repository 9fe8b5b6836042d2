"""Feature steering on the tiny random model: the edit itself, generation, hook removal, the `steer` command."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from conftest import CORPUS, SAE_LAYERS, TOXIC_WORDS, run_cli

from safetyscope.backbone import decoder_layers
from safetyscope.errors import SafetyScopeError
from safetyscope.steering import SteerSpec, steer

LAYER = SAE_LAYERS[0]
TEXT = "you are a stupid idiot and i hate you"


def _hidden(bb, text):
    ids = bb.tokenizer([text])["input_ids"]
    input_ids, mask = bb.pad(ids)
    return bb.capture(input_ids, mask, [LAYER])[LAYER][0].float()


def _no_hooks(model):
    return not model._forward_hooks and not any(b._forward_hooks for b in decoder_layers(model))


def _firing_feature(bb, sae, text=TEXT):
    """A feature that fires on some but not all tokens of ``text`` and whose encoder agrees with its decoder."""
    z = sae.encode(_hidden(bb, text))
    for f in torch.argsort(-(z > 0).sum(0)).tolist():
        n = int((z[:, f] > 0).sum())
        u = sae.W_dec[:, f] / sae.W_dec[:, f].norm()
        if 0 < n < z.shape[0] and float(sae.W_enc[f] @ u) > 0.05:
            return f, z[:, f]
    pytest.fail("no partially firing feature with W_enc . u > 0 in the tiny fixtures")


def _gain(sae, f):
    return float(sae.W_enc[f] @ (sae.W_dec[:, f] / sae.W_dec[:, f].norm()))


def _typical(bb, sae, f):
    """Feature f's mean max-activation over the shipped reference texts on which it fires."""
    from safetyscope.features import FeatureExtractor
    from safetyscope.steer_dose import reference_texts

    col = FeatureExtractor(bb, sae, LAYER, cache=False).transform(reference_texts())[:, f].toarray().ravel()
    assert (col > 0).any(), f"feature {f} fires on no reference text"
    return float(col[col > 0].mean())


def test_add_moves_the_stream_by_alpha_times_the_unit_direction(tiny_backbone, tiny_sae):
    f, z0 = _firing_feature(tiny_backbone, tiny_sae)
    h0 = _hidden(tiny_backbone, TEXT)
    u = tiny_sae.W_dec[:, f] / tiny_sae.W_dec[:, f].norm()
    with steer(tiny_backbone, tiny_sae, LAYER, [SteerSpec(f, alpha=0.5)]) as st:
        h1 = _hidden(tiny_backbone, TEXT)
    assert torch.allclose(h1 - h0, 0.5 * u.expand_as(h0), atol=1e-5)
    gain = float(tiny_sae.W_enc[f] @ u)
    pre0, pre1 = tiny_sae.pre_acts(h0)[:, f], tiny_sae.pre_acts(h1)[:, f]
    assert torch.allclose(pre1 - pre0, torch.full_like(pre0, 0.5 * gain), atol=1e-4)  # raised at every position
    z1 = tiny_sae.encode(h1)[:, f]
    assert z1.sum() > z0.sum() and (z1 > 0).sum() >= 1
    assert st.positions == h0.shape[0] and st.mean_edit_norm == pytest.approx(0.5, rel=1e-4)
    assert _no_hooks(tiny_backbone.model)
    with steer(tiny_backbone, tiny_sae, LAYER, [SteerSpec(f, alpha=-0.5)]):
        z2 = tiny_sae.encode(_hidden(tiny_backbone, TEXT))[:, f]
    assert (z2 <= z0).all() and z2.sum() < z0.sum()  # negative alpha suppresses


def test_clamp_to_zero_zeroes_the_feature_and_leaves_other_positions_alone(tiny_backbone, tiny_sae):
    f, z0 = _firing_feature(tiny_backbone, tiny_sae)
    h0 = _hidden(tiny_backbone, TEXT)
    with steer(tiny_backbone, tiny_sae, LAYER, [SteerSpec(f, clamp=0.0)]):
        h1 = _hidden(tiny_backbone, TEXT)
    z1 = tiny_sae.encode(h1)[:, f]
    assert z1.abs().max() < 1e-4
    off = z0 <= 0
    assert off.any() and torch.equal(h1[off], h0[off])  # where the feature did not fire nothing changed
    assert not torch.allclose(h1[~off], h0[~off])
    # clamp to a value: where the feature fired its pre-activation becomes that value (its activation too, while it
    # stays in the top-k: this random SAE's other features can outgrow it, a trained SAE's W_enc . u is near 1)
    c = float(z0.max()) * 2
    with steer(tiny_backbone, tiny_sae, LAYER, [SteerSpec(f, clamp=c)]):
        h2 = _hidden(tiny_backbone, TEXT)
    pre2 = tiny_sae.pre_acts(h2)[:, f]
    assert torch.allclose(pre2[~off], torch.full_like(pre2[~off], c), rtol=1e-4)
    pre0 = tiny_sae.pre_acts(h0)[:, f]  # where it was 0 the step is c - 0
    assert torch.allclose(pre2[off] - pre0[off], torch.full_like(pre0[off], c), rtol=1e-4)


def _greedy(model, ids, n=6):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, pad_token_id=0)


def test_alpha_zero_reproduces_plain_generation_and_generated_positions_only(tiny_backbone, tiny_sae):
    model = tiny_backbone.model
    ids = torch.tensor(tiny_backbone.tokenizer(["the weather is nice and", "you are a stupid"])["input_ids"][:1])
    plain = _greedy(model, ids)
    f, _ = _firing_feature(tiny_backbone, tiny_sae)
    with steer(model, tiny_sae, LAYER, [SteerSpec(f, alpha=0.0)]):
        zero = _greedy(model, ids)
    assert torch.equal(plain, zero)
    # a large alpha at every position changes the text; at generated positions only, the prefill (and so the first
    # generated token) is untouched and each decoding step edits one position
    with steer(model, tiny_sae, LAYER, [SteerSpec(f, alpha=40.0)]):
        every = _greedy(model, ids)
    assert not torch.equal(plain, every)
    with steer(model, tiny_sae, LAYER, [SteerSpec(f, alpha=40.0)], positions="generated") as st:
        gen = _greedy(model, ids)
    n_prompt = ids.shape[1]
    assert gen[0, n_prompt] == plain[0, n_prompt] and not torch.equal(gen, plain)
    assert st.positions == gen.shape[1] - n_prompt - 1
    assert _no_hooks(model)


def test_hooks_are_removed_after_an_exception_and_nan_is_an_error(tiny_backbone, tiny_sae):
    model = tiny_backbone.model
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, tiny_sae, LAYER, [SteerSpec(3, alpha=1.0)]):
            assert not _no_hooks(model)
            raise RuntimeError("boom")
    assert _no_hooks(model)
    ids = torch.tensor(tiny_backbone.tokenizer(["the weather is nice"])["input_ids"])
    with pytest.raises(SafetyScopeError, match="non-finite"):
        with steer(model, tiny_sae, LAYER, [SteerSpec(3, alpha=1e39)]):
            _greedy(model, ids)
    assert _no_hooks(model)
    with pytest.raises(SafetyScopeError, match="unknown feature"):
        with steer(model, tiny_sae, LAYER, [SteerSpec(10**6, alpha=1.0)]):
            pass
    assert _no_hooks(model)


def test_spec_parsing():
    assert SteerSpec.parse("161:-8") == SteerSpec(161, alpha=-8.0)
    assert SteerSpec.parse("12:2.5e1") == SteerSpec(12, alpha=25.0)
    assert SteerSpec.parse("7:0", clamp=True) == SteerSpec(7, clamp=0.0)
    for bad in ("x:1", "161", "161:abc"):
        with pytest.raises(SafetyScopeError, match="bad steering spec"):
            SteerSpec.parse(bad)


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    pl.DataFrame({"prompt": ["tell me about the cat", "you are a stupid", "how do i bake a"]}).write_ndjson(p)
    return p


def test_steer_command_rows_and_reencoded_activations(tmp_path, tiny_backbone, tiny_sae, model_args, prompts):
    from safetyscope.features import FeatureExtractor

    f, _ = _firing_feature(tiny_backbone, tiny_sae)
    g = next(x for x in range(tiny_sae.cfg.d_sae) if x != f and _gain(tiny_sae, x) > 0.05)
    out = tmp_path / "out.jsonl"
    res = run_cli(["steer", prompts, "-o", out, "--feature", f"{f}:6", "--clamp", f"{g}:0", "--plain", "--abs",
                   "--max-new-tokens", 5, "--no-cache", *model_args])
    df = pl.read_ndjson(out)
    assert df.columns == ["prompt", "completion", "steering", "target_features", "strength", "strength_abs",
                          "target_acts", "plain_completion", "plain_acts"]
    assert df.height == 3 and set(df["steering"]) == {f"{f}:+6,{g}=0"} and "edited" in res.output
    assert df["target_features"].to_list() == [[f, g]] * 3
    assert df["strength_abs"].to_list() == [[6.0, 0.0]] * 3  # --abs: the numbers typed
    scale = _typical(tiny_backbone, tiny_sae, f) * float(tiny_sae.W_dec[:, f].norm())
    assert df["strength"][0].to_list() == pytest.approx([6.0 / scale, 0.0], rel=1e-4)
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=False)
    for col, acts in (("completion", "target_acts"), ("plain_completion", "plain_acts")):
        texts = df[col].to_list()
        ok = [i for i, t in enumerate(texts) if t.strip()]
        codes = fx.transform([texts[i] for i in ok])[:, [f, g]].toarray()
        for row, i in zip(codes, ok):
            assert df[acts][i].to_list() == pytest.approx(row.tolist(), rel=1e-4)
    assert df["completion"].to_list() != df["plain_completion"].to_list()
    # alpha 0 through the command: the completions are the plain ones
    run_cli(["steer", prompts, "-o", tmp_path / "zero.jsonl", "--feature", f"{f}:0", "--plain", "--max-new-tokens", 5,
             "--abs", *model_args])
    z = pl.read_ndjson(tmp_path / "zero.jsonl")
    assert z["completion"].to_list() == z["plain_completion"].to_list() == df["plain_completion"].to_list()


def test_suppress_a_classifiers_features(tmp_path, model_args, prompts, tiny_sae):
    clean = [t for t in CORPUS if not any(w in t for w in TOXIC_WORDS)]
    rows = [{"text": "you are a stupid idiot", "label": "toxic"}] * len(clean) + [{"text": t, "label": "clean"} for t in clean]
    p = tmp_path / "tox.csv"
    pl.DataFrame(rows * 2).write_csv(p)
    clf = tmp_path / "clf.json"
    run_cli(["discover", p, "-o", clf, *model_args, "--max-features", 3, "--fpr-cap", "none"])
    feats = [x["id"] for x in json.loads(clf.read_text())["rule"]["features"]]
    out = tmp_path / "s.jsonl"
    args = ["steer", prompts, "-o", out, "-c", clf, "--suppress", "--max-new-tokens", 4, *model_args]
    bad = [x for x in feats if _gain(tiny_sae, x) <= 1e-3]
    if bad:  # a random SAE may have a feature whose encoder opposes its decoder: clamping it is refused
        res = run_cli(args, ok=False)
        assert res.exit_code == 2 and f"feature {bad[0]}: its encoder and decoder" in res.output
        return
    run_cli(args)
    df = pl.read_ndjson(out)
    assert df["target_features"][0].to_list() == feats
    assert df["steering"][0] == ",".join(f"{x}=0" for x in feats)


def test_user_errors_are_one_line(tmp_path, model_args, prompts, tiny_model_dir):
    from conftest import random_sae_tensors

    out = tmp_path / "o.jsonl"
    cases = [
        (["--feature", "99999:1"], "unknown feature id"),
        (["--feature", "3:1e39", "--abs"], "non-finite"),
        (["--feature", "3:2", "--strengths", "1,2"], "--calibrate schedule"),
        (["--calibrate", "--feature", "3", "--clamp", "4:0"], "drop --clamp"),
        (["--feature", "3"], "bad steering spec"),
        (["--feature", "3:1", "--backend", "vllm"], "cannot steer"),
        (["--suppress"], "go together"),
        ([], "nothing to steer"),
    ]
    for extra, msg in cases:
        res = run_cli(["steer", prompts, "-o", out, "--max-new-tokens", 3, *extra, *model_args], ok=False)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (extra, res.output)
    # an SAE of another width: the wrong SAE for this model
    d = tmp_path / "wide"
    d.mkdir()
    torch.save(random_sae_tensors(d_model=32, d_sae=64), d / f"layer{LAYER}.sae.pt")
    res = run_cli(["steer", prompts, "-o", out, "--feature", "3:1", "--model", tiny_model_dir, "--sae", d,
                   "--layer", LAYER, "--k", 4], ok=False)
    assert res.exit_code == 2 and "SAE width mismatch" in res.output


def test_suppress_takes_a_sparse_rules_positive_weight_features_only(tmp_path, model_args):
    from safetyscope.discovery.detector import Detector
    from safetyscope.steering import classifier_features

    clean = [t for t in CORPUS if not any(w in t for w in TOXIC_WORDS)]
    toxic = [t for t in CORPUS if any(w in t for w in TOXIC_WORDS)]
    rows = [{"text": t, "label": "toxic"} for t in toxic] * 4 + [{"text": t, "label": "clean"} for t in clean] * 2
    p = tmp_path / "tox.csv"
    pl.DataFrame(rows).write_csv(p)
    clf = tmp_path / "sparse.json"
    run_cli(["discover", p, "-o", clf, "--kind", "sparse_linear", "--criterion", "f1", "--max-features", 64, *model_args])
    weights = {x["id"]: x["weight"] for x in json.loads(clf.read_text())["rule"]["features"]}
    assert any(w > 0 for w in weights.values()) and any(w < 0 for w in weights.values())  # both signs planted
    got = classifier_features(clf, Detector.load(clf, dtype="float32").extractor)
    assert got == [f for f, w in weights.items() if w > 0]


def test_relative_strength_is_a_multiple_of_the_typical_activation_and_cached(tiny_backbone, tiny_sae, monkeypatch):
    from safetyscope.features import FeatureExtractor
    from safetyscope.steer_dose import Dose, feature_scales, resolve

    f, _ = _firing_feature(tiny_backbone, tiny_sae)
    fx = FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=True)
    scales = feature_scales(fx)
    a, norm = _typical(tiny_backbone, tiny_sae, f), float(tiny_sae.W_dec[:, f].norm())
    assert scales[f].typical == pytest.approx(a, rel=1e-5) and scales[f].source == "reference"
    add, clamp, raw = resolve([Dose(f, 2.0), Dose(f, 0.5, "clamp"), Dose(f, 3.0, absolute=True)], scales)
    assert add.spec == SteerSpec(f, alpha=pytest.approx(2.0 * a * norm, rel=1e-5))
    assert (add.strength, add.strength_abs) == (2.0, add.spec.alpha)
    assert clamp.spec.clamp == pytest.approx(0.5 * a, rel=1e-5) and clamp.strength == 0.5
    assert raw.spec.alpha == 3.0 and raw.strength == pytest.approx(3.0 / (a * norm), rel=1e-5)
    # computed once: the second call reads the disk cache, no extraction
    monkeypatch.setattr(fx, "transform", lambda *_a, **_k: pytest.fail("recomputed instead of read from the cache"))
    again = feature_scales(fx)
    assert np.array_equal(again.typical, scales.typical) and np.array_equal(again.fired, scales.fired)
    # a feature that never fires on the reference texts: the SAE's median typical activation, said on stderr
    silent = np.flatnonzero(scales.fired == 0)
    if silent.size:
        s = scales[int(silent[0])]
        assert s.source == "sae_median" and s.typical == pytest.approx(np.median(scales.typical[scales.fired > 0]))
    with pytest.raises(SafetyScopeError, match="unknown feature"):
        resolve([Dose(10**6, 1.0)], scales)


def test_one_prompt_prints_plain_and_steered_side_by_side(tmp_path, tiny_backbone, tiny_sae, model_args):
    f, _ = _firing_feature(tiny_backbone, tiny_sae)
    prompt = "tell me about the cat"
    res = run_cli(["steer", prompt, "--feature", f"{f}:40", "--abs", "--max-new-tokens", 5, *model_args])
    p = tmp_path / "one.jsonl"
    pl.DataFrame({"prompt": [prompt]}).write_ndjson(p)
    run_cli(["steer", p, "-o", tmp_path / "o.jsonl", "--feature", f"{f}:40", "--abs", "--plain", "--max-new-tokens", 5,
             *model_args])
    df = pl.read_ndjson(tmp_path / "o.jsonl")
    head = next(line for line in res.output.splitlines() if line.startswith("plain"))
    col = head.index(" | ")
    body = [line for line in res.output.splitlines() if " | " in line and not line.startswith(("plain", "activation"))]
    left = " ".join(line[:col].strip() for line in body).split()
    right = " ".join(line[col + 3:].strip() for line in body).split()
    assert left == df["plain_completion"][0].split() and right == df["completion"][0].split()
    assert left != right and f"steered {f}:+40" in head
    res = run_cli(["steer", "missing.jsonl", "--feature", f"{f}:1", *model_args], ok=False)
    assert res.exit_code == 2 and "missing.jsonl: no such file" in res.output
    res = run_cli(["steer", p, "--feature", f"{f}:1", *model_args], ok=False)
    assert res.exit_code == 2 and "-o OUTPUT is needed" in res.output


def test_calibrate_sweeps_strengths_and_marks_the_largest_fluent_raising_one(tmp_path, tiny_backbone, tiny_sae,
                                                                            full_model, model_args, prompts):
    from safetyscope.generators import TransformersGenerator

    f, _ = _firing_feature(tiny_backbone, tiny_sae)
    out = tmp_path / "cal"
    res = run_cli(["steer", prompts, "--calibrate", "--feature", f"{f}:3", "--strengths", "0.5,60", "--max-new-tokens", 6,
                   "-o", out, *model_args])
    doc = json.loads((out / "calibration.json").read_text())
    (feat,) = doc["features"]
    rows = feat["rows"]
    assert [r["strength"] for r in rows] == [0.0, 0.5, 3.0, 60.0]  # plain, the schedule and the typed strength
    unit = _typical(tiny_backbone, tiny_sae, f) * float(tiny_sae.W_dec[:, f].norm())
    assert feat["unit_abs"] == pytest.approx(unit, rel=1e-5)
    assert [r["strength_abs"] for r in rows] == pytest.approx([s * unit for s in (0, 0.5, 3, 60)], rel=1e-6)
    comps = pl.read_ndjson(out / "completions.jsonl")
    plain = rows[0]
    for r in rows:
        sel = comps.filter(pl.col("strength") == r["strength"])
        assert r["mean_activation"] == pytest.approx(sum(a[0] for a in sel["acts"].to_list()) / 3)
        assert r["raises"] == (r["mean_activation"] > plain["mean_activation"])
        assert r["fluent"] == (r["perplexity_ratio"] <= 2 and r["degenerate"] <= plain["degenerate"])
    ok = [r["strength"] for r in rows[1:] if r["fluent"] and r["raises"]]
    assert feat["calibrated_strength"] == (max(ok) if ok else None)
    texts = {s: comps.filter(pl.col("strength") == s)["completion"].to_list() for s in (0.0, 60.0)}
    assert texts[60.0] != texts[0.0]  # each strength really generated, steered
    # the perplexity is the unsteered model's, of the completion tokens given the rendered prompt
    gen = TransformersGenerator.from_backbone(tiny_backbone)
    row = next(r for r in comps.iter_rows(named=True) if r["completion"].strip() and r["strength"] == 60)
    tok = tiny_backbone.tokenizer
    ctx = tok(gen._render([{"role": "user", "content": row["prompt"]}]))["input_ids"]
    comp = tok(row["completion"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(full_model(torch.tensor([ctx + comp])).logits[0], -1)
    nll = -torch.stack([logp[len(ctx) - 1 + i, t] for i, t in enumerate(comp)]).mean()
    assert row["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    assert (out / "calibration.png").stat().st_size > 1000 and "calibrated strength" in (out / "calibration.md").read_text()
    assert f"feature {f}: calibrated strength" in res.output


def test_degeneration_measures():
    from safetyscope.steer_calibrate import degeneration, is_degenerate

    assert degeneration(list(range(10))) == (1.0, 0.0)
    distinct, rep = degeneration([1, 2, 3] * 3)  # 3-grams: 7, of which 4 repeat an earlier one
    assert (distinct, rep) == (pytest.approx(1 / 3), pytest.approx(4 / 7)) and is_degenerate(distinct, rep, 9)
    assert is_degenerate(*degeneration([]), 0) and not is_degenerate(1.0, 0.0, 10)


def test_auto_dtype_generates_in_float32_on_cpu(tmp_path, tiny_model_dir, qwen_scope_sae_dir, prompts):
    from safetyscope.backbone import cpu_has_native_bf16, pick_dtype

    assert pick_dtype("auto", "cpu", "generate") == torch.float32
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert pick_dtype("bfloat16", "cpu", "generate") == torch.bfloat16  # a named dtype is kept
    # the command: --dtype auto generates exactly as --dtype float32 (bf16 greedy text differs on this model)
    base = ["steer", prompts, "--feature", "3:20", "--abs", "--plain", "--max-new-tokens", 5, "--model", tiny_model_dir,
            "--sae", qwen_scope_sae_dir, "--layer", LAYER]
    run_cli([*base, "-o", tmp_path / "auto.jsonl", "--dtype", "auto"])
    run_cli([*base, "-o", tmp_path / "fp32.jsonl", "--dtype", "float32"])
    assert pl.read_ndjson(tmp_path / "auto.jsonl").equals(pl.read_ndjson(tmp_path / "fp32.jsonl"))


def test_generation_settings_are_steerconfigs_defaults_and_checks():
    """steer's generation options take their defaults from SteerConfig, --calibrate's config inherits them, and a
    bad value is refused by SteerConfig itself: one line, before any model loads."""
    from dataclasses import fields

    from safetyscope.cli.steer import steer as steer_cmd
    from safetyscope.steer_calibrate import CalibrationConfig
    from safetyscope.steering import SteerConfig

    options = {p.name: p for p in steer_cmd.params}
    for f in fields(SteerConfig):
        if f.name != "batch_size":  # --batch-size is the shared model option
            assert options[f.name].default == f.default, f.name
    shared = {f.name for f in fields(SteerConfig)}
    assert {f.name: f.default for f in fields(CalibrationConfig) if f.name in shared} == \
        {f.name: f.default for f in fields(SteerConfig)}
    for bad, message in (({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
                         ({"temperature": float("nan")}, "--temperature must be a finite number"),
                         ({"positions": "prompt"}, "positions must be one of all, generated"),
                         ({"batch_size": 0}, "--batch-size must be >= 1")):
        with pytest.raises(SafetyScopeError, match=message):
            SteerConfig(**bad)
    res = run_cli(["steer", "hello", "--feature", "1:1", "--max-new-tokens", "0", "--model", "/nonexistent/model"],
                  ok=False)
    assert res.exit_code == 2 and res.output == "error: --max-new-tokens must be >= 1; got 0\n", res.output
