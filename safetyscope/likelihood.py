"""How likely the backbone finds a text after a prefix: mean log-probability per token of ``text`` given ``prefix``.

One forward pass of the full causal LM per batch (unlike feature extraction, which stops at the SAE's layer).
Perplexity is ``exp(-mean log-prob)``; the gain of a text given one prefix over another (pointwise mutual
information per token) says whether the prefix helps predict the text, e.g. whether a response answers its
prompt or would be as likely after any prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .backbone import Backbone


@torch.inference_mode()
def mean_logprob(backbone: Backbone, prefixes: list[str], texts: list[str], *, batch_size: int = 16,
                 max_text_tokens: int = 256, max_prefix_tokens: int = 512,
                 prefix_special_tokens: bool = False) -> np.ndarray:
    """Per pair, the mean log-probability of ``text``'s tokens after ``prefix`` (already rendered: chat template
    and special tokens included; "" = the tokenizer's BOS alone, if it has one). NaN for an empty text. The text is
    cut to ``max_text_tokens``, the prefix keeps its last ``max_prefix_tokens``. ``prefix_special_tokens``: the
    tokenizer adds its special tokens to the prefix (a raw text rather than a rendered chat template)."""
    if len(prefixes) != len(texts):
        raise ValueError(f"{len(prefixes)} prefixes but {len(texts)} texts")
    tok: Any = backbone.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pre_ids = [(tok(p, add_special_tokens=prefix_special_tokens)["input_ids"] if p else bos)[-max_prefix_tokens:]
               for p in prefixes]
    txt_ids = [tok(t, add_special_tokens=False)["input_ids"][:max_text_tokens] if t else [] for t in texts]
    out = np.full(len(texts), np.nan)
    todo = [i for i in range(len(texts)) if txt_ids[i]]
    heads = {i: pre_ids[i] or bos for i in todo}
    seqs = {i: heads[i] + txt_ids[i] for i in todo}
    # with no prefix and no BOS the text's first token has nothing to be predicted from: it is not scored
    starts = {i: len(heads[i]) or 1 for i in todo}
    order = sorted(todo, key=lambda i: len(seqs[i]))
    model: Any = backbone.model
    base, head = getattr(model, "model", model), model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    for s in range(0, len(order), max(1, batch_size)):
        batch = order[s : s + batch_size]
        input_ids, mask = backbone.pad([seqs[i] for i in batch])
        hidden = base(input_ids=input_ids.to(backbone.device), attention_mask=mask.to(backbone.device),
                      use_cache=False).last_hidden_state
        for b, i in enumerate(batch):
            # the vocabulary projection only at the positions that predict the text's tokens: the prompt's
            # positions would cost most of the (vocabulary-sized) logits and are not scored
            lo, hi = starts[i] - 1, len(seqs[i]) - 1
            logits = head(hidden[b, lo:hi]).float()
            if cap:  # Gemma's final logit soft-capping, as its forward applies it
                logits = torch.tanh(logits / cap) * cap
            target = input_ids[b, lo + 1 : hi + 1].to(logits.device)
            out[i] = float(torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean())
    return out
