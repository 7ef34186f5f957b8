"""The watchdog's parts in-process: lag statistics, the blocked-loop thread, stack
walking, the leak and memory watches, the systemd ping gate, the task factory,
and the dispatcher's abandon path on a real store."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from daemon.config import WatchdogConfig
from daemon.jobs import ErrorInfo, Job, JobIds
from daemon.observe.health import Check, Health
from daemon.queue import Dispatcher
from daemon.store.base import AttemptEnd, NewJob
from daemon.store.sqlite import Store
from daemon.watchdog.introspect import coro_stack, headline
from daemon.watchdog.leaks import LeakWatch
from daemon.watchdog.loop import LagStats, LoopMonitor
from daemon.watchdog.memory import MB, MemoryWatch, ProcessSample
from daemon.watchdog.notify import SystemdPinger, ping_interval_s
from daemon.watchdog.tasks import TaskRegistry

TIMEOUT_S = 20
THIS_FILE = os.path.abspath(__file__)


def sample(rss_mb: float, fds: int = 10, threads: int = 4) -> ProcessSample:
    return ProcessSample(rss_bytes=int(rss_mb * MB), fds=fds, threads=threads)


def named(logs: Sequence[Mapping[str, Any]], event: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def until(condition: Callable[[], bool], interval_s: float = 0.01) -> None:
    """Poll state another part owns (callers bound it with fail_after)."""
    while not condition():  # noqa: ASYNC110  (no event to wait on: it is their state)
        await anyio.sleep(interval_s)


# -- loop lag and the blocked-loop thread -------------------------------------------


def test_lag_stats_percentiles_and_buckets() -> None:
    """p50/p99/max over the recent window only; buckets and sum count everything."""
    stats = LagStats(window=100)
    for lag in [9000.0] + [float(i) for i in range(100)]:
        stats.add(lag)
    assert stats.summary() == {"p50": 50.0, "p99": 99.0, "max": 99.0}  # 9000 left the window
    assert stats.count == 101 and stats.max_ms == 9000.0
    assert sum(stats.buckets) == 101 and stats.buckets[-1] == 1  # 9000 ms > the last bound


@pytest.mark.anyio
async def test_blocked_loop_is_caught_by_the_side_thread() -> None:
    """Blocking the loop for a second: the thread logs loop.blocked naming this very
    line, then loop.unblocked; health's live check would fail meanwhile."""
    monitor = LoopMonitor(block_threshold_s=0.25, stall_dump_s=30.0)
    with capture_logs() as logs, anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            await anyio.sleep(0.3)
            line = sys._getframe().f_lineno + 1
            time.sleep(1.2)  # noqa: ASYNC251  (the fault under test)
            await until(lambda: not monitor.detector.blocked)
            tg.cancel_scope.cancel()
    # Only this test's block: a loaded machine may stall the loop elsewhere too.
    [blocked] = [e for e in named(logs, "loop.blocked") if e.get("file") == THIS_FILE]
    assert blocked["line"] == line
    assert blocked["function"] == "test_blocked_loop_is_caught_by_the_side_thread"
    [unblocked] = [e for e in named(logs, "loop.unblocked") if e.get("file") == THIS_FILE]
    assert unblocked["blocked_ms"] >= 600
    status = monitor.status()
    assert status["blocked_count"] >= 1 and not status["blocked_now"]
    assert [s["count"] for s in status["sites"] if THIS_FILE in s["site"]] == [1]


@pytest.mark.anyio
async def test_repeated_blocks_at_one_site_are_counted_not_logged() -> None:
    """Three blocks at the same line: one loop.blocked line, a count of three."""
    monitor = LoopMonitor(block_threshold_s=0.25, stall_dump_s=30.0)
    with capture_logs() as logs, anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            for _ in range(3):
                await anyio.sleep(0.2)
                before = monitor.detector.count
                time.sleep(0.8)  # noqa: ASYNC251  (the fault under test)
                await until(
                    lambda: not monitor.detector.blocked and monitor.detector.count > before  # noqa: B023
                )
            tg.cancel_scope.cancel()
    # Only this test's site: a loaded machine may stall the loop elsewhere too.
    assert len([e for e in named(logs, "loop.blocked") if e.get("file") == THIS_FILE]) == 1
    assert len([e for e in named(logs, "loop.unblocked") if e.get("file") == THIS_FILE]) == 1
    [site] = [s for s in monitor.status()["sites"] if THIS_FILE in s["site"]]
    assert site["count"] == 3 and site["total_s"] >= 1.2


# -- stacks -------------------------------------------------------------------------


