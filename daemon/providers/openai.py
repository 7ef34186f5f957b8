"""An OpenAI-compatible chat-completions client (OpenAI, vLLM, llama.cpp, Ollama,
LiteLLM...), one long-lived aiohttp session per provider behind its limits."""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any, Self

import aiohttp
import anyio
import msgspec
import structlog

from daemon.config import ProviderConfig
from daemon.providers.base import (
    NON_RETRYABLE_STATUSES,
    ChatRequest,
    Completion,
    ProviderError,
)
from daemon.providers.limits import ProviderLimits

log = structlog.get_logger("vigil.provider")
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
DEFAULT_429_PAUSE_S = 1.0


class _Choice(msgspec.Struct):
    message: dict[str, Any]


class _Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Answer(msgspec.Struct):
    choices: list[_Choice]
    usage: _Usage = _Usage()


_answer_decoder = msgspec.json.Decoder(_Answer)


class ProviderStats(msgspec.Struct, kw_only=True):
    requests: int = 0
    by_status: dict[str, int] = {}
    rate_limited: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms_total: float = 0.0


MAX_HINT_S = 300.0
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float | None:
    """OpenAI's reset durations: "120ms", "1.5s", "6m0s", "1h2m3s"."""
    text = text.strip()
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _bounded(value: float) -> float | None:
    """A hint we can act on: finite, and capped, so `inf` cannot stall a provider."""
    return min(max(0.0, value), MAX_HINT_S) if math.isfinite(value) else None


