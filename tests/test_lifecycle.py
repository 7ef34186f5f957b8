"""Real signals against the daemon subprocess: nothing accepted is ever lost."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.daemon_proc import DaemonProcess, run_cli, sim_config

StartDaemon = Callable[..., DaemonProcess]


def _rows(db_path: Path, sql: str) -> list[Any]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql).fetchall()


def _wait(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _submit(daemon: DaemonProcess, n: int, analyzer: str = "summarize") -> list[str]:
    ids: list[str] = daemon.call(
        "submit", jobs=[{"analyzer": analyzer, "input": {"text": f"doc {i}"}} for i in range(n)]
    )["ids"]
    return ids


def test_sigkill_mid_run_loses_nothing(start_daemon: StartDaemon) -> None:
    """SIGKILL with attempts in flight; after restart every job ends, once."""
    daemon = start_daemon(sim_config(error_rate=0.05, latency_ms=150, max_concurrency=16))
    ids = _submit(daemon, 300)
    _wait(lambda: daemon.call("status")["jobs"]["succeeded"] >= 30)
    running = daemon.call("status")["jobs"]["running"]
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    assert running > 0

    daemon.restart()
    jobs = daemon.wait_all_terminal(timeout_s=120)
    assert jobs["succeeded"] + jobs["failed"] == 300
    db = daemon.state_dir / "vigil.db"
    assert {r[0] for r in _rows(db, "SELECT id FROM jobs")} == set(ids)
    assert not _rows(
        db,
        "SELECT job_id FROM attempts WHERE outcome = 'succeeded' "
        "GROUP BY job_id HAVING count(*) > 1",
    ), "a job has two recorded results"
    assert _rows(db, "SELECT count(*) FROM attempts WHERE outcome = 'crashed'")[0][0] > 0
    mismatched = _rows(
        db,
        "SELECT j.id FROM jobs j WHERE j.attempts != (SELECT count(*) FROM attempts a "
        "WHERE a.job_id = j.id AND a.outcome != 'interrupted')",
    )
    assert not mismatched, "every counted attempt is recorded, the cut-off one included"
    assert daemon.terminate() == 0


def test_a_job_that_kills_the_process_cannot_loop(start_daemon: StartDaemon) -> None:
    """A job whose attempts die with the process ends failed after max_attempts."""
    daemon = start_daemon(sim_config(hang_rate=1.0, max_attempts=2, timeout_s=60))
    (job_id,) = _submit(daemon, 1)
    for _ in range(2):
        _wait(lambda: daemon.call("show", id=job_id)["job"]["state"] == "running")
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        daemon.restart()
    job = daemon.call("show", id=job_id)
    assert job["job"]["state"] == "failed"
    assert job["job"]["attempts"] == 2
    assert job["job"]["error"]["message"] == "process died during the attempt"
    assert [a["outcome"] for a in job["attempts"]] == ["crashed", "crashed"]


def test_sigterm_requeues_what_does_not_finish_in_the_grace(start_daemon: StartDaemon) -> None:
    """SIGTERM: exit 0 within the grace; cut-off attempts are requeued, not counted."""
    daemon = start_daemon(sim_config(latency_ms=20_000, timeout_s=60, grace_s=0.5))
    ids = _submit(daemon, 5)
    _wait(lambda: daemon.call("status")["jobs"]["running"] == 5)
    assert daemon.terminate(timeout_s=30) == 0
    db = daemon.state_dir / "vigil.db"
    rows = _rows(db, "SELECT state, attempts FROM jobs")
    assert rows == [("queued", 0)] * 5
    outcomes = _rows(db, "SELECT outcome FROM attempts")
    assert outcomes == [("interrupted",)] * 5
    stopped = [e for e in daemon.events() if e.get("event") == "daemon.stopped"]
    assert stopped and stopped[-1]["requeued"] == 5
    assert len(ids) == 5


def test_sigterm_lets_in_flight_attempts_finish(start_daemon: StartDaemon) -> None:
    """SIGTERM with a long grace: running attempts complete and are recorded."""
    daemon = start_daemon(sim_config(latency_ms=1500, timeout_s=60, grace_s=30))
    _submit(daemon, 4)
    _wait(lambda: daemon.call("status")["jobs"]["running"] == 4)
    assert daemon.terminate(timeout_s=60) == 0
    rows = _rows(daemon.state_dir / "vigil.db", "SELECT state, attempts FROM jobs")
    assert rows == [("succeeded", 1)] * 4


def test_second_daemon_on_same_state_dir_refuses(start_daemon: StartDaemon) -> None:
    """A second daemon on the same state directory exits 1 and names the lock."""
    daemon = start_daemon(sim_config())
    second = run_cli("run", "--config", str(daemon.config_path), env=daemon.env)
    assert second.returncode == 1
    assert "another vigil daemon is using" in second.stderr
    assert daemon.call("ping")["pong"] is True
