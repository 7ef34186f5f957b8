"""`vigil top`: one frame shows the status figures; rates come from two snapshots."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def test_frame_rates_from_two_snapshots() -> None:
    """Rates are the difference of two snapshots over the time between them."""

    def snapshot(finished: int, requests: int) -> dict[str, Any]:
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

    text = frame(snapshot(30, 40), snapshot(10, 20), 2.0)
    assert "attempts ended 10.0/s" in text
    assert " 10.0/s " in text.splitlines()[-1] + " "
