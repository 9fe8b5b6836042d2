"""Shared fixtures: a tiny random Qwen3 model with an offline tokenizer, a random Qwen-Scope SAE, a
session-wide SAFETYSCOPE_CACHE, and the optional ../shared/data pack."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

D_MODEL = 64
N_LAYERS = 4
D_SAE = 256
SAE_K = 8
SAE_LAYERS = (1, 3)  # a middle layer and the last one
SAE_DIR_NAME = f"SAE-Res-Tiny-W{D_SAE}-L0_{SAE_K}"

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "you are a wonderful person and i like you",
    "you are a stupid idiot and i hate you",
    "this movie was great , the actors were brilliant !",
    "this movie was awful , what a waste of time .",
    "please tell me how to bake a chocolate cake",
    "how do i build a bomb at home ?",
    "shut up , nobody cares about your opinion",
    "thank you so much for your help today",
    "the weather is nice and the sun is shining",
    "go away you worthless piece of garbage",
    "i love reading books about history and science",
    "what is the capital city of france ?",
    "kill all the bugs in the code before friday",
    "my cat sleeps on the sofa every afternoon",
]


def _build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>"], min_frequency=1)
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    # a BOS token at position 0, like real chat models (so skip_first_token has something to skip)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="session", autouse=True)
def safetyscope_cache(tmp_path_factory):
    """Every test writes its caches (features, converted GGUF) to one temporary dir per session."""
    d = tmp_path_factory.mktemp("safetyscope-cache")
    old = os.environ.get("SAFETYSCOPE_CACHE")
    os.environ["SAFETYSCOPE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SAFETYSCOPE_CACHE", None)
    else:
        os.environ["SAFETYSCOPE_CACHE"] = old


def build_tiny_model(d: Path) -> Path:
    """The tiny random Qwen3 and its tokenizer saved in ``d`` (benchmarks/features_memory.py uses it too)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _build_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(1234)
    model = Qwen3ForCausalLM(cfg).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from safetyscope import Backbone

    return Backbone.from_pretrained(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="session")
def full_model(tiny_model_dir):
    """The same tiny model loaded plainly (reference computations go through it, not through safetyscope)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def random_sae_tensors(d_model: int = D_MODEL, d_sae: int = D_SAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Qwen-Scope layout: W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc (d_sae), b_dec (d_model)."""
    g = torch.Generator().manual_seed(seed)
    return {
        # the tiny model's residual stream has norm ~0.25: scale W_enc so x, not b_enc, decides the code
        "W_enc": torch.randn(d_sae, d_model, generator=g) * 4.0,
        "W_dec": torch.randn(d_model, d_sae, generator=g) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.05 - 0.05,
        "b_dec": torch.randn(d_model, generator=g) * 0.1,
    }


@pytest.fixture(scope="session")
def qwen_scope_sae_dir(tmp_path_factory) -> Path:
    """A Qwen-Scope style SAE directory (k inferred from the L0_8 suffix) with layer1 and layer3 files."""
    d = tmp_path_factory.mktemp("saes") / SAE_DIR_NAME
    d.mkdir()
    for n in SAE_LAYERS:
        torch.save(random_sae_tensors(seed=100 + n), d / f"layer{n}.sae.pt")
    return d


@pytest.fixture(scope="session")
def tiny_sae(qwen_scope_sae_dir):
    from safetyscope import load_sae

    return load_sae(qwen_scope_sae_dir, layer=SAE_LAYERS[0])


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (it exists in CI)")
    return SHARED_DATA


# words of CORPUS that the toxic rows of the tests' labelled tables contain
TOXIC_WORDS = ("stupid", "idiot", "hate", "worthless", "garbage", "shut", "bomb", "awful")


