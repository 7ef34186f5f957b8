"""The simulated API's Anthropic dialect (the Messages API), exercised over real HTTP on
loopback."""

from __future__ import annotations

import io
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
from multidict import CIMultiDictProxy

from daemon.cli.main import EX_USAGE, build_parser, main
from daemon.config import SimulateConfig
from daemon.providers.ratelimit_headers import parse_rate_limit_headers
from daemon.simulated.anthropic_limits import rfc3339
from daemon.simulated.cache import Breakpoint, PromptCache
from daemon.simulated.faults import FAULT_HEADER
from daemon.simulated.server import (
    MAX_BODY_BYTES,
    SimulatedAPI,
    run_standalone,
    serve_api,
    serve_simulated,
)
from tests.test_simulated import eventually

pytestmark = pytest.mark.anyio

FAST = SimulateConfig(dialect="anthropic", latency_ms=0, seed=7)
VERSION = {"anthropic-version": "2023-06-01"}
SYSTEM = "You summarize documents."
TEXT = "The launch was a great success and the team is happy with the rollout of the product."
LONG_SYSTEM = "Follow the house style guide to the letter. " * 100  # 4,400 chars: 1,100 tokens
RFC3339_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

Answer = tuple[int, dict[str, Any], CIMultiDictProxy[str]]


def messages_body(text: str = TEXT, **extra: Any) -> dict[str, Any]:
    """An Anthropic Messages request body."""
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        **extra,
    }


def cached_system(text: str = LONG_SYSTEM) -> list[dict[str, Any]]:
    """A system prompt marked as a cacheable prefix."""
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


@asynccontextmanager
async def client(
    settings: SimulateConfig = FAST,
) -> AsyncIterator[tuple[SimulatedAPI, str, aiohttp.ClientSession]]:
    """A served API, its base URL (the root) and a client session sending the version."""
    async with (
        serve_simulated(settings) as (api, url),
        aiohttp.ClientSession(headers={"x-api-key": "sk-ant-test", **VERSION}) as session,
    ):
        yield api, url, session


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: object,
    *,
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST one request; returns status, decoded body and headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}{path}", data=data, headers=headers) as response:
        return response.status, msgspec.json.decode(await response.read()), response.headers


async def get_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The server's own counters, read over HTTP."""
    async with session.get(f"{url}/stats") as response:
        assert response.status == 200
        stats: dict[str, Any] = await response.json()
        return stats


def error_of(status: int, payload: dict[str, Any], expected_status: int, kind: str) -> str:
    """Check Anthropic's error shape; returns the message."""
    assert status == expected_status, payload
    assert payload["type"] == "error"
    assert payload["error"]["type"] == kind
    message: str = payload["error"]["message"]
    assert message
    return message


def text_of(payload: dict[str, Any]) -> str:
    """The text of a message's single text block."""
    (block,) = payload["content"]
    assert block["type"] == "text"
    text: str = block["text"]
    return text


# --- answers ------------------------------------------------------------------------------


async def test_text_answer_shape_and_usage() -> None:
    """A plain request gets an Anthropic-shaped message with consistent usage and a request-id."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
            status, body, headers = await post(session, url, messages_body())
    assert status == 200
    assert body["id"].startswith("msg_")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude-haiku-4-5"
    assert text_of(body).startswith("Summary: The launch was a great success")
    assert body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None
    usage = body["usage"]
    assert usage["input_tokens"] == (len(SYSTEM) + len(TEXT)) // 4
    assert 1 <= usage["output_tokens"] <= 100
    assert usage["cache_creation_input_tokens"] == 0
    assert usage["cache_read_input_tokens"] == 0
    assert headers["request-id"].startswith("req_")
    assert "x-ratelimit-limit-requests" not in headers


@pytest.mark.parametrize(
    "extra",
    [
        {"system": "Answer with a JSON object."},
        {"system": [{"type": "text", "text": "Reply in json only."}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": f"{TEXT} As JSON."}]}]},
    ],
)
async def test_json_answer_when_the_prompt_asks_for_json(extra: dict[str, Any]) -> None:
    """A system prompt or last user text that asks for JSON gets a parseable JSON object."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            status, body, _ = await post(session, url, messages_body(**extra))
    assert status == 200
    result = json.loads(text_of(body))
    assert set(result) == {"summary", "sentiment", "topics", "language", "score"}
    assert result["sentiment"] == "positive"


