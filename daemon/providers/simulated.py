"""A simulated OpenAI-compatible chat-completions API, served over real HTTP on loopback.

It exists so the daemon's real HTTP path (client, budgets, 429 cool-downs, timeouts,
retries, circuit breaker) runs in demos, tests and benchmarks with no key and no cost,
against misbehaviour that can be dialled in: latency, rate limits, server errors, hangs.
`GET /stats` tells a test what the API really saw, independently of the daemon's own count.

Named faults (`FAULTS`) make every request fail one chosen way, for fault-injection tests:
ask for one with the `x-sim-fault` header, or point a client at `/fault/NAME/v1` instead of
`/v1` (a provider's `base_url` carries no headers). Faults skip the rate limits and latency.
"""

from __future__ import annotations

import math
import random
import re
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import anyio
import msgspec
from aiohttp import web
from msgspec import Meta

from daemon.config import SimulateConfig

__all__ = [
    "FAULTS",
    "FAULT_HEADER",
    "SIMULATED_API",
    "SimulatedAPI",
    "SimulatedStats",
    "openai_duration",
    "run_standalone",
    "serve_api",
    "serve_simulated",
]

HANG_S = 600.0
"""A hung request sleeps this long: past any sane client timeout, yet not forever."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted; a 1 MiB job input still fits after JSON escaping."""
DEFAULT_MAX_TOKENS = 256
"""Completion budget when a request names none (also what it costs against the TPM)."""
_ANALYSED_CHARS = 4096  # the fake "model" reads only this much, so CPU per request is bounded
_SUMMARY_WORDS = 24
_TOPICS = 3
_CLIENT_CLOSED = 499  # nginx's code for "client went away"; keeps sum(by_status) == requests
_SHUTDOWN_TIMEOUT_S = 1.0  # aiohttp waits up to twice this for handlers, then cancels them
_CLEANUP_DEADLINE_S = 5.0
_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "simulated")
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
_MODELS_CREATED = 1_700_000_000

_POSITIVE = frozenset({"good", "great", "excellent", "happy", "love", "success", "win", "best"})
_NEGATIVE = frozenset({"bad", "poor", "terrible", "sad", "hate", "failure", "broken", "worst"})
_STOPWORDS = frozenset({"about", "after", "their", "there", "these", "those", "which", "while"})


# --- wire types -------------------------------------------------------------------------


class _Part(msgspec.Struct):
    type: str = "text"
    text: str = ""


