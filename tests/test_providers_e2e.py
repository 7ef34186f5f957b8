"""Providers as real APIs behave (issue #13), end to end: the daemon as a subprocess,
the simulated API as a real HTTP server on 127.0.0.1 speaking each dialect, its own
counts as the truth."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from daemon.config import SimulateConfig
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows, run_cli
from tests.torture_helpers import analyzer, ledger_problems, openai_provider, threaded_api

StartDaemon = Callable[..., DaemonProcess]
KEY_ENV = "VIGIL_E2E_ANTHROPIC_KEY"
LONG_SYSTEM = "You analyse customer documents for a support team. " * 120  # ~1,500 tokens


def anthropic_provider(name: str, base_url: str, **limits: int) -> str:
    """A `kind = "anthropic"` provider section pointing at `base_url` (the API root)."""
    lines = "\n".join(f"{key} = {value}" for key, value in limits.items())
    return f"""
[providers.{name}]
kind = "anthropic"
base_url = "{base_url}"
api_key_env = "{KEY_ENV}"
max_concurrency = 16
timeout_s = 10
{lines}
"""


def submit(daemon: DaemonProcess, name: str, n: int, text: str = "document") -> list[str]:
    jobs = [{"analyzer": name, "input": {"text": f"{text} {i}"}} for i in range(n)]
    ids: list[str] = daemon.call("submit", jobs=jobs)["ids"]
    return ids


def test_an_anthropic_analyzer_runs_end_to_end(start_daemon: StartDaemon) -> None:
    """Text and JSON analyzers on kind = "anthropic": every job succeeds with the key in
    x-api-key; the cached system prompt is written once and then read from the cache,
    and the cache tokens are stored on the job and its attempt and shown."""
    settings = SimulateConfig(dialect="anthropic", latency_ms=5, latency_sigma=0.1, seed=3)
    with threaded_api(settings) as api:
        sections = anthropic_provider("claude", api.url)
        sections += analyzer("text", "claude")
        sections += analyzer("triage", "claude", output="json")
        sections += '\n[analyzers.cached]\nprovider = "claude"\nmodel = "claude-test"\n'
        sections += f'system = "{LONG_SYSTEM}"\ncache_system = true\nprompt = "{{text}}"\n'
        daemon = start_daemon(daemon_config(sections), env={KEY_ENV: "sk-ant-e2e-SECRET"})
        text_ids = submit(daemon, "text", 3)
        json_ids = submit(daemon, "triage", 3)
        [first] = submit(daemon, "cached", 1)
        daemon.wait_all_terminal(timeout_s=60)
        cached_ids = submit(daemon, "cached", 3)  # after the first wrote the cache
        counts = daemon.wait_all_terminal(timeout_s=60)
        stats = api.stats()
    assert counts["succeeded"] == 10 and counts["failed"] == 0, counts
    assert stats["dialect"] == "anthropic" and stats["by_status"] == {"200": 10}
    for job_id in text_ids:
        assert isinstance(daemon.call("show", id=job_id)["job"]["result"], str)
    for job_id in json_ids:
        assert "sentiment" in daemon.call("show", id=job_id)["job"]["result"]
    written = daemon.call("show", id=first)["job"]["usage"]
    assert written["cache_write_tokens"] > 1000 and written["cached_tokens"] == 0, written
    for job_id in cached_ids:
        shown = daemon.call("show", id=job_id)
        usage = shown["job"]["usage"]
        assert usage["cached_tokens"] == written["cache_write_tokens"], usage
        assert shown["attempts"][-1]["usage"] == usage
        assert shown["attempts"][-1]["stop_reason"] == "end_turn"
    assert stats["cache_read_tokens"] == 3 * written["cache_write_tokens"]
    text = run_cli("show", cached_ids[0], socket_path=daemon.socket_path)
    assert f"({written['cache_write_tokens']} cached, 0 cache-written)" in text.stdout
    status = daemon.call("status")["providers"]["claude"]
    assert status["dialect"] == "anthropic" and status["tokens_cached"] > 0
    assert "sk-ant-e2e-SECRET" not in daemon.log()
    assert not ledger_problems(daemon.state_dir / "vigil.db")


def test_anthropic_budgets_are_learned_from_the_headers(start_daemon: StartDaemon) -> None:
    """No limits configured, the API enforcing all three in one-second slices: the
    daemon learns requests, input and output tokens from the anthropic-ratelimit-*
    headers, every job succeeds, and after the first burst (sent before any answer
    could teach the limits) at most 1 % of the requests meet a 429."""
    settings = SimulateConfig(
        dialect="anthropic",
        latency_ms=10,
        latency_sigma=0.1,
        requests_per_minute=900,
        input_tokens_per_minute=600_000,
        output_tokens_per_minute=300_000,
        seed=5,
    )
    with threaded_api(settings) as api:
        sections = anthropic_provider("claude", api.url) + analyzer("a", "claude")
        daemon = start_daemon(daemon_config(sections), env={KEY_ENV: "sk-ant-e2e"})
        ids = submit(daemon, "a", 40, text="word " * 1500)  # ~1,900 input tokens each
        counts = daemon.wait_all_terminal(timeout_s=120)
        seen = api.seen()
        stats = api.stats()
    assert counts["succeeded"] == len(ids), counts
    learned = {
        e["budget"]: e["server_limit"]
        for e in daemon.events()
        if e["event"] == "provider.limit_learned"
    }
    assert learned == {"requests": 900, "input_tokens": 600_000, "output_tokens": 300_000}, learned
    first_answer_at = seen[0].at + 0.1
    burst = sum(1 for s in seen if s.at < first_answer_at)
    refused = stats["by_status"].get("429", 0)
    assert refused - burst <= max(1, len(seen) // 100), (refused, burst, stats["by_status"])
    budgets = daemon.call("status")["providers"]["claude"]["budgets"]
    assert budgets["input_tokens"]["per_minute"] == 600_000
    assert budgets["output_tokens"]["per_minute"] == 300_000


def test_a_529_storm_costs_time_not_jobs(start_daemon: StartDaemon) -> None:
    """Half the answers are 529 overloaded_error: every job succeeds (529s spend no
    attempt), and the account is never held: no cool-down, no open circuit."""
    settings = SimulateConfig(
        dialect="anthropic", latency_ms=5, latency_sigma=0.1, overload_rate=0.5, seed=11
    )
    with threaded_api(settings) as api:
        sections = anthropic_provider("claude", api.url, breaker_failures=3)
        sections += analyzer("a", "claude", max_attempts=1)
        daemon = start_daemon(daemon_config(sections), env={KEY_ENV: "sk-ant-e2e"})
        ids = submit(daemon, "a", 40)
        counts = daemon.wait_all_terminal(timeout_s=120)
        stats = api.stats()
    assert counts["succeeded"] == len(ids), counts
    overloaded = stats["by_status"].get("529", 0)
    assert overloaded >= 10, stats["by_status"]  # a storm indeed
    provider = daemon.call("status")["providers"]["claude"]
    assert provider["overloaded"] == overloaded
    assert provider["cooldowns"] == 0 and provider["circuit"]["opened"] == 0, provider
    [(turned_away,)] = db_rows(
        daemon.state_dir / "vigil.db",
        "SELECT count(*) FROM attempts WHERE outcome = 'rate_limited' AND http_status = 529",
    )
    assert turned_away == overloaded
    assert not ledger_problems(daemon.state_dir / "vigil.db")


def test_a_full_backlog_at_start_meets_no_429_from_a_sliced_limit(
    start_daemon: StartDaemon,
) -> None:
    """The API enforces 3000 RPM as 50 a second; a daemon (told 3000 RPM) started with
    1,000 jobs waiting and 64 slots sends no more than a slice at once: no 429 at all."""
    settings = SimulateConfig(latency_ms=20, latency_sigma=0.1, requests_per_minute=3000, seed=2)
    with threaded_api(settings) as api:
        provider = openai_provider("main", api.url, requests_per_minute=3000, max_concurrency=64)
        config = daemon_config(provider + analyzer("a", "main"), max_concurrency=64)
        daemon = start_daemon(config)
        daemon.call("pause")
        ids = submit(daemon, "a", 1000)
        assert daemon.terminate() == 0
        assert api.stats()["requests"] == 0
        daemon.restart()  # the whole backlog is there when it starts
        counts = daemon.wait_all_terminal(timeout_s=180)
        stats: dict[str, Any] = api.stats()
    assert counts["succeeded"] == len(ids), counts
    assert stats["by_status"] == {"200": len(ids)}, json.dumps(stats["by_status"])