async def test_max_tokens_cuts_the_answer() -> None:
    """A too-small max_tokens cuts the text and says so with stop_reason max_tokens."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            _, whole, _ = await post(session, url, messages_body())
            status, short, _ = await post(session, url, messages_body(max_tokens=3))
    assert status == 200
    assert short["stop_reason"] == "max_tokens"
    assert short["usage"]["output_tokens"] <= 3
    assert text_of(whole).startswith(text_of(short))
    assert whole["id"] != short["id"]


async def test_stop_sequence_ends_the_answer() -> None:
    """A stop sequence in the answer cuts it there and is reported."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            body = messages_body(stop_sequences=["nothing like it", "great"])
            status, answer, _ = await post(session, url, body)
    assert status == 200
    assert text_of(answer) == "Summary: The launch was a "
    assert answer["stop_reason"] == "stop_sequence"
    assert answer["stop_sequence"] == "great"


async def test_no_api_key_is_fine() -> None:
    """The simulated API has no keys: a request without x-api-key is answered."""
    with anyio.fail_after(5):
        async with serve_simulated(FAST) as (_, url), aiohttp.ClientSession() as session:
            status, _, _ = await post(session, url, messages_body(), headers=VERSION)
    assert status == 200


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        (messages_body(), {"anthropic-version": ""}, "anthropic-version: header is required"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, None, "max_tokens:"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, None, "model:"),
        (messages_body(temperature=1.5), None, "temperature:"),
        (messages_body(max_tokens=0), None, "max_tokens:"),
        (messages_body(stream=True), None, "stream:"),
        (messages_body(messages=[]), None, "messages:"),
        (messages_body(messages=[{"role": "system", "content": "x"}]), None, "messages.0.role:"),
        (
            messages_body(messages=[{"role": "user", "content": [{"type": "image"}]}]),
            None,
            "messages.0.content.0.type:",
        ),
        (b"{not json", None, "There was an error parsing the body"),
    ],
)
async def test_invalid_requests_are_400_naming_the_field(
    body: object, headers: dict[str, str] | None, field: str
) -> None:
    """A missing header or a missing/invalid field gets Anthropic's 400 naming it."""
    with anyio.fail_after(5):
        async with client() as (api, url, session):
            status, payload, answer_headers = await post(session, url, body, headers=headers)
    message = error_of(status, payload, 400, "invalid_request_error")
    assert message.startswith(field), message
    assert answer_headers["request-id"].startswith("req_")
    assert api.stats().admitted == 0


async def test_oversized_body_is_413_request_too_large() -> None:
    """A body past the size limit gets Anthropic's 413 request_too_large."""
    body = io.BytesIO(json.dumps(messages_body("x" * (MAX_BODY_BYTES + 1))).encode())
    with anyio.fail_after(10):
        async with (
            client() as (_, url, session),
            session.post(f"{url}/v1/messages", data=body) as response,
        ):
            status, payload = response.status, await response.json()
    error_of(status, payload, 413, "request_too_large")


async def test_too_many_cache_breakpoints_is_400() -> None:
    """More than four blocks with cache_control is refused, as Anthropic does."""
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            status, payload, _ = await post(session, url, messages_body(system=[block] * 5))
    assert "maximum of 4 blocks" in error_of(status, payload, 400, "invalid_request_error")