class _InMessage(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object"] = "text"


class _ChatRequest(msgspec.Struct):
    """What we read of an OpenAI request; unknown fields are ignored, as OpenAI does."""

    messages: Annotated[list[_InMessage], Meta(min_length=1)]
    model: str = "simulated"
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    response_format: _ResponseFormat | None = None
    stream: bool = False


class _OutMessage(msgspec.Struct):
    role: str
    content: str


class _Choice(msgspec.Struct):
    index: int
    message: _OutMessage
    finish_reason: str


class _Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[_Choice]
    usage: _Usage


class _Analysis(msgspec.Struct):
    summary: str
    sentiment: Literal["positive", "neutral", "negative"]
    topics: list[str]
    language: str
    score: float


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


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


_ENCODER = msgspec.json.Encoder()
_REQUEST_DECODER = msgspec.json.Decoder(_ChatRequest)


class _ApiError(Exception):
    """An answer other than success, carried out of the request pipeline."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _ErrorBody(_ErrorDetail(message, type_, param, code))
        self.headers = headers or {}


# --- rate limits --------------------------------------------------------------------------


def openai_duration(seconds: float) -> str:
    """Format like OpenAI's `x-ratelimit-reset-*` ("120ms", "1.5s", "6m0s"), rounded up
    so a client that waits that long is never early."""
    ms = math.ceil(round(seconds * 1000, 6)) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Bucket:
    """A per-minute limit enforced in slices, as OpenAI does ("60,000 a minute may be
    enforced as 1,000 a second"): admission is decided by a bucket that holds one
    slice (`limit` x `slice_s` / 60) and refills `limit`/60 per second, while the
    headers speak of the minute (`remaining` out of `limit`), as the real ones do. A
    request bigger than one slice is admitted when the slice is full."""

    __slots__ = ("_level", "_minute", "_rate_per_s", "_stamp", "capacity", "limit")

    def __init__(self, limit: int, now: float, slice_s: float) -> None:
        self.limit = limit
        self.capacity = limit * slice_s / 60
        self._rate_per_s = limit / 60.0
        self._level = self.capacity
        self._minute = float(limit)
        self._stamp = now

    def refill(self, now: float) -> None:
        gained = max(0.0, now - self._stamp) * self._rate_per_s
        self._level = min(self.capacity, self._level + gained)
        self._minute = min(float(self.limit), self._minute + gained)
        self._stamp = now

    def wait_s(self, cost: int) -> float:
        """Seconds until `cost` fits (after `refill`); 0 if it fits now."""
        return max(0.0, (min(cost, self.capacity) - self._level) / self._rate_per_s)

    def take(self, cost: int) -> None:
        self._level -= cost
        self._minute -= cost

    @property
    def level(self) -> float:
        """What the slice holds now (after `refill`): what `/stats` reports."""
        return self._level

    @property
    def remaining(self) -> int:
        """What the headers report: the minute's budget left."""
        return max(0, math.floor(self._minute))

    def headers(self, kind: str) -> dict[str, str]:
        reset_s = (self.limit - self._minute) / self._rate_per_s
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(self.remaining),
            f"x-ratelimit-reset-{kind}": openai_duration(reset_s),
        }


class _Limits:
    """OpenAI's two budgets. A request is admitted only if both have room; a rejected
    request consumes nothing, so clients that honour retry-after get through."""

    def __init__(self, settings: SimulateConfig, clock: Callable[[], float]) -> None:
        now = clock()
        self._clock = clock
        rpm, tpm, slice_s = (
            settings.requests_per_minute,
            settings.tokens_per_minute,
            settings.slice_s,
        )
        self._requests = _Bucket(rpm, now, slice_s) if rpm else None
        self._tokens = _Bucket(tpm, now, slice_s) if tpm else None

    def remaining(self) -> tuple[int | None, int | None]:
        """The requests and tokens the slice holds now (None: that budget is unlimited)."""
        now = self._clock()
        levels: list[int | None] = []
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
            levels.append(None if bucket is None else max(0, math.floor(bucket.level)))
        return levels[0], levels[1]

    def admit(self, cost: int) -> dict[str, str]:
        """Consume one request and `cost` tokens, returning the x-ratelimit-* headers;
        raise a 429 `_ApiError` if either budget is short."""
        now = self._clock()
        budgets: list[tuple[str, _Bucket, int]] = []
        if self._requests is not None:
            budgets.append(("requests", self._requests, 1))
        if self._tokens is not None:
            budgets.append(("tokens", self._tokens, cost))
        headers: dict[str, str] = {}
        for kind, bucket, _ in budgets:
            bucket.refill(now)
            headers.update(bucket.headers(kind))
        # The worst shortage is reported: one that can never fit first, then the longest wait.
        worst = max(budgets, key=lambda b: (b[2] > b[1].limit, b[1].wait_s(b[2])), default=None)
        if worst is not None and worst[1].wait_s(worst[2]) > 0:
            raise self._rejection(worst, headers)
        for kind, bucket, need in budgets:
            bucket.take(need)
            headers.update(bucket.headers(kind))
        return headers

    @staticmethod
    def _rejection(short: tuple[str, _Bucket, int], headers: dict[str, str]) -> _ApiError:
        kind, bucket, need = short
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        if need > bucket.limit:  # can never fit: OpenAI's "Request too large", no retry-after
            message = (
                f"Request too large for {unit}: Limit {bucket.limit}, Requested {need}. "
                "Reduce the size of your request."
            )
            return _ApiError(429, message, kind, code="rate_limit_exceeded", headers=headers)
        wait_s = bucket.wait_s(need)
        used = bucket.limit - bucket.remaining
        message = (
            f"Rate limit reached for {unit}: Limit {bucket.limit}, Used {used}, "
            f"Requested {need}. Please try again in {openai_duration(wait_s)}."
        )
        retry = {
            "retry-after": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
        }
        return _ApiError(
            429, message, kind, code="rate_limit_exceeded", headers={**headers, **retry}
        )


# --- the fake model -----------------------------------------------------------------------


def _text_of(message: _InMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def _analyse(text: str, max_words: int, max_topics: int) -> _Analysis:
    """A deterministic stand-in for a model reading `text` (only its first few KiB)."""
    head = text[:_ANALYSED_CHARS]
    words = head.split()
    summary = " ".join(words[:max_words]) if words else "(empty input)"
    lowered = [word.strip(".,;:!?\"'()[]").lower() for word in words]
    mood = sum(w in _POSITIVE for w in lowered) - sum(w in _NEGATIVE for w in lowered)
    sentiment: Literal["positive", "neutral", "negative"] = (
        "positive" if mood > 0 else "negative" if mood < 0 else "neutral"
    )
    counts = Counter(w for w in lowered if len(w) >= 5 and w.isalpha() and w not in _STOPWORDS)
    topics = [word for word, _ in counts.most_common(max_topics)]
    score = round(zlib.crc32(head.encode()) / 0xFFFFFFFF, 3)
    return _Analysis(summary, sentiment, topics, "en", score)


def _content(text: str, json_object: bool, max_tokens: int) -> tuple[str, str]:
    """The answer and its finish_reason, kept within `max_tokens` (4 chars a token).
    JSON answers shrink until they fit, so they stay parseable when they can."""
    budget_chars = max_tokens * 4
    if json_object:
        for words, topics in ((_SUMMARY_WORDS, _TOPICS), (12, _TOPICS), (6, 1), (3, 0), (1, 0)):
            content = _ENCODER.encode(_analyse(text, words, topics)).decode()
            if len(content) <= budget_chars:
                return content, "stop"
    else:
        content = f"Summary: {_analyse(text, _SUMMARY_WORDS, 0).summary}"
        if len(content) <= budget_chars:
            return content, "stop"
    cut = content[:budget_chars]
    if not json_object and " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut, "length"


# --- errors -------------------------------------------------------------------------------

_AT_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _invalid(exc: msgspec.DecodeError) -> _ApiError:
    """Turn a msgspec error into OpenAI's 400, naming the parameter at fault."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        message = f"We could not parse the JSON body of your request. ({text})"
        return _ApiError(400, message, "invalid_request_error")
    at = _AT_RE.search(text)
    path = at["path"] if at else ""
    reason = text[: at.start()] if at else text
    missing = _MISSING_RE.match(text)
    if missing:
        param = f"{path}.{missing['field']}" if path else missing["field"]
        message = f"Missing required parameter: '{param}'."
        return _ApiError(
            400, message, "invalid_request_error", param=param, code="missing_required_parameter"
        )
    message = f"Invalid value for '{path}': {reason}." if path else f"Invalid body: {reason}."
    return _ApiError(
        400, message, "invalid_request_error", param=path or None, code="invalid_value"
    )


def _json_response(
    payload: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(payload),
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
        self._limits = _Limits(settings, clock)
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
            self._limits = _Limits(settings, self._clock)

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
            prompt_chars = sum(len(_text_of(message)) for message in body.messages)
            max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
            cost = prompt_chars // 4 + max_tokens
            headers = self._limits.admit(cost)
            self._admitted += 1
            self._tokens_charged += cost
            await self._misbehave(headers)
            return self._complete(body, prompt_chars // 4, max_tokens, headers)
        except _ApiError as exc:
            return _json_response(exc.body, exc.status, exc.headers)

    async def _parse(self, request: web.Request) -> _ChatRequest:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            message = f"Request body exceeds {MAX_BODY_BYTES} bytes."
            raise _ApiError(
                413, message, "invalid_request_error", code="request_too_large"
            ) from None
        try:
            body = _REQUEST_DECODER.decode(raw)
        except msgspec.DecodeError as exc:
            raise _invalid(exc) from None
        if body.stream:
            message = "Streaming is not supported by the simulated API."
            raise _ApiError(400, message, "invalid_request_error", param="stream")
        return body

    async def _fault(
        self, fault: str, body: _ChatRequest, request: web.Request
    ) -> web.StreamResponse:
        """Answer with the named fault (FAULTS) instead of a completion."""
        if fault not in FAULTS:
            message = f"Unknown fault {fault[:40]!r}; known: {', '.join(FAULTS)}."
            raise _ApiError(400, message, "invalid_request_error", param=FAULT_HEADER)
        self._faults[fault] += 1
        match fault:
            case "500":
                message = "The server had an error while processing your request. Sorry!"
                raise _ApiError(500, message, "server_error")
            case "502":
                page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
                return web.Response(status=502, text=page, content_type="text/html")
            case "503":
                message = "The engine is currently overloaded, please try again later."
                raise _ApiError(503, message, "server_error", headers={"retry-after": "1"})
            case "529":
                overloaded = {"type": "overloaded_error", "message": "Overloaded"}
                data = _ENCODER.encode({"type": "error", "error": overloaded})
                return web.Response(status=529, body=data, content_type="application/json")
            case "429" | "429-no-retry-after":
                hint = fault == "429"
                wait = openai_duration(FAULT_RETRY_AFTER_MS / 1000) if hint else "a while"
                headers = (
                    {"retry-after": "1", "retry-after-ms": str(FAULT_RETRY_AFTER_MS)}
                    if hint
                    else {}
                )
                message = f"Rate limit reached for requests. Please try again in {wait}."
                raise _ApiError(
                    429, message, "requests", code="rate_limit_exceeded", headers=headers
                )
            case "hang":
                await self._hang({})
        raw = _fault_answer(body, prose=fault == "bad-json-content")
        match fault:
            case "malformed-json":
                return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
            case "no-choices":
                data = _ENCODER.encode({"id": "chatcmpl-fault", "object": "chat.completion"})
                return web.Response(body=data, content_type="application/json")
            case "bad-json-content":
                return web.Response(body=raw, content_type="application/json")
            case "reset":
                return await _reset_midway(request, raw)
            case _:  # "slow-body"
                return await _trickle(request, raw)

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
            raise _ApiError(500, message, "server_error", headers=headers)

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
        raise _ApiError(503, message, "server_error", headers=headers)

    def _latency_s(self) -> float:
        """Lognormal with median `latency_ms`: mostly near it, with a long right tail."""
        settings = self._settings
        median_s = settings.latency_ms / 1000.0
        draw = (
            self._rng.lognormvariate(math.log(median_s), settings.latency_sigma) if median_s else 0
        )
        return min(draw, HANG_S)

    def _complete(
        self, body: _ChatRequest, prompt_tokens: int, max_tokens: int, headers: dict[str, str]
    ) -> web.Response:
        users = [message for message in body.messages if message.role == "user"]
        text = _text_of((users or body.messages)[-1])
        json_object = (
            body.response_format is not None and body.response_format.type == "json_object"
        )
        content, finish_reason = _content(text, json_object, max_tokens)
        completion_tokens = max(1, len(content) // 4)
        self._tokens_prompt += prompt_tokens
        self._tokens_completion += completion_tokens
        completion = _Completion(
            id=f"chatcmpl-{self._rng.getrandbits(96):024x}",
            object="chat.completion",
            created=int(time.time()),
            model=body.model,
            choices=[_Choice(0, _OutMessage("assistant", content), finish_reason)],
            usage=_Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
        )
        return _json_response(completion, headers=headers)


def _fault_answer(body: _ChatRequest, *, prose: bool) -> bytes:
    """A well-formed completion for the faults that damage one (no counters, no RNG:
    a fault never shifts a seeded run); `prose`: text where JSON was asked for."""
    users = [message for message in body.messages if message.role == "user"]
    json_object = body.response_format is not None and body.response_format.type == "json_object"
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    content, finish = _content(_text_of((users or body.messages)[-1]), json_object, max_tokens)
    if prose:
        content, finish = "Sure! The sentiment is positive, and the topics are many.", "stop"
    tokens = max(1, len(content) // 4)
    completion = _Completion(
        id="chatcmpl-fault",
        object="chat.completion",
        created=int(time.time()),
        model=body.model,
        choices=[_Choice(0, _OutMessage("assistant", content), finish)],
        usage=_Usage(tokens, tokens, 2 * tokens),
    )
    return _ENCODER.encode(completion)


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
