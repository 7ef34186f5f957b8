"""Spend budgets end to end (issue #14): the daemon as a subprocess, the simulated API
as a real HTTP server on 127.0.0.1, its own token counts priced as the truth."""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.config import SimulateConfig
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows
from tests.torture_helpers import (
    ThreadedApi,
    analyzer,
    ledger_problems,
    openai_provider,
    threaded_api,
)

StartDaemon = Callable[..., DaemonProcess]
PROMPT_PER_MTOK = 1.0
COMPLETION_PER_MTOK = 2.0
TEXT = "The launch of the new service went well and the team is happy with it. " * 6


def priced(tokens_prompt: int, tokens_completion: int) -> float:
    """The API's own token counts at the configured prices."""
    return (tokens_prompt * PROMPT_PER_MTOK + tokens_completion * COMPLETION_PER_MTOK) / 1e6


def budget_config(url: str, daily_usd: float) -> str:
    provider = openai_provider("main", url, max_concurrency=16)
    provider += f"""
[providers.main.prices]
prompt_per_mtok = {PROMPT_PER_MTOK}
completion_per_mtok = {COMPLETION_PER_MTOK}

[providers.main.budget]
daily_usd = {daily_usd}
"""
    return daemon_config(provider + analyzer("a", "main"), max_concurrency=16)


def settled(api: ThreadedApi, daemon: DaemonProcess, quiet_s: float = 3.0) -> None:
    """Wait until nothing runs and the API has seen no request for `quiet_s`: the
    budget holds every job left (a job refused by it is tried again every 2 s)."""
    deadline = time.monotonic() + 90
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        seen = api.stats()["requests"]
        if seen != last or daemon.call("status")["jobs"]["running"]:
            last, since = seen, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.25)
    raise TimeoutError("the API kept being called")


def test_a_daily_budget_stops_the_next_call_and_a_raised_one_runs_the_rest(
    start_daemon: StartDaemon,
) -> None:
    """16 slots, a budget worth about 40 jobs, 150 submitted: what the API counted,
    priced, never passes the budget and uses at least 80 % of it; the rest wait queued
    with no attempt spent, through a restart that calls the API no more; a reload that
    raises the budget runs them all."""
    settings = SimulateConfig(latency_ms=30, latency_sigma=0.2, seed=4)
    with threaded_api(settings) as api:
        probe = start_daemon(budget_config(api.url, 100.0), name="probe")
        probe.call("submit", jobs=[{"analyzer": "a", "input": {"text": TEXT}}])
        probe.wait_all_terminal(timeout_s=30)
        one_job = priced(api.stats()["tokens_prompt"], api.stats()["tokens_completion"])
        probe.terminate()
        budget = round(40 * one_job, 6)
        before = api.stats()

        daemon = start_daemon(budget_config(api.url, budget))
        jobs = [{"analyzer": "a", "input": {"text": f"{i} {TEXT}"}} for i in range(150)]
        daemon.call("submit", jobs=jobs)
        settled(api, daemon)
        held = api.stats()
        spent = priced(
            held["tokens_prompt"] - before["tokens_prompt"],
            held["tokens_completion"] - before["tokens_completion"],
        )
        status = daemon.call("status")
        counts = status["jobs"]
        [row] = [b for b in status["budgets"] if b["scope"] == "provider"]

        assert spent <= budget, (spent, budget)
        assert spent >= 0.8 * budget, (spent, budget)
        assert counts["failed"] == 0 and counts["queued"] + counts["succeeded"] == 150, counts
        assert row["spent_usd"] == round(spent, 6) or abs(row["spent_usd"] - spent) < 1e-9
        assert row["held"] and row["remaining_usd"] < budget * 0.2, row
        [(spent_attempts,)] = db_rows(
            daemon.state_dir / "vigil.db",
            "SELECT count(*) FROM jobs WHERE state = 'queued' AND attempts > 0",
        )
        assert spent_attempts == 0
        reached = [e for e in daemon.events() if e["event"] == "budget.reached"]
        assert len(reached) == 1 and reached[0]["name"] == "main", reached

        assert daemon.terminate() == 0
        daemon.restart()  # the day's spend is stored: still no call goes out
        time.sleep(2.0)
        assert api.stats()["requests"] == held["requests"]

        daemon.config_path.write_text(budget_config(api.url, budget * 10))
        assert "providers" in daemon.call("reload")["applied"]
        final = daemon.wait_all_terminal(timeout_s=120)
    assert final["succeeded"] == 150, final
    reopened = [e for e in daemon.events() if e["event"] == "budget.reopened"]
    assert reopened, "the reload that raised the budget is logged as a reopening"
    assert not ledger_problems(daemon.state_dir / "vigil.db")