async def test_the_other_dialects_path_is_404() -> None:
    """Each dialect answers the other's endpoint with a 404 in its own error shape."""
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            status, payload, headers = await post(
                session, url, {"messages": []}, path="/v1/chat/completions"
            )
            assert headers["request-id"].startswith("req_")
        error_of(status, payload, 404, "not_found_error")
        openai = SimulateConfig(latency_ms=0)
        async with serve_simulated(openai) as (_, v1), aiohttp.ClientSession() as session:
            root = v1.removesuffix("/v1")
            status, payload, _ = await post(session, root, messages_body(), headers=VERSION)
    assert status == 404
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"] == "Invalid URL (POST /v1/messages)"


# --- prompt caching -----------------------------------------------------------------------


async def test_cache_creation_then_read() -> None:
    """A cache_control prefix of 1,024+ tokens is written once, then read, with the counts."""
    prefix = (len(LONG_SYSTEM)) // 4
    total = (len(LONG_SYSTEM) + len(TEXT)) // 4
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            _, first, _ = await post(session, url, messages_body(system=cached_system()))
            _, second, _ = await post(session, url, messages_body(system=cached_system()))
            _, other, _ = await post(session, url, messages_body(system=cached_system("X" * 99)))
            stats = await get_stats(session, url)
    assert first["usage"]["cache_creation_input_tokens"] == prefix
    assert first["usage"]["cache_read_input_tokens"] == 0
    assert first["usage"]["input_tokens"] == total - prefix
    assert second["usage"]["cache_creation_input_tokens"] == 0
    assert second["usage"]["cache_read_input_tokens"] == prefix
    assert second["usage"]["input_tokens"] == total - prefix
    # Under 1,024 tokens a marked prefix is not cached at all.
    assert other["usage"]["cache_creation_input_tokens"] == 0
    assert other["usage"]["cache_read_input_tokens"] == 0
    assert stats["cache_creation_tokens"] == prefix
    assert stats["cache_read_tokens"] == prefix
    # ITPM is charged the input and the cache writes, never the cache reads.
    uncached = [answer["usage"]["input_tokens"] for answer in (first, second, other)]
    assert stats["input_tokens_charged"] == sum(uncached) + prefix
    assert stats["tokens_prompt"] == sum(uncached) + 2 * prefix


async def test_cache_reads_the_longest_cached_breakpoint() -> None:
    """With breakpoints on the system and a message, a new tail reads the system prefix
    and writes the rest."""

    def body(tail: str) -> dict[str, Any]:
        turn = {"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}
        return messages_body(
            system=cached_system(),
            messages=[
                {"role": "user", "content": [turn]},
                {"role": "assistant", "content": "Understood."},
                {"role": "user", "content": tail},
            ],
        )

    system_tokens = len(LONG_SYSTEM) // 4
    both_tokens = 2 * len(LONG_SYSTEM) // 4
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            _, first, _ = await post(session, url, body(TEXT))
            _, second, _ = await post(session, url, body("another question"))
    assert first["usage"]["cache_creation_input_tokens"] == both_tokens
    assert first["usage"]["cache_read_input_tokens"] == 0
    assert second["usage"]["cache_read_input_tokens"] == both_tokens
    assert second["usage"]["cache_creation_input_tokens"] == 0
    assert both_tokens > system_tokens


async def test_cache_expires_after_five_minutes() -> None:
    """An unused prefix is gone after 300 s: the next request writes it again."""
    now = [1000.0]
    api = SimulatedAPI(FAST, clock=lambda: now[0])
    prefix = len(LONG_SYSTEM) // 4
    with anyio.fail_after(5):
        async with serve_api(api) as url, aiohttp.ClientSession(headers=VERSION) as session:
            usages = []
            for step_s in (0.0, 299.0, 299.0, 301.0):
                now[0] += step_s
                _, body, _ = await post(session, url, messages_body(system=cached_system()))
                usages.append(body["usage"])
    assert [u["cache_creation_input_tokens"] for u in usages] == [prefix, 0, 0, prefix]
    assert [u["cache_read_input_tokens"] for u in usages] == [0, prefix, prefix, 0]


def test_prompt_cache_is_bounded() -> None:
    """The cache keeps at most max_entries prefixes, dropping the least recently used."""
    cache = PromptCache(lambda: 0.0, max_entries=3, min_tokens=1)
    points = [Breakpoint(bytes([i]), 10) for i in range(5)]
    for point in points:
        cache.commit(cache.use([point]))
    assert len(cache) == 3
    assert cache.use([points[0]]).read == 0
    assert cache.use([points[4]]).read == 10


async def test_openai_dialect_reports_cached_tokens() -> None:
    """The openai dialect caches a repeated 1,024+ token prefix by itself: cached_tokens."""

    def body(question: str) -> dict[str, Any]:
        messages = [
            {"role": "system", "content": LONG_SYSTEM},
            {"role": "user", "content": question},
        ]
        return {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 50}

    with anyio.fail_after(5):
        async with (
            serve_simulated(SimulateConfig(latency_ms=0)) as (api, url),
            aiohttp.ClientSession() as session,
        ):
            path = "/chat/completions"
            _, first, _ = await post(session, url, body(TEXT), path=path)
            _, second, _ = await post(session, url, body("Another question?"), path=path)
            _, short, _ = await post(session, url, body(TEXT) | {"model": "gpt-4o"}, path=path)
    assert "prompt_tokens_details" not in first["usage"]  # nothing cached yet
    assert "prompt_tokens_details" not in short["usage"]  # a cache is per model
    # 1,100 tokens of system prompt, counted down to OpenAI's 128-token steps.
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}
    assert second["usage"]["prompt_tokens"] == (len(LONG_SYSTEM) + len("Another question?")) // 4
    assert api.stats().cache_read_tokens == 1024


