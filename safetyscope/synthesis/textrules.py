"""Text rules of SFT rows: normalisation, shingles and near-duplicates, instruction echoes, the decline-phrase test.

Pure functions of text (no model), used by synthesis (candidate requests, response checks), the audit and
sft-eval. The phrase test is one weak signal: the audit's response judge is a classifier (audit.py).
"""

from __future__ import annotations

import re
import unicodedata

# decline phrases per language, matched (casefolded) in a response's opening sentence by is_refusal; sft-eval reuses it
DECLINE_MARKERS = {
    "en": ("can't", "cannot", "can not", "won't", "will not", "unable to", "not able to", "decline", "refuse",
           "not going to", "not comfortable", "must not", "should not", "shouldn't"),
    "de": ("kann ich nicht", "ich kann nicht", "kann ich leider nicht", "kann dabei nicht", "nicht helfen",
           "werde ich nicht", "ich werde nicht", "darf ich nicht", "lehne ich ab", "ist mir nicht möglich"),
    "fr": ("je ne peux pas", "ne peux pas", "je ne vais pas", "je refuse", "je ne suis pas en mesure",
           "je ne pourrai pas", "il m'est impossible"),
    "es": ("no puedo", "no voy a", "me niego", "no estoy en condiciones", "no podré", "no me es posible"),
    "it": ("non posso", "non sono in grado", "mi rifiuto"),
    "pt": ("não posso", "não consigo ajudar", "me recuso", "não vou"),
    "ru": ("не могу", "не буду", "не стану", "не смогу", "отказываюсь", "не в состоянии"),
    "zh": ("不能", "无法", "不会帮", "拒绝", "不可以", "办不到"),
    "ja": ("できません", "できかねます", "いたしかねます", "致しかねます", "お断り"),
    "ar": ("لا أستطيع", "لا يمكنني", "لن أساعد", "لن أقدم", "أرفض", "لا يسعني"),
    "hi": ("नहीं कर सकता", "नहीं कर सकती", "मदद नहीं कर", "असमर्थ", "मना करता", "मना करती", "नहीं दे सकता", "नहीं दे सकती"),
}
_DECLINES = tuple(m for ms in DECLINE_MARKERS.values() for m in ms)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？؟।])\s*|\n+")
# text of the generation prompts (and of chat templates' default system prompts): a generation that repeats it
# is an echo of the instructions, not a user request or an answer
ECHO_MARKERS = ("harmful request", "harmless request", "refusal training set", "user request", "the request only",
                "safe assistant", "share one concept", "key word is marked", "ai assistant named", "trained by hugging face",
                "refuse it politely", "requested information", "the user's request is", "start with \"i'm sorry\"",
                "answer the user's request")
def normalise(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def shingles(text: str, n: int = 5) -> set[str]:
    t = normalise(text)
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def copies_context(text: str, contexts: list[set], threshold: float = 0.8) -> bool:
    """Most of ``text`` (a share of its 5-grams above ``threshold``) is found in one shown context: a copy of a
    snippet is not new data, even when the context is much longer than the copy (Jaccard would not see it)."""
    s = shingles(text)
    return any(len(s & c) / len(s) > threshold for c in contexts) if s else False


class Deduper:
    """Normalised exact duplicates and near duplicates (5-gram Jaccard > threshold) against what it holds."""

    def __init__(self, threshold: float = 0.8, exact_only: list[str] | tuple[str, ...] = ()):
        self.threshold, self.exact = threshold, {normalise(t) for t in exact_only}
        self.sh: list[set[str]] = []

    def is_dup(self, text: str) -> bool:
        if normalise(text) in self.exact:
            return True
        s = shingles(text)
        return any(jaccard(s, o) > self.threshold for o in self.sh)

    def add(self, text: str) -> None:
        self.exact.add(normalise(text))
        self.sh.append(shingles(text))


_LEAD = re.compile(r"^\s*(?:[-*•>#]+|\d+[.)]|\(?[a-z]\)|(?:user|request|prompt|question|new request)\s*:)\s*", re.I)


def echoes_instructions(text: str) -> bool:
    t = text.casefold().replace("’", "'")
    return any(m in t for m in ECHO_MARKERS)


def extract_candidates(text: str, max_lines: int = 3) -> list[str]:
    """User requests in a generation: its first lines, without list markers, labels, quotes and the «» marks of the
    shown contexts; lines that repeat the generation instructions are not requests."""
    out = []
    for line in text.splitlines():
        line = line.replace("«", "").replace("»", "").strip()
        for _ in range(3):
            line = _LEAD.sub("", line).strip().strip('"“”\'`*').strip()
        if len(line) < 12 or len(line) > 400 or line.endswith(":") or echoes_instructions(line):
            continue
        out.append(line)
        if len(out) >= max_lines:
            break
    return out


def is_refusal(text: str) -> bool:
    """A decline ("can't", "won't", "je ne peux pas", "не могу", "无法", "できません", "لا أستطيع", "नहीं कर सकता" ...,
    see DECLINE_MARKERS) in the opening sentence (the first two when the first is short, e.g. a bare apology such as
    "I'm sorry."): "I'm sorry, but here is how ..." is not a refusal, nor is a text that echoes the instructions.
    Pure function of the text; the language need not be known."""
    t = text.casefold().replace("’", "'").strip()
    parts = _SENTENCE_END.split(t, maxsplit=2)
    short = 30 if t.isascii() else 12  # CJK and other scripts say as much in fewer characters
    opening = parts[0] if len(parts[0]) >= short or len(parts) == 1 else " ".join(parts[:2])
    return any(m in opening[:250] for m in _DECLINES) and not echoes_instructions(t)
