"""`vigil top`: one frame shows the status figures; rates come from two snapshots."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from daemon.cli import render
from daemon.cli.top import frame
from tests.daemon_proc import DaemonProcess, run_cli, sim_config

StartDaemon = Callable[..., DaemonProcess]


def test_top_once_shows_the_daemons_figures(start_daemon: StartDaemon) -> None:
    """`vigil top --once` prints the job counts and providers the daemon reports."""
    daemon = start_daemon(sim_config())
    daemon.call("submit", jobs=[{"analyzer": "summarize", "input": {"text": "x"}}] * 7)
    daemon.wait_all_terminal(timeout_s=60)
    out = run_cli("top", "--once", socket_path=daemon.socket_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("QUEUED"))
    assert lines[header + 1].split() == ["0", "0", "7", "0", "0"]
    assert any(line.startswith("sim ") for line in lines)
    assert f"pid {daemon.proc.pid}" in lines[0]


def _snapshot(finished: int = 0, requests: int = 0) -> dict[str, Any]:
    """A status snapshot as `vigil top` reads it."""
    return {
        "version": "x",
        "pid": 1,
        "state": "running",
        "uptime_s": 10.0,
        "health": {"live": True, "ready": True, "checks": []},
        "queue": {
            "active": 1,
            "max_concurrency": 4,
            "max_backlog": 10,
            "accepted": finished,
            "finished": finished,
        },
        "jobs": {"queued": 0, "running": 1, "succeeded": finished, "failed": 0, "canceled": 0},
        "providers": {"p": {"requests": requests, "in_flight": 1}},
    }


def test_frame_rates_from_two_snapshots() -> None:
    """Rates are the difference of two snapshots over the time between them."""
    text = frame(_snapshot(30, 40), _snapshot(10, 20), 2.0)
    assert "attempts ended 10.0/s" in text
    assert " 10.0/s " in text.splitlines()[-1] + " "


BUDGET_ROWS = [
    {
        "scope": "provider",
        "name": "sim",
        "window": "day",
        "limit_usd": 5.0,
        "spent_usd": 3.5,
        "reserved_usd": 0.25,
        "remaining_usd": 1.25,
        "resets_at": 1000.0 + 5 * 3600 + 12 * 60,
        "held": False,
        "held_jobs": 0,
    },
    {
        "scope": "analyzer",
        "name": "summarize",
        "window": "month",
        "limit_usd": 20.0,
        "spent_usd": 19.996,
        "reserved_usd": 0.0,
        "remaining_usd": 0.004,
        "resets_at": 1000.0 + 3 * 86400 + 2 * 3600,
        "held": True,
        "held_jobs": 12,
    },
]
PRICED_SIM = (
    "[providers.sim.prices]\nprompt_per_mtok = 1.0\n\n[providers.sim.budget]\ndaily_usd = 2.5\n"
)


def test_budgets_table_shows_each_budget() -> None:
    """One line per budget: spend of limit, share used, reserved, left, reset, HELD and its jobs."""
    out = io.StringIO()
    render.budgets_table({"budgets": BUDGET_ROWS}, out, now=1000.0)
    header, sim, summarize = (" ".join(line.split()) for line in out.getvalue().splitlines()[1:])
    assert header == "BUDGET WINDOW SPENT / LIMIT USED RESERVED REMAINING RESETS IN HELD"
    assert sim == "provider/sim day $3.50 / $5.00 75% $0.25 $1.25 5h 12m no"
    assert summarize == (
        "analyzer/summarize month $20.00 / $20.00 100% $0.00 $0.0040 3d 2h HELD (12 jobs)"
    )


def test_budgets_are_left_out_when_none_are_configured() -> None:
    """No budgets (or a daemon that does not report them): no budgets section at all."""
    empty: list[dict[str, Any]] = [{"budgets": []}, {}, {"budgets": None}]
    for data in empty:
        out = io.StringIO()
        render.budgets_table(data, out)
        assert out.getvalue() == ""
    status: dict[str, Any] = {**_snapshot(), "budgets": []}
    assert "BUDGET" not in frame(status, None, 0.0)
    assert "analyzer/summarize" in frame({**status, "budgets": BUDGET_ROWS}, None, 0.0)


def test_status_report_lists_the_budgets() -> None:
    """`vigil status` prints the budgets table after the providers."""
    out = io.StringIO()
    data = {**_snapshot(), "socket": "/run/vigil.sock", "store": {"path": "/var/vigil.db"}}
    render.status_report({**data, "budgets": BUDGET_ROWS}, out)
    text = out.getvalue()
    assert text.index("PROVIDER") < text.index("BUDGET") and "HELD (12 jobs)" in text


def test_top_piped_shows_budgets_with_no_screen_codes(start_daemon: StartDaemon) -> None:
    """`vigil top` into a pipe prints frames one after another, budgets included, no escapes."""
    daemon = start_daemon(sim_config(extra=PRICED_SIM))
    env = {**os.environ, "VIGIL_SOCKET": str(daemon.socket_path)}
    env.pop("VIGIL_CONFIG", None)
    top = subprocess.Popen(
        [sys.executable, "-m", "daemon", "top", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    time.sleep(2.0)
    top.send_signal(signal.SIGINT)
    out, err = top.communicate(timeout=30)
    assert top.returncode == 0, err.decode()
    text = out.decode()
    assert "\x1b" not in text and "Ctrl+C" not in text
    assert text.count("BUDGET ") >= 2  # two frames at least, each with its budgets
    assert re.search(r"^provider/sim +day +\$0\.00 / \$2\.50 +0% .* no$", text, re.MULTILINE)


def test_top_once_takes_two_samples_for_its_rates(start_daemon: StartDaemon) -> None:
    """`vigil top --once` samples status twice, `--interval` apart, so its one frame
    shows rates (here, attempts ending while jobs run), not "-"; into a pipe, with no
    screen-control codes."""
    daemon = start_daemon(sim_config(latency_ms=300, max_concurrency=32))
    daemon.call("submit", jobs=[{"analyzer": "summarize", "input": {"text": "x"}}] * 300)
    started = time.monotonic()
    out = run_cli("top", "--once", "--interval", "1", socket_path=daemon.socket_path)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started >= 1.0
    assert "\x1b" not in out.stdout and "Ctrl+C" not in out.stdout
    rates = re.search(r"accepted (\S+)  attempts ended (\S+)", out.stdout)
    assert rates is not None, out.stdout
    assert rates.group(1) == "0.0/s"  # all were accepted before the first sample
    assert float(rates.group(2).removesuffix("/s")) > 0, out.stdout