# --- rate limits --------------------------------------------------------------------------


async def test_rpm_exceeded_is_429_with_headers() -> None:
    """A third quick request against 2 RPM gets a rate_limit_error with retry-after and headers."""
    settings = SimulateConfig(dialect="anthropic", latency_ms=0, requests_per_minute=2, slice_s=60)
    with anyio.fail_after(5):
        async with client(settings) as (api, url, session):
            ok = [await post(session, url, messages_body()) for _ in range(2)]
            status, body, headers = await post(session, url, messages_body())
            stats = api.stats()
    assert [answer[0] for answer in ok] == [200, 200]
    assert ok[0][2]["anthropic-ratelimit-requests-limit"] == "2"
    assert ok[0][2]["anthropic-ratelimit-requests-remaining"] == "1"
    assert "requests per minute" in error_of(status, body, 429, "rate_limit_error")
    # One request refills in 30 s; a slow machine has used up at most a little of that.
    assert 20 <= int(headers["retry-after"]) <= 30
    assert "retry-after-ms" not in headers
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert RFC3339_RE.match(headers["anthropic-ratelimit-requests-reset"])
    assert not any(name.startswith("anthropic-ratelimit-input") for name in headers)
    assert stats.admitted == 2
    assert stats.remaining_requests == 0


async def test_itpm_exceeded_is_429_and_consumes_nothing() -> None:
    """A prompt that does not fit the input-token budget gets a 429; the rejection is free."""
    settings = SimulateConfig(
        dialect="anthropic", latency_ms=0, input_tokens_per_minute=2000, slice_s=60
    )
    big = "word " * 1200  # 1,500 tokens with the system prompt: one fits, two do not
    with anyio.fail_after(5):
        async with client(settings) as (api, url, session):
            first, answer, first_headers = await post(session, url, messages_body(big))
            charged = api.stats().input_tokens_charged
            status, body, headers = await post(session, url, messages_body(big))
            stats = await get_stats(session, url)
    assert first == 200
    assert charged == answer["usage"]["input_tokens"] == (len(SYSTEM) + len(big)) // 4
    assert "input tokens per minute" in error_of(status, body, 429, "rate_limit_error")
    assert int(headers["retry-after"]) >= 1
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "2000"
    assert headers["anthropic-ratelimit-tokens-limit"] == "2000"  # the only token budget
    for name in ("input-tokens", "tokens"):
        remaining = int(headers[f"anthropic-ratelimit-{name}-remaining"])
        assert remaining % 1000 == 0 and 0 <= remaining <= 2000
    assert first_headers["anthropic-ratelimit-input-tokens-remaining"] in ("0", "1000")
    assert stats["input_tokens_charged"] == charged  # the 429 was charged nothing
    assert stats["admitted"] == 1
    assert stats["by_status"] == {"200": 1, "429": 1}


