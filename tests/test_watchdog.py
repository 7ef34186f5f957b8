"""The watchdog end to end: each test injects a real fault into `vigil run` (a
subprocess) through a Python handler and reads what the daemon says about it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests import watchdog_handlers
from tests.daemon_proc import DaemonProcess, db_rows, run_cli, sim_config
from tests.watchdog_handlers import marked_line

StartDaemon = Callable[..., DaemonProcess]
Event = dict[str, Any]
HANDLERS_FILE = str(Path(watchdog_handlers.__file__).resolve())
WAIT_S = 60.0
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)  # Linux; Python does not export it


def watchdog_config(watchdog: str = "", analyzers: str = "") -> str:
    """sim_config plus the fault-injecting handler analyzers and [watchdog] keys."""
    extra = f"""
[watchdog]
block_threshold_ms = 200
{watchdog}

[analyzers.blocks]
handler = "tests.watchdog_handlers:blocks"

[analyzers.hogs]
handler = "tests.watchdog_handlers:hogs_gil"

[analyzers.leaks]
handler = "tests.watchdog_handlers:leaks"

[analyzers.sloppy]
handler = "tests.watchdog_handlers:sloppy"
{analyzers}
"""
    return sim_config(extra=extra)


def submit(daemon: DaemonProcess, analyzer: str, n: int = 1, **input: Any) -> list[str]:
    jobs = [{"analyzer": analyzer, "input": input} for _ in range(n)]
    ids: list[str] = daemon.call("submit", jobs=jobs)["ids"]
    return ids


def wait_event(
    daemon: DaemonProcess, name: str, where: Callable[[Event], bool] = lambda _: True
) -> Event:
    """The first log event called `name` that matches; bounded by WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for event in daemon.events():
            if event.get("event") == name and where(event):
                return event
        if daemon.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {name} event in the log:\n{daemon.log()}")


def events_named(daemon: DaemonProcess, name: str) -> list[Event]:
    return [e for e in daemon.events() if e.get("event") == name]


def test_blocked_loop_names_the_blocking_line(start_daemon: StartDaemon) -> None:
    """time.sleep(1) in a handler: loop.blocked names its file and line, then
    loop.unblocked gives the total; status counts it and health is live again."""
    daemon = start_daemon(watchdog_config())
    (job_id,) = submit(daemon, "blocks", seconds=1.0)

    blocked = wait_event(daemon, "loop.blocked", lambda e: e.get("function") == "blocks")
    assert blocked["file"] == HANDLERS_FILE
    assert blocked["line"] == marked_line("blocks")
    assert blocked["function"] == "blocks"
    assert "time.sleep" in blocked["code"]
    assert blocked["task"] == f"job {job_id}"
    assert blocked["stack"][0] == f"{HANDLERS_FILE}:{marked_line('blocks')} in blocks"
    assert any("Worker.attempt" in frame for frame in blocked["stack"][1:])

    unblocked = wait_event(daemon, "loop.unblocked", lambda e: e.get("function") == "blocks")
    assert unblocked["line"] == blocked["line"]
    assert unblocked["blocked_ms"] >= 500  # the sleep lasted a second

    daemon.wait_all_terminal(timeout_s=WAIT_S)
    status = daemon.call("status")
    loop = status["watchdog"]["loop"]
    assert loop["blocked_count"] >= 1 and loop["blocked_seconds"] >= 0.5
    site = f"{HANDLERS_FILE}:{marked_line('blocks')} in blocks"
    assert site in [s["site"] for s in loop["sites"]], loop["sites"]
    assert loop["lag_ms"]["max"] >= 500
    assert status["health"]["live"] is True


