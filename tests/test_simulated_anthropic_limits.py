"""The simulated API's Anthropic dialect, part two: its three rate limits, its
misbehaviour and faults, its stats, serving and command line."""

from __future__ import annotations

import signal
import sys
import time

import aiohttp
import anyio
import msgspec
import pytest

from daemon.cli.main import EX_USAGE, build_parser, main
from daemon.config import SimulateConfig
from daemon.providers.ratelimit_headers import parse_rate_limit_headers
from daemon.simulated.anthropic_limits import rfc3339
from daemon.simulated.faults import FAULT_HEADER
from daemon.simulated.server import (
    run_standalone,
    serve_simulated,
)
from tests.test_simulated import announced_url, eventually
from tests.test_simulated_anthropic import (
    FAST,
    RFC3339_RE,
    SYSTEM,
    VERSION,
    client,
    error_of,
    get_stats,
    messages_body,
    post,
    text_of,
)

pytestmark = pytest.mark.anyio

pytestmark = pytest.mark.anyio


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
            url = await announced_url(capsys)
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