async def test_otpm_spent_is_429_after_the_answer_is_charged() -> None:
    """The output budget is charged the answer's real tokens; once spent, admission stops."""
    settings = SimulateConfig(
        dialect="anthropic", latency_ms=0, output_tokens_per_minute=10, slice_s=60
    )
    with anyio.fail_after(5):
        async with client(settings) as (api, url, session):
            first, answer, first_headers = await post(session, url, messages_body())
            status, body, headers = await post(session, url, messages_body())
            stats = api.stats()
    assert first == 200
    output = answer["usage"]["output_tokens"]
    assert output > 10  # so the budget is in debt
    assert first_headers["anthropic-ratelimit-output-tokens-remaining"] == "0"
    assert "output tokens per minute" in error_of(status, body, 429, "rate_limit_error")
    # Paying the debt back at 10 a minute takes over a minute.
    assert int(headers["retry-after"]) > 60
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "10"
    assert stats.output_tokens_charged == output
    assert stats.remaining_output_tokens == 0
    assert stats.input_tokens_charged == answer["usage"]["input_tokens"]


async def test_rate_limit_headers_parse_as_anthropics() -> None:
    """The headers read back through the daemon's own parser: limits, rounded remainders, resets."""
    settings = SimulateConfig(
        dialect="anthropic",
        latency_ms=0,
        requests_per_minute=50,
        input_tokens_per_minute=20_000,
        output_tokens_per_minute=8_000,
    )
    with anyio.fail_after(5):
        async with client(settings) as (_, url, session):
            status, answer, headers = await post(session, url, messages_body())
    assert status == 200
    parsed = parse_rate_limit_headers(headers, now=time.time())
    assert parsed.requests is not None and parsed.requests.limit == 50
    assert parsed.requests.remaining == 49
    assert parsed.input_tokens is not None and parsed.input_tokens.limit == 20_000
    assert parsed.input_tokens.remaining == 20_000  # 20,000 - 30, to the nearest thousand
    assert parsed.output_tokens is not None and parsed.output_tokens.limit == 8_000
    assert parsed.output_tokens.remaining == 8_000
    assert parsed.tokens is not None and parsed.tokens.limit == 8_000  # fewest remaining
    for budget in (parsed.requests, parsed.input_tokens, parsed.output_tokens, parsed.tokens):
        assert budget.reset_s is not None and 0 <= budget.reset_s <= 5
    for name, value in headers.items():
        if name.endswith("-reset"):
            assert RFC3339_RE.match(value), (name, value)
    assert answer["usage"]["output_tokens"] > 0


def test_rfc3339_rounds_up_to_the_second() -> None:
    """Resets are written as UTC RFC 3339 times, never earlier than the real reset."""
    assert rfc3339(1796495100.0) == "2026-12-05T18:25:00Z"
    assert rfc3339(1796495100.2) == "2026-12-05T18:25:01Z"


# --- misbehaviour and faults --------------------------------------------------------------


async def test_overload_rate_one_is_529() -> None:
    """overload_rate = 1 turns every request away with Anthropic's 529 overloaded_error."""
    settings = SimulateConfig(dialect="anthropic", latency_ms=0, overload_rate=1.0)
    with anyio.fail_after(5):
        async with client(settings) as (api, url, session):
            status, body, headers = await post(session, url, messages_body())
    assert error_of(status, body, 529, "overloaded_error") == "Overloaded"
    assert headers["request-id"].startswith("req_")
    assert api.stats().by_status == {"529": 1}


