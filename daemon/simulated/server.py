"""A simulated OpenAI-compatible chat-completions API, served over real HTTP on loopback.

It exists so the daemon's real HTTP path (client, budgets, 429 cool-downs, timeouts,
retries, circuit breaker) runs in demos, tests and benchmarks with no key and no cost,
against misbehaviour that can be dialled in: latency, rate limits, server errors, hangs.
`GET /stats` tells a test what the API really saw, independently of the daemon's own count.

This module is the API and its server; what it speaks (`wire`), its fake model
(`model`), its rate limits (`limits`) and its named faults (`faults`) live beside it.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import msgspec
from aiohttp import web

from daemon.config import SimulateConfig
from daemon.simulated.faults import FAULT_HEADER, FAULTS, fault_response
from daemon.simulated.limits import Limits
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

__all__ = [
    "SIMULATED_API",
    "SimulatedAPI",
    "SimulatedStats",
    "run_standalone",
    "serve_api",
    "serve_simulated",
]

HANG_S = 600.0
"""A hung request sleeps this long: past any sane client timeout, yet not forever."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted; a 1 MiB job input still fits after JSON escaping."""
_CLIENT_CLOSED = 499  # nginx's code for "client went away"; keeps sum(by_status) == requests
_SHUTDOWN_TIMEOUT_S = 1.0  # aiohttp waits up to twice this for handlers, then cancels them
_CLEANUP_DEADLINE_S = 5.0
_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "simulated")
_MODELS_CREATED = 1_700_000_000


# --- wire types -------------------------------------------------------------------------


