"""The dialects, table-driven from answers recorded per server (tests/recorded/, issue #13):
each answer is read the way the client reads it, then the request side per dialect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from multidict import CIMultiDict

from daemon.config import ProviderConfig, SimulateConfig
from daemon.providers.anthropic import ANTHROPIC_VERSION, JSON_INSTRUCTION, AnthropicDialect
from daemon.providers.base import ChatRequest, Message, ProviderError
from daemon.providers.client import dialect_for
from daemon.providers.dialect import MESSAGE_MAX_CHARS, Dialect
from daemon.providers.openai import OpenAIDialect, server_of
from daemon.providers.ratelimit_headers import RateLimitHeaders, retry_after_s

RECORDED = Path(__file__).parent / "recorded"
KEY_ENV = "VIGIL_TEST_DIALECT_KEY"
KEY = "sk-test-dialect-0123456789"
MESSAGE_SLACK = 64  # "HTTP 429 insufficient_quota: " and the like, before the cut message
BUDGETS = ("requests", "tokens", "input_tokens", "output_tokens")
COMPLETION_FIELDS = (
    "content",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "stop_reason",
)
SERVERS: dict[str, ProviderConfig] = {
    "openai": ProviderConfig(
        kind="openai", base_url="https://api.openai.com/v1", api_key_env=KEY_ENV
    ),
    "azure": ProviderConfig(
        kind="openai",
        base_url="https://contoso-eastus.openai.azure.com",
        api_version="2024-10-21",
        api_key_env=KEY_ENV,
    ),
    "groq": ProviderConfig(
        kind="openai", base_url="https://api.groq.com/openai/v1", api_key_env=KEY_ENV
    ),
    "vllm": ProviderConfig(kind="openai", base_url="http://10.0.0.5:8000/v1", api_key_env=KEY_ENV),
    "llamacpp": ProviderConfig(
        kind="openai", base_url="http://127.0.0.1:8080/v1", api_key_env=KEY_ENV
    ),
    "ollama": ProviderConfig(kind="openai", base_url="http://localhost:11434/v1"),
    "gemini": ProviderConfig(
        kind="openai",
        base_url="https://generativelanguage.googleapis.com/v1beta/openai",
        api_key_env=KEY_ENV,
    ),
    "openrouter": ProviderConfig(
        kind="openai", base_url="https://openrouter.ai/api/v1", api_key_env=KEY_ENV
    ),
    "anthropic": ProviderConfig(
        kind="anthropic", base_url="https://api.anthropic.com", api_key_env=KEY_ENV
    ),
}
"""Each fixture file's server: a provider config with its usual base URL."""
DIALECT_NAMES = {"azure": "azure", "groq": "groq", "anthropic": "anthropic"}
"""The dialect `dialect_for` picks per server (the plain openai one where not listed)."""
OPENAI_FAMILY = [server for server in SERVERS if server != "anthropic"]


# --- helpers ------------------------------------------------------------------------------


def load_rows() -> list[tuple[str, dict[str, Any]]]:
    """Every recorded answer as (server, row), in file order."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(RECORDED.glob("*.json")):
        for row in json.loads(path.read_text(encoding="utf-8")):
            rows.append((path.stem, row))
    return rows


ROWS = load_rows()


def params(*, with_xfail: bool) -> list[Any]:
    """The rows as pytest params with `server/name` ids; `with_xfail` marks the rows a
    dialect is known to mishandle (their `xfail` reason), strictly."""
    out = []
    for server, row in ROWS:
        marks = []
        if with_xfail and "xfail" in row:
            marks.append(pytest.mark.xfail(reason=row["xfail"], strict=True))
        out.append(pytest.param(server, row, id=f"{server}/{row['name']}", marks=marks))
    return out


def dialect_of(server: str) -> Dialect:
    """The dialect the client would pick for this server's provider config."""
    config = SERVERS[server]
    return dialect_for(config, config.base_url)