async def test_openai_overload_is_503() -> None:
    """In the openai dialect an overload is a 503 with OpenAI's server_error body."""
    settings = SimulateConfig(latency_ms=0, overload_rate=1.0)
    with anyio.fail_after(5):
        async with serve_simulated(settings) as (_, url), aiohttp.ClientSession() as session:
            body = {"messages": [{"role": "user", "content": "hi"}]}
            status, payload, _ = await post(session, url, body, path="/chat/completions")
    assert status == 503
    assert payload["error"]["type"] == "server_error"
    assert payload["error"]["message"] == "The server is overloaded or not ready yet."


async def test_error_rate_one_is_api_error() -> None:
    """error_rate = 1 answers every request with Anthropic's 500 api_error."""
    settings = SimulateConfig(dialect="anthropic", latency_ms=0, error_rate=1.0)
    with anyio.fail_after(5):
        async with client(settings) as (_, url, session):
            status, body, _ = await post(session, url, messages_body())
    error_of(status, body, 500, "api_error")


@pytest.mark.parametrize(
    ("fault", "status", "kind"),
    [
        ("500", 500, "api_error"),
        ("503", 503, "api_error"),
        ("529", 529, "overloaded_error"),
        ("429", 429, "rate_limit_error"),
        ("429-no-retry-after", 429, "rate_limit_error"),
    ],
)
async def test_error_faults_speak_anthropic(fault: str, status: int, kind: str) -> None:
    """The named error faults answer in Anthropic's error shape, by path or header."""
    with anyio.fail_after(5):
        async with client() as (api, url, session):
            by_path = await post(session, f"{url}/fault/{fault}", messages_body())
            by_header = await post(session, url, messages_body(), headers={FAULT_HEADER: fault})
            stats = api.stats()
    for got_status, payload, headers in (by_path, by_header):
        error_of(got_status, payload, status, kind)
        assert headers["request-id"].startswith("req_")
        assert headers.get("retry-after") == ("1" if fault in ("429", "503") else None)
        assert "retry-after-ms" not in headers
    assert stats.faults == {fault: 2}
    assert stats.admitted == 0


async def test_body_faults_damage_an_anthropic_message() -> None:
    """malformed-json, no-choices and bad-json-content damage an Anthropic message body."""
    json_body = messages_body(system="Answer in JSON.")
    with anyio.fail_after(5):
        async with client() as (_, url, session):
            async with session.post(
                f"{url}/fault/malformed-json/v1/messages", json=json_body
            ) as response:
                assert response.status == 200
                raw = await response.read()
            _, empty, _ = await post(session, f"{url}/fault/no-choices", json_body)
            _, prose, _ = await post(session, f"{url}/fault/bad-json-content", json_body)
    assert raw.startswith(b'{"id":"msg_fault","type":"message"')
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(raw)
    assert empty["type"] == "message" and empty["content"] == []
    assert prose["type"] == "message"
    assert "{" not in text_of(prose)


async def test_hang_fault_ends_when_the_client_leaves() -> None:
    """The hang fault holds the answer until the client gives up."""
    with anyio.fail_after(5):
        async with client() as (api, url, session):
            timeout = aiohttp.ClientTimeout(total=0.3)
            with pytest.raises(TimeoutError):
                async with session.post(
                    f"{url}/fault/hang/v1/messages", json=messages_body(), timeout=timeout
                ) as response:
                    await response.read()
            await eventually(lambda: get_stats(session, url), lambda s: s["in_flight"] == 0)
    assert api.stats().by_status == {"499": 1}


# --- stats, serving, the command line -----------------------------------------------------


