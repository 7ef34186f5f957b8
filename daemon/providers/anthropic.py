"""Anthropic's Messages API, natively (README "Providers"): `{base_url}/v1/messages`
with `x-api-key` and `anthropic-version`; the system prompt top-level (optionally a
cached prefix); usage with cache reads and writes; errors told apart by their type;
three budgets (requests, input tokens, output tokens) from the
`anthropic-ratelimit-*` headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from daemon.providers.base import NON_RETRYABLE_STATUSES, ChatRequest, Completion, ProviderError
from daemon.providers.dialect import Fault, malformed, read_error, withheld
from daemon.providers.limits import Cost
from daemon.providers.ratelimit_headers import RateLimitHeaders, parse_anthropic_headers

ANTHROPIC_VERSION = "2023-06-01"
JSON_INSTRUCTION = "Answer with one JSON object and nothing else."
"""The Messages API has no JSON mode: the system prompt asks for it instead."""
_PAUSING_WORDS = ("usage limit", "spend limit", "credit balance")
"""Errors that say the account's money ran out: waiting does not help, an operator does."""


class _Block(msgspec.Struct):
    type: str
    text: str | None = None


class _Usage(msgspec.Struct, frozen=True):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage | None = None


_message_decoder = msgspec.json.Decoder(_Message)


class AnthropicDialect:
    name = "anthropic"
    cache_reads_free = True

    def __init__(self, api_version: str = "", key_env: str = "") -> None:
        self._version = api_version or ANTHROPIC_VERSION
        self._key_env = key_env or "(none)"

    def url(self, base_url: str, request: ChatRequest) -> str:
        return f"{base_url}/v1/messages"

    def auth_headers(self, key: str) -> dict[str, str]:
        headers = {"anthropic-version": self._version}
        if key:
            headers["x-api-key"] = key
        return headers

    def body(self, request: ChatRequest) -> dict[str, Any]:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        blocks: list[dict[str, Any]] = []
        if system:
            block: dict[str, Any] = {"type": "text", "text": system}
            if request.cache_system:  # a stable prefix first, so later calls read it cached
                block["cache_control"] = {"type": "ephemeral"}
            blocks.append(block)
        if request.json_mode:
            blocks.append({"type": "text", "text": JSON_INSTRUCTION})
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [
                {"role": m.role, "content": m.content}
                for m in request.messages
                if m.role != "system"
            ],
            "temperature": request.temperature,
        }
        if blocks:
            body["system"] = blocks
        return body

    def cost(self, request: ChatRequest) -> Cost:
        return Cost(request.estimated_input_tokens(), request.max_tokens)

    def decode(self, raw: bytes, status: int) -> Completion:
        try:
            message = _message_decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise malformed(exc, status) from None
        if message.stop_reason == "refusal":
            raise withheld("the model declined to answer (stop_reason refusal)", status)
        texts = [block.text for block in message.content if block.type == "text" and block.text]
        if not texts:
            raise ProviderError("answer has no text content", kind="BadResponse", status=status)
        usage = message.usage or _Usage()
        written = usage.cache_creation_input_tokens or 0
        read = usage.cache_read_input_tokens or 0
        return Completion(
            content="".join(texts),
            # Anthropic's input_tokens leaves out cache reads and writes; ours counts all.
            prompt_tokens=(usage.input_tokens or 0) + written + read,
            completion_tokens=usage.output_tokens or 0,
            cached_tokens=read,
            cache_write_tokens=written,
            stop_reason=message.stop_reason,
            http_status=status,
        )

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimitHeaders:
        # `anthropic-ratelimit-tokens-*` is only the tighter of the input and output
        # budgets, which are read on their own.
        found = parse_anthropic_headers(headers)
        return msgspec.structs.replace(found, tokens=None)

    def fault(self, status: int, raw: bytes) -> Fault:
        error = read_error(raw)
        kind, message = error.type, error.message
        text = f"HTTP {status} {kind}: {message}" if kind else f"HTTP {status}: {message}"
        if any(words in message.lower() for words in _PAUSING_WORDS) or kind == "billing_error":
            return Fault(
                kind="QuotaExhausted",
                message=text,
                retryable=False,
                pause=f"the account's spending limit or credit is used up ({message[:200]})",
            )
        if kind == "rate_limit_error" or status == 429:
            return Fault(kind="RateLimited", message=text, rate_limited=True)
        if kind == "overloaded_error" or status == 529:
            return Fault(kind="Overloaded", message=text, overloaded=True)
        if kind in ("authentication_error", "permission_error") or status in (401, 403):
            return Fault(
                kind="HTTPError",
                message=text,
                retryable=False,
                pause=f"HTTP {status}: the API key in ${self._key_env} was refused",
            )
        if kind == "request_too_large" or status == 413:
            return Fault(kind="TooLarge", message=text, retryable=False)
        return Fault(kind="HTTPError", message=text, retryable=status not in NON_RETRYABLE_STATUSES)
