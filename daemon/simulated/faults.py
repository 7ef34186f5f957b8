"""Named faults for the simulated API: every request fails one chosen way, for
fault-injection tests. Apart from the API itself, which only routes a request here.

Ask for a fault with the `x-sim-fault` header, or point a client at `/fault/NAME/v1`
instead of `/v1` (`/fault/NAME` instead of the root, for the anthropic dialect: a
provider's `base_url` carries no headers). Faults skip the rate limits and latency.
Each fault speaks the dialect being served: its errors are in that dialect's shape, and
the damaged answers are that dialect's answers, damaged.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import anyio
from aiohttp import web

from daemon.simulated.dialect import Dialect, Reply, Turn
from daemon.simulated.model import answer
from daemon.simulated.wire import ENCODER

FAULT_HEADER = "x-sim-fault"
FAULTS = (
    "500",  # the dialect's server error (OpenAI's server_error, Anthropic's api_error)
    "502",  # a proxy's HTML page, not JSON
    "503",  # overloaded, with retry-after: 1
    "529",  # Anthropic's overloaded_error (in either dialect)
    "429",  # rate limited, retry-after: 1 (OpenAI's also retry-after-ms: FAULT_RETRY_AFTER_MS)
    "429-no-retry-after",  # rate limited, no hint at all
    "reset",  # a 200 whose body is cut off by a TCP reset
    "hang",  # no answer until the client gives up (or HANG_S)
    "slow-body",  # a valid answer trickled out, _SLOW_CHUNK_BYTES every _SLOW_CHUNK_S
    "malformed-json",  # a 200 whose JSON body is truncated
    "no-choices",  # a 200 with valid JSON but no answer: no `choices`, or empty `content`
    "bad-json-content",  # a valid completion whose content holds no JSON object
)
"""The faults a request can ask for (see the module docstring)."""
FAULT_RETRY_AFTER_MS = 500
_SLOW_CHUNK_BYTES = 8
_SLOW_CHUNK_S = 0.25


async def fault_response(
    fault: str,
    dialect: Dialect,
    turn: Turn,
    request: web.Request,
    hang: Callable[[dict[str, str]], Awaitable[None]],
) -> web.StreamResponse:
    """The answer for `fault`, one of FAULTS, in `dialect`; `hang` is the API's own (it
    ends when the client leaves or the server shuts down)."""
    error = dialect.fault_error(fault)
    if error is not None:
        raise error
    match fault:
        case "502":
            page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        case "529":
            overloaded = {"type": "overloaded_error", "message": "Overloaded"}
            data = ENCODER.encode({"type": "error", "error": overloaded})
            return web.Response(status=529, body=data, content_type="application/json")
        case "hang":
            await hang({})
    raw = _fault_answer(dialect, turn, prose=fault == "bad-json-content")
    match fault:
        case "malformed-json":
            return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
        case "no-choices":
            return web.Response(body=dialect.empty(turn), content_type="application/json")
        case "bad-json-content":
            return web.Response(body=raw, content_type="application/json")
        case "reset":
            return await _reset_midway(request, raw)
        case _:  # "slow-body"
            return await _trickle(request, raw)


def _fault_answer(dialect: Dialect, turn: Turn, *, prose: bool) -> bytes:
    """A well-formed answer for the faults that damage one (no counters, no RNG, no
    cache: a fault never shifts a seeded run); `prose`: text where JSON was asked for."""
    content, finish = answer(turn.text, turn.json_object, turn.max_tokens)
    if prose:
        content, finish = "Sure! The sentiment is positive, and the topics are many.", "stop"
    tokens = max(1, len(content) // 4)
    reply = Reply(content=content, finish=finish, input_tokens=tokens, output_tokens=tokens)
    return dialect.render(turn, reply, "fault")


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
