"""Named faults for the simulated API: every request fails one chosen way, for
fault-injection tests. Apart from the API itself, which only routes a request here.

Ask for a fault with the `x-sim-fault` header, or point a client at `/fault/NAME/v1`
instead of `/v1` (a provider's `base_url` carries no headers). Faults skip the rate
limits and latency.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Awaitable, Callable

import anyio
from aiohttp import web

from daemon.simulated.limits import openai_duration
from daemon.simulated.model import answer, text_of
from daemon.simulated.wire import (
    DEFAULT_MAX_TOKENS,
    ENCODER,
    ApiError,
    ChatRequest,
    Choice,
    Completion,
    OutMessage,
    Usage,
)

FAULT_HEADER = "x-sim-fault"
FAULTS = (
    "500",  # OpenAI's server_error body
    "502",  # a proxy's HTML page, not JSON
    "503",  # overloaded, with retry-after: 1
    "529",  # Anthropic's overloaded_error
    "429",  # rate limited, retry-after-ms: FAULT_RETRY_AFTER_MS
    "429-no-retry-after",  # rate limited, no hint at all
    "reset",  # a 200 whose body is cut off by a TCP reset
    "hang",  # no answer until the client gives up (or HANG_S)
    "slow-body",  # a valid answer trickled out, _SLOW_CHUNK_BYTES every _SLOW_CHUNK_S
    "malformed-json",  # a 200 whose JSON body is truncated
    "no-choices",  # a 200 with valid JSON but no `choices`
    "bad-json-content",  # a valid completion whose content holds no JSON object
)
"""The faults a request can ask for (see the module docstring)."""
FAULT_RETRY_AFTER_MS = 500
_SLOW_CHUNK_BYTES = 8
_SLOW_CHUNK_S = 0.25


async def fault_response(
    fault: str,
    body: ChatRequest,
    request: web.Request,
    hang: Callable[[dict[str, str]], Awaitable[None]],
) -> web.StreamResponse:
    """The answer for `fault`, one of FAULTS; `hang` is the API's own (it ends when the
    client leaves or the server shuts down)."""
    match fault:
        case "500":
            message = "The server had an error while processing your request. Sorry!"
            raise ApiError(500, message, "server_error")
        case "502":
            page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        case "503":
            message = "The engine is currently overloaded, please try again later."
            raise ApiError(503, message, "server_error", headers={"retry-after": "1"})
        case "529":
            overloaded = {"type": "overloaded_error", "message": "Overloaded"}
            data = ENCODER.encode({"type": "error", "error": overloaded})
            return web.Response(status=529, body=data, content_type="application/json")
        case "429" | "429-no-retry-after":
            hint = fault == "429"
            wait = openai_duration(FAULT_RETRY_AFTER_MS / 1000) if hint else "a while"
            headers = (
                {"retry-after": "1", "retry-after-ms": str(FAULT_RETRY_AFTER_MS)} if hint else {}
            )
            message = f"Rate limit reached for requests. Please try again in {wait}."
            raise ApiError(429, message, "requests", code="rate_limit_exceeded", headers=headers)
        case "hang":
            await hang({})
    raw = _fault_answer(body, prose=fault == "bad-json-content")
    match fault:
        case "malformed-json":
            return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
        case "no-choices":
            data = ENCODER.encode({"id": "chatcmpl-fault", "object": "chat.completion"})
            return web.Response(body=data, content_type="application/json")
        case "bad-json-content":
            return web.Response(body=raw, content_type="application/json")
        case "reset":
            return await _reset_midway(request, raw)
        case _:  # "slow-body"
            return await _trickle(request, raw)


def _fault_answer(body: ChatRequest, *, prose: bool) -> bytes:
    """A well-formed completion for the faults that damage one (no counters, no RNG:
    a fault never shifts a seeded run); `prose`: text where JSON was asked for."""
    users = [message for message in body.messages if message.role == "user"]
    json_object = body.response_format is not None and body.response_format.type == "json_object"
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    content, finish = answer(text_of((users or body.messages)[-1]), json_object, max_tokens)
    if prose:
        content, finish = "Sure! The sentiment is positive, and the topics are many.", "stop"
    tokens = max(1, len(content) // 4)
    completion = Completion(
        id="chatcmpl-fault",
        object="chat.completion",
        created=int(time.time()),
        model=body.model,
        choices=[Choice(0, OutMessage("assistant", content), finish)],
        usage=Usage(tokens, tokens, 2 * tokens),
    )
    return ENCODER.encode(completion)


async def _reset_midway(request: web.Request, body: bytes) -> web.StreamResponse:
    """Send the status line, the headers and half the body, then a TCP reset (RST, by
    SO_LINGER 0): what a crashing upstream or a dropped connection looks like."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return response


async def _trickle(request: web.Request, body: bytes) -> web.StreamResponse:
    """A complete, valid answer sent a few bytes at a time: a client with a short total
    timeout gives up, a patient one gets it whole."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    for start in range(0, len(body), _SLOW_CHUNK_BYTES):
        await response.write(body[start : start + _SLOW_CHUNK_BYTES])
        await anyio.sleep(_SLOW_CHUNK_S)
    await response.write_eof()
    return response
