"""The throttle and the breaker against a misconfigured limit and an outage (issue 16),
end to end: the daemon as a subprocess, the APIs as real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

from daemon.config import SimulateConfig
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows, run_cli, wait_until
from tests.scripted_api import ScriptedAPI
from tests.torture_helpers import analyzer, ledger_problems, openai_provider, threaded_api

StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedAPI]]:
    """Scripted APIs, each stopped at the end."""
    servers: list[ScriptedAPI] = []

    def make(script: list[int] | None = None, **kwargs: Any) -> ScriptedAPI:
        server = ScriptedAPI(script, **kwargs).__enter__()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.__exit__()


def _submit(daemon: DaemonProcess, name: str, n: int) -> list[str]:
    jobs = [{"analyzer": name, "input": {"text": f"document {i}"}} for i in range(n)]
    ids: list[str] = daemon.call("submit", jobs=jobs)["ids"]
    return ids


def test_a_limit_ten_times_lower_than_configured_stops_429s_once_learned(
    start_daemon: StartDaemon,
) -> None:
    """API 60 RPM in one-second slices, Vigil told 600: once the first answer teaches
    the real limit, requests leave as the server allows (a handful of 429s at most
    after that), and no job dies of a limit of our own making."""
    settings = SimulateConfig(latency_ms=20, latency_sigma=0.1, requests_per_minute=60, seed=1)
    with threaded_api(settings) as api:
        provider = openai_provider("main", api.url, requests_per_minute=600)
        config = daemon_config(provider + analyzer("a", "main", max_attempts=3))
        daemon = start_daemon(config)
        ids = _submit(daemon, "a", 12)
        counts = daemon.wait_all_terminal(timeout_s=120)
        seen = api.seen()
        stats = api.stats()
    assert counts["succeeded"] == len(ids), counts
    learned = [e for e in daemon.events() if e["event"] == "provider.limit_learned"]
    assert learned and learned[0]["server_limit"] == 60, learned
    # Requests sent before any answer could teach the limit: the first burst.
    first_answer_at = seen[0].at + 0.2
    burst = sum(1 for s in seen if s.at < first_answer_at)
    refused = stats["by_status"].get("429", 0)
    assert refused - burst <= 2, (refused, burst, stats["by_status"])
    # The daemon's own record: no attempt begun after the limit was learned met a 429.
    learned_at = datetime.fromisoformat(learned[0]["timestamp"]).timestamp()
    [(late,)] = db_rows(
        daemon.state_dir / "vigil.db",
        "SELECT count(*) FROM attempts WHERE outcome = 'rate_limited' AND started_at > ?",
        (learned_at,),
    )
    assert late == 0, late
    assert not ledger_problems(daemon.state_dir / "vigil.db")


def test_429s_spend_no_attempt_and_a_failed_answer_is_kept(
    start_daemon: StartDaemon, scripted: Callable[..., ScriptedAPI]
) -> None:
    """429, 429, 500, then 200 with max_attempts = 2 succeeds: the 429s are counted
    apart. An answer that fails the JSON check keeps its text and usage on the attempt,
    `vigil show` prints them, and the final failure is a warning (`job.failed`)."""
    limited = scripted([429, 429, 500])
    prose = scripted(content="I would rather not answer in JSON.")
    sections = (
        openai_provider("lim", limited.url)
        + openai_provider("prose", prose.url)
        + analyzer("a", "lim", max_attempts=2)
        + analyzer("j", "prose", output="json", max_attempts=2)
        + "\n[providers.prose.prices]\nprompt_per_mtok = 1.0\ncompletion_per_mtok = 2.0\n"
    )
    daemon = start_daemon(daemon_config(sections))
    [job_id] = _submit(daemon, "a", 1)
    [bad_id] = _submit(daemon, "j", 1)
    daemon.wait_all_terminal(timeout_s=60)

    shown = daemon.call("show", id=job_id)
    assert shown["job"]["state"] == "succeeded", shown
    assert (shown["job"]["attempts"], shown["job"]["rate_limited"]) == (2, 2)
    assert [(a["outcome"], a["http_status"]) for a in shown["attempts"]] == [
        ("rate_limited", 429),
        ("rate_limited", 429),
        ("error", 500),
        ("succeeded", 200),
    ]
    assert limited.statuses == [429, 429, 500, 200]

    bad = daemon.call("show", id=bad_id)
    assert bad["job"]["state"] == "failed"
    [attempt] = bad["attempts"]
    assert attempt["error"]["type"] == "OutputInvalid"
    assert attempt["answer"] == "I would rather not answer in JSON."
    assert attempt["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "cost": 1.7e-05,
    }
    assert bad["job"]["usage"] == attempt["usage"]
    text = run_cli("show", bad_id, socket_path=daemon.socket_path)
    assert text.returncode == 0, text.stderr
    assert "attempt 1 answered:\nI would rather not answer in JSON." in text.stdout
    assert "7 in, 5 out, $0.000017" in text.stdout

    warnings = run_cli("logs", "--level", "warning", "--json", socket_path=daemon.socket_path)
    failed = [line for line in warnings.stdout.splitlines() if '"job.failed"' in line]
    assert len(failed) == 1 and bad_id in failed[0] and "OutputInvalid" in failed[0], failed


def test_half_open_probe_leaves_the_backlog_unclaimed_then_runs_it_at_once(
    start_daemon: StartDaemon, scripted: Callable[..., ScriptedAPI]
) -> None:
    """API down, a backlog queued, circuit open; the API comes back: while the probe is
    under way the backlog stays queued (no claim-and-defer of every job), and once the
    probe closes the circuit every job runs."""
    api = scripted()
    api.down = True
    api.delay_s = 0.3  # the probe takes a while: time for a dispatcher to misbehave
    provider = openai_provider("main", api.url, breaker_failures=3, breaker_open_s=1.0)
    daemon = start_daemon(
        daemon_config(provider + analyzer("a", "main", max_attempts=5), max_concurrency=64)
    )
    ids = _submit(daemon, "a", 300)
    wait_until(
        lambda: daemon.call("status")["providers"]["main"]["circuit"]["state"] == "open",
        what="the circuit to open",
    )
    api.down = False
    counts = daemon.wait_all_terminal(timeout_s=120)
    assert counts["succeeded"] == len(ids), counts
    db = daemon.state_dir / "vigil.db"
    [(deferred,)] = db_rows(db, "SELECT count(*) FROM attempts WHERE outcome = 'deferred'")
    # At most the jobs claimed in the moment the circuit opened: one claim's worth.
    assert deferred <= 64, deferred
    assert not ledger_problems(db)


def test_resume_says_a_provider_without_its_key_stays_paused(
    start_daemon: StartDaemon, scripted: Callable[..., ScriptedAPI]
) -> None:
    """A key variable that is not set cannot be fixed by `resume`: it says so, and the
    provider's jobs stay queued with no attempt (no claim-and-defer loop)."""
    api = scripted()
    provider = openai_provider("main", api.url, api_key_env="VIGIL_TEST_UNSET_KEY")
    daemon = start_daemon(daemon_config(provider + analyzer("a", "main")))
    [job_id] = _submit(daemon, "a", 1)
    out = run_cli("resume", socket_path=daemon.socket_path)
    assert out.returncode == 0, out.stderr
    assert "providers lifted" not in out.stdout
    assert "provider main stays paused: $VIGIL_TEST_UNSET_KEY (the API key) is not set" in (
        out.stdout
    )
    data = daemon.call("resume")
    assert data["providers_resumed"] == [] and "main" in data["providers_still_paused"]
    time.sleep(1.5)  # several dispatcher rounds: none may claim the held job
    shown = daemon.call("show", id=job_id)
    assert shown["job"]["state"] == "queued" and shown["attempts"] == [], shown
    assert api.statuses == []
    assert "VIGIL_TEST_UNSET_KEY" in daemon.call("status")["providers"]["main"]["paused"]


def test_an_open_circuit_is_a_failing_check_that_keeps_the_daemon_live_and_ready(
    start_daemon: StartDaemon, scripted: Callable[..., ScriptedAPI]
) -> None:
    """Circuit open while jobs wait: status says why (failures, last error, when the
    probe comes) in a failing check that takes neither liveness nor readiness away."""
    api = scripted()
    api.down = True
    provider = openai_provider("main", api.url, breaker_failures=2, breaker_open_s=60.0)
    daemon = start_daemon(daemon_config(provider + analyzer("a", "main", max_attempts=5)))
    _submit(daemon, "a", 3)
    wait_until(
        lambda: daemon.call("status")["providers"]["main"]["circuit"]["state"] == "open",
        what="the circuit to open",
    )
    health = daemon.call("status")["health"]
    [check] = [c for c in health["checks"] if c["name"] == "provider.main"]
    assert not check["ok"] and check["affects"] == "none", check
    assert check["reason"].startswith("circuit open after 2 failures (HTTP 500), probe in "), check
    assert health["live"] and health["ready"], health
    text = run_cli("status", socket_path=daemon.socket_path)
    assert "provider.main: circuit open after 2 failures (HTTP 500)" in text.stdout, text.stdout
