"""SAELens and sparsify SAEs written by the libraries themselves (tests/fixtures/library_saes, made by
make_library_fixtures.py with the versions its manifest.json records): safetyscope's loader must give the
library's own codes (and reconstruction), or refuse the variant with a one-line error naming the option."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safetyscope import SafetyScopeError, load_sae

FIXTURES = Path(__file__).parent / "fixtures"
LIBRARY_SAES = FIXTURES / "library_saes"
MANIFEST = json.loads((LIBRARY_SAES / "manifest.json").read_text())


def check_variant(root: Path, name: str, entry: dict) -> None:
    where = root / entry["path"]
    if "refused" in entry:
        with pytest.raises(SafetyScopeError, match=re.escape(entry["refused"])) as e:
            load_sae(where)
        assert "\n" not in str(e.value)
        return
    io = load_file(root / name / "io.safetensors")
    sae = load_sae(where)
    assert (sae.cfg.activation, sae.cfg.k, sae.cfg.layer) == (entry["activation"], entry["k"], entry["layer"]), name
    codes = sae.encode(io["x"])
    assert torch.allclose(codes, io["codes"], rtol=1e-4, atol=1e-5), (name, (codes - io["codes"]).abs().max())
    # the same features fire in every row (for TopK: the same top-k set)
    assert torch.equal(codes > 0, io["codes"] > 0), name
    fired = (io["codes"] > 0).sum(-1)
    assert fired.min() > 0 and fired.max() < sae.cfg.d_sae  # the comparison means something
    if entry["activation"] == "topk":
        assert int(fired.max()) <= entry["k"]
    assert torch.allclose(sae.decode(io["codes"]), io["recon"], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_library_written_sae(name):
    entry = MANIFEST[name]
    assert entry["library"] in ("sae-lens", "eai-sparsify") and re.fullmatch(r"\d+\.\d+\.\d+", entry["version"])
    check_variant(LIBRARY_SAES, name, entry)


def test_fixtures_cover_each_library_version_and_variant():
    versions = {(e["library"], e["version"].split(".")[0]) for e in MANIFEST.values()}
    assert {("sae-lens", "5"), ("sae-lens", "6"), ("eai-sparsify", "1")} <= versions
    kinds = {(e["library"], e.get("activation")) for e in MANIFEST.values() if "refused" not in e}
    assert {("sae-lens", "relu"), ("sae-lens", "topk"), ("sae-lens", "jumprelu"), ("eai-sparsify", "topk")} <= kinds


def _libraries_here() -> bool:
    return bool(importlib.util.find_spec("sae_lens")) or bool(importlib.util.find_spec("sparsify"))


@pytest.mark.skipif(not _libraries_here(), reason="sae-lens / eai-sparsify are not installed (the committed fixtures "
                                                  "written by them are checked above)")
def test_library_written_sae_live(tmp_path, monkeypatch):
    """With the libraries installed: write every variant afresh with the installed versions and check it."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    sys.modules.pop("make_library_fixtures", None)
    import make_library_fixtures

    entries = make_library_fixtures.generate(tmp_path)
    assert entries
    for name, entry in entries.items():
        check_variant(tmp_path, name, entry)
