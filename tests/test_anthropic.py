"""The Anthropic dialect through the real client: ApiProvider (kind = "anthropic")
against a Messages endpoint on 127.0.0.1 that answers as the test scripts it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiohttp import web

from daemon.analyzers import Analyzer, Calls
from daemon.config import AnalyzerConfig, PriceConfig, ProviderConfig
from daemon.jobs import Job
from daemon.providers.base import ChatRequest, Completion, Message, OutputInvalid, ProviderError
from daemon.providers.client import ApiProvider
from daemon.spend.pricing import cost_usd
from tests.test_provider import serve_app

pytestmark = pytest.mark.anyio
KEY_ENV = "VIGIL_TEST_ANTHROPIC_KEY"
SECRET = "sk-ant-test-0123456789-SECRET"
BOUND_S = 10.0


class Received:
    """What the scripted endpoint was sent: each request's headers and JSON body."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.bodies: list[dict[str, Any]] = []


def message(text: str = "fine", **usage: int) -> dict[str, Any]:
    """A Messages API success body."""
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 4, **usage},
    }


def error(status: int, kind: str, text: str, headers: dict[str, str] | None = None) -> web.Response:
    """A Messages API error answer."""
    body = {"type": "error", "error": {"type": kind, "message": text}}
    return web.json_response(body, status=status, headers=headers)


def later(seconds: float) -> str:
    """An RFC 3339 time `seconds` from now, as Anthropic's resets are written."""
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


Reply = Callable[[web.Request], Awaitable[web.Response]]