async def _inner(event: anyio.Event) -> None:
    await event.wait()


async def _outer(event: anyio.Event) -> None:
    await _inner(event)


@pytest.mark.anyio
async def test_coro_stack_follows_the_await_chain() -> None:
    """A waiting task's stack goes down its awaits (innermost first), and its
    headline skips asyncio and anyio to name our code."""
    event = anyio.Event()
    task = asyncio.get_running_loop().create_task(_outer(event))
    await anyio.sleep(0.01)
    stack = coro_stack(task.get_coro())
    functions = [frame.function for frame in stack]
    assert functions.index("_inner") < functions.index("_outer") == len(stack) - 1
    assert functions[0] != "_inner"  # anyio's Event.wait and asyncio lie below it
    top = headline(stack)
    assert (top.file, top.function) == (THIS_FILE, "_inner")
    event.set()
    await task


# -- leaks --------------------------------------------------------------------------


async def idle_forever() -> None:
    await anyio.sleep_forever()


@pytest.mark.anyio
async def test_task_growth_is_logged_with_the_kinds_that_grew() -> None:
    """Past task_growth_limit: tasks.growth names the coroutine that multiplied, and
    the baseline moves up so the same growth is not reported twice."""
    watch = LeakWatch(
        WatchdogConfig(warmup_s=0, task_growth_limit=5), lambda: len(asyncio.all_tasks())
    )
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            watch.observe(sample(50), 0.0)  # baseline
            for _ in range(20):
                tg.start_soon(idle_forever)
            await anyio.sleep(0.01)
            watch.observe(sample(50), 1.0)
            watch.observe(sample(50), 2.0)
            tg.cancel_scope.cancel()
    (growth,) = named(logs, "tasks.growth")
    assert growth["grew_by"] == 20 and growth["limit"] == 5
    assert growth["grown_kinds"] == {"idle_forever": 20}
    assert not named(logs, "fds.growth")


@pytest.mark.anyio
async def test_fd_and_thread_growth_are_logged_after_warmup() -> None:
    """Nothing is judged during warm-up; afterwards fds and threads past their
    limits are reported against the first sample after it."""
    watch = LeakWatch(
        WatchdogConfig(warmup_s=10, fd_growth_limit=3, thread_growth_limit=2), lambda: 1
    )
    watch.start(0.0)
    with capture_logs() as logs:
        watch.observe(sample(50, fds=1000, threads=100), 5.0)  # warming up
        watch.observe(sample(50, fds=10, threads=4), 11.0)  # baseline
        watch.observe(sample(50, fds=20, threads=5), 12.0)
    assert [e["event"] for e in logs] == ["fds.growth"]
    assert logs[0]["baseline"] == 10 and logs[0]["count"] == 20


# -- memory -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sustained_growth_traces_and_names_the_allocating_line() -> None:
    """A spike is ignored; growth held for three samples logs memory.growth, and the
    trace window that follows puts this test's allocating line on top."""
    config = WatchdogConfig(warmup_s=0, memory_growth_mb=10, memory_trace_s=0.5, sample_s=0.05)
    watch = MemoryWatch(config, lambda reason: None)
    kept: list[bytes] = []
    with capture_logs() as logs, anyio.fail_after(TIMEOUT_S):
        watch.observe(sample(100), 0.0)  # baseline
        watch.observe(sample(200), 1.0)  # a spike...
        watch.observe(sample(100), 2.0)  # ...gone
        for t in (3.0, 4.0, 5.0):
            watch.observe(sample(200), t)
        assert len(named(logs, "memory.growth")) == 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            line = sys._getframe().f_lineno + 2
            while not named(logs, "memory.sites"):
                kept.append(b"m" * 100_000)
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    sites = named(logs, "memory.sites")[0]
    assert (sites["file"], sites["line"]) == (THIS_FILE, line)
    assert watch.baseline_bytes == 200 * MB and not watch.status()["tracing"]


def test_max_rss_asks_for_one_restart() -> None:
    """Over max_rss_mb: logged once and a restart requested once, however long it lasts."""
    asked: list[str] = []
    watch = MemoryWatch(WatchdogConfig(max_rss_mb=100), asked.append)
    with capture_logs() as logs:
        for rss in (50, 150, 160, 170):
            watch.observe(sample(rss), 0.0)
    assert len(asked) == 1 and "max_rss_mb" in asked[0]
    assert len(named(logs, "memory.max_rss_exceeded")) == 1
    assert watch.over_limit


# -- systemd pings ------------------------------------------------------------------