def raw_of(row: dict[str, Any]) -> bytes:
    """The body's bytes as the server sent them (lone surrogates: bytes not UTF-8)."""
    body: str = row["body"]
    return body.encode("utf-8", "surrogateescape")


def headers_of(row: dict[str, Any]) -> CIMultiDict[str]:
    """The answer's headers, case-insensitive like aiohttp's."""
    return CIMultiDict(row["headers"])


def request(
    *, json_mode: bool = False, cache_system: bool = False, model: str = "gpt-4o-mini"
) -> ChatRequest:
    """A chat request with a system prompt and a user message."""
    return ChatRequest(
        model=model,
        messages=[
            Message("system", "You summarize incident reports."),
            Message("user", "Summarize: the 14:00 deploy broke checkout for 9 minutes."),
        ],
        max_tokens=256,
        temperature=0.2,
        json_mode=json_mode,
        cache_system=cache_system,
    )


def check_budgets(found: RateLimitHeaders, expected: dict[str, Any]) -> None:
    """The budgets found are exactly those expected, with their limit and remaining."""
    for budget in BUDGETS:
        got = getattr(found, budget)
        want = expected.get(budget)
        if want is None:
            assert got is None, f"{budget} should not be a budget: {got}"
            continue
        assert got is not None, f"{budget} missing"
        assert got.limit == want["limit"], budget
        assert got.remaining == want["remaining"], budget
        if "reset_s" in want:
            assert got.reset_s == pytest.approx(want["reset_s"]), budget


# --- the recorded answers -----------------------------------------------------------------


def test_recorded_files_match_the_servers() -> None:
    """Every fixture file has a server config, every server a file, rows are well formed."""
    assert {path.stem for path in RECORDED.glob("*.json")} == set(SERVERS)
    seen: set[str] = set()
    for server, row in ROWS:
        assert {"name", "status", "headers", "body", "expect"} <= row.keys(), row.get("name")
        row_id = f"{server}/{row['name']}"
        assert row_id not in seen, f"duplicate row {row_id}"
        seen.add(row_id)
        assert isinstance(row["body"], str), row_id
        assert all(isinstance(v, str) for v in row["headers"].values()), row_id
        if row["status"] != 200 and "error" not in row["expect"]:
            assert {"kind", "message"} <= row["expect"].keys(), row_id


@pytest.mark.parametrize("server", list(SERVERS))
def test_servers_get_their_dialect(server: str) -> None:
    """Each server's provider config picks the dialect its fixture is read with."""
    assert dialect_of(server).name == DIALECT_NAMES.get(server, "openai")


@pytest.mark.parametrize(("server", "row"), params(with_xfail=True))
def test_recorded_answer(server: str, row: dict[str, Any]) -> None:
    """A 200 decodes to the expected Completion (or error); any other status to its Fault."""
    dialect = dialect_of(server)
    raw, expect, status = raw_of(row), row["expect"], row["status"]
    if status == 200:
        if "error" in expect:
            error = expect["error"]
            with pytest.raises(ProviderError) as caught:
                dialect.decode(raw, status)
            assert caught.value.kind == error["kind"]
            assert caught.value.retryable is error["retryable"]
            assert caught.value.status == 200
            assert error.get("message", "") in str(caught.value)
            return
        completion = dialect.decode(raw, status)
        for field in COMPLETION_FIELDS:
            if field in expect:
                assert getattr(completion, field) == expect[field], field
        assert completion.http_status == 200
        return
    fault = dialect.fault(status, raw)
    assert fault.kind == expect["kind"]
    assert fault.retryable is expect.get("retryable", True)
    assert (fault.pause is not None) is expect.get("pause", False)
    assert fault.rate_limited is expect.get("rate_limited", False)
    assert fault.overloaded is expect.get("overloaded", False)
    assert expect["message"] in fault.message
    assert fault.message.startswith(f"HTTP {status}")
    assert len(fault.message) <= MESSAGE_MAX_CHARS + MESSAGE_SLACK
    if fault.pause is not None and status in (401, 403):
        assert f"${KEY_ENV}" in fault.pause


