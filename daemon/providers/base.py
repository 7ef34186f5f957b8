"""What every provider speaks: a chat request, a completion, and typed failures."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# Statuses that will fail the same way again: retrying only burns budget.
NON_RETRYABLE_STATUSES = frozenset({400, 401, 403, 404, 413, 422})


class Message(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    messages: list[Message]
    max_tokens: int
    temperature: float = 0.0
    json_mode: bool = False
    cache_system: bool = False  # Anthropic: the system prompt is a cacheable prefix

    def estimated_input_tokens(self) -> int:
        """A pre-flight cost for the input budgets: ~4 characters a token; corrected
        from the answer's `usage` afterwards."""
        chars = sum(len(m.content) for m in self.messages)
        return chars // 4 + 8 * len(self.messages)


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """One answer. `prompt_tokens` counts every input token, the cached ones
    (`cached_tokens`: OpenAI's cached_tokens, Anthropic's cache reads) and Anthropic's
    cache writes (`cache_write_tokens`) included, so all dialects add up alike.
    `stop_reason` is "max_tokens" when the answer was cut there (OpenAI's "length")."""

    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    stop_reason: str | None = None
    http_status: int = 200
    latency_ms: float = 0.0


class ProviderError(Exception):
    """A failed call. `retryable` decides whether the job tries again; the message is
    safe to store and log (it never carries the key or request headers)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status: int | None = None,
        retryable: bool = True,
        retry_after_s: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.details = details or {}


class OutputInvalid(Exception):
    """The model answered, but not in the shape the analyzer asked for."""