class _Model(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class _ModelList(msgspec.Struct):
    object: str
    data: list[_Model]


class SimulatedStats(msgspec.Struct, frozen=True):
    """What the API saw. Every chat request lands in exactly one `by_status` key once done
    (499 = the client went away first), so `sum(by_status) + in_flight == requests`."""

    requests: int
    by_status: dict[str, int]
    tokens_prompt: int
    tokens_completion: int
    in_flight: int
    # What the rate limiter saw, for benchmarks: requests let through and the tokens they
    # were charged (prompt + max_tokens, as OpenAI counts), the buckets' levels now
    # (None: no limit), and the server's clock, so rates need no client-side timing.
    admitted: int = 0
    tokens_charged: int = 0
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    uptime_s: float = 0.0
    faults: dict[str, int] = {}  # requests answered with each injected fault


_REQUEST_DECODER = msgspec.json.Decoder(ChatRequest)


# --- errors -------------------------------------------------------------------------------

_AT_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _invalid(exc: msgspec.DecodeError) -> ApiError:
    """Turn a msgspec error into OpenAI's 400, naming the parameter at fault."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        message = f"We could not parse the JSON body of your request. ({text})"
        return ApiError(400, message, "invalid_request_error")
    at = _AT_RE.search(text)
    path = at["path"] if at else ""
    reason = text[: at.start()] if at else text
    missing = _MISSING_RE.match(text)
    if missing:
        param = f"{path}.{missing['field']}" if path else missing["field"]
        message = f"Missing required parameter: '{param}'."
        return ApiError(
            400, message, "invalid_request_error", param=param, code="missing_required_parameter"
        )
    message = f"Invalid value for '{path}': {reason}." if path else f"Invalid body: {reason}."
    return ApiError(400, message, "invalid_request_error", param=path or None, code="invalid_value")


def _json_response(
    payload: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=ENCODER.encode(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


# --- the API ------------------------------------------------------------------------------


class SimulatedAPI:
    """The behaviour and counters behind the simulated endpoints.

    One instance per server; all state lives here (no globals), and every counter is a
    scalar or a dict keyed by HTTP status, so memory stays flat however long it runs.
    """

    def __init__(
        self, settings: SimulateConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._started = clock()
        self._settings = settings
        self._rng = random.Random(settings.seed)
        self._limits = Limits(settings, clock)
        self._requests = 0
        self._in_flight = 0
        self._by_status: dict[int, int] = {}
        self._tokens_prompt = 0
        self._tokens_completion = 0
        self._admitted = 0
        self._tokens_charged = 0
        self._faults: Counter[str] = Counter()  # keys bounded by FAULTS
        self._hangs: set[anyio.CancelScope] = set()  # at most one per in-flight request

    @property
    def settings(self) -> SimulateConfig:
        return self._settings

    def configure(self, settings: SimulateConfig) -> None:
        """Apply new settings live (reload); budgets restart full only if their limits
        changed, and the random stream carries on unless the seed changed."""
        old = self._settings
        self._settings = settings
        if settings.seed != old.seed:
            self._rng = random.Random(settings.seed)
        if (settings.requests_per_minute, settings.tokens_per_minute, settings.slice_s) != (
            old.requests_per_minute,
            old.tokens_per_minute,
            old.slice_s,
        ):
            self._limits = Limits(settings, self._clock)

    def stats(self) -> SimulatedStats:
        """A snapshot of the counters (the `/stats` body)."""
        remaining_requests, remaining_tokens = self._limits.remaining()
        return SimulatedStats(
            requests=self._requests,
            by_status={str(code): n for code, n in sorted(self._by_status.items())},
            tokens_prompt=self._tokens_prompt,
            tokens_completion=self._tokens_completion,
            in_flight=self._in_flight,
            admitted=self._admitted,
            tokens_charged=self._tokens_charged,
            remaining_requests=remaining_requests,
            remaining_tokens=remaining_tokens,
            uptime_s=round(self._clock() - self._started, 6),
            faults=dict(sorted(self._faults.items())),
        )

    def app(self) -> web.Application:
        """A fresh aiohttp application serving this API. Run it with
        `handler_cancellation=True` (as `serve_api` does) so a client that leaves ends
        its request; otherwise a hung request lingers until HANG_S."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app[SIMULATED_API] = self
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post("/fault/{fault}/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.on_shutdown.append(self._end_hangs)
        return app

    async def _end_hangs(self, app: web.Application) -> None:
        """On shutdown, hung requests answer at once rather than holding the drain open
        until aiohttp's timeout cancels them."""
        for scope in list(self._hangs):
            scope.cancel()

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats())

    async def _handle_models(self, request: web.Request) -> web.Response:
        models = [_Model(name, "model", _MODELS_CREATED, "vigil-simulated") for name in _MODEL_IDS]
        return _json_response(_ModelList("list", models))

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        """Count the request in and out, whatever happens, including a client that leaves
        (aiohttp cancels the handler then, since the runner sets handler_cancellation)."""
        self._requests += 1
        self._in_flight += 1
        status = 500  # an unexpected exception becomes aiohttp's own 500
        try:
            response = await self._chat(request)
        except anyio.get_cancelled_exc_class():
            status = _CLIENT_CLOSED
            raise
        else:
            status = response.status
            return response
        finally:
            self._in_flight -= 1
            self._by_status[status] = self._by_status.get(status, 0) + 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._parse(request)
            fault = request.match_info.get("fault") or request.headers.get(FAULT_HEADER)
            if fault:
                return await self._fault(fault, body, request)
            prompt_chars = sum(len(text_of(message)) for message in body.messages)
            max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
            cost = prompt_chars // 4 + max_tokens
            headers = self._limits.admit(cost)
            self._admitted += 1
            self._tokens_charged += cost
            await self._misbehave(headers)
            return self._complete(body, prompt_chars // 4, max_tokens, headers)
        except ApiError as exc:
            return _json_response(exc.body, exc.status, exc.headers)

    async def _parse(self, request: web.Request) -> ChatRequest:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            message = f"Request body exceeds {MAX_BODY_BYTES} bytes."
            raise ApiError(
                413, message, "invalid_request_error", code="request_too_large"
            ) from None
        try:
            body = _REQUEST_DECODER.decode(raw)
        except msgspec.DecodeError as exc:
            raise _invalid(exc) from None
        if body.stream:
            message = "Streaming is not supported by the simulated API."
            raise ApiError(400, message, "invalid_request_error", param="stream")
        return body

    async def _fault(
        self, fault: str, body: ChatRequest, request: web.Request
    ) -> web.StreamResponse:
        """Answer with the named fault (FAULTS) instead of a completion."""
        if fault not in FAULTS:
            message = f"Unknown fault {fault[:40]!r}; known: {', '.join(FAULTS)}."
            raise ApiError(400, message, "invalid_request_error", param=FAULT_HEADER)
        self._faults[fault] += 1
        return await fault_response(fault, body, request, self._hang)

    async def _misbehave(self, headers: dict[str, str]) -> None:
        """Latency, injected 500s and hangs, drawn from the seeded RNG in a fixed order
        so a seeded run is reproducible."""
        settings = self._settings
        fail = self._rng.random() < settings.error_rate
        hang = self._rng.random() < settings.hang_rate
        delay_s = self._latency_s()
        if hang:
            await self._hang(headers)
        await anyio.sleep(delay_s)
        if fail:
            message = "The server had an error while processing your request. Sorry about that!"
            raise ApiError(500, message, "server_error", headers=headers)

    async def _hang(self, headers: dict[str, str]) -> None:
        """No answer: ends when the client disconnects (aiohttp cancels the handler), at
        shutdown (`_end_hangs`), or after HANG_S, with a 503."""
        with anyio.CancelScope(deadline=anyio.current_time() + HANG_S) as scope:
            self._hangs.add(scope)
            try:
                await anyio.sleep_forever()
            finally:
                self._hangs.discard(scope)
        message = "The simulated hang ended without an answer."
        raise ApiError(503, message, "server_error", headers=headers)

    def _latency_s(self) -> float:
        """Lognormal with median `latency_ms`: mostly near it, with a long right tail."""
        settings = self._settings
        median_s = settings.latency_ms / 1000.0
        draw = (
            self._rng.lognormvariate(math.log(median_s), settings.latency_sigma) if median_s else 0
        )
        return min(draw, HANG_S)

    def _complete(
        self, body: ChatRequest, prompt_tokens: int, max_tokens: int, headers: dict[str, str]
    ) -> web.Response:
        users = [message for message in body.messages if message.role == "user"]
        text = text_of((users or body.messages)[-1])
        json_object = (
            body.response_format is not None and body.response_format.type == "json_object"
        )
        content, finish_reason = answer(text, json_object, max_tokens)
        completion_tokens = max(1, len(content) // 4)
        self._tokens_prompt += prompt_tokens
        self._tokens_completion += completion_tokens
        completion = Completion(
            id=f"chatcmpl-{self._rng.getrandbits(96):024x}",
            object="chat.completion",
            created=int(time.time()),
            model=body.model,
            choices=[Choice(0, OutMessage("assistant", content), finish_reason)],
            usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
        )
        return _json_response(completion, headers=headers)


SIMULATED_API = web.AppKey("simulated_api", SimulatedAPI)
"""Where the application keeps its `SimulatedAPI`, for code holding only the app."""


# --- serving ------------------------------------------------------------------------------


def _url(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard is not dialable
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


@asynccontextmanager
async def serve_api(
    api: SimulatedAPI, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve an existing `SimulatedAPI` while the block runs; yields its base URL
    (`http://HOST:PORT/v1`, with the real port when `port` is 0).

    The host program owns signals. On exit, handlers get a short drain and are then
    cancelled; the cleanup is shielded, with a deadline, so a cancelled caller still
    frees the port.
    """
    runner = web.AppRunner(
        api.app(),
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,  # a client that leaves cancels its handler (hangs end)
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield _url(runner.addresses[0])
    finally:
        with anyio.move_on_after(_CLEANUP_DEADLINE_S, shield=True):
            await runner.cleanup()


@asynccontextmanager
async def serve_simulated(
    settings: SimulateConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[SimulatedAPI, str]]:
    """Serve a new simulated API while the block runs; yields it (for `stats()` and
    `configure()`) and its base URL."""
    api = SimulatedAPI(settings)
    async with serve_api(api, host, port) as url:
        yield api, url


async def run_standalone(settings: SimulateConfig, host: str, port: int) -> None:
    """Serve until cancelled (`vigil simulate-api`); announces the URL once bound so a
    script can wait for that line instead of sleeping."""
    async with serve_simulated(settings, host, port) as (_, url):
        print(f"simulate-api listening on {url}", flush=True)
        await anyio.sleep_forever()
