"""The simulated API's OpenAI dialect: chat completions at `/v1/chat/completions`,
OpenAI's error bodies, its two budgets (`limits.Limits`), and its automatic prompt
caching (a repeated prefix of 1,024+ tokens is reported as `cached_tokens`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import msgspec

from daemon.config import SimulateConfig
from daemon.simulated.cache import MIN_CACHED_TOKENS, Breakpoint, CacheUse, PrefixHasher
from daemon.simulated.dialect import Dialect, Reply, Turn, describe
from daemon.simulated.faults import FAULT_RETRY_AFTER_MS
from daemon.simulated.limits import Cost, Limits, RateLimits, openai_duration
from daemon.simulated.model import text_of
from daemon.simulated.wire import (
    DEFAULT_MAX_TOKENS,
    ENCODER,
    ApiError,
    ChatRequest,
    Choice,
    Completion,
    ErrorBody,
    ErrorDetail,
    OutMessage,
    PromptTokensDetails,
    Usage,
)

_REQUEST_DECODER = msgspec.json.Decoder(ChatRequest)
_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "simulated")
_MODELS_CREATED = 1_700_000_000
_CACHE_STEP_TOKENS = 128  # OpenAI's cache hits grow in steps of this many tokens
_CACHE_BOUNDARIES = 4  # the last message ends tried as prefixes: bounded cache writes


class _Model(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class _ModelList(msgspec.Struct):
    object: str
    data: list[_Model]


def _invalid(exc: msgspec.DecodeError) -> ApiError:
    """Turn a msgspec error into OpenAI's 400, naming the parameter at fault."""
    invalid = describe(exc)
    if invalid is None:
        message = f"We could not parse the JSON body of your request. ({exc})"
        return ApiError(400, message, "invalid_request_error")
    path, missing, reason = invalid
    if missing:
        param = f"{path}.{missing}" if path else missing
        message = f"Missing required parameter: '{param}'."
        return ApiError(
            400, message, "invalid_request_error", param=param, code="missing_required_parameter"
        )
    message = f"Invalid value for '{path}': {reason}." if path else f"Invalid body: {reason}."
    return ApiError(400, message, "invalid_request_error", param=path or None, code="invalid_value")


class OpenAIDialect(Dialect):
    name = "openai"
    path = "/v1/chat/completions"
    charges_output = False  # the TPM charge counts max_tokens up front

    def base_url(self, root: str) -> str:
        return f"{root}/v1"

    def parse(self, raw: bytes, headers: Mapping[str, str]) -> Turn:
        try:
            body = _REQUEST_DECODER.decode(raw)
        except msgspec.DecodeError as exc:
            raise _invalid(exc) from None
        if body.stream:
            message = "Streaming is not supported by the simulated API."
            raise ApiError(400, message, "invalid_request_error", param="stream")
        users = [message for message in body.messages if message.role == "user"]
        json_object = (
            body.response_format is not None and body.response_format.type == "json_object"
        )
        texts = [text_of(message) for message in body.messages]
        prompt_tokens = sum(map(len, texts)) // 4
        return Turn(
            model=body.model,
            text=text_of((users or body.messages)[-1]),
            json_object=json_object,
            max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            prompt_tokens=prompt_tokens,
            breakpoints=self._prefixes(body, texts) if prompt_tokens >= MIN_CACHED_TOKENS else (),
        )

    def _prefixes(self, body: ChatRequest, texts: list[str]) -> tuple[Breakpoint, ...]:
        """OpenAI caches any long prefix by itself; here, the prompt up to each of the
        last few message ends, its tokens counted down to OpenAI's 128-token steps."""
        hasher = PrefixHasher(self.name, body.model)
        chars = 0
        ends: list[Breakpoint] = []
        for message, text in zip(body.messages, texts, strict=True):
            hasher.add(message.role, text)
            chars += len(text)
            tokens = chars // 4
            if tokens >= MIN_CACHED_TOKENS:
                step = (tokens - MIN_CACHED_TOKENS) // _CACHE_STEP_TOKENS * _CACHE_STEP_TOKENS
                ends.append(Breakpoint(hasher.key(), MIN_CACHED_TOKENS + step))
        return tuple(ends[-_CACHE_BOUNDARIES:])

    def cost(self, turn: Turn, cache: CacheUse) -> Cost:
        return Cost(tokens=turn.prompt_tokens + turn.max_tokens)

    def limits(self, settings: SimulateConfig, clock: Callable[[], float]) -> RateLimits:
        return Limits(settings, clock)

    def render(self, turn: Turn, reply: Reply, ident: str) -> bytes:
        completion = Completion(
            id=f"chatcmpl-{ident}",
            object="chat.completion",
            created=int(time.time()),
            model=turn.model,
            choices=[Choice(0, OutMessage("assistant", reply.content), reply.finish)],
            usage=Usage(
                reply.prompt_tokens,
                reply.output_tokens,
                reply.prompt_tokens + reply.output_tokens,
                PromptTokensDetails(reply.cache_read) if reply.cache_read else None,
            ),
        )
        return ENCODER.encode(completion)

    def empty(self, turn: Turn) -> bytes:
        return ENCODER.encode({"id": "chatcmpl-fault", "object": "chat.completion"})

    def error_body(self, error: ApiError) -> bytes:
        return ENCODER.encode(
            ErrorBody(ErrorDetail(error.message, error.type, error.param, error.code))
        )

    def not_found(self, method: str, path: str) -> ApiError:
        return ApiError(404, f"Invalid URL ({method} {path})", "invalid_request_error")

    def server_error(self, headers: dict[str, str]) -> ApiError:
        message = "The server had an error while processing your request. Sorry about that!"
        return ApiError(500, message, "server_error", headers=headers)

    def overloaded(self, headers: dict[str, str]) -> ApiError:
        message = "The server is overloaded or not ready yet."
        return ApiError(503, message, "server_error", headers=headers)

    def fault_error(self, fault: str) -> ApiError | None:
        match fault:
            case "500":
                message = "The server had an error while processing your request. Sorry!"
                return ApiError(500, message, "server_error")
            case "503":
                message = "The engine is currently overloaded, please try again later."
                return ApiError(503, message, "server_error", headers={"retry-after": "1"})
            case "429" | "429-no-retry-after":
                hint = fault == "429"
                wait = openai_duration(FAULT_RETRY_AFTER_MS / 1000) if hint else "a while"
                headers = (
                    {"retry-after": "1", "retry-after-ms": str(FAULT_RETRY_AFTER_MS)}
                    if hint
                    else {}
                )
                message = f"Rate limit reached for requests. Please try again in {wait}."
                return ApiError(
                    429, message, "requests", code="rate_limit_exceeded", headers=headers
                )
        return None

    def models(self) -> bytes:
        models = [_Model(name, "model", _MODELS_CREATED, "vigil-simulated") for name in _MODEL_IDS]
        return ENCODER.encode(_ModelList("list", models))
