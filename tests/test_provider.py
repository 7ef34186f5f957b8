"""ApiProvider and its limits, against real HTTP servers on loopback."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.testing import capture_logs

from daemon.config import ProviderConfig, SimulateConfig
from daemon.providers.base import ChatRequest, Message, ProviderError
from daemon.providers.bucket import TokenBucket
from daemon.providers.client import ApiProvider
from daemon.providers.limits import Cost, ProviderLimits
from daemon.simulated.server import SimulatedAPI, serve_simulated

KEY_ENV = "VIGIL_TEST_PROVIDER_KEY"
SECRET = "sk-test-vigil-0123456789abcdef-SECRET"
BOUND_S = 10.0  # every wait in this file ends well before this
FAST = SimulateConfig(latency_ms=0, seed=7)
ALWAYS_500 = SimulateConfig(latency_ms=0, error_rate=1.0, seed=1)
TEXT = "The launch was a great success and the team is happy with the rollout."


# --- helpers ------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Seen:
    """What a test server received: arrival times (time.monotonic) and auth headers."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.auth: list[str | None] = []


def config(base_url: str, **overrides: Any) -> ProviderConfig:
    """An openai-kind provider config pointed at `base_url`."""
    return ProviderConfig(kind="openai", base_url=base_url, **overrides)


def chat(text: str = TEXT, max_tokens: int = 50) -> ChatRequest:
    """A small chat request."""
    return ChatRequest(
        model="gpt-4o-mini",
        messages=[Message("system", "You summarize."), Message("user", text)],
        max_tokens=max_tokens,
    )


def ok_body(content: str = "fine") -> dict[str, Any]:
    """A minimal successful chat-completions answer."""
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3},
    }


