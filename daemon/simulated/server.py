"""A simulated AI API, served over real HTTP on loopback: OpenAI's chat completions or
Anthropic's Messages API, as `SimulateConfig.dialect` says.

It exists so the daemon's real HTTP path (client, budgets, 429 cool-downs, timeouts,
retries, circuit breaker) runs in demos, tests and benchmarks with no key and no cost,
against misbehaviour that can be dialled in: latency, rate limits, server errors,
overloads, hangs. `GET /stats` tells a test what the API really saw, independently of
the daemon's own count.

This module is the dialect-neutral core (counting, misbehaviour, the prompt cache, the
server); each dialect (`openai`, `anthropic`, behind the `dialect` seam) reads its
requests and writes its answers, errors and rate limits; the fake model (`model`) and
the named faults (`faults`) live beside them.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import msgspec
from aiohttp import web

from daemon.config import SimulateConfig
from daemon.simulated.anthropic import AnthropicDialect
from daemon.simulated.cache import CacheUse, PromptCache
from daemon.simulated.dialect import Dialect, Reply, Turn
from daemon.simulated.faults import FAULT_HEADER, FAULTS, fault_response
from daemon.simulated.model import answer, stop_at
from daemon.simulated.openai import OpenAIDialect
from daemon.simulated.wire import ENCODER, ApiError

__all__ = [
    "DIALECTS",
    "SIMULATED_API",
    "SimulatedAPI",
    "SimulatedStats",
    "run_standalone",
    "serve_api",
    "serve_simulated",
]

DIALECTS: dict[str, Dialect] = {"openai": OpenAIDialect(), "anthropic": AnthropicDialect()}
"""The dialects the API speaks, by `SimulateConfig.dialect`."""
HANG_S = 600.0
"""A hung request sleeps this long: past any sane client timeout, yet not forever."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted; a 1 MiB job input still fits after JSON escaping."""
_CLIENT_CLOSED = 499  # nginx's code for "client went away"; keeps sum(by_status) == requests
_SHUTDOWN_TIMEOUT_S = 1.0  # aiohttp waits up to twice this for handlers, then cancels them
_CLEANUP_DEADLINE_S = 5.0


# --- stats -----------------------------------------------------------------------------


class SimulatedStats(msgspec.Struct, frozen=True):
    """What the API saw. Every chat request lands in exactly one `by_status` key once done
    (499 = the client went away first), so `sum(by_status) + in_flight == requests`."""

    requests: int
    by_status: dict[str, int]
    tokens_prompt: int  # the whole prompt of each answered request, cached parts included
    tokens_completion: int
    in_flight: int
    # What the rate limiter saw, for benchmarks: requests let through and the tokens they
    # were charged (openai: prompt + max_tokens, as OpenAI counts), the buckets' levels
    # now (None: no limit), and the server's clock, so rates need no client-side timing.
    admitted: int = 0
    tokens_charged: int = 0
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    uptime_s: float = 0.0
    faults: dict[str, int] = {}  # requests answered with each injected fault
    dialect: str = "openai"
    # anthropic: what its ITPM was charged (uncached input + cache writes) and its OTPM
    # (the answers' output tokens), and those budgets' levels now (None: no limit).
    input_tokens_charged: int = 0
    output_tokens_charged: int = 0
    remaining_input_tokens: int | None = None
    remaining_output_tokens: int | None = None
    # The prompt cache: tokens answered from it, and tokens written to it.
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0


# --- the API ------------------------------------------------------------------------------


def _limit_settings(settings: SimulateConfig) -> tuple[object, ...]:
    return (
        settings.dialect,
        settings.requests_per_minute,
        settings.tokens_per_minute,
        settings.input_tokens_per_minute,
        settings.output_tokens_per_minute,
        settings.slice_s,
    )