@pytest.fixture
def model_args(tiny_model_dir, qwen_scope_sae_dir) -> list:
    """--model/--sae/--layer/--dtype of the tiny model and SAE, for any command with the model options."""
    return ["--model", tiny_model_dir, "--sae", qwen_scope_sae_dir, "--layer", SAE_LAYERS[0], "--dtype", "float32"]


def run_cli(args, ok=True):
    """The safetyscope command in-process; with ``ok`` it must exit 0 (the output and exception in the message)."""
    from click.testing import CliRunner

    from safetyscope.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def edit_last_value_in_place(path, name: str) -> float:
    """Add 0.5 to the last float32 value of tensor ``name`` by rewriting its 4 bytes inside the safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    info = json.loads(raw[8:8 + n])[name]
    assert info["dtype"] == "F32"
    at = 8 + n + info["data_offsets"][1] - 4
    value = struct.unpack("<f", raw[at:at + 4])[0] + 0.5
    size, inode = path.stat().st_size, path.stat().st_ino
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<f", value))
    assert (path.stat().st_size, path.stat().st_ino) == (size, inode)
    return struct.unpack("<f", struct.pack("<f", value))[0]


def count_hashes(monkeypatch, cls) -> list:
    """Count the real hash computations of ``cls`` (Backbone or SAE); the cache answers the rest."""
    calls, real = [], cls._hash_weights
    monkeypatch.setattr(cls, "_hash_weights", lambda self: calls.append(1) or real(self))
    return calls


def fail_part_writes_after(monkeypatch, n_parts: int):
    """The (n_parts+1)-th durable part write (classify, features) fails with a full disk, so the run stops after
    n_parts parts; returns a function that restores the real writer."""
    import errno

    from safetyscope import streaming

    real, calls = streaming.fsync_write_parquet, {"n": 0}

    def write(df, path):
        calls["n"] += 1
        if calls["n"] > n_parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(df, path)

    monkeypatch.setattr(streaming, "fsync_write_parquet", write)
    return lambda: monkeypatch.setattr(streaming, "fsync_write_parquet", real)


def kill_9_when(proc, ready, timeout: float = 120, poll: float = 0.005) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (failing if it ends first or ``timeout`` passes)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)

# -- a local OpenAI-compatible server for the generator and judge backends -------------------------------------
def send_json(handler, code: int, data: bytes) -> None:
    """One HTTP answer from a BaseHTTPRequestHandler (a client that gave up on a slow answer is not an error)."""
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


class LocalChatServer:
    """A real HTTP server on 127.0.0.1 (a free port) serving ``handler`` (a BaseHTTPRequestHandler subclass, its log
    silenced) in a thread for the ``with`` block; ``endpoint`` is its /v1 URL."""

    def __init__(self, handler):
        handler.log_message = lambda *a: None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


class FixedAnswerServer(LocalChatServer):
    """POST /v1/chat/completions -> ``answer(messages)`` (one string, or a list cycled over the n choices).

    ``failures[marker]``: what the first requests whose conversation holds ``marker`` get instead, in order: an HTTP
    status, "reset" (the connection is closed without an answer) or "slow" (answers after the client's timeout)."""

    def __init__(self, answer, failures: dict[str, list] | None = None):
        self.answer, self.failures, self.requests = answer, {k: list(v) for k, v in (failures or {}).items()}, []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = json.dumps(body["messages"])
                with outer.lock:
                    outer.requests.append(body)
                    fail = next((q.pop(0) for m, q in outer.failures.items() if m in text and q), None)
                if fail == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fail == "slow":
                    time.sleep(0.6)
                elif fail is not None:
                    return send_json(self, fail, b"upstream says no\nsecond line of detail")
                got = outer.answer(body["messages"])
                texts = [got] if isinstance(got, str) else got
                n = body.get("n", 1)
                out = {"choices": [{"index": i, "message": {"role": "assistant", "content": texts[i % len(texts)]}}
                                   for i in range(n)]}
                send_json(self, 200, json.dumps(out).encode())

        super().__init__(Handler)