def test_ping_interval_from_the_environment() -> None:
    """Half of WATCHDOG_USEC; none when unset, invalid, or meant for another pid."""
    pid = os.getpid()
    assert ping_interval_s({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert ping_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(pid)}, pid) == 0.2
    assert ping_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(pid + 1)}, pid) is None
    assert ping_interval_s({}, pid) is None
    assert ping_interval_s({"WATCHDOG_USEC": "soon"}, pid) is None
    assert ping_interval_s({"WATCHDOG_USEC": "0"}, pid) is None


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket as $NOTIFY_SOCKET."""
    path = tmp_path / "n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_pings_follow_liveness_and_the_store_not_readiness(
    notify_socket: socket.socket,
) -> None:
    """A full backlog (ready) still pings; a blocked loop (live) or an unwritable
    store withholds; the pings resume when they clear."""
    state = {"backlog": False, "loop": True, "store": True}
    health = Health()
    health.register(
        lambda: [
            Check(name="backlog", ok=state["backlog"], reason="full"),
            Check(name="loop", ok=state["loop"], affects="live", reason="blocked"),
            Check(name="store", ok=state["store"], reason="unwritable"),
        ]
    )
    pinger = SystemdPinger(health, {"WATCHDOG_USEC": "1000000"})
    assert pinger.interval_s == 0.5
    pinger._ping_once()
    assert notify_socket.recv(100) == b"WATCHDOG=1"
    state["loop"] = False
    pinger._ping_once()
    state["loop"], state["store"] = True, False
    pinger._ping_once()
    assert pinger.withheld == 2 and pinger.reasons() == ["store: unwritable"]
    state["store"] = True
    pinger._ping_once()
    assert notify_socket.recv(100) == b"WATCHDOG=1"
    assert pinger.sent == 2


# -- the task factory ---------------------------------------------------------------


@pytest.mark.anyio
async def test_task_registry_stamps_tasks_and_restores_the_factory() -> None:
    """Tasks created while installed are stamped and counted; leaving restores the
    loop's previous factory."""
    loop = asyncio.get_running_loop()
    registry = TaskRegistry()
    with registry.installed(loop):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(idle_forever)
            await anyio.sleep(0.01)
            assert registry.total == 3
            ours = [
                t
                for t in registry.created
                if isinstance(t, asyncio.Task) and t.get_name().endswith("idle_forever")
            ]
            assert len(ours) == 3
            assert all(registry.created[t] <= time.monotonic() for t in ours)
            tg.cancel_scope.cancel()
    assert loop.get_task_factory() is None


# -- abandoning an attempt ----------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "vigil.db", synchronous="NORMAL") as opened:
        yield opened


@pytest.mark.anyio
async def test_abandoned_attempt_is_a_failed_attempt_and_the_job_retries(store: Store) -> None:
    """An attempt that shields itself is abandoned: its slot frees at once, it is
    recorded as a timeout, the job runs again and succeeds; the late result of the
    abandoned task is ignored."""
    calls: list[int] = []

    async def execute(job: Job) -> AttemptEnd:
        calls.append(job.attempts)
        if job.attempts == 1:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.5)
            return AttemptEnd(outcome="succeeded", result="late", latency_ms=500)
        return AttemptEnd(outcome="succeeded", result="second", latency_ms=1)

    job_id = JobIds().new()
    await store.submit(
        [
            NewJob(
                id=job_id,
                analyzer="a",
                input={},
                priority=0,
                idempotency_key=None,
                max_attempts=3,
                source="test",
            )
        ],
        max_backlog=10,
    )
    dispatcher = Dispatcher(store, execute, max_concurrency=1)
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            await until(lambda: job_id in dispatcher.active)
            entry = dispatcher.active[job_id]
            end = AttemptEnd(
                outcome="timeout",
                error=ErrorInfo("Stuck", "abandoned"),
                latency_ms=1,
                retry_at=time.time(),
            )
            assert await dispatcher.abandon(entry, end) == "queued"
            assert await dispatcher.abandon(entry, end) is None  # once only
            await until(lambda: store.counts["succeeded"] == 1)
            await until(lambda: dispatcher.lingering == 0)
            await dispatcher.drain(1.0)
            tg.cancel_scope.cancel()
    job = await store.get(job_id)
    assert job is not None and job.result == "second" and job.attempts == 2
    attempts = await store.attempts(job_id)
    assert [(a.outcome, a.error.type if a.error else None) for a in attempts] == [
        ("timeout", "Stuck"),
        ("succeeded", None),
    ]
    assert calls == [1, 2] and dispatcher.outcomes == {"retried": 1, "succeeded": 1}