def retry_after_s(headers: Any) -> float | None:
    """The server's wait hint: `retry-after-ms`, then `retry-after` (seconds), then
    the longest `x-ratelimit-reset-*` duration."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            hint = _bounded(float(value) * scale)
        except ValueError:
            continue
        if hint is not None:
            return hint
    resets = [
        parse_duration_s(headers.get(name, ""))
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    ]
    known = [r for r in resets if r is not None]
    return _bounded(max(known)) if known else None


class OpenAIProvider(anyio.AsyncContextManagerMixin):
    """Owns the HTTP session and the limits of one configured provider."""

    def __init__(self, name: str, config: ProviderConfig, base_url: str | None = None) -> None:
        self.name = name
        self.config = config
        self.base_url = (base_url or config.base_url).rstrip("/")
        self.limits = ProviderLimits(
            max_concurrency=config.max_concurrency,
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
        )
        self.stats = ProviderStats()
        self._counts: Counter[str] = Counter()
        self.paused_reason: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        env = self.config.api_key_env
        if env:
            key = os.environ.get(env)
            if not key:
                raise ProviderError(
                    f"environment variable {env} (the API key of provider {self.name!r}) "
                    "is not set",
                    kind="MissingKey",
                    retryable=False,
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def resume(self) -> None:
        self.paused_reason = None

    async def complete(self, request: ChatRequest) -> Completion:
        """One throttled call; raises ProviderError on every kind of failure."""
        if self.paused_reason:
            raise ProviderError(
                f"provider {self.name!r} is paused: {self.paused_reason}",
                kind="ProviderPaused",
                retryable=True,
                retry_after_s=30.0,
            )
        headers = self._headers()  # a missing key fails before taking budget
        estimate = request.estimated_tokens()
        async with self.limits.slot(estimate):
            self.stats.in_flight += 1
            try:
                completion = await self._post(request, headers)
            finally:
                self.stats.in_flight -= 1
        used = completion.prompt_tokens + completion.completion_tokens
        if used:
            self.limits.tokens.refund(estimate - used)
        return completion

    async def _post(self, request: ChatRequest, headers: dict[str, str]) -> Completion:
        assert self._session is not None, "provider used outside its context"
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        started = time.monotonic()
        self.stats.requests += 1
        try:
            with anyio.fail_after(self.config.timeout_s):
                async with self._session.post(
                    f"{self.base_url}/chat/completions",
                    # A stream, not bytes: aiohttp warns about large bytes bodies.
                    data=io.BytesIO(msgspec.json.encode(body)),
                    headers=headers,
                ) as response:
                    raw = await _read_bounded(response, MAX_RESPONSE_BYTES + 1)
                    status = response.status
                    answer_headers = response.headers
        except TimeoutError:
            self._count("timeout")
            raise ProviderError(
                f"no answer within {self.config.timeout_s:g} s", kind="Timeout"
            ) from None
        except aiohttp.ClientError as exc:
            self._count("connection_error")
            raise ProviderError(
                f"cannot reach {self.base_url}: {type(exc).__name__}", kind="ConnectionError"
            ) from None
        latency_ms = (time.monotonic() - started) * 1000
        self.stats.latency_ms_total += latency_ms
        self._count(str(status))
        if status != 200:
            raise self._http_error(status, answer_headers, raw)
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ProviderError("answer larger than 8 MiB", kind="BadResponse", status=status)
        try:
            answer = _answer_decoder.decode(raw)
            content = answer.choices[0].message.get("content")
        except (msgspec.DecodeError, IndexError) as exc:
            raise ProviderError(
                f"malformed answer: {exc}", kind="BadResponse", status=status
            ) from None
        if not isinstance(content, str):
            raise ProviderError("answer has no text content", kind="BadResponse", status=status)
        self.stats.prompt_tokens += answer.usage.prompt_tokens
        self.stats.completion_tokens += answer.usage.completion_tokens
        return Completion(
            content=content,
            prompt_tokens=answer.usage.prompt_tokens,
            completion_tokens=answer.usage.completion_tokens,
            http_status=status,
            latency_ms=latency_ms,
        )

    def _count(self, key: str) -> None:
        self._counts[key] += 1
        self.stats.by_status = dict(self._counts)

    def _http_error(self, status: int, headers: Any, raw: bytes) -> ProviderError:
        message, code = _error_text(raw)
        key = os.environ.get(self.config.api_key_env) if self.config.api_key_env else None
        if key:
            message = message.replace(key, "[redacted]")  # some APIs echo the key back
        hint = retry_after_s(headers)
        if status == 429:
            self.stats.rate_limited += 1
            if code == "insufficient_quota":
                self.paused_reason = "quota exhausted (insufficient_quota)"
                log.error("provider.paused", provider=self.name, reason=self.paused_reason)
                return ProviderError(
                    f"HTTP 429 insufficient_quota: {message}",
                    kind="QuotaExhausted",
                    status=status,
                    retryable=False,
                )
            if message.startswith("Request too large"):
                # Bigger than the whole per-minute budget: waiting never helps.
                return ProviderError(
                    f"HTTP 429: {message}", kind="TooLarge", status=status, retryable=False
                )
            self.limits.cool_down(hint if hint is not None else DEFAULT_429_PAUSE_S)
            return ProviderError(
                f"HTTP 429 rate limited: {message}",
                kind="RateLimited",
                status=status,
                retry_after_s=hint,
            )
        if status in (401, 403):
            self.paused_reason = (
                f"HTTP {status}: the API key in ${self.config.api_key_env or '(none)'} was refused"
            )
            log.error("provider.paused", provider=self.name, reason=self.paused_reason)
        return ProviderError(
            f"HTTP {status}: {message}",
            kind="HTTPError",
            status=status,
            retryable=status not in NON_RETRYABLE_STATUSES,
            retry_after_s=hint,
        )


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to `limit` bytes: `read(n)` returns what has arrived so far, so a
    body that comes in pieces needs a loop."""
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await response.content.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _error_text(raw: bytes) -> tuple[str, str | None]:
    """The OpenAI error body's message and code, bounded; falls back to raw text."""
    try:
        body = msgspec.json.decode(raw)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            return str(error.get("message", ""))[:500], str(code) if code else None
    except msgspec.DecodeError:
        pass
    return raw[:200].decode("utf-8", "replace"), None