@pytest.mark.parametrize(("server", "row"), params(with_xfail=False))
def test_recorded_rate_limits(server: str, row: dict[str, Any]) -> None:
    """The answer's headers give exactly the expected per-minute budgets."""
    found = dialect_of(server).rate_limits(headers_of(row))
    check_budgets(found, row["expect"].get("rate_limits", {}))


@pytest.mark.parametrize(
    ("server", "row"),
    [p for p in params(with_xfail=False) if "retry_after_s" in p.values[1]["expect"]],
)
def test_recorded_retry_hint(server: str, row: dict[str, Any]) -> None:
    """A 429's headers give the client the expected wait."""
    dialect = dialect_of(server)
    headers = headers_of(row)
    hint = retry_after_s(headers, tokens_needed=1000, snapshot=dialect.rate_limits(headers))
    assert hint == pytest.approx(row["expect"]["retry_after_s"])


# --- the request side ---------------------------------------------------------------------


@pytest.mark.parametrize("server", [s for s in OPENAI_FAMILY if s != "azure"])
def test_url_plain(server: str) -> None:
    """OpenAI-compatible servers take the request at {base}/chat/completions."""
    base = SERVERS[server].base_url
    assert dialect_of(server).url(base, request()) == f"{base}/chat/completions"


def test_url_azure_deployment() -> None:
    """Azure posts to the deployment (the model name, quoted) with its api-version."""
    dialect = dialect_of("azure")
    base = SERVERS["azure"].base_url
    assert dialect.url(base, request()) == (
        f"{base}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    )
    odd = request(model="team a/gpt 4o")
    assert dialect.url(base, odd) == (
        f"{base}/openai/deployments/team%20a%2Fgpt%204o/chat/completions?api-version=2024-10-21"
    )


def test_url_anthropic() -> None:
    """Anthropic takes the request at {base}/v1/messages."""
    assert dialect_of("anthropic").url("https://api.anthropic.com", request()) == (
        "https://api.anthropic.com/v1/messages"
    )


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("openai", {"Authorization": f"Bearer {KEY}"}),
        ("groq", {"Authorization": f"Bearer {KEY}"}),
        ("openrouter", {"Authorization": f"Bearer {KEY}"}),
        ("azure", {"api-key": KEY}),
        ("anthropic", {"x-api-key": KEY, "anthropic-version": ANTHROPIC_VERSION}),
    ],
)
def test_auth_headers(server: str, expected: dict[str, str]) -> None:
    """The key travels as Bearer, Azure's api-key, or Anthropic's x-api-key + version."""
    assert dialect_of(server).auth_headers(KEY) == expected


def test_auth_headers_without_key() -> None:
    """No key, no auth header; Anthropic still names its API version."""
    assert dialect_of("ollama").auth_headers("") == {}
    assert dialect_of("azure").auth_headers("") == {}
    assert dialect_of("anthropic").auth_headers("") == {"anthropic-version": "2023-06-01"}


def test_anthropic_version_configurable() -> None:
    """api_version overrides the anthropic-version header (default 2023-06-01)."""
    config = ProviderConfig(kind="anthropic", api_version="2023-01-01")
    dialect = dialect_for(config, "https://api.anthropic.com")
    assert dialect.auth_headers(KEY)["anthropic-version"] == "2023-01-01"


@pytest.mark.parametrize("server", OPENAI_FAMILY)
@pytest.mark.parametrize("json_mode", [False, True])
def test_body_openai(server: str, json_mode: bool) -> None:
    """max_tokens (never max_completion_tokens); response_format only in JSON mode."""
    body = dialect_of(server).body(request(json_mode=json_mode))
    assert body["max_tokens"] == 256
    assert "max_completion_tokens" not in body
    assert body["model"] == "gpt-4o-mini"
    assert body["temperature"] == 0.2
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == "You summarize incident reports."
    if json_mode:
        assert body["response_format"] == {"type": "json_object"}
    else:
        assert "response_format" not in body