def error_reply(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": "error", "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[tuple[Seen, str]]:
    """Serve `app` on 127.0.0.1 port 0, recording each request; yields it and its /v1 URL."""
    seen = Seen()

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.times.append(time.monotonic())
        seen.auth.append(request.headers.get("Authorization"))
        return await handler(request)

    app.middlewares.append(record)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield seen, f"http://{host}:{port}/v1"
    finally:
        with anyio.move_on_after(5, shield=True):
            await runner.cleanup()


@asynccontextmanager
async def serve_chat(handler: Handler) -> AsyncIterator[tuple[Seen, str]]:
    """Serve one chat-completions handler."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as served:
        yield served


@asynccontextmanager
async def chat_provider(
    handler: Handler, **overrides: Any
) -> AsyncIterator[tuple[Seen, ApiProvider]]:
    """A provider talking to a server that answers every chat request with `handler`."""
    async with (
        serve_chat(handler) as (seen, url),
        ApiProvider("main", config(url, **overrides)) as provider,
    ):
        yield seen, provider


@asynccontextmanager
async def simulated_provider(
    settings: SimulateConfig, **overrides: Any
) -> AsyncIterator[tuple[SimulatedAPI, ApiProvider]]:
    """A provider talking to the simulated API."""
    async with (
        serve_simulated(settings) as (api, url),
        ApiProvider("main", config(url, **overrides)) as provider,
    ):
        yield api, provider


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The provider's API key, set in its environment variable."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


# --- TokenBucket --------------------------------------------------------------------------


def test_bucket_reserve_within_budget_is_free() -> None:
    """Reservations that fit the budget need no wait."""
    bucket = TokenBucket(60, FakeClock(), slice_s=60)
    assert bucket.reserve(30) == 0
    assert bucket.reserve(30) == 0
    assert bucket.level == 0


def test_bucket_over_budget_returns_wait() -> None:
    """Going over budget returns the time the deficit takes to refill; waiters queue up."""
    bucket = TokenBucket(60, FakeClock(), slice_s=60)  # 1 unit a second
    assert bucket.reserve(60) == 0
    assert bucket.reserve(3) == pytest.approx(3.0)
    assert bucket.reserve(2) == pytest.approx(5.0)


def test_bucket_refills_over_time_up_to_cap() -> None:
    """The level refills at per_minute/60 a second and never passes the cap."""
    clock = FakeClock()
    bucket = TokenBucket(120, clock, slice_s=60)  # 2 units a second
    assert bucket.reserve(120) == 0
    clock.now += 15
    assert bucket.reserve(30) == 0
    assert bucket.reserve(2) == pytest.approx(1.0)
    clock.now += 3600
    assert bucket.reserve(120) == 0
    assert bucket.reserve(1) == pytest.approx(0.5)


def test_bucket_refund() -> None:
    """A refund gives units back (capped); a negative refund takes more."""
    clock = FakeClock()
    bucket = TokenBucket(60, clock, slice_s=60)
    bucket.reserve(60)
    bucket.refund(20)
    assert bucket.reserve(20) == 0
    bucket.refund(1000)
    assert bucket.level == 60
    bucket.refund(-90)
    assert bucket.reserve(0) == pytest.approx(30.0)


def test_bucket_configure_lowers_cap() -> None:
    """Lowering the budget caps the level and slows the refill."""
    clock = FakeClock()
    bucket = TokenBucket(600, clock, slice_s=60)
    bucket.configure(60)
    assert bucket.level == 60
    assert bucket.reserve(60) == 0
    assert bucket.reserve(6) == pytest.approx(6.0)
    clock.now += 6
    assert bucket.reserve(0) == pytest.approx(0.0)


def test_bucket_zero_is_unlimited() -> None:
    """per_minute 0 never asks anyone to wait."""
    clock = FakeClock()
    bucket = TokenBucket(0, clock, slice_s=60)
    for _ in range(3):
        assert bucket.reserve(1e9) == 0
    bucket.refund(-1e9)
    assert bucket.reserve(1) == 0


def test_bucket_configure_from_unlimited_starts_full() -> None:
    """Turning a budget on starts it full, as a new bucket does."""
    bucket = TokenBucket(0, FakeClock(), slice_s=60)
    bucket.configure(60)
    assert bucket.reserve(60) == 0


# --- ProviderLimits -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_slot_rejects_request_larger_than_token_budget() -> None:
    """A request above the whole tokens_per_minute fails fast, not retryable."""
    limits = ProviderLimits(
        max_concurrency=1, requests_per_minute=0, tokens_per_minute=1000, slice_s=60
    )
    with anyio.fail_after(BOUND_S):
        with pytest.raises(ProviderError) as info:
            async with limits.slot(Cost(1001)):
                pytest.fail("slot granted")
        assert info.value.kind == "TooLarge"
        assert info.value.retryable is False
        assert limits.concurrency.borrowed_tokens == 0
        async with limits.slot(Cost(1000)):  # exactly the budget fits
            pass


@pytest.mark.anyio
async def test_cool_down_holds_requests_until_it_ends() -> None:
    """After cool_down, no request reaches the server before the cool-down ends."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(ok_body())

    limits = ProviderLimits(max_concurrency=4, requests_per_minute=0, tokens_per_minute=0)
    async with serve_chat(handler) as (seen, url), aiohttp.ClientSession() as session:
        started = time.monotonic()
        limits.cool_down(0.2)
        assert 0 < limits.cooldown_left() <= 0.2
        assert limits.cooldowns == 1
        limits.cool_down(0.05)  # shorter: neither shortens nor counts
        assert limits.cooldowns == 1
        until = limits.cooldown_until
        with anyio.fail_after(BOUND_S):
            async with (
                limits.slot(Cost(10)),
                session.post(f"{url}/chat/completions", json={}) as response,
            ):
                assert response.status == 200
    assert len(seen.times) == 1
    assert seen.times[0] >= until
    assert seen.times[0] - started >= 0.15
    assert limits.cooldown_left() == 0


@pytest.mark.anyio
async def test_cool_down_extended_while_waiting_is_honoured() -> None:
    """A cool-down extended while callers sleep holds them until the new end."""
    limits = ProviderLimits(max_concurrency=4, requests_per_minute=0, tokens_per_minute=0)
    released: list[float] = []

    async def caller() -> None:
        async with limits.slot(Cost(1)):
            released.append(time.monotonic())

    with anyio.fail_after(BOUND_S):
        limits.cool_down(0.3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await anyio.sleep(0.02)
            assert not released
            limits.cool_down(0.4)
            until = limits.cooldown_until
    assert limits.cooldowns == 2
    assert released and released[0] >= until


# --- ApiProvider against the simulated API ---------------------------------------------


@pytest.mark.anyio
async def test_success_returns_content_and_usage() -> None:
    """A 200 from the simulated API gives text and usage; both sides count it."""
    async with simulated_provider(FAST) as (api, provider):
        with anyio.fail_after(BOUND_S):
            completion = await provider.complete(chat())
    assert completion.content.startswith("Summary: The launch")
    assert completion.http_status == 200
    assert completion.prompt_tokens > 0
    assert completion.completion_tokens > 0
    stats = api.stats()
    assert stats.requests == 1
    assert stats.by_status == {"200": 1}
    assert stats.tokens_prompt == completion.prompt_tokens
    assert stats.tokens_completion == completion.completion_tokens
    assert provider.stats.by_status == {"200": 1}
    assert provider.stats.requests == 1
    assert provider.stats.prompt_tokens == completion.prompt_tokens
    assert provider.stats.in_flight == 0


@pytest.mark.anyio
async def test_server_error_is_retryable() -> None:
    """error_rate=1 gives a retryable ProviderError with status 500."""
    async with simulated_provider(ALWAYS_500) as (api, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
    assert info.value.status == 500
    assert info.value.retryable is True
    assert info.value.kind == "HTTPError"
    assert api.stats().by_status == {"500": 1}
    assert provider.stats.by_status == {"500": 1}


@pytest.mark.anyio
async def test_rate_limited_cools_down_for_retry_after_ms() -> None:
    """A simulated 429's retry-after-ms cools the provider down; nothing is sent meanwhile."""
    # 60000 TPM refills 1000 tokens/s; two requests of 31000 tokens overrun it by 2000,
    # so the second is refused with retry-after-ms of about 2000 (less what refilled
    # between them: up to a second's stall still gets the 429).
    settings = SimulateConfig(latency_ms=0, tokens_per_minute=60_000, slice_s=60, seed=3)
    request = ChatRequest(model="gpt-4o-mini", messages=[Message("user", "hi")], max_tokens=31_000)
    api = SimulatedAPI(settings)
    async with (
        serve_app(api.app()) as (seen, url),
        # Header sync off: it would learn the budget and wait locally instead of a 429.
        ApiProvider(
            "main", config(url, sync_rate_limit_headers=False, budget_slice_s=60)
        ) as provider,
    ):
        with anyio.fail_after(BOUND_S):
            await provider.complete(request)
            with pytest.raises(ProviderError) as info:
                await provider.complete(request)
            until = provider.limits.cooldown_until
            assert 0 < provider.limits.cooldown_left() <= 2.0
            await provider.complete(request)
    error = info.value
    assert error.kind == "RateLimited"
    assert error.status == 429
    assert error.retryable is True
    assert error.retry_after_s is not None
    assert 1.0 < error.retry_after_s <= 2.0
    assert provider.limits.cooldowns == 1
    assert provider.stats.rate_limited == 1
    assert api.stats().by_status == {"200": 2, "429": 1}
    assert len(seen.times) == 3
    assert seen.times[2] >= until
    assert seen.times[2] - seen.times[1] >= 0.15


# --- ApiProvider against hand-made answers ---------------------------------------------


@pytest.mark.anyio
async def test_insufficient_quota_pauses_provider() -> None:
    """insufficient_quota pauses the provider; the next call is refused without a request."""

    async def handler(request: web.Request) -> web.Response:
        return error_reply(429, "You exceeded your current quota.", "insufficient_quota")

    async with chat_provider(handler) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            with pytest.raises(ProviderError) as info:
                await provider.complete(chat())
            assert info.value.retryable is False
            assert info.value.kind == "QuotaExhausted"
            assert provider.paused_reason is not None
            assert "insufficient_quota" in provider.paused_reason
            assert provider.limits.cooldowns == 0
            with pytest.raises(ProviderError) as paused:
                await provider.complete(chat())
    assert paused.value.kind == "ProviderPaused"
    assert len(seen.times) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_pauses_until_resume(api_key: str, status: int) -> None:
    """401/403 fail fast and pause the provider, naming the key's variable, until resume()."""
    refuse = [True]

    async def handler(request: web.Request) -> web.Response:
        if refuse[0]:
            return error_reply(status, "Incorrect API key provided.", "invalid_api_key")
        return web.json_response(ok_body())

    async with chat_provider(handler, api_key_env=KEY_ENV) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            with pytest.raises(ProviderError) as info:
                await provider.complete(chat())
            assert info.value.status == status
            assert info.value.retryable is False
            assert provider.paused_reason is not None
            assert KEY_ENV in provider.paused_reason
            with pytest.raises(ProviderError) as paused:
                await provider.complete(chat())
            assert paused.value.kind == "ProviderPaused"
            assert len(seen.times) == 1
            refuse[0] = False
            provider.resume()
            assert provider.paused_reason is None
            completion = await provider.complete(chat())
    assert completion.content == "fine"
    assert len(seen.times) == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "retryable", "kind"),
    [
        (400, False, "HTTPError"),
        (404, False, "HTTPError"),
        (413, False, "HTTPError"),
        (422, False, "HTTPError"),
        (500, True, "HTTPError"),
        (503, True, "Overloaded"),  # the API's own JSON "not now": not processed
    ],
)
async def test_http_errors_retryable_by_status(status: int, retryable: bool, kind: str) -> None:
    """400/404/413/422 fail fast; 500 and 503 are retried; the message is kept; no pause."""

    async def handler(request: web.Request) -> web.Response:
        return error_reply(status, f"Invalid value for 'temperature' ({status}).", "bad")

    async with chat_provider(handler) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert info.value.kind == kind
    assert f"Invalid value for 'temperature' ({status})." in str(info.value)
    assert provider.paused_reason is None
    assert provider.stats.by_status == {str(status): 1}


@pytest.mark.anyio
async def test_timeout_is_retryable() -> None:
    """A server slower than timeout_s gives a retryable Timeout."""

    async def handler(request: web.Request) -> web.Response:
        await anyio.sleep(5)  # cancelled when the client leaves
        return web.json_response(ok_body())

    async with chat_provider(handler, timeout_s=0.3) as (seen, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
    assert info.value.kind == "Timeout"
    assert info.value.retryable is True
    assert len(seen.times) == 1
    assert provider.stats.by_status == {"timeout": 1}


@pytest.mark.anyio
async def test_connection_refused() -> None:
    """A port nobody listens on gives a retryable ConnectionError."""
    with socket.socket() as bound:  # bound, never listening: connects are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        async with ApiProvider("main", config(f"http://127.0.0.1:{port}/v1")) as provider:
            with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
                await provider.complete(chat())
    assert info.value.kind == "ConnectionError"
    assert info.value.retryable is True
    assert info.value.status is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}'],
    ids=["malformed", "no-choices", "null-content"],
)
async def test_bad_200_body_is_bad_response(body: bytes) -> None:
    """A 200 whose body is not a usable answer gives BadResponse."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async with chat_provider(handler) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
    assert info.value.kind == "BadResponse"
    assert info.value.status == 200


@pytest.mark.anyio
async def test_a_missing_key_pauses_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset api_key_env pauses the provider from the start, naming the variable;
    a call is refused as not attempted and sends nothing, also after a `resume`."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    async with simulated_provider(FAST, api_key_env=KEY_ENV) as (api, provider):
        assert provider.paused_reason is not None and KEY_ENV in provider.paused_reason
        assert not provider.available()
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
        assert info.value.kind == "ProviderPaused" and KEY_ENV in str(info.value)
        assert api.stats().requests == 0
        provider.resume()  # still no key: paused again by the next call
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
        assert info.value.kind == "ProviderPaused" and provider.paused_reason is not None
    assert api.stats().requests == 0


@pytest.mark.anyio
async def test_key_sent_as_bearer_and_never_leaked(api_key: str) -> None:
    """The key goes out as `Bearer <key>` and appears in no error and no log line."""
    answers = iter([200, 401])

    async def handler(request: web.Request) -> web.Response:
        status = next(answers)
        if status == 200:
            return web.json_response(ok_body())
        return error_reply(status, "Incorrect API key provided.", "invalid_api_key")

    with capture_logs() as logs:
        async with chat_provider(handler, api_key_env=KEY_ENV) as (seen, provider):
            with anyio.fail_after(BOUND_S):
                await provider.complete(chat())
                with pytest.raises(ProviderError) as info:
                    await provider.complete(chat())
    assert seen.auth == [f"Bearer {api_key}"] * 2
    error = info.value
    assert api_key not in f"{error} {error!r} {error.details!r} {provider.paused_reason}"
    assert any(entry["event"] == "provider.paused" for entry in logs)
    assert api_key not in repr(logs)


# --- defects found in review, now fixed ---------------------------------------------------


@pytest.mark.anyio
async def test_answer_arriving_in_chunks_is_read_whole() -> None:
    """A valid answer delivered in two TCP writes is read whole."""
    content = "word " * 20_000
    body = web.json_response(ok_body(content)).body
    assert isinstance(body, bytes)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:1000])
        await anyio.sleep(0.25)  # the client is reading by then
        await response.write(body[1000:])
        await response.write_eof()
        return response

    async with chat_provider(handler) as (_, provider):
        with anyio.fail_after(BOUND_S):
            completion = await provider.complete(chat())
    assert completion.content == content


@pytest.mark.anyio
async def test_rate_limit_reset_header_sets_cool_down() -> None:
    """A 429 with only x-ratelimit-reset-requests cools down that long."""

    async def handler(request: web.Request) -> web.Response:
        headers = {"x-ratelimit-reset-requests": "2.5s"}
        return error_reply(429, "Rate limit reached for requests.", "rate_limit_exceeded", headers)

    async with chat_provider(handler) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError):
            await provider.complete(chat())
        assert provider.limits.cooldown_left() > 2.0


@pytest.mark.anyio
async def test_non_finite_retry_after_does_not_stall_provider() -> None:
    """A non-finite retry-after-ms leaves a finite cool-down."""

    async def handler(request: web.Request) -> web.Response:
        headers = {"retry-after-ms": "inf"}
        return error_reply(429, "Rate limit reached.", "rate_limit_exceeded", headers)

    async with chat_provider(handler) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError):
            await provider.complete(chat())
        assert math.isfinite(provider.limits.cooldown_left())


@pytest.mark.anyio
async def test_key_echoed_by_server_is_redacted(api_key: str) -> None:
    """A 401 body that echoes the key does not put it in the error."""

    async def handler(request: web.Request) -> web.Response:
        echoed = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return error_reply(401, f"Incorrect API key provided: {echoed}.", "invalid_api_key")

    async with chat_provider(handler, api_key_env=KEY_ENV) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
    assert api_key not in str(info.value)


@pytest.mark.anyio
async def test_a_redirect_is_a_configuration_error_not_followed() -> None:
    """A base_url that redirects is not followed (the key would go along) and not
    retried: the error names where it points."""

    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("https://elsewhere.example/v1/chat/completions")

    async with chat_provider(handler) as (seen, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat())
    assert info.value.kind == "Redirected" and not info.value.retryable
    assert "https://elsewhere.example" in str(info.value)
    assert len(seen.times) == 1


@pytest.mark.anyio
async def test_a_429_hint_from_the_token_headers_counts_max_tokens() -> None:
    """With no retry-after, the wait comes from the token headers for the whole
    request, input and max_tokens alike (OpenAI charges both)."""

    async def handler(request: web.Request) -> web.Response:
        headers = {
            "x-ratelimit-limit-tokens": "10000",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "6s",
        }
        return error_reply(429, "Rate limit reached", "rate_limit_exceeded", headers)

    async with chat_provider(handler) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
            await provider.complete(chat(max_tokens=4000))
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 2.0
