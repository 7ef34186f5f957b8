"""The simulated API's Anthropic dialect (the Messages API), exercised over real HTTP on
loopback."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
from multidict import CIMultiDictProxy

from daemon.config import SimulateConfig
from daemon.simulated.cache import Breakpoint, PromptCache
from daemon.simulated.server import (
    MAX_BODY_BYTES,
    SimulatedAPI,
    serve_api,
    serve_simulated,
)

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