class SimulatedAPI:
    """The behaviour and counters behind the simulated endpoints.

    One instance per server; all state lives here (no globals), and every counter is a
    scalar or a dict keyed by HTTP status, so memory stays flat however long it runs
    (the prompt cache is bounded too).
    """

    def __init__(
        self, settings: SimulateConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._started = clock()
        self._settings = settings
        self._dialect = DIALECTS[settings.dialect]
        self._rng = random.Random(settings.seed)
        self._limits = self._dialect.limits(settings, clock)
        self._cache = PromptCache(clock)
        self._requests = 0
        self._in_flight = 0
        self._by_status: dict[int, int] = {}
        self._tokens_prompt = 0
        self._tokens_completion = 0
        self._admitted = 0
        self._tokens_charged = 0
        self._input_tokens_charged = 0
        self._output_tokens_charged = 0
        self._cache_read = 0
        self._cache_creation = 0
        self._faults: Counter[str] = Counter()  # keys bounded by FAULTS
        self._hangs: set[anyio.CancelScope] = set()  # at most one per in-flight request

    @property
    def settings(self) -> SimulateConfig:
        return self._settings

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def configure(self, settings: SimulateConfig) -> None:
        """Apply new settings live (reload); budgets restart full only if their limits
        (or the dialect) changed, and the random stream carries on unless the seed
        changed. A new dialect moves the endpoint: a client must be pointed anew."""
        old = self._settings
        self._settings = settings
        self._dialect = DIALECTS[settings.dialect]
        if settings.seed != old.seed:
            self._rng = random.Random(settings.seed)
        if _limit_settings(settings) != _limit_settings(old):
            self._limits = self._dialect.limits(settings, self._clock)

    def stats(self) -> SimulatedStats:
        """A snapshot of the counters (the `/stats` body)."""
        levels = self._limits.levels()
        return SimulatedStats(
            requests=self._requests,
            by_status={str(code): n for code, n in sorted(self._by_status.items())},
            tokens_prompt=self._tokens_prompt,
            tokens_completion=self._tokens_completion,
            in_flight=self._in_flight,
            admitted=self._admitted,
            tokens_charged=self._tokens_charged,
            remaining_requests=levels.requests,
            remaining_tokens=levels.tokens,
            uptime_s=round(self._clock() - self._started, 6),
            faults=dict(sorted(self._faults.items())),
            dialect=self._dialect.name,
            input_tokens_charged=self._input_tokens_charged,
            output_tokens_charged=self._output_tokens_charged,
            remaining_input_tokens=levels.input_tokens,
            remaining_output_tokens=levels.output_tokens,
            cache_read_tokens=self._cache_read,
            cache_creation_tokens=self._cache_creation,
        )

    def app(self) -> web.Application:
        """A fresh aiohttp application serving this API. Run it with
        `handler_cancellation=True` (as `serve_api` does) so a client that leaves ends
        its request; otherwise a hung request lingers until HANG_S. Both dialects'
        endpoints are routed: the one not spoken answers 404 in the one spoken."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app[SIMULATED_API] = self
        for dialect in DIALECTS.values():
            app.router.add_post(dialect.path, self._handle_chat)
            app.router.add_post(f"/fault/{{fault}}{dialect.path}", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.on_response_prepare.append(self._stamp)
        app.on_shutdown.append(self._end_hangs)
        return app

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        """The dialect's headers on every answer, streamed ones included."""
        for name, value in self._dialect.answer_headers().items():
            response.headers.setdefault(name, value)

    async def _end_hangs(self, app: web.Application) -> None:
        """On shutdown, hung requests answer at once rather than holding the drain open
        until aiohttp's timeout cancels them."""
        for scope in list(self._hangs):
            scope.cancel()

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=ENCODER.encode(self.stats()), content_type="application/json")

    async def _handle_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._dialect.models(), content_type="application/json")

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
        dialect = self._dialect
        try:
            if not request.path.endswith(dialect.path):
                raise dialect.not_found(request.method, request.path)
            turn = dialect.parse(await self._read(request), request.headers)
            fault = request.match_info.get("fault") or request.headers.get(FAULT_HEADER)
            if fault:
                return await self._fault(fault, dialect, turn, request)
            cache = self._cache.use(turn.breakpoints)
            cost = dialect.cost(turn, cache)
            headers = self._limits.admit(cost)
            self._admitted += 1
            self._tokens_charged += cost.tokens
            self._input_tokens_charged += cost.input_tokens
            await self._misbehave(dialect, headers)
            return self._complete(dialect, turn, cache, headers)
        except ApiError as exc:
            return web.Response(
                body=dialect.error_body(exc),
                status=exc.status,
                content_type="application/json",
                headers=exc.headers,
            )

    @staticmethod
    async def _read(request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            message = f"Request body exceeds {MAX_BODY_BYTES} bytes."
            raise ApiError(
                413, message, "invalid_request_error", code="request_too_large"
            ) from None

    async def _fault(
        self, fault: str, dialect: Dialect, turn: Turn, request: web.Request
    ) -> web.StreamResponse:
        """Answer with the named fault (FAULTS) instead of a completion."""
        if fault not in FAULTS:
            message = f"Unknown fault {fault[:40]!r}; known: {', '.join(FAULTS)}."
            raise ApiError(400, message, "invalid_request_error", param=FAULT_HEADER)
        self._faults[fault] += 1
        return await fault_response(fault, dialect, turn, request, self._hang)

    async def _misbehave(self, dialect: Dialect, headers: dict[str, str]) -> None:
        """Latency, injected 500s, overloads and hangs, drawn from the seeded RNG in a
        fixed order so a seeded run is reproducible. The overload draw is made only
        when overloads are dialled in, so runs seeded before it existed replay as they
        did."""
        settings = self._settings
        fail = self._rng.random() < settings.error_rate
        hang = self._rng.random() < settings.hang_rate
        overload = settings.overload_rate > 0 and self._rng.random() < settings.overload_rate
        delay_s = self._latency_s()
        if hang:
            await self._hang(headers)
        if overload:  # an overloaded API turns requests away at once
            raise dialect.overloaded(headers)
        await anyio.sleep(delay_s)
        if fail:
            raise dialect.server_error(headers)

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
        self, dialect: Dialect, turn: Turn, cache: CacheUse, headers: dict[str, str]
    ) -> web.Response:
        """The answer: made by the fake model, written to the cache, charged to the
        output budget, counted."""
        content, finish = answer(turn.text, turn.json_object, turn.max_tokens)
        content, finish, stop_sequence = stop_at(content, finish, turn.stop_sequences)
        output_tokens = max(1, len(content) // 4)
        self._cache.commit(cache)
        headers = self._limits.settle(output_tokens, headers)
        reply = Reply(
            content=content,
            finish=finish,
            stop_sequence=stop_sequence,
            input_tokens=turn.prompt_tokens - cache.read - cache.creation,
            output_tokens=output_tokens,
            cache_read=cache.read,
            cache_creation=cache.creation,
        )
        self._tokens_prompt += turn.prompt_tokens
        self._tokens_completion += output_tokens
        self._cache_read += cache.read
        self._cache_creation += cache.creation
        if dialect.charges_output:
            self._output_tokens_charged += output_tokens
        body = dialect.render(turn, reply, f"{self._rng.getrandbits(96):024x}")
        return web.Response(body=body, content_type="application/json", headers=headers)


SIMULATED_API = web.AppKey("simulated_api", SimulatedAPI)
"""Where the application keeps its `SimulatedAPI`, for code holding only the app."""


# --- serving ------------------------------------------------------------------------------


def _root(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard is not dialable
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def serve_api(
    api: SimulatedAPI, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve an existing `SimulatedAPI` while the block runs; yields the base URL a
    client of its dialect configures, with the real port when `port` is 0: openai
    `http://HOST:PORT/v1`, anthropic the root `http://HOST:PORT`.

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
        yield api.dialect.base_url(_root(runner.addresses[0]))
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
