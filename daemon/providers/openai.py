"""The OpenAI chat-completions dialect, and the servers that speak it with their own
accents (README "Providers"):

- Azure OpenAI: the key in an `api-key` header, deployment URLs with an `api-version`
  query, answers withheld by its content filter (fail, no retry), `-1` limit headers.
- Groq: its `x-ratelimit-*-requests` headers count per day: never a per-minute budget.
- vLLM, llama.cpp, Ollama, Gemini, OpenRouter: error bodies of other shapes (integer
  codes, a flat object, a string, a JSON array; see `dialect.read_error`), llama.cpp's
  503 while the model loads (retried), OpenRouter's 402 when out of credits (pauses).
  `max_tokens` is sent, not `max_completion_tokens`, which Ollama ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec

from daemon.providers.base import NON_RETRYABLE_STATUSES, ChatRequest, Completion, ProviderError
from daemon.providers.dialect import ErrorText, Fault, malformed, read_error, withheld
from daemon.providers.limits import Cost
from daemon.providers.ratelimit_headers import RateLimitHeaders, parse_openai_headers

AZURE_HOSTS = (".openai.azure.com", ".cognitiveservices.azure.com")
GROQ_HOSTS = ("api.groq.com",)
OVERLOADED_STATUSES = frozenset({503, 529})
BAD_KEY_400 = "API key not valid"  # Gemini refuses a key with a 400 INVALID_ARGUMENT
MODERATION_WORDS = ("flagged", "moderation")


class _Choice(msgspec.Struct):
    message: dict[str, Any]
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct, frozen=True):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Answer(msgspec.Struct):
    choices: list[_Choice]
    usage: _Usage | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)


def server_of(dialect: str, base_url: str) -> str:
    """The server a provider names, or, for "auto", the one its host tells."""
    if dialect != "auto":
        return dialect
    host = (urlsplit(base_url).hostname or "").lower()
    if host.endswith(AZURE_HOSTS):
        return "azure"
    if host in GROQ_HOSTS:
        return "groq"
    return "openai"


class OpenAIDialect:
    cache_reads_free = False

    def __init__(self, name: str, api_version: str = "", key_env: str = "") -> None:
        self.name = name
        self._api_version = api_version
        self._key_env = key_env or "(none)"

    @classmethod
    def for_server(
        cls, dialect: str, base_url: str, api_version: str = "", key_env: str = ""
    ) -> OpenAIDialect:
        return cls(server_of(dialect, base_url), api_version, key_env)

    def url(self, base_url: str, request: ChatRequest) -> str:
        if self.name == "azure":
            deployment = quote(request.model, safe="")
            version = quote(self._api_version, safe="")
            return (
                f"{base_url}/openai/deployments/{deployment}/chat/completions?api-version={version}"
            )
        return f"{base_url}/chat/completions"

    def auth_headers(self, key: str) -> dict[str, str]:
        if not key:
            return {}
        if self.name == "azure":
            return {"api-key": key}
        return {"Authorization": f"Bearer {key}"}

    def body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def cost(self, request: ChatRequest) -> Cost:
        return Cost(request.estimated_input_tokens(), request.max_tokens)

    def decode(self, raw: bytes, status: int) -> Completion:
        try:
            answer = _answer_decoder.decode(raw)
            choice = answer.choices[0]
        except (msgspec.DecodeError, RecursionError, IndexError) as exc:
            raise malformed(exc, status) from None
        if choice.finish_reason == "content_filter":
            why = "the API's content filter withheld the answer (finish_reason content_filter)"
            raise withheld(why, status)
        content = choice.message.get("content")
        refusal = choice.message.get("refusal")
        if not content and isinstance(refusal, str) and refusal:
            raise withheld(f"the model refused: {refusal[:200]}", status)
        if not isinstance(content, str):
            raise ProviderError("answer has no text content", kind="BadResponse", status=status)
        usage = answer.usage or _Usage()
        details = usage.prompt_tokens_details
        finish = choice.finish_reason
        return Completion(
            content=content,
            prompt_tokens=usage.prompt_tokens or 0,
            completion_tokens=usage.completion_tokens or 0,
            cached_tokens=(details.cached_tokens or 0) if details else 0,
            stop_reason="max_tokens" if finish == "length" else finish,
            http_status=status,
        )

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimitHeaders:
        return parse_openai_headers(headers, requests=self.name != "groq")

    def fault(self, status: int, raw: bytes) -> Fault:
        error = read_error(raw)
        message = error.message
        if status == 429:
            return _too_many(error)
        if status == 402:  # OpenRouter: no credits left
            return Fault(
                kind="QuotaExhausted",
                message=f"HTTP 402: {message}",
                retryable=False,
                pause=f"HTTP 402: no credits left ({message[:200]})",
            )
        if status == 403 and any(word in message.lower() for word in MODERATION_WORDS):
            # OpenRouter's moderation refusing one input: that job's, not the key's.
            return Fault(
                kind="ContentFiltered", message=f"HTTP {status}: {message}", retryable=False
            )
        if status in (401, 403) or (status == 400 and message.startswith(BAD_KEY_400)):
            return Fault(
                kind="HTTPError",
                message=f"HTTP {status}: {message}",
                retryable=False,
                pause=f"HTTP {status}: the API key in ${self._key_env} was refused",
            )
        if error.code == "content_filter":  # Azure refusing the prompt
            return Fault(
                kind="ContentFiltered", message=f"HTTP {status}: {message}", retryable=False
            )
        if status in OVERLOADED_STATUSES and error.structured:
            # The API's own "not now" (overloaded, llama.cpp loading its model), not a
            # proxy's page: the request was not processed.
            return Fault(kind="Overloaded", message=f"HTTP {status}: {message}", overloaded=True)
        return Fault(
            kind="HTTPError",
            message=f"HTTP {status}: {message}",
            retryable=status not in NON_RETRYABLE_STATUSES,
        )


def _too_many(error: ErrorText) -> Fault:
    """A 429: out of quota (pauses), bigger than the whole budget, or rate limited."""
    message = error.message
    if "insufficient_quota" in (error.code, error.type):
        return Fault(
            kind="QuotaExhausted",
            message=f"HTTP 429 insufficient_quota: {message}",
            retryable=False,
            pause="quota exhausted (insufficient_quota)",
        )
    if message.startswith("Request too large"):
        # Bigger than the whole per-minute budget: waiting never helps.
        return Fault(kind="TooLarge", message=f"HTTP 429: {message}", retryable=False)
    return Fault(kind="RateLimited", message=f"HTTP 429 rate limited: {message}", rate_limited=True)