@asynccontextmanager
async def anthropic_provider(
    reply: Reply, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> AsyncIterator[tuple[Received, ApiProvider]]:
    """A kind = "anthropic" provider whose API answers every request with `reply`."""
    received = Received()
    monkeypatch.setenv(KEY_ENV, SECRET)

    async def handle(request: web.Request) -> web.Response:
        received.headers.append(dict(request.headers))
        received.bodies.append(await request.json())
        return await reply(request)

    app = web.Application()
    app.router.add_post("/v1/messages", handle)
    async with serve_app(app) as (_, v1_url):
        root = v1_url.removesuffix("/v1")
        settings = {"kind": "anthropic", "base_url": root, "api_key_env": KEY_ENV, **overrides}
        async with ApiProvider("claude", ProviderConfig(**settings)) as provider:
            yield received, provider


def request(
    *, json_mode: bool = False, cache_system: bool = False, max_tokens: int = 100
) -> ChatRequest:
    """A request with a system prompt and one user message."""
    return ChatRequest(
        model="claude-test",
        messages=[Message("system", "You summarize."), Message("user", "Some text.")],
        max_tokens=max_tokens,
        temperature=0.5,
        json_mode=json_mode,
        cache_system=cache_system,
    )


async def call(provider: ApiProvider, req: ChatRequest | None = None) -> Completion:
    with anyio.fail_after(BOUND_S):
        return await provider.complete(req or request())


async def test_request_is_written_in_the_messages_dialect(monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/messages with x-api-key and anthropic-version; system top-level; max_tokens sent."""

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(message("a summary"))

    async with anthropic_provider(reply, monkeypatch) as (received, provider):
        completion = await call(provider)
    assert completion.content == "a summary"
    headers, body = received.headers[0], received.bodies[0]
    assert headers["x-api-key"] == SECRET
    assert headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert body["system"] == [{"type": "text", "text": "You summarize."}]
    assert body["messages"] == [{"role": "user", "content": "Some text."}]
    assert body["max_tokens"] == 100 and body["temperature"] == 0.5
    assert "response_format" not in body


async def test_cache_system_marks_the_prefix_and_json_mode_asks_in_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cache_system puts cache_control on the system block; JSON is asked for after it."""

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(message('{"a": 1}'))

    async with anthropic_provider(reply, monkeypatch, api_version="2024-01-01") as (
        received,
        provider,
    ):
        await call(provider, request(json_mode=True, cache_system=True))
    system = received.bodies[0]["system"]
    assert system[0] == {
        "type": "text",
        "text": "You summarize.",
        "cache_control": {"type": "ephemeral"},
    }
    assert "JSON" in system[1]["text"] and "cache_control" not in system[1]
    assert received.headers[0]["anthropic-version"] == "2024-01-01"


async def test_usage_counts_cache_reads_and_writes_and_prices_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """input_tokens leaves cache tokens out: ours counts all, each priced at its own price."""

    async def reply(request: web.Request) -> web.Response:
        body = message(cache_creation_input_tokens=2000, cache_read_input_tokens=3000)
        return web.json_response(body)

    async with anthropic_provider(reply, monkeypatch) as (_, provider):
        completion = await call(provider)
        calls = Calls({"claude": provider}, {})
        await calls.complete("claude", request())
    assert completion.prompt_tokens == 10 + 2000 + 3000
    assert completion.cached_tokens == 3000 and completion.cache_write_tokens == 2000
    assert calls.usage.cached_tokens == 3000 and calls.usage.cache_write_tokens == 2000
    prices = PriceConfig(
        prompt_per_mtok=3.0,
        completion_per_mtok=15.0,
        cached_prompt_per_mtok=0.3,
        cache_write_per_mtok=3.75,
    )
    expected = (10 * 3.0 + 3000 * 0.3 + 2000 * 3.75 + 4 * 15.0) / 1e6
    assert cost_usd(completion, prices) == pytest.approx(expected)
    plain = PriceConfig(prompt_per_mtok=3.0, completion_per_mtok=15.0)
    assert cost_usd(completion, plain) == pytest.approx((5010 * 3.0 + 4 * 15.0) / 1e6)
    assert provider.status()["tokens_cached"] == 6000  # two calls


async def test_max_tokens_stop_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer cut at max_tokens says so in stop_reason; a cut JSON answer is a clear
    error, while one whose JSON ended before the cut still counts."""
    answers = iter(['{"summary": "cut', '{"summary": "cut', '{"summary": "whole"} and then'])

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(message(next(answers)) | {"stop_reason": "max_tokens"})

    async with anthropic_provider(reply, monkeypatch) as (_, provider):
        completion = await call(provider)
        analyzer = Analyzer(
            "triage",
            AnalyzerConfig(provider="claude", model="claude-test", prompt="{text}", output="json"),
        )
        job = Job(
            id="j1",
            analyzer="triage",
            input={"text": "x"},
            priority=0,
            idempotency_key=None,
            state="running",
            attempts=1,
            max_attempts=5,
            not_before=0.0,
            created_at=time.time(),
            started_at=time.time(),
            finished_at=None,
            result=None,
            error=None,
            usage=None,
            source="test",
        )
        with anyio.fail_after(BOUND_S), pytest.raises(OutputInvalid) as info:
            await analyzer.run(job, Calls({"claude": provider}, {}))
        with anyio.fail_after(BOUND_S):
            whole = await analyzer.run(job, Calls({"claude": provider}, {}))
    assert whole.result == {"summary": "whole"}
    assert completion.stop_reason == "max_tokens"
    assert "cut at max_tokens (512)" in str(info.value)
    assert "analyzers.triage.max_tokens" in str(info.value)


async def test_three_budgets_are_learned_from_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests, input-tokens and output-tokens limits become the three budgets; the
    combined tokens header does not become a budget of its own."""

    async def reply(request: web.Request) -> web.Response:
        headers: dict[str, str] = {}
        for kind, limit, left in (
            ("requests", 50, 49),
            ("input-tokens", 40_000, 39_000),
            ("output-tokens", 8_000, 8_000),
            ("tokens", 8_000, 8_000),
        ):
            prefix = f"anthropic-ratelimit-{kind}"
            headers |= {
                f"{prefix}-limit": str(limit),
                f"{prefix}-remaining": str(left),
                f"{prefix}-reset": later(2),
            }
        return web.json_response(message(), headers=headers)

    async with anthropic_provider(reply, monkeypatch) as (_, provider):
        await call(provider)
        budgets = provider.status()["budgets"]
    assert budgets["requests"]["per_minute"] == 50
    assert budgets["input_tokens"]["per_minute"] == 40_000
    assert budgets["output_tokens"]["per_minute"] == 8_000
    assert budgets["tokens"]["per_minute"] == 0  # no such budget at Anthropic
    # The output budget was booked at max_tokens (100) and settled from the answer (4).
    assert provider.limits.output_tokens.level > 8_000 / 60 - 100 + 90


async def test_the_output_budget_is_charged_from_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing of output_tokens_per_minute is booked up front (max_tokens may be far
    above a slice); the answer's output is charged, and a call after one that put the
    budget in debt waits until it is paid off."""
    outputs = iter([20, 200, 20])

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(message(output_tokens=next(outputs)))

    async with anthropic_provider(
        reply, monkeypatch, output_tokens_per_minute=6000, budget_margin_ms=0
    ) as (_, provider):
        started = time.monotonic()
        await call(provider, request(max_tokens=4000))  # 4000 > the 100-token slice
        await call(provider, request(max_tokens=4000))  # 20 used: room left, no wait
        quick = time.monotonic() - started
        await call(provider, request(max_tokens=4000))  # 200 used: 120 in debt
        waited = time.monotonic() - started - quick
    assert quick < 0.5
    assert waited >= 1.0  # 120 tokens at 100 a second


async def test_cache_reads_leave_the_input_budget_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached prefix read costs the input budget nothing: once a call read it, the
    next books only what the cache did not cover, and settles to the uncached input."""

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(message(input_tokens=50, cache_read_input_tokens=3000))

    long_system = "x" * 12_000  # ~3,000 tokens
    req = ChatRequest(
        model="claude-test",
        messages=[Message("system", long_system), Message("user", "Some text.")],
        max_tokens=10,
        cache_system=True,
    )
    async with anthropic_provider(
        reply, monkeypatch, input_tokens_per_minute=600_000, budget_margin_ms=0
    ) as (_, provider):
        bucket = provider.limits.input_tokens
        await call(provider, req)
        after_first = bucket.level
        await call(provider, req)
        spent_second = after_first - bucket.level
    # Settled to the 50 uncached tokens (refill since then only adds), not the ~3,000
    # the prefix estimate booked; and the second booked about that, not ~3,000 again.
    assert 0 <= bucket.capacity - after_first <= 52
    assert spent_second < 100


async def test_overloaded_529_retries_without_holding_the_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """529 overloaded_error: retryable, no cool-down, no pause, the breaker stays closed."""

    async def reply(request: web.Request) -> web.Response:
        return error(529, "overloaded_error", "Overloaded")

    async with anthropic_provider(reply, monkeypatch, breaker_failures=2) as (_, provider):
        for _ in range(4):
            with pytest.raises(ProviderError) as info:
                await call(provider)
            assert info.value.kind == "Overloaded" and info.value.retryable
        assert provider.limits.cooldown_left() == 0
        assert provider.paused_reason is None
        assert provider.breaker.state == "closed"
        assert provider.status()["overloaded"] == 4


async def test_rate_limit_error_cools_down_for_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """429 rate_limit_error: a shared cool-down as long as retry-after says."""

    async def reply(request: web.Request) -> web.Response:
        return error(429, "rate_limit_error", "Number of requests exceeded", {"retry-after": "7"})

    async with anthropic_provider(reply, monkeypatch) as (_, provider):
        with pytest.raises(ProviderError) as info:
            await call(provider)
        assert info.value.kind == "RateLimited" and info.value.retry_after_s == 7
        assert 6 < provider.limits.cooldown_left() <= 7
        assert provider.paused_reason is None


@pytest.mark.parametrize(
    ("status", "kind", "text", "paused"),
    [
        (401, "authentication_error", "invalid x-api-key", True),
        (403, "permission_error", "Your API key does not have permission", True),
        (429, "rate_limit_error", "You have reached your specified API usage limits.", True),
        (400, "invalid_request_error", "Your credit balance is too low to access the API", True),
        (400, "invalid_request_error", "max_tokens: field required", False),
        (404, "not_found_error", "model: claude-nope", False),
        (413, "request_too_large", "Request exceeds the maximum allowed size", False),
    ],
)
async def test_errors_by_type(
    monkeypatch: pytest.MonkeyPatch, status: int, kind: str, text: str, paused: bool
) -> None:
    """Refused keys and spent money pause the provider; bad requests fail at once."""

    async def reply(request: web.Request) -> web.Response:
        return error(status, kind, f"{text} ({SECRET})")

    async with anthropic_provider(reply, monkeypatch) as (_, provider):
        with pytest.raises(ProviderError) as info:
            await call(provider)
    assert not info.value.retryable
    assert (provider.paused_reason is not None) is paused
    assert text in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in (provider.paused_reason or "")


async def test_an_api_overloaded_for_too_long_opens_the_circuit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Overloaded answers do not count for the breaker, until the API has answered
    nothing else for longer than the breaker stays open: then it is failing, not busy."""

    async def reply(request: web.Request) -> web.Response:
        return error(529, "overloaded_error", "Overloaded")

    settings = {"breaker_failures": 2, "breaker_open_s": 1.0}
    async with anthropic_provider(reply, monkeypatch, **settings) as (_, provider):
        states = []
        for _ in range(4):
            with pytest.raises(ProviderError):
                await call(provider)
            states.append(provider.breaker.state)
        await anyio.sleep(1.1)
        for _ in range(2):
            with pytest.raises(ProviderError):
                await call(provider)
            states.append(provider.breaker.state)
    assert states[:4] == ["closed"] * 4  # busy, not failing
    assert states[-1] == "open"


async def test_api_error_500_is_retried_and_counts_for_the_breaker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """500 api_error: retryable, and repeated ones open the circuit (the API is failing)."""

    async def reply(request: web.Request) -> web.Response:
        return error(500, "api_error", "Internal server error")

    async with anthropic_provider(reply, monkeypatch, breaker_failures=2) as (_, provider):
        for _ in range(2):
            with pytest.raises(ProviderError) as info:
                await call(provider)
            assert info.value.retryable and info.value.kind == "HTTPError"
        assert provider.breaker.state == "open"
