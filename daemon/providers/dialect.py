"""What differs between AI APIs, behind one seam: where a request goes and how it is
written, how an answer and an error are read, and which rate-limit headers count.

The client (`client.py`) owns everything they share: the HTTP session, the budgets,
the breaker, the counters. A dialect is pure: bytes and headers in, records out, so
each is tested from recorded answers alone (tests/test_dialects.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from daemon.providers.base import ChatRequest, Completion, ProviderError
from daemon.providers.limits import Cost
from daemon.providers.ratelimit_headers import RateLimitHeaders

MESSAGE_MAX_CHARS = 500
"""An error message is cut to this length before it is stored or logged."""
SHORT_MAX_CHARS = 100
"""An error's code or type, likewise."""


class Fault(msgspec.Struct, frozen=True, kw_only=True):
    """How an error answer is treated.

    `pause`: the account cannot be served (a refused key, no credits): every call
    waits for an operator. `rate_limited`: the account's limit (a shared cool-down).
    `overloaded`: the API is busy, nobody's limit: the request was not processed, so
    the job retries with backoff without spending an attempt, and neither the
    breaker nor the other callers are held for it."""

    kind: str
    message: str
    retryable: bool = True
    pause: str | None = None
    rate_limited: bool = False
    overloaded: bool = False


class Dialect(Protocol):
    name: str
    cache_reads_free: bool  # cache reads leave the input budget alone (Anthropic)

    def url(self, base_url: str, request: ChatRequest) -> str:
        """Where the request is posted."""
        ...

    def auth_headers(self, key: str) -> dict[str, str]:
        """The headers that carry the API key (and the API version, where asked)."""
        ...

    def body(self, request: ChatRequest) -> dict[str, Any]: ...

    def cost(self, request: ChatRequest) -> Cost:
        """What the request books from the budgets before it is sent."""
        ...

    def decode(self, raw: bytes, status: int) -> Completion:
        """A 200's body as a Completion; raises ProviderError when it is not one."""
        ...

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimitHeaders:
        """The rate-limit headers that describe this API's per-minute budgets."""
        ...

    def fault(self, status: int, raw: bytes) -> Fault:
        """How an answer other than 200 is treated."""
        ...


def malformed(exc: Exception, status: int) -> ProviderError:
    """A 200 whose body is not the answer it should be (retried: it may be a glitch)."""
    return ProviderError(f"malformed answer: {exc}", kind="BadResponse", status=status)


def withheld(why: str, status: int) -> ProviderError:
    """An answer the API or the model withheld: asking again gets the same."""
    return ProviderError(why, kind="ContentFiltered", status=status, retryable=False)


class ErrorText(msgspec.Struct, frozen=True):
    """An error body as far as it could be read: the message and the code/type the
    API gave (either may be missing), whatever shape the server chose."""

    message: str
    code: str | None = None
    type: str | None = None
    structured: bool = False  # the API's own JSON, not a proxy's page


def read_error(raw: bytes) -> ErrorText:
    """The message, code and type of an error body in any of the shapes seen in the
    wild: OpenAI's `{"error": {...}}` (string or integer `code`), Anthropic's
    `{"type": "error", "error": {...}}`, vLLM's flat `{"object": "error", "message"}`,
    Ollama's `{"error": "text"}`, Gemini's JSON array of those. Anything else is kept
    as its first bytes, never a crash."""
    try:
        body: Any = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # nesting deep enough is an error too
        return ErrorText(raw[:200].decode("utf-8", "replace"))
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return ErrorText(raw[:200].decode("utf-8", "replace"))
    error = body.get("error", body)
    if isinstance(error, str):
        return ErrorText(error[:MESSAGE_MAX_CHARS], structured=True)
    if not isinstance(error, dict):
        return ErrorText(raw[:200].decode("utf-8", "replace"))
    code = error.get("code")
    kind = error.get("type") or error.get("status")
    message = error.get("message", error.get("detail"))  # FastAPI's {"detail": ...}
    return ErrorText(
        str(message if message is not None else raw[:200].decode("utf-8", "replace"))[
            :MESSAGE_MAX_CHARS
        ],
        code=None if code is None else str(code)[:SHORT_MAX_CHARS],
        type=None if kind is None else str(kind)[:SHORT_MAX_CHARS],
        structured=True,
    )
