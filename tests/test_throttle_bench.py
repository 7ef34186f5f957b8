"""`vigil bench throttle` end to end (a tiny run, so it cannot rot), and the throttle's
figures in `vigil status` of a real daemon."""

from __future__ import annotations

from typing import Any

import msgspec

from tests.daemon_proc import run_cli, sim_config


def test_bench_smoke_runs_both_processes_and_reports() -> None:
    """The smoke scenario runs the API and the daemon as processes and prints one JSON
    line with what the API saw."""
    done = run_cli("bench", "throttle", "--scenario", "smoke", "--json", "--jobs", "20")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result: dict[str, Any] = msgspec.json.decode(lines[0])
    assert result["scenario"] == "smoke"
    assert result["jobs"]["submitted"] == 20
    assert result["jobs"]["succeeded"] == 20
    assert result["whole_run"]["requests"] == 20  # counted by the API itself
    assert result["rate_limited_share"] == 0
    assert result["target_met"] is None
    assert result["machine"]["cpus"] >= 1


def test_bench_usage_error() -> None:
    """An unknown scenario is a usage error, before anything starts."""
    done = run_cli("bench", "throttle", "--scenario", "nope")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_status_shows_throttle_figures(start_daemon: Any) -> None:
    """`vigil status --json` carries latency percentiles, budgets, circuit and
    concurrency for each provider."""
    daemon = start_daemon(sim_config(api_rpm=6000))
    daemon.call(
        "submit", jobs=[{"analyzer": "summarize", "input": {"text": f"doc {i}"}} for i in range(5)]
    )
    daemon.wait_all_terminal(60)
    done = run_cli("status", "--json", socket_path=daemon.socket_path)
    assert done.returncode == 0, done.stderr
    sim = msgspec.json.decode(done.stdout)["providers"]["sim"]
    assert sim["by_status"] == {"200": 5}
    assert sim["p50_latency_ms"] is not None
    assert sim["p99_latency_ms"] >= sim["p50_latency_ms"]
    assert sim["circuit"]["state"] == "closed"
    assert sim["concurrency_limit"] == 16
    assert sim["budgets"]["requests"]["server_limit"] == 6000  # learned from the headers
    assert sim["cooldown_s"] == 0