async def test_stats_report_the_dialect_and_match_over_http() -> None:
    """/stats names the dialect and says what the API charged, the same over HTTP as local."""
    with anyio.fail_after(5):
        async with client() as (api, url, session):
            _, answer, _ = await post(session, url, messages_body())
            stats = await get_stats(session, url)
            local = msgspec.to_builtins(api.stats())
    assert stats["uptime_s"] <= local.pop("uptime_s")
    assert {k: v for k, v in stats.items() if k != "uptime_s"} == local
    assert stats["dialect"] == "anthropic"
    assert stats["tokens_prompt"] == answer["usage"]["input_tokens"]
    assert stats["tokens_completion"] == answer["usage"]["output_tokens"]
    assert stats["output_tokens_charged"] == answer["usage"]["output_tokens"]
    assert stats["tokens_charged"] == 0  # OpenAI's TPM charge: not this dialect's
    assert stats["remaining_input_tokens"] is None  # no ITPM limit set


async def test_models_list_the_anthropic_way() -> None:
    """GET /v1/models lists models in Anthropic's shape."""
    with anyio.fail_after(5):
        async with client() as (_, url, session), session.get(f"{url}/v1/models") as response:
            assert response.status == 200
            body = await response.json()
    assert body["has_more"] is False
    assert {"type", "id", "display_name", "created_at"} <= set(body["data"][0])


async def test_configure_switches_the_dialect() -> None:
    """A reload to the anthropic dialect moves the endpoint and the limits with it."""
    with anyio.fail_after(5):
        async with client(SimulateConfig(latency_ms=0)) as (api, v1, session):
            root = v1.removesuffix("/v1")
            api.configure(
                SimulateConfig(dialect="anthropic", latency_ms=0, output_tokens_per_minute=600)
            )
            status, _, headers = await post(session, root, messages_body())
            old, _, _ = await post(session, v1, {"messages": []}, path="/chat/completions")
    assert status == 200
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "600"
    assert old == 404


async def test_run_standalone_announces_the_root(capsys: pytest.CaptureFixture[str]) -> None:
    """run_standalone prints the anthropic API's root URL once bound, and serves it."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_standalone, FAST, "127.0.0.1", 0)
            out = ""
            while "\n" not in out:
                await anyio.sleep(0.01)
                out += capsys.readouterr().out
            url = out.removeprefix("simulate-api listening on ").strip()
            assert not url.endswith("/v1")
            async with aiohttp.ClientSession(headers=VERSION) as session:
                status, _, _ = await post(session, url, messages_body())
            tg.cancel_scope.cancel()
    assert status == 200


async def test_cli_serves_the_anthropic_dialect() -> None:
    """`vigil simulate-api --dialect anthropic --port 0` prints its root URL, applies its flags."""
    args = ["--dialect", "anthropic", "--port", "0", "--latency-ms", "0", "--itpm", "40000"]
    command = [sys.executable, "-m", "daemon", "simulate-api", *args, "--otpm", "8000"]
    with anyio.fail_after(60):
        async with await anyio.open_process(command) as process:
            assert process.stdout is not None
            out = b""
            while b"\n" not in out:
                out += await process.stdout.receive()
            line = out.decode().splitlines()[0]
            assert line.startswith("simulate-api listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            async with aiohttp.ClientSession(headers=VERSION) as session:
                status, _, headers = await post(session, url, messages_body())
                stats = await get_stats(session, url)
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
    assert status == 200
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "40000"
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "8000"
    assert stats["dialect"] == "anthropic"
    assert code == 0


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--dialect", "gemini"], "--dialect"),
        (["--itpm", "-1"], "--itpm"),
        (["--otpm", "1.5"], "--otpm"),
        (["--overload-rate", "2"], "--overload-rate"),
    ],
)
def test_cli_flags_are_checked(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each new flag is checked by SimulateConfig's own constraint, naming the flag."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["simulate-api", *args])
    assert exited.value.code == EX_USAGE
    assert f"argument {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["--dialect", "anthropic", "--tpm", "100"], ["--itpm", "100"], ["--otpm", "100"]],
)
def test_cli_refuses_the_other_dialects_budget(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A token budget of the other dialect is a usage error, before anything is served."""
    assert main(["simulate-api", "--port", "0", *args]) == EX_USAGE
    assert "dialect" in capsys.readouterr().err
