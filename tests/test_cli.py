"""`safetyscope features` end to end through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from conftest import SAE_LAYERS

from safetyscope import FeatureExtractor, load_sae
from safetyscope.cli import main

LAYER = SAE_LAYERS[0]
ROWS = [
    ("a-1", "thank you so much, \"really\""),
    ("b-2", "the quick brown fox jumps over the lazy dog"),
    ("c-3", "you are a stupid idiot and i hate you"),
    ("d-4", "hello"),
    ("e-5", "what is the capital city of france ? i love reading books about history"),
]


def _frame() -> pl.DataFrame:
    return pl.DataFrame({"id": [r[0] for r in ROWS], "text": [r[1] for r in ROWS], "label": [0, 1, 1, 0, 0]})


def _write_input(tmp_path, fmt: str):
    df = _frame()
    if fmt == "hf":
        import datasets

        p = tmp_path / "in_hf"
        datasets.Dataset(df.to_arrow()).save_to_disk(str(p))
        return p
    p = tmp_path / f"in.{fmt}"
    {"csv": df.write_csv, "jsonl": df.write_ndjson, "parquet": df.write_parquet}[fmt](p)
    return p


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _model_args(tiny_model_dir, qwen_scope_sae_dir, *extra):
    return ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", LAYER, "--dtype", "float32", *extra]


def _assert_matches_api(out: pl.DataFrame, codes, with_id=True):
    assert out.height == len(ROWS)
    if with_id:
        assert out.columns[0] == "id"
        assert out.get_column("id").to_list() == [r[0] for r in ROWS]
    for i, (ids, acts) in enumerate(zip(out.get_column("feature_ids").to_list(), out.get_column("feature_acts").to_list())):
        row = codes.getrow(i)
        assert len(ids) > 0
        assert list(ids) == row.indices.tolist()
        np.testing.assert_allclose(acts, row.data, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def api_codes(tiny_backbone, tiny_sae):
    return FeatureExtractor(tiny_backbone, tiny_sae, LAYER, cache=False).extract([r[1] for r in ROWS]).codes


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "hf"])
def test_features_each_input_format(tmp_path, tiny_model_dir, qwen_scope_sae_dir, api_codes, fmt):
    inp = _write_input(tmp_path, fmt)
    out_path = tmp_path / "out.parquet"
    r = _run(["features", inp, "-o", out_path, *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    assert r.exit_code == 0, r.output
    assert f"wrote {len(ROWS)} rows" in r.stderr
    out = pl.read_parquet(out_path)
    assert out.columns == ["id", "feature_ids", "feature_acts"]
    assert out.schema["feature_ids"] == pl.List(pl.Int32)
    _assert_matches_api(out, api_codes)


def test_features_jsonl_output_without_id(tmp_path, tiny_model_dir, qwen_scope_sae_dir, api_codes):
    inp = tmp_path / "in.csv"
    _frame().drop("id").rename({"text": "body"}).write_csv(inp)
    out_path = tmp_path / "out.jsonl"
    r = _run(["features", inp, "-o", out_path, "--text-column", "body", "--batch-size", 2, "--no-cache",
              *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [sorted(x) for x in lines] == [["feature_acts", "feature_ids"]] * len(ROWS)
    _assert_matches_api(pl.DataFrame(lines), api_codes, with_id=False)


def test_features_k_override(tmp_path, tiny_model_dir, qwen_scope_sae_dir, tiny_backbone):
    inp = _write_input(tmp_path, "parquet")
    out_path = tmp_path / "out.parquet"
    r = _run(["features", inp, "-o", out_path, "--k", 2, *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    assert r.exit_code == 0, r.output
    sae2 = load_sae(qwen_scope_sae_dir, layer=LAYER, k=2)
    codes = FeatureExtractor(tiny_backbone, sae2, LAYER, cache=False).extract([r[1] for r in ROWS]).codes
    out = pl.read_parquet(out_path)
    _assert_matches_api(out, codes)
    assert out.get_column("feature_ids").list.len().to_list()[3] <= 2 * 2  # "hello": <s> + 1 token, k=2 each


def _assert_user_error(r, *fragments):
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in err, err
    assert isinstance(r.exception, SystemExit)


def test_missing_column(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    inp = _write_input(tmp_path, "csv")
    r = _run(["features", inp, "-o", tmp_path / "o.parquet", "--text-column", "body",
              *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    _assert_user_error(r, "missing column(s) ['body']", "'text'")
    assert not (tmp_path / "o.parquet").exists()


def test_missing_file(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    r = _run(["features", tmp_path / "nope.csv", "-o", tmp_path / "o.parquet", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    _assert_user_error(r, "nope.csv", "no such file")


def test_unknown_extension(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    inp = tmp_path / "data.txt"
    inp.write_text("text\nhello\n")
    r = _run(["features", inp, "-o", tmp_path / "o.parquet", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    _assert_user_error(r, "unknown table format '.txt'")


def test_empty_text_row(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    inp = tmp_path / "in.jsonl"
    pl.DataFrame({"text": ["fine", None, "also fine"]}, schema={"text": pl.String}).write_ndjson(inp)
    r = _run(["features", inp, "-o", tmp_path / "o.parquet", *_model_args(tiny_model_dir, qwen_scope_sae_dir)])
    _assert_user_error(r, "null or empty", "rows [1]")


def test_bad_sae_and_layer(tmp_path, tiny_model_dir, qwen_scope_sae_dir):
    inp = _write_input(tmp_path, "csv")
    r = _run(["features", inp, "-o", tmp_path / "o.parquet", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir])
    _assert_user_error(r, "pass --layer")
    r = _run(["features", inp, "-o", tmp_path / "o.parquet", "--model", tiny_model_dir, "--sae", qwen_scope_sae_dir,
              "--layer", 2])
    _assert_user_error(r, "no layer2.sae.pt")


@pytest.mark.slow
def test_embedded_default_model_on_ci_sample(tmp_path, shared_data):
    """The embedded SmolLM2-135M-Instruct and its embedded SAE, all default options."""
    from safetyscope.sae import EMBEDDED_SAE_DIR

    if not (EMBEDDED_SAE_DIR / "config.json").exists():
        pytest.fail(f"the embedded default SAE is missing ({EMBEDDED_SAE_DIR})")
    inp = shared_data / "toxicity" / "ci_sample.parquet"
    src = pl.read_parquet(inp)
    out_path = tmp_path / "ci_features.parquet"
    r = _run(["features", inp, "-o", out_path])
    assert r.exit_code == 0, r.output
    out = pl.read_parquet(out_path)
    assert out.height == src.height == 720
    assert out.get_column("id").to_list() == src.get_column("id").to_list()
    d_sae = load_sae().cfg.d_sae
    n_feats = out.get_column("feature_ids").list.len()
    assert n_feats.min() > 0
    assert out.get_column("feature_ids").explode().min() >= 0
    assert out.get_column("feature_ids").explode().max() < d_sae
    assert out.get_column("feature_acts").explode().min() > 0


@pytest.mark.parametrize("per_layer_saes", [False, True])
def test_features_layers_equal_single_layer_runs(tmp_path, tiny_model_dir, qwen_scope_sae_dir, per_layer_saes):
    """--layers 1,3: one forward pass, one column pair per layer, each equal to that layer's own --layer run."""
    inp = _write_input(tmp_path, "parquet")
    base = ["--model", tiny_model_dir, "--dtype", "float32", "--no-cache", "--batch-size", 2]
    sae = (",".join(str(qwen_scope_sae_dir / f"layer{n}.sae.pt") for n in SAE_LAYERS) if per_layer_saes
           else qwen_scope_sae_dir)
    r = _run(["features", inp, "-o", tmp_path / "multi.parquet", *base, "--sae", sae, "--layers", "1,3"])
    assert r.exit_code == 0, r.output
    assert "layers 1, 3" in r.stderr
    multi = pl.read_parquet(tmp_path / "multi.parquet")
    assert multi.columns == ["id", "feature_ids_l1", "feature_acts_l1", "feature_ids_l3", "feature_acts_l3"]
    for layer in SAE_LAYERS:
        one = tmp_path / f"l{layer}.parquet"
        r = _run(["features", inp, "-o", one, *base, "--sae", qwen_scope_sae_dir, "--layer", layer])
        assert r.exit_code == 0, r.output
        single = pl.read_parquet(one)
        assert multi.get_column(f"feature_ids_l{layer}").to_list() == single.get_column("feature_ids").to_list()
        assert multi.get_column(f"feature_acts_l{layer}").to_list() == single.get_column("feature_acts").to_list()
    assert multi.get_column("feature_ids_l1").to_list() != multi.get_column("feature_ids_l3").to_list()
