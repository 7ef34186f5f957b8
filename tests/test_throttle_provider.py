"""The provider's throttling over real HTTP: header sync, learned limits, the circuit
breaker, AIMD concurrency, live reconfiguration and the status figures."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from daemon.config import SimulateConfig
from daemon.providers.base import ChatRequest, Message, ProviderError
from daemon.providers.client import ApiProvider
from daemon.simulated.server import SimulatedAPI
from tests.test_provider import (
    BOUND_S,
    FAST,
    chat,
    chat_provider,
    config,
    error_reply,
    ok_body,
    serve_app,
    serve_chat,
    simulated_provider,
)

pytestmark = pytest.mark.anyio


def ok_with(headers: dict[str, str]) -> web.Response:
    """A successful answer carrying `headers`."""
    return web.json_response(ok_body(), headers=headers)


async def test_header_sync_lowers_budget_and_holds_requests() -> None:
    """The server says almost nothing is left: our level drops to match, and the next
    request beyond it waits for the refill instead of being sent."""

    async def handler(request: web.Request) -> web.Response:
        return ok_with({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"})

    async with chat_provider(
        handler, requests_per_minute=60, budget_margin_ms=0, budget_slice_s=60
    ) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            await provider.complete(chat())
            bucket = provider.limits.requests
            assert bucket.corrections == 1
            assert bucket.level < 2  # 59 expected, 0 reported, 1 unit of rounding
            await provider.complete(chat())  # the unit rounding left
            await provider.complete(chat())
    assert len(seen.times) == 3
    # The third had to wait for a refill: 60/min is one a second from the sync, which
    # the first answer brought (measured from the first: a slow second only shortens
    # the gap after it).
    assert seen.times[2] - seen.times[0] >= 0.8
    assert provider.status()["budgets"]["requests"]["corrections"] == 1


async def test_limit_learned_from_headers_and_logged_once() -> None:
    """A lower server limit is adopted and logged once; the status shows both limits."""
    limits = iter(["3000", "3000", "3000", "3300"])

    async def handler(request: web.Request) -> web.Response:
        return ok_with({"x-ratelimit-limit-requests": next(limits)})

    with capture_logs() as logs:
        async with chat_provider(handler, requests_per_minute=3600) as (_, provider):
            with anyio.fail_after(BOUND_S):
                for _ in range(3):
                    await provider.complete(chat())
                assert provider.limits.requests.per_minute == 3000
                await provider.complete(chat())
    learned = [e for e in logs if e["event"] == "provider.limit_learned"]
    assert [(e["was"], e["per_minute"], e["configured"]) for e in learned] == [
        (3600, 3000, 3600),
        (3000, 3300, 3600),
    ]
    budget = provider.status()["budgets"]["requests"]
    assert budget["per_minute"] == 3300
    assert budget["configured"] == 3600
    assert budget["server_limit"] == 3300


async def test_sync_can_be_switched_off() -> None:
    """sync_rate_limit_headers = false leaves the budgets alone."""

    async def handler(request: web.Request) -> web.Response:
        return ok_with({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0"})

    async with chat_provider(handler, requests_per_minute=600, sync_rate_limit_headers=False) as (
        _,
        provider,
    ):
        with anyio.fail_after(BOUND_S):
            await provider.complete(chat())
    assert provider.limits.requests.per_minute == 600
    assert provider.limits.requests.corrections == 0


async def test_header_sync_avoids_429s_from_the_simulated_api() -> None:
    """Against the simulated API's headers, a provider with no local budget learns the
    API's token limit and waits instead of collecting a 429 (sync off: see
    test_rate_limited_cools_down_for_retry_after_ms, where the same pair gets one)."""
    api = SimulatedAPI(SimulateConfig(latency_ms=0, tokens_per_minute=60_000, slice_s=60, seed=3))
    request = ChatRequest(model="gpt-4o-mini", messages=[Message("user", "hi")], max_tokens=30_250)
    async with (
        serve_app(api.app()) as (seen, url),
        ApiProvider("main", config(url, budget_margin_ms=0, budget_slice_s=60)) as provider,
    ):
        with anyio.fail_after(BOUND_S):
            for _ in range(2):
                await provider.complete(request)
    assert api.stats().by_status == {"200": 2}
    assert provider.limits.tokens.per_minute == 60_000
    # 60000 TPM refills 1000 tokens/s: the second waited for the 500 it lacked.
    assert seen.times[1] - seen.times[0] >= 0.4


async def test_request_over_learned_token_budget_fails_fast() -> None:
    """Once the server's token limit is known, a bigger request fails with TooLarge
    and is never sent."""

    async def handler(request: web.Request) -> web.Response:
        return ok_with({"x-ratelimit-limit-tokens": "1000"})

    async with chat_provider(handler) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            await provider.complete(chat())
            with pytest.raises(ProviderError) as info:
                await provider.complete(chat(max_tokens=2000))
    assert info.value.kind == "TooLarge"
    assert info.value.retryable is False
    assert len(seen.times) == 1


async def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    """3 failures in a row open the circuit: calls fail fast with no request; after
    breaker_open_s one probe goes, and its success closes the circuit."""
    failing = [True]

    async def handler(request: web.Request) -> web.Response:
        if failing[0]:
            return error_reply(500, "The server had an error.")
        return web.json_response(ok_body())

    async with chat_provider(handler, breaker_failures=3, breaker_open_s=0.5) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            for _ in range(3):
                with pytest.raises(ProviderError):
                    await provider.complete(chat())
            with pytest.raises(ProviderError) as info:
                await provider.complete(chat())
            assert info.value.kind == "CircuitOpen"
            assert info.value.retryable is True
            assert info.value.retry_after_s is not None
            assert 0 < info.value.retry_after_s <= 0.5
            assert len(seen.times) == 3
            circuit = provider.status()["circuit"]
            assert circuit["state"] == "open"
            assert circuit["consecutive_failures"] == 3
            assert circuit["last_failure"] == "HTTP 500"
            await anyio.sleep(0.55)
            assert provider.breaker.state == "half_open"
            failing[0] = False
            completion = await provider.complete(chat())
    assert completion.content == "fine"
    assert len(seen.times) == 4
    assert provider.status()["circuit"]["state"] == "closed"
    assert provider.status()["circuit"]["rejected"] == 1


async def test_failed_probe_reopens_circuit() -> None:
    """A probe that fails opens the circuit again for another breaker_open_s."""

    async def handler(request: web.Request) -> web.Response:
        return error_reply(500, "The server had an error.")

    async with chat_provider(handler, breaker_failures=1, breaker_open_s=0.5) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            with pytest.raises(ProviderError):
                await provider.complete(chat())
            await anyio.sleep(0.55)
            with pytest.raises(ProviderError) as probe:
                await provider.complete(chat())
            with pytest.raises(ProviderError) as after:
                await provider.complete(chat())
    assert probe.value.status == 500
    assert after.value.kind == "CircuitOpen"
    assert provider.breaker.opened == 2
    assert len(seen.times) == 2


async def test_connection_errors_open_the_circuit() -> None:
    """Refused connections count as failures like 5xx and timeouts."""
    with socket.socket() as bound:  # bound, never listening: connects are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/v1"
        async with ApiProvider("main", config(url, breaker_failures=2)) as provider:
            with anyio.fail_after(BOUND_S):
                kinds = []
                for _ in range(3):
                    with pytest.raises(ProviderError) as info:
                        await provider.complete(chat())
                    kinds.append(info.value.kind)
    assert kinds == ["ConnectionError", "ConnectionError", "CircuitOpen"]
    assert provider.stats.requests == 2


async def test_4xx_and_429_do_not_trip_the_breaker() -> None:
    """Answers below 500 mean the server is up: they reset the failure count."""
    answers = iter([500, 429, 500, 404, 500])

    async def handler(request: web.Request) -> web.Response:
        status = next(answers)
        return error_reply(status, "no", headers={"retry-after-ms": "1"})

    async with chat_provider(handler, breaker_failures=2) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            for _ in range(5):
                with pytest.raises(ProviderError):
                    await provider.complete(chat())
    assert provider.breaker.state == "closed"
    assert len(seen.times) == 5


async def test_aimd_halves_on_429_and_recovers() -> None:
    """With adaptive_concurrency, a 429 halves the concurrency limit and successes
    add one back per adaptive_successes_per_step."""
    answers = iter([429, 200, 200, 200, 200])

    async def handler(request: web.Request) -> web.Response:
        if next(answers) == 429:
            return error_reply(429, "Rate limit reached.", headers={"retry-after-ms": "1"})
        return web.json_response(ok_body())

    async with chat_provider(
        handler, max_concurrency=8, adaptive_concurrency=True, adaptive_successes_per_step=2
    ) as (_, provider):
        with anyio.fail_after(BOUND_S):
            with pytest.raises(ProviderError):
                await provider.complete(chat())
            assert provider.limits.adaptive.limit == 4
            assert provider.limits.concurrency.total_tokens == 4
            for _ in range(4):
                await provider.complete(chat())
    status = provider.status()
    assert status["concurrency_limit"] == 6
    assert status["concurrency_decreases"] == 1
    assert status["adaptive_concurrency"] is True


async def test_aimd_halves_on_timeout() -> None:
    """A timeout is a congestion signal too."""

    async def handler(request: web.Request) -> web.Response:
        await anyio.sleep(5)  # cancelled when the client leaves
        return web.json_response(ok_body())

    async with chat_provider(
        handler, max_concurrency=10, adaptive_concurrency=True, timeout_s=0.2
    ) as (_, provider):
        with anyio.fail_after(BOUND_S), pytest.raises(ProviderError):
            await provider.complete(chat())
    assert provider.limits.adaptive.limit == 5


async def test_configure_applies_new_settings_live() -> None:
    """configure() changes budgets, concurrency, timeout and breaker for the next
    requests."""

    async def handler(request: web.Request) -> web.Response:
        await anyio.sleep(1)  # cancelled when the client leaves
        return web.json_response(ok_body())

    async with serve_chat(handler) as (seen, url):
        base = config(url, timeout_s=5)
        async with ApiProvider("main", base) as provider:
            provider.configure(
                msgspec.structs.replace(
                    base,
                    requests_per_minute=60,
                    tokens_per_minute=5000,
                    max_concurrency=2,
                    timeout_s=0.2,
                    breaker_failures=1,
                )
            )
            assert provider.limits.requests.per_minute == 60
            assert provider.limits.tokens.per_minute == 5000
            assert provider.limits.concurrency.total_tokens == 2
            with anyio.fail_after(BOUND_S), pytest.raises(ProviderError) as info:
                await provider.complete(chat())
            assert info.value.kind == "Timeout"  # the new 0.2 s, not 5 s
            assert provider.breaker.state == "open"  # the new threshold of one
            status = provider.status()
    assert status["max_concurrency"] == 2
    assert status["requests_per_minute"] == 60
    assert len(seen.times) == 1


async def test_configure_moves_to_a_new_base_url() -> None:
    """A changed base_url takes effect for the next request."""

    async def first(request: web.Request) -> web.Response:
        return web.json_response(ok_body("first"))

    async def second(request: web.Request) -> web.Response:
        return web.json_response(ok_body("second"))

    async with (
        serve_chat(first) as (_, url1),
        serve_chat(second) as (_, url2),
        ApiProvider("main", config(url1)) as provider,
    ):
        with anyio.fail_after(BOUND_S):
            assert (await provider.complete(chat())).content == "first"
            provider.configure(config(url2))
            assert (await provider.complete(chat())).content == "second"


async def test_status_figures() -> None:
    """status() carries latency percentiles, budgets with the server's limits, the
    circuit and the concurrency limit."""
    settings = SimulateConfig(latency_ms=1, requests_per_minute=1000, seed=5)
    async with simulated_provider(settings, requests_per_minute=1200) as (_, provider):
        with anyio.fail_after(BOUND_S):
            for _ in range(5):
                await provider.complete(chat())
    status: dict[str, Any] = provider.status()
    assert status["by_status"] == {"200": 5}
    assert status["avg_latency_ms"] > 0
    assert 0 < status["p50_latency_ms"] <= status["p99_latency_ms"]
    assert status["budgets"]["requests"]["server_limit"] == 1000
    assert status["budgets"]["requests"]["per_minute"] == 1000
    assert status["budgets"]["tokens"]["per_minute"] == 0
    assert status["circuit"]["state"] == "closed"
    assert status["concurrency_limit"] == 16
    assert status["in_flight"] == 0
    assert status["tokens_in"] > 0


async def test_retry_after_ms_holds_every_caller() -> None:
    """While a 429's retry-after-ms runs, no caller's request reaches the server."""
    answers = iter([429, 200, 200])

    async def handler(request: web.Request) -> web.Response:
        if next(answers) == 429:
            return error_reply(429, "Rate limit reached.", headers={"retry-after-ms": "300"})
        return web.json_response(ok_body())

    async with chat_provider(handler) as (seen, provider):
        with anyio.fail_after(BOUND_S):
            with pytest.raises(ProviderError) as info:
                await provider.complete(chat())
            until = provider.limits.cooldown_until
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(provider.complete, chat())
    assert info.value.retry_after_s == 0.3
    assert len(seen.times) == 3
    assert min(seen.times[1:]) >= until >= seen.times[0] + 0.3


async def test_fast_status_smoke() -> None:
    """A fresh provider's status is complete before any request."""
    async with simulated_provider(FAST) as (_, provider):
        status = provider.status()
    assert status["p50_latency_ms"] is None
    assert status["circuit"]["state"] == "closed"
    assert status["budgets"]["requests"]["level"] is None  # unlimited


