"""Real signals against the daemon subprocess: nothing accepted is ever lost."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from tests.daemon_proc import DaemonProcess, db_rows, run_cli, sim_config, wait_until

StartDaemon = Callable[..., DaemonProcess]


def _submit(daemon: DaemonProcess, n: int, analyzer: str = "summarize") -> list[str]:
    ids: list[str] = daemon.call(
        "submit", jobs=[{"analyzer": analyzer, "input": {"text": f"doc {i}"}} for i in range(n)]
    )["ids"]
    return ids


def test_sigkill_mid_run_loses_nothing(start_daemon: StartDaemon) -> None:
    """SIGKILL with attempts in flight; after restart every job ends, once."""
    daemon = start_daemon(sim_config(error_rate=0.05, latency_ms=150, max_concurrency=16))
    ids = _submit(daemon, 300)
    wait_until(lambda: daemon.call("status")["jobs"]["succeeded"] >= 30)
    running = daemon.call("status")["jobs"]["running"]
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    assert running > 0

    daemon.restart()
    jobs = daemon.wait_all_terminal(timeout_s=120)
    assert jobs["succeeded"] + jobs["failed"] == 300
    db = daemon.state_dir / "vigil.db"
    assert {r[0] for r in db_rows(db, "SELECT id FROM jobs")} == set(ids)
    assert not db_rows(
        db,
        "SELECT job_id FROM attempts WHERE outcome = 'succeeded' "
        "GROUP BY job_id HAVING count(*) > 1",
    ), "a job has two recorded results"
    assert db_rows(db, "SELECT count(*) FROM attempts WHERE outcome = 'crashed'")[0][0] > 0
    mismatched = db_rows(
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
        wait_until(lambda: daemon.call("show", id=job_id)["job"]["state"] == "running")
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
    wait_until(lambda: daemon.call("status")["jobs"]["running"] == 5)
    assert daemon.terminate(timeout_s=30) == 0
    db = daemon.state_dir / "vigil.db"
    rows = db_rows(db, "SELECT state, attempts FROM jobs")
    assert rows == [("queued", 0)] * 5
    outcomes = db_rows(db, "SELECT outcome FROM attempts")
    assert outcomes == [("interrupted",)] * 5
    stopped = [e for e in daemon.events() if e.get("event") == "daemon.stopped"]
    assert stopped and stopped[-1]["requeued"] == 5
    assert len(ids) == 5


def test_sigterm_lets_in_flight_attempts_finish(start_daemon: StartDaemon) -> None:
    """SIGTERM with a long grace: running attempts complete and are recorded."""
    daemon = start_daemon(sim_config(latency_ms=1500, timeout_s=60, grace_s=30))
    _submit(daemon, 4)
    wait_until(lambda: daemon.call("status")["jobs"]["running"] == 4)
    assert daemon.terminate(timeout_s=60) == 0
    rows = db_rows(daemon.state_dir / "vigil.db", "SELECT state, attempts FROM jobs")
    assert rows == [("succeeded", 1)] * 4


def test_second_daemon_on_same_state_dir_refuses(start_daemon: StartDaemon) -> None:
    """A second daemon on the same state directory exits 1 and names the lock."""
    daemon = start_daemon(sim_config())
    second = run_cli("run", "--config", str(daemon.config_path), env=daemon.env)
    assert second.returncode == 1
    assert "another vigil daemon is using" in second.stderr
    assert daemon.call("ping")["pong"] is True


def _has_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path) for fd in fd_dir.iterdir())
    except OSError:  # a descriptor closed while listed
        return False


def test_signals_during_start_up_are_held_until_the_daemon_handles_them(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """SIGHUP and SIGUSR1 while the store is still opening (here: waiting on a lock)
    do not kill the daemon with their default actions: they are acted on once it
    runs (a reload, a stack dump), systemd hears no reload before READY=1, and a
    SIGTERM then drains and exits 0."""
    daemon = start_daemon(sim_config())
    assert daemon.terminate() == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        daemon.env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
        _start_while_locked_and_signal(daemon, notify)


def _start_while_locked_and_signal(daemon: DaemonProcess, notify: socket.socket) -> None:
    db = daemon.state_dir / "vigil.db"
    locker = sqlite3.connect(db, timeout=30, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the store's open waits on it (busy_timeout)
    try:
        daemon.spawn()
        proc = daemon.proc
        wait_until(lambda: _has_open(proc.pid, db) or proc.poll() is not None, timeout_s=30)
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        assert proc.poll() is None, daemon.log()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    notify.settimeout(30)
    messages = [notify.recv(4096).decode()]  # READY=1: socket, HTTP and store are up
    wait_until(lambda: '"reload.done"' in daemon.log_path.read_text(), timeout_s=30)
    wait_until(lambda: '"stacks.thread"' in daemon.log_path.read_text(), timeout_s=30)
    assert daemon.call("ping")["pong"] is True
    assert daemon.terminate() == 0
    notify.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(notify.recv(4096).decode())
    messages = [m for m in messages if not m.startswith("STATUS=")]  # every 5 s, any time
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1", messages
    assert not [m for m in messages if m.startswith("RELOADING")], messages


def test_a_second_sigterm_cuts_the_drain_short_and_costs_no_attempt(
    start_daemon: StartDaemon,
) -> None:
    """TERM drains; a second TERM stops at once: exit 0, a stop line, and the cut-off
    attempts requeued uncounted."""
    daemon = start_daemon(sim_config(latency_ms=20_000, timeout_s=60, grace_s=60))
    ids = _submit(daemon, 3)
    wait_until(lambda: daemon.call("status")["jobs"]["running"] == 3)
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: '"daemon.draining"' in daemon.log_path.read_text())
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0, daemon.log()
    log = daemon.log_path.read_text()
    assert '"daemon.forced_stop"' in log and '"daemon.stopped"' in log, daemon.log()
    rows = db_rows(daemon.state_dir / "vigil.db", "SELECT id, state, attempts FROM jobs")
    assert sorted(rows) == sorted((i, "queued", 0) for i in ids)