def test_body_anthropic_plain() -> None:
    """The system prompt is top-level (not a message), uncached unless asked."""
    body = dialect_of("anthropic").body(request())
    assert body["max_tokens"] == 256
    assert "max_completion_tokens" not in body
    assert "response_format" not in body
    assert body["messages"] == [
        {"role": "user", "content": "Summarize: the 14:00 deploy broke checkout for 9 minutes."}
    ]
    assert body["system"] == [{"type": "text", "text": "You summarize incident reports."}]


def test_body_anthropic_cache_system() -> None:
    """cache_system marks the system block, and only it, with cache_control."""
    body = dialect_of("anthropic").body(request(cache_system=True, json_mode=True))
    system = body["system"]
    assert system[0] == {
        "type": "text",
        "text": "You summarize incident reports.",
        "cache_control": {"type": "ephemeral"},
    }
    assert system[1] == {"type": "text", "text": JSON_INSTRUCTION}
    assert all("cache_control" not in m for m in body["messages"])


def test_body_anthropic_json_mode() -> None:
    """JSON mode adds an instruction block to the system prompt (no response_format)."""
    body = dialect_of("anthropic").body(request(json_mode=True))
    assert body["system"] == [
        {"type": "text", "text": "You summarize incident reports."},
        {"type": "text", "text": JSON_INSTRUCTION},
    ]
    assert "response_format" not in body
    bare = ChatRequest(model="m", messages=[Message("user", "hi")], max_tokens=5)
    assert "system" not in dialect_of("anthropic").body(bare)
    only_json = msgspec.structs.replace(bare, json_mode=True)
    assert dialect_of("anthropic").body(only_json)["system"] == [
        {"type": "text", "text": JSON_INSTRUCTION}
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://contoso-eastus.openai.azure.com", "azure"),
        ("https://CONTOSO.openai.azure.com/", "azure"),
        ("https://contoso.cognitiveservices.azure.com", "azure"),
        ("https://api.groq.com/openai/v1", "groq"),
        ("https://api.openai.com/v1", "openai"),
        ("http://localhost:11434/v1", "openai"),
        ("https://openrouter.ai/api/v1", "openai"),
        ("https://generativelanguage.googleapis.com/v1beta/openai", "openai"),
        ("https://openai.azure.com.example.net/v1", "openai"),
        ("https://notapi.groq.com/v1", "openai"),
        ("", "openai"),
    ],
)
def test_server_of_auto(url: str, expected: str) -> None:
    """The "auto" dialect tells Azure and Groq by host; any other host is openai."""
    assert server_of("auto", url) == expected


def test_server_of_named() -> None:
    """A named dialect wins over the host."""
    assert server_of("groq", "http://localhost:8000/v1") == "groq"
    assert server_of("openai", "https://contoso.openai.azure.com") == "openai"


def test_dialect_for_kinds() -> None:
    """anthropic, simulated speaking anthropic, simulated and openai kinds get their dialect."""
    anthropic = dialect_for(ProviderConfig(kind="anthropic"), "https://api.anthropic.com")
    assert isinstance(anthropic, AnthropicDialect)
    simulated = ProviderConfig(kind="simulated", simulate=SimulateConfig(dialect="anthropic"))
    assert isinstance(dialect_for(simulated, "http://127.0.0.1:9/v1"), AnthropicDialect)
    plain = dialect_for(ProviderConfig(kind="simulated"), "http://127.0.0.1:9/v1")
    assert isinstance(plain, OpenAIDialect)
    assert plain.name == "openai"
    named = ProviderConfig(kind="openai", dialect="azure", api_version="2024-10-21")
    azure = dialect_for(named, "http://127.0.0.1:9")
    assert azure.name == "azure"
    assert azure.auth_headers(KEY) == {"api-key": KEY}
