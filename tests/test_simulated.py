"""The simulated OpenAI-compatible API, exercised over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import anyio
import msgspec
import pytest
from multidict import CIMultiDictProxy

from daemon.config import SimulateConfig
from daemon.simulated.limits import openai_duration
from daemon.simulated.server import (
    SimulatedAPI,
    run_standalone,
    serve_api,
    serve_simulated,
)

pytestmark = pytest.mark.anyio

T = TypeVar("T")
FAST = SimulateConfig(latency_ms=0, seed=7)
TEXT = "The launch was a great success and the team is happy with the rollout of the product."


def chat_body(text: str = TEXT, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat-completions request body."""
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You summarize documents."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 100,
        "temperature": 0,
        **extra,
    }


@asynccontextmanager
async def client(
    settings: SimulateConfig = FAST,
) -> AsyncIterator[tuple[SimulatedAPI, str, aiohttp.ClientSession]]:
    """A served API, its base URL and a client session, all closed on exit."""
    async with (
        serve_simulated(settings) as (api, url),
        aiohttp.ClientSession(headers={"Authorization": "Bearer sk-test"}) as session,
    ):
        yield api, url, session


async def post_chat(
    session: aiohttp.ClientSession, url: str, body: object
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """POST one chat completion; returns status, decoded body and headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}/chat/completions", data=data) as response:
        payload = msgspec.json.decode(await response.read())
        return response.status, payload, response.headers


async def get_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The server's own counters, read over HTTP."""
    async with session.get(url.removesuffix("/v1") + "/stats") as response:
        assert response.status == 200
        stats: dict[str, Any] = await response.json()
        return stats


async def eventually(
    read: Callable[[], Awaitable[T]], ok: Callable[[T], bool], interval_s: float = 0.01
) -> None:
    """Poll `read` until `ok` holds; the caller bounds the wait with fail_after."""
    while True:
        if ok(await read()):
            return
        await anyio.sleep(interval_s)


async def test_success_shape_and_usage() -> None:
    """A plain request gets an OpenAI-shaped completion with consistent usage."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
            status, body, _ = await post_chat(session, url, chat_body())
    assert status == 200
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Summary: The launch was a great success")
    usage = body["usage"]
    prompt_chars = len("You summarize documents.") + len(TEXT)
    assert usage["prompt_tokens"] == prompt_chars // 4
    assert 1 <= usage["completion_tokens"] <= 100
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_json_object_content() -> None:
    """With response_format json_object the content parses and carries the keys."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            request = chat_body(response_format={"type": "json_object"})
            status, body, _ = await post_chat(session, url, request)
    assert status == 200
    result = json.loads(body["choices"][0]["message"]["content"])
    assert set(result) == {"summary", "sentiment", "topics", "language", "score"}
    assert isinstance(result["summary"], str) and result["summary"]
    assert result["sentiment"] == "positive"
    assert all(isinstance(topic, str) for topic in result["topics"])
    assert result["language"] == "en"
    assert 0.0 <= result["score"] <= 1.0


async def test_content_is_deterministic_and_within_max_tokens() -> None:
    """The same prompt gets the same answer, and a tiny max_tokens is honoured."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            _, first, _ = await post_chat(session, url, chat_body())
            _, second, _ = await post_chat(session, url, chat_body())
            _, short, _ = await post_chat(session, url, chat_body(max_tokens=3))
    content = first["choices"][0]["message"]["content"]
    assert content == second["choices"][0]["message"]["content"]
    assert first["id"] != second["id"]
    assert short["usage"]["completion_tokens"] <= 3
    assert short["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        ({"model": "gpt-4o-mini"}, "messages"),
        (chat_body(max_tokens="many"), "max_tokens"),
    ],
)
async def test_bad_body_is_400(body: object, param: str | None) -> None:
    """Malformed JSON or a missing/invalid field gets OpenAI's 400 error body."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            status, payload, _ = await post_chat(session, url, body)
    assert status == 400
    error = payload["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert "code" in error


async def test_rpm_exceeded_is_429_with_headers() -> None:
    """A third quick request against 2 RPM gets 429 with retry and x-ratelimit headers."""
    settings = SimulateConfig(latency_ms=0, requests_per_minute=2, slice_s=60)
    with anyio.fail_after(5):
        async with client(settings) as (_, url, session):
            ok = [await post_chat(session, url, chat_body()) for _ in range(2)]
            status, body, headers = await post_chat(session, url, chat_body())
    assert [status for status, _, _ in ok] == [200, 200]
    assert ok[0][2]["x-ratelimit-limit-requests"] == "2"
    assert ok[0][2]["x-ratelimit-remaining-requests"] == "1"
    assert status == 429
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] is None
    assert body["error"]["message"].startswith("Rate limit reached for requests")
    # One request refills in 30 s; a slow machine has used up at most a little of that.
    assert 20_000 < int(headers["retry-after-ms"]) <= 30_000
    assert int(headers["retry-after"]) == -(-int(headers["retry-after-ms"]) // 1000)
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in headers  # TPM is unlimited here


async def test_tpm_exceeded_is_429_tokens() -> None:
    """A request that does not fit the token budget gets a 429 of type tokens."""
    settings = SimulateConfig(latency_ms=0, tokens_per_minute=150)
    with anyio.fail_after(5):
        async with client(settings) as (_, url, session):
            first, _, first_headers = await post_chat(session, url, chat_body())
            status, body, headers = await post_chat(session, url, chat_body())
            too_big, big_body, big_headers = await post_chat(
                session, url, chat_body(max_tokens=1000)
            )
    assert first == 200
    assert first_headers["x-ratelimit-limit-tokens"] == "150"
    assert status == 429
    assert body["error"]["type"] == "tokens"
    assert int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-remaining-tokens"] == first_headers["x-ratelimit-remaining-tokens"]
    assert too_big == 429
    assert big_body["error"]["message"].startswith("Request too large")
    assert "retry-after" not in big_headers  # waiting can never help


async def test_buckets_refill_over_time() -> None:
    """A spent request budget admits again once the clock has refilled it."""
    now = [1000.0]
    api = SimulatedAPI(SimulateConfig(latency_ms=0, requests_per_minute=1), clock=lambda: now[0])
    with anyio.fail_after(5):
        async with serve_api(api) as url, aiohttp.ClientSession() as session:
            statuses = [(await post_chat(session, url, chat_body()))[0] for _ in range(2)]
            now[0] += 30.0
            _, _, half = await post_chat(session, url, chat_body())
            now[0] += 30.0
            refilled, _, _ = await post_chat(session, url, chat_body())
    assert statuses == [200, 429]
    assert half["retry-after-ms"] == "30000"
    assert half["x-ratelimit-reset-requests"] == "30s"
    assert refilled == 200


async def test_error_rate_one_is_500() -> None:
    """error_rate = 1.0 answers every request with an OpenAI-style 500."""
    with anyio.fail_after(5):
        async with client(SimulateConfig(latency_ms=0, error_rate=1.0)) as (_, url, session):
            status, body, _ = await post_chat(session, url, chat_body())
    assert status == 500
    assert body["error"]["type"] == "server_error"


async def test_hang_is_cancelled_when_client_leaves() -> None:
    """A hung request times out client-side, and the server drops it when the client leaves."""
    with anyio.fail_after(5):
        async with client(SimulateConfig(latency_ms=0, hang_rate=1.0)) as (api, url, session):
            timeout = aiohttp.ClientTimeout(total=0.3)
            with pytest.raises(TimeoutError):
                async with session.post(
                    f"{url}/chat/completions", json=chat_body(), timeout=timeout
                ) as response:
                    await response.read()
            # The server learns of the disconnect a moment later: poll what it reports.
            await eventually(lambda: get_stats(session, url), lambda s: s["in_flight"] == 0)
            stats = await get_stats(session, url)
    assert stats["requests"] == 1
    assert stats["by_status"] == {"499": 1}
    assert api.stats().in_flight == 0


async def test_shutdown_answers_hung_requests() -> None:
    """Leaving serve_simulated answers a still-hung request with 503 rather than holding on."""
    statuses: list[int] = []
    with anyio.fail_after(5):
        # Exits run in reverse: the server stops first, then the task group awaits the call.
        async with (
            aiohttp.ClientSession() as session,
            anyio.create_task_group() as tg,
            serve_simulated(SimulateConfig(latency_ms=0, hang_rate=1.0)) as (api, url),
        ):

            async def call() -> None:
                statuses.append((await post_chat(session, url, chat_body()))[0])

            tg.start_soon(call)
            await eventually(lambda: get_stats(session, url), lambda s: s["in_flight"] == 1)
    assert statuses == [503]
    assert api.stats().by_status == {"503": 1}


async def test_stats_count_by_status() -> None:
    """/stats counts every request by status, and tokens only for successes."""
    with anyio.fail_after(5):
        async with client() as (api, url, session):
            _, ok, _ = await post_chat(session, url, chat_body())
            await post_chat(session, url, chat_body())
            await post_chat(session, url, b"{")
            stats = await get_stats(session, url)
    local = msgspec.to_builtins(api.stats())
    assert stats["uptime_s"] <= local.pop("uptime_s")
    assert {k: v for k, v in stats.items() if k != "uptime_s"} == local
    assert stats["admitted"] == 2  # the 400 never reached the rate limiter
    assert stats["requests"] == 3
    assert stats["by_status"] == {"200": 2, "400": 1}
    assert stats["in_flight"] == 0
    assert stats["tokens_prompt"] == 2 * ok["usage"]["prompt_tokens"]
    assert stats["tokens_completion"] == 2 * ok["usage"]["completion_tokens"]


async def test_models_list() -> None:
    """GET /v1/models lists models the OpenAI way."""
    with anyio.fail_after(5):
        async with client() as (_, url, session), session.get(f"{url}/models") as response:
            assert response.status == 200
            body = await response.json()
    assert body["object"] == "list"
    assert {"gpt-4o-mini", "simulated"} <= {model["id"] for model in body["data"]}


async def test_seeded_misbehaviour_is_reproducible() -> None:
    """Two servers with the same seed fail the same requests."""
    settings = SimulateConfig(latency_ms=1, error_rate=0.5, seed=42)
    runs: list[list[int]] = []
    with anyio.fail_after(5):
        for _ in range(2):
            async with client(settings) as (_, url, session):
                runs.append([(await post_chat(session, url, chat_body()))[0] for _ in range(12)])
    assert runs[0] == runs[1]
    assert {200, 500} == set(runs[0])


async def announced_url(capsys: pytest.CaptureFixture[str]) -> str:
    """The URL run_standalone prints once bound (its one line)."""
    out = ""
    while "\n" not in out:
        await anyio.sleep(0.01)
        out += capsys.readouterr().out
    prefix = "simulate-api listening on "
    assert out.startswith(prefix), out
    return out.removeprefix(prefix).strip()


async def test_run_standalone_announces_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    """run_standalone prints its URL once bound, serves, and stops cleanly when cancelled."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_standalone, FAST, "127.0.0.1", 0)
            url = await announced_url(capsys)
            async with aiohttp.ClientSession() as session:
                status, _, _ = await post_chat(session, url, chat_body())
            tg.cancel_scope.cancel()
    assert status == 200


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.12, "120ms"), (0.0001, "1ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s")],
)
def test_openai_duration(seconds: float, text: str) -> None:
    """Durations are written the way OpenAI's x-ratelimit-reset-* headers write them."""
    assert openai_duration(seconds) == text
