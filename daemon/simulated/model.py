"""The simulated API's fake model: a deterministic, cheap stand-in for reading a
prompt and answering it, shared by real completions and the faults that damage one.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Literal

import msgspec

from daemon.simulated.wire import ENCODER, InMessage

_ANALYSED_CHARS = 4096  # the fake "model" reads only this much, so CPU per request is bounded
_SUMMARY_WORDS = 24
_TOPICS = 3
_POSITIVE = frozenset({"good", "great", "excellent", "happy", "love", "success", "win", "best"})
_NEGATIVE = frozenset({"bad", "poor", "terrible", "sad", "hate", "failure", "broken", "worst"})
_STOPWORDS = frozenset({"about", "after", "their", "there", "these", "those", "which", "while"})


class _Analysis(msgspec.Struct):
    summary: str
    sentiment: Literal["positive", "neutral", "negative"]
    topics: list[str]
    language: str
    score: float


def text_of(message: InMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def _analyse(text: str, max_words: int, max_topics: int) -> _Analysis:
    """A deterministic stand-in for a model reading `text` (only its first few KiB)."""
    head = text[:_ANALYSED_CHARS]
    words = head.split()
    summary = " ".join(words[:max_words]) if words else "(empty input)"
    lowered = [word.strip(".,;:!?\"'()[]").lower() for word in words]
    mood = sum(w in _POSITIVE for w in lowered) - sum(w in _NEGATIVE for w in lowered)
    sentiment: Literal["positive", "neutral", "negative"] = (
        "positive" if mood > 0 else "negative" if mood < 0 else "neutral"
    )
    counts = Counter(w for w in lowered if len(w) >= 5 and w.isalpha() and w not in _STOPWORDS)
    topics = [word for word, _ in counts.most_common(max_topics)]
    score = round(zlib.crc32(head.encode()) / 0xFFFFFFFF, 3)
    return _Analysis(summary, sentiment, topics, "en", score)


def answer(text: str, json_object: bool, max_tokens: int) -> tuple[str, str]:
    """The answer and its finish_reason, kept within `max_tokens` (4 chars a token).
    JSON answers shrink until they fit, so they stay parseable when they can."""
    budget_chars = max_tokens * 4
    if json_object:
        for words, topics in ((_SUMMARY_WORDS, _TOPICS), (12, _TOPICS), (6, 1), (3, 0), (1, 0)):
            content = ENCODER.encode(_analyse(text, words, topics)).decode()
            if len(content) <= budget_chars:
                return content, "stop"
    else:
        content = f"Summary: {_analyse(text, _SUMMARY_WORDS, 0).summary}"
        if len(content) <= budget_chars:
            return content, "stop"
    cut = content[:budget_chars]
    if not json_object and " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut, "length"


def stop_at(
    content: str, finish: str, stop_sequences: tuple[str, ...]
) -> tuple[str, str, str | None]:
    """Cut `content` before the earliest of `stop_sequences` in it: the content, its
    finish reason ("stop_sequence" if cut) and the sequence that stopped it."""
    found = [(at, seq) for seq in stop_sequences if seq and (at := content.find(seq)) >= 0]
    if not found:
        return content, finish, None
    at, seq = min(found)
    return content[:at], "stop_sequence", seq