def test_gil_holding_stall_is_dumped_by_faulthandler(start_daemon: StartDaemon) -> None:
    """A handler holding the GIL in C calls past stall_dump_s: faulthandler's own
    thread writes the stuck frame (file, function) to stderr."""
    daemon = start_daemon(watchdog_config("stall_dump_s = 0.5"))
    submit(daemon, "hogs", seconds=2.5)
    line = marked_line("hogs_gil")
    dumped = re.compile(rf'^  File "{re.escape(HANDLERS_FILE)}", line {line} in hogs_gil$', re.M)
    deadline = time.monotonic() + WAIT_S
    text = ""
    while not dumped.search(text):
        assert time.monotonic() < deadline, text[-5000:]
        time.sleep(0.1)
        # faulthandler writes plain text to stderr, between the JSON lines.
        lines = daemon.log_path.read_text(errors="replace").splitlines()
        text = "\n".join(line for line in lines if not line.startswith("{"))
    assert "Timeout (0:00:00.500000)!" in text
    assert "most recent call first" in text


def test_gil_held_in_c_is_a_blocked_loop_with_no_stale_site(start_daemon: StartDaemon) -> None:
    """A C call holding the GIL past the threshold: loop.blocked says so (held_gil)
    and names no frame, since the side thread can only look once the call is over."""
    daemon = start_daemon(watchdog_config())
    submit(daemon, "hogs", seconds=1.5)

    blocked = wait_event(daemon, "loop.blocked", lambda e: e.get("held_gil") is True)
    assert blocked["sampled_late_ms"] > blocked["threshold_ms"]
    assert not {"file", "line", "function", "code", "task", "stack"} & blocked.keys()
    assert "stall_dump_s" in blocked["hint"] and blocked["stall_dump_s"] == 10.0
    unblocked = wait_event(daemon, "loop.unblocked", lambda e: e.get("held_gil") is True)
    assert "file" not in unblocked
    assert unblocked["blocked_ms"] >= blocked["threshold_ms"]

    daemon.wait_all_terminal(timeout_s=WAIT_S)
    loop = daemon.call("status")["watchdog"]["loop"]
    assert loop["held_gil"]["count"] >= 1
    # What ran after the call is not where the loop blocked (other stalls on a loaded
    # machine may add sites of their own).
    assert not [s for s in loop["sites"] if HANDLERS_FILE in s["site"]], loop["sites"]
    assert daemon.terminate() == 0


def test_memory_growth_names_the_growing_site(start_daemon: StartDaemon) -> None:
    """A handler that keeps 256 KiB a call: memory.growth, then memory.sites with
    that line on top."""
    daemon = start_daemon(
        watchdog_config(
            "sample_s = 0.2\nwarmup_s = 0.5\nmemory_growth_mb = 8\nmemory_trace_s = 1.0"
        )
    )
    deadline = time.monotonic() + WAIT_S
    while not events_named(daemon, "memory.sites"):
        assert time.monotonic() < deadline, daemon.log()
        submit(daemon, "leaks", n=5)
        time.sleep(0.05)

    growth = events_named(daemon, "memory.growth")[0]
    assert growth["growth_mb"] > 8
    sites = events_named(daemon, "memory.sites")[0]
    assert (sites["file"], sites["line"]) == (HANDLERS_FILE, marked_line("leaks"))
    top = sites["top"][0]
    assert top["site"] == f"{HANDLERS_FILE}:{marked_line('leaks')}"
    assert top["size_diff_bytes"] > 1_000_000 and top["count_diff"] > 0
    memory = daemon.call("status")["watchdog"]["memory"]
    assert memory["growth_events"] >= 1 and memory["tracing"] in (True, False)