async def test_callers_in_line_during_a_cool_down_leave_spaced_not_together() -> None:
    """A 429's cool-down met by callers already in line for budget: after it they book
    again and leave at the budget's rate, so the server's one-second slice (10 a second
    here) refuses none of them; released together they would overrun it."""
    api = SimulatedAPI(SimulateConfig(latency_ms=0, requests_per_minute=600, seed=3))
    async with (
        serve_app(api.app()) as (seen, url),
        ApiProvider("main", config(url, requests_per_minute=600)) as provider,
    ):
        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(provider.complete, chat())
                await anyio.sleep(0.3)  # a few sent, the rest in line for budget
                assert provider.limits.waiting > 10
                assert provider.status()["budgets"]["requests"]["left"] == 0
                provider.limits.rate_limited(0.5)  # as if a 429 had said so
    assert api.stats().by_status == {"200": 30}
    assert len(seen.times) == 30
    assert provider.limits.waiting == 0


async def test_calls_waiting_for_a_slot_when_the_circuit_opens_are_not_sent() -> None:
    """Calls admitted while the circuit was closed but still waiting for a slot when it
    opened are turned away before sending (CircuitOpen, no attempt's worth of request):
    an API known to be down gets no more of them."""

    async def handler(request: web.Request) -> web.Response:
        await anyio.sleep(0.05)
        return error_reply(500, "down")

    async with chat_provider(handler, max_concurrency=1, breaker_failures=1) as (seen, provider):
        kinds: list[str] = []

        async def call() -> None:
            try:
                await provider.complete(chat())
            except ProviderError as exc:
                kinds.append(exc.kind)

        with anyio.fail_after(BOUND_S):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(call)
    assert sorted(kinds) == ["CircuitOpen"] * 4 + ["HTTPError"], kinds
    assert len(seen.times) == 1
    assert provider.limits.concurrency.borrowed_tokens == 0
