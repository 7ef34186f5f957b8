"""The simulated API's Anthropic dialect: the Messages API at `/v1/messages`, with
its `anthropic-version` header, `cache_control` prompt caching, error shapes and three
budgets (`anthropic_limits`)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Mapping

import msgspec

from daemon.config import SimulateConfig
from daemon.simulated.anthropic_limits import AnthropicLimits
from daemon.simulated.anthropic_wire import (
    MAX_CACHE_BREAKPOINTS,
    ErrorBody,
    ErrorDetail,
    Message,
    MessagesRequest,
    MessageUsage,
    ModelInfo,
    ModelList,
    TextBlock,
    TextOut,
)
from daemon.simulated.cache import Breakpoint, CacheUse, PrefixHasher
from daemon.simulated.dialect import Dialect, Reply, Turn, describe
from daemon.simulated.limits import Cost, RateLimits
from daemon.simulated.wire import ENCODER, ApiError

VERSION_HEADER = "anthropic-version"
_DECODER = msgspec.json.Decoder(MessagesRequest)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}  # any other status is an api_error
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}
_MODELS = (
    ("claude-sonnet-4-5", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
    ("simulated", "Simulated"),
)
_MODELS_CREATED = "2025-01-01T00:00:00Z"
_INDEX_RE = re.compile(r"\[(\d+)\]")


def _invalid(exc: msgspec.DecodeError) -> ApiError:
    """Turn a msgspec error into Anthropic's 400, naming the field at fault the way
    Anthropic does ("messages.0.content: ...")."""
    invalid = describe(exc)
    if invalid is None:
        message = f"There was an error parsing the body of your request: {exc}"
        return ApiError(400, message, "invalid_request_error")
    path, missing, reason = invalid
    path = _INDEX_RE.sub(r".\1", path)
    if missing:
        return ApiError(
            400, f"{path}.{missing}: Field required".lstrip("."), "invalid_request_error"
        )
    message = f"{path}: {reason}" if path else f"Invalid request body: {reason}"
    return ApiError(400, message, "invalid_request_error")


def _blocks(body: MessagesRequest) -> Iterator[tuple[str, TextBlock | str]]:
    """Every text of the prompt in Anthropic's cache order (system, then messages),
    with who said it."""
    if isinstance(body.system, str):
        yield "system", body.system
    else:
        for block in body.system or ():
            yield "system", block
    for message in body.messages:
        if isinstance(message.content, str):
            yield message.role, message.content
        else:
            for block in message.content:
                yield message.role, block


def _text(block: TextBlock | str) -> str:
    return block if isinstance(block, str) else block.text


class AnthropicDialect(Dialect):
    name = "anthropic"
    path = "/v1/messages"
    charges_output = True  # OTPM: the answer's real output tokens

    def base_url(self, root: str) -> str:
        return root  # Anthropic's clients append /v1/messages themselves

    def parse(self, raw: bytes, headers: Mapping[str, str]) -> Turn:
        if not headers.get(VERSION_HEADER):
            raise ApiError(400, f"{VERSION_HEADER}: header is required", "invalid_request_error")
        try:
            body = _DECODER.decode(raw)
        except msgspec.DecodeError as exc:
            raise _invalid(exc) from None
        if body.stream:
            message = "stream: streaming is not supported by the simulated API"
            raise ApiError(400, message, "invalid_request_error", param="stream")
        chars, breakpoints = self._prefixes(body)
        users = [m for m in body.messages if m.role == "user"]
        last = (users or body.messages)[-1]
        text = last.content if isinstance(last.content, str) else "".join(map(_text, last.content))
        system = (
            body.system if isinstance(body.system, str) else "".join(map(_text, body.system or ()))
        )
        return Turn(
            model=body.model,
            text=text,
            json_object="json" in system.lower() or "json" in text.lower(),
            max_tokens=body.max_tokens,
            prompt_tokens=chars // 4,
            stop_sequences=tuple(body.stop_sequences),
            breakpoints=tuple(breakpoints),
        )

    def _prefixes(self, body: MessagesRequest) -> tuple[int, list[Breakpoint]]:
        """The prompt's length in chars, and a breakpoint at each block marked with
        cache_control: the hash of the prefix up to and including it, and its tokens."""
        marked = any(
            not isinstance(block, str) and block.cache_control is not None
            for _, block in _blocks(body)
        )
        hasher = PrefixHasher(self.name, body.model) if marked else None
        chars = 0
        breakpoints: list[Breakpoint] = []
        for role, block in _blocks(body):
            text = _text(block)
            chars += len(text)
            if hasher is None:
                continue
            hasher.add(role, text)
            if not isinstance(block, str) and block.cache_control is not None:
                breakpoints.append(Breakpoint(hasher.key(), chars // 4))
                if len(breakpoints) > MAX_CACHE_BREAKPOINTS:
                    message = (
                        f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control "
                        "may be provided."
                    )
                    raise ApiError(400, message, "invalid_request_error")
        return chars, breakpoints

    def cost(self, turn: Turn, cache: CacheUse) -> Cost:
        return Cost(input_tokens=turn.prompt_tokens - cache.read)

    def limits(self, settings: SimulateConfig, clock: Callable[[], float]) -> RateLimits:
        return AnthropicLimits(settings, clock)

    def render(self, turn: Turn, reply: Reply, ident: str) -> bytes:
        return self._message(
            turn,
            [TextOut("text", reply.content)],
            _STOP_REASONS[reply.finish],
            reply.stop_sequence,
            MessageUsage(
                reply.input_tokens, reply.output_tokens, reply.cache_creation, reply.cache_read
            ),
            ident,
        )

    def empty(self, turn: Turn) -> bytes:
        usage = MessageUsage(turn.prompt_tokens, 0, 0, 0)
        return self._message(turn, [], "end_turn", None, usage, "fault")

    @staticmethod
    def _message(
        turn: Turn,
        content: list[TextOut],
        stop_reason: str,
        stop_sequence: str | None,
        usage: MessageUsage,
        ident: str,
    ) -> bytes:
        message = Message(
            f"msg_{ident}",
            "message",
            "assistant",
            turn.model,
            content,
            stop_reason,
            stop_sequence,
            usage,
        )
        return ENCODER.encode(message)

    def error_body(self, error: ApiError) -> bytes:
        kind = _ERROR_TYPES.get(error.status, "api_error")
        return ENCODER.encode(ErrorBody("error", ErrorDetail(kind, error.message)))

    def not_found(self, method: str, path: str) -> ApiError:
        return ApiError(404, "Not Found", "not_found_error")

    def server_error(self, headers: dict[str, str]) -> ApiError:
        return ApiError(500, "Internal server error", "api_error", headers=headers)

    def overloaded(self, headers: dict[str, str]) -> ApiError:
        return ApiError(529, "Overloaded", "overloaded_error", headers=headers)

    def fault_error(self, fault: str) -> ApiError | None:
        match fault:
            case "500":
                return self.server_error({})
            case "503":
                message = "Service temporarily unavailable, please try again later."
                return ApiError(503, message, "api_error", headers={"retry-after": "1"})
            case "429" | "429-no-retry-after":
                headers = {"retry-after": "1"} if fault == "429" else {}
                message = "This request would exceed your rate limit. Please try again later."
                return ApiError(429, message, "rate_limit_error", headers=headers)
        return None

    def models(self) -> bytes:
        data = [ModelInfo("model", id_, name, _MODELS_CREATED) for id_, name in _MODELS]
        return ENCODER.encode(ModelList(data, False, data[0].id, data[-1].id))

    def answer_headers(self) -> dict[str, str]:
        return {"request-id": f"req_sim{uuid.uuid4().hex[:24]}"}