def test_timeouts_log_their_stack_and_stuck_attempts_are_abandoned(
    start_daemon: StartDaemon,
) -> None:
    """An await-forever handler is cancelled at its timeout with its stack logged;
    one that shields itself is abandoned past timeout + margin with its stack
    logged; both count failed attempts, are retried, and end failed."""
    analyzers = """
[analyzers.forever]
handler = "tests.watchdog_handlers:forever"
timeout_s = 1.0
max_attempts = 2

[analyzers.shielded]
handler = "tests.watchdog_handlers:shielded"
timeout_s = 1.0
max_attempts = 2
"""
    daemon = start_daemon(watchdog_config("stuck_margin_s = 0.5", analyzers))
    (forever_id,) = submit(daemon, "forever")
    (shielded_id,) = submit(daemon, "shielded", hold_s=3.0)
    daemon.wait_all_terminal(timeout_s=WAIT_S)

    shown = daemon.call("show", id=forever_id)
    assert shown["job"]["state"] == "failed" and shown["job"]["attempts"] == 2
    assert [a["outcome"] for a in shown["attempts"]] == ["timeout", "timeout"]
    timeouts = [e for e in events_named(daemon, "job.timeout") if e["job_id"] == forever_id]
    assert [e["attempt"] for e in timeouts] == [1, 2]
    assert [e["next_state"] for e in timeouts] == ["queued", "failed"]
    for event in timeouts:
        assert (event["file"], event["line"]) == (HANDLERS_FILE, marked_line("forever"))
        assert event["function"] == "forever"
        assert any("Dispatcher._run_one" in frame for frame in event["stack"])

    shown = daemon.call("show", id=shielded_id)
    assert shown["job"]["state"] == "failed" and shown["job"]["attempts"] == 2
    assert [a["outcome"] for a in shown["attempts"]] == ["timeout", "timeout"]
    assert {a["error"]["type"] for a in shown["attempts"]} == {"Stuck"}
    stuck = [e for e in events_named(daemon, "job.stuck") if e["job_id"] == shielded_id]
    assert [(e["attempt"], e["final"]) for e in stuck] == [(1, False), (2, True)]
    for event in stuck:
        assert (event["file"], event["line"]) == (HANDLERS_FILE, marked_line("shielded"))
        assert event["age_s"] >= 1.5  # timeout 1.0 + margin 0.5
        assert event["task"] == f"job {shielded_id}"

    # The abandoned tasks end on their own (3 s); then shutdown is clean.
    deadline = time.monotonic() + WAIT_S
    while daemon.call("status")["watchdog"]["stuck"]["lingering"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stuck_status = daemon.call("status")["watchdog"]["stuck"]
    assert stuck_status["abandoned"] == 2 and stuck_status["timeouts_with_stack"] >= 2
    assert daemon.call("show", id=shielded_id)["job"]["state"] == "failed"
    assert daemon.terminate() == 0


def test_attempts_claimed_together_each_log_their_timeout_stack(
    start_daemon: StartDaemon,
) -> None:
    """Attempts claimed in one batch while the stuck watch waits: every one logs job.timeout."""
    analyzers = """
[analyzers.forever]
handler = "tests.watchdog_handlers:forever"
timeout_s = 0.8
max_attempts = 1
"""
    daemon = start_daemon(watchdog_config(analyzers=analyzers))
    # Having sampled this attempt, the stuck watch next looks CHECK_S (1 s) later; the
    # batch, claimed well before that and due sooner (sampled 0.6-0.8 s in), wakes it:
    # a wake that came before the batch's tasks ran saw nothing to sample and lost all
    # their stacks.
    first = submit(daemon, "forever")
    daemon.wait_all_terminal(timeout_s=WAIT_S)
    batch = submit(daemon, "forever", n=5)
    daemon.wait_all_terminal(timeout_s=WAIT_S)

    timeouts = {e["job_id"]: e for e in events_named(daemon, "job.timeout")}
    assert sorted(timeouts) == sorted(first + batch), daemon.log()
    for event in timeouts.values():
        assert (event["file"], event["line"]) == (HANDLERS_FILE, marked_line("forever"))
    assert daemon.call("status")["watchdog"]["stuck"]["timeouts_with_stack"] == 6
    assert daemon.terminate() == 0


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (short path: the
    sun_path limit), with kernel receive timestamps."""
    directory = tempfile.mkdtemp(prefix="vw", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def receive(sock: socket.socket, timeout_s: float) -> tuple[str, float] | None:
    """One datagram and the kernel's time of its arrival; None on timeout."""
    sock.settimeout(timeout_s)
    try:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
    except (TimeoutError, BlockingIOError):
        return None
    stamp = time.time()
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP:
            seconds, micros = struct.unpack("qq", raw[:16])
            stamp = seconds + micros / 1e6
    return data.decode(), stamp


def pings(sock: socket.socket, n: int) -> list[float]:
    """Arrival times of the next `n` WATCHDOG=1 datagrams (others skipped)."""
    stamps: list[float] = []
    deadline = time.monotonic() + WAIT_S
    while len(stamps) < n:
        assert time.monotonic() < deadline, f"only {len(stamps)} pings"
        got = receive(sock, 1.0)
        if got is not None and got[0] == "WATCHDOG=1":
            stamps.append(got[1])
    return stamps


def test_systemd_watchdog_pings_stop_while_the_loop_is_blocked(
    start_daemon: StartDaemon,
) -> None:
    """With WATCHDOG_USEC, WATCHDOG=1 arrives every half interval from the loop;
    none arrives while a handler blocks the loop, and they resume after."""
    with notify_socket() as (sock, path):
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        daemon = start_daemon(watchdog_config(), env=env)
        stamps = pings(sock, 6)
        # The first is sent at start; the others on a drift-free 0.2 s schedule (each
        # at or after its slot): six pings span at least five intervals.
        assert stamps[-1] - stamps[0] >= 5 * 0.2 * 0.95, stamps
        assert daemon.call("status")["watchdog"]["systemd"]["interval_s"] == 0.2

        submit(daemon, "blocks", seconds=1.5)
        wait_event(daemon, "loop.blocked", lambda e: e.get("function") == "blocks")
        last_before = stamps[-1]
        while (got := receive(sock, 0.0)) is not None:  # everything sent before it
            if got[0] == "WATCHDOG=1":
                last_before = got[1]
        after = pings(sock, 1)[0]
        # Pings resume only once the side thread saw the loop tick again.
        assert events_named(daemon, "loop.unblocked"), "a ping came while blocked"
        assert after - last_before >= 1.0  # the loop was blocked for 1.5 s
        pings(sock, 2)
        assert daemon.terminate() == 0


def test_debug_commands_and_sigusr1(start_daemon: StartDaemon) -> None:
    """`vigil debug tasks` lists the job's task with its stack and the watchdog's
    tasks; `debug stacks` every thread; `debug memory` allocation sites; SIGUSR1
    writes the stacks to the log."""
    analyzers = """
[analyzers.forever]
handler = "tests.watchdog_handlers:forever"
timeout_s = 600
"""
    daemon = start_daemon(watchdog_config(analyzers=analyzers))
    sock = daemon.socket_path
    (job_id,) = submit(daemon, "forever")
    deadline = time.monotonic() + WAIT_S
    while daemon.call("show", id=job_id)["job"]["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    out = run_cli("debug", "tasks", "--json", socket_path=sock)
    assert out.returncode == 0, out.stderr
    report = msgspec.json.decode(out.stdout)
    tasks = {t["name"]: t for t in report["tasks"]}
    job_task = tasks[f"job {job_id}"]
    assert job_task["state"] == "waiting" and job_task["age_s"] >= 0
    assert f"{HANDLERS_FILE}:{marked_line('forever')} in forever" in job_task["stack"]
    for name in ("watchdog.loop", "watchdog.sampler", "watchdog.memory", "watchdog.stuck"):
        assert name in tasks, sorted(tasks)
    assert any("LoopMonitor.run" in frame for frame in tasks["watchdog.loop"]["stack"])
    assert report["count"] == len(report["tasks"])
    human = run_cli("debug", "tasks", socket_path=sock)
    assert human.returncode == 0 and f"job {job_id}" in human.stdout

    out = run_cli("debug", "stacks", "--json", socket_path=sock)
    assert out.returncode == 0, out.stderr
    threads = {t["name"]: t for t in msgspec.json.decode(out.stdout)["threads"]}
    assert "MainThread" in threads and "vigil-watchdog" in threads
    assert any("BlockedDetector._run" in f for f in threads["vigil-watchdog"]["stack"])

    out = run_cli("debug", "memory", "--json", "--seconds", "0.5", socket_path=sock)
    assert out.returncode == 0, out.stderr
    memory = msgspec.json.decode(out.stdout)
    assert memory["rss_mb"] > 0 and memory["traced_s"] == 0.5
    assert memory["sites"], "some allocation is alive after half a second"
    assert all(s["file"] and s["line"] > 0 and s["size_diff_bytes"] > 0 for s in memory["sites"])
    human = run_cli("debug", "memory", "--seconds", "0.2", socket_path=sock)
    assert human.returncode == 0 and "SITE" in human.stdout

    daemon.proc.send_signal(signal.SIGUSR1)
    wait_event(daemon, "stacks.thread", lambda e: e["name"] == "MainThread")
    wait_event(
        daemon,
        "stacks.tasks",
        lambda e: any(f.endswith(" in forever") for f in e["stack"]) and e["count"] == 1,
    )
    daemon.call("cancel", id=job_id)  # else shutdown waits out its grace for it
    assert daemon.terminate() == 0


def test_unawaited_coroutines_and_lost_task_errors_are_logged(
    start_daemon: StartDaemon,
) -> None:
    """A dropped coroutine and a task whose exception nobody retrieves reach the
    log as warnings naming where they happened."""
    daemon = start_daemon(watchdog_config())
    (job_id,) = submit(daemon, "sloppy")
    warning = wait_event(daemon, "python.warning", lambda e: "never awaited" in e["message"])
    assert warning["category"] == "RuntimeWarning"
    assert "_never_awaited" in warning["message"]
    assert (warning["file"], warning["line"]) == (HANDLERS_FILE, marked_line("dropped"))
    assert warning["job_id"] == job_id  # logged inside the attempt, with its context

    lost = wait_event(daemon, "loop.exception")
    assert lost["message"] == "Task exception was never retrieved"
    assert lost["coroutine"] == "_fails_later"
    assert lost["error"] == "ValueError: nobody awaits me"
    assert (lost["file"], lost["line"]) == (HANDLERS_FILE, marked_line("fails_later"))
    assert lost["level"] == "warning"


def test_max_rss_drains_and_exits_for_a_restart(start_daemon: StartDaemon) -> None:
    """Past watchdog.max_rss_mb the daemon logs it, drains and exits 75; every job
    it accepted is still in the database."""
    daemon = start_daemon(watchdog_config("max_rss_mb = 160\nsample_s = 0.2"))
    accepted: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while daemon.proc.poll() is None:
        assert time.monotonic() < deadline, daemon.log()
        # Refused (intake closed) or cut off once it stops: then nothing is claimed.
        with contextlib.suppress(OSError, AssertionError, msgspec.DecodeError):
            accepted += submit(daemon, "leaks", n=10, bytes=1_048_576)
        time.sleep(0.05)
    assert daemon.proc.wait(WAIT_S) == 75
    exceeded = events_named(daemon, "memory.max_rss_exceeded")
    assert len(exceeded) == 1 and exceeded[0]["rss_mb"] > 160
    stopped = events_named(daemon, "daemon.stopped")[-1]
    assert stopped["exit_code"] == 75 and "max_rss_mb" in stopped["restart_reason"]

    assert accepted
    stored = {row[0] for row in db_rows(daemon.state_dir / "vigil.db", "SELECT id FROM jobs")}
    assert set(accepted) <= stored


@pytest.mark.parametrize("enabled", [True, False])
def test_status_section_follows_the_switch(start_daemon: StartDaemon, enabled: bool) -> None:
    """`watchdog.enabled` turns the monitors on or off; status says which."""
    config = watchdog_config(f"enabled = {'true' if enabled else 'false'}")
    daemon = start_daemon(config)
    section = daemon.call("status")["watchdog"]
    assert section["enabled"] is enabled
    assert ("loop" in section) is enabled
    checks = {c["name"] for c in daemon.call("status")["health"]["checks"]}
    assert ("loop" in checks) is enabled
    assert daemon.terminate() == 0
