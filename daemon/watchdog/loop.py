"""The event loop's pulse: how late it wakes up, and when it stops waking at all.

A task in the loop sleeps a short tick and measures how late it woke (the lag); the
time it next expects to run is its heartbeat. A side thread, which keeps running
while the loop is stuck in a blocking call, watches that heartbeat: once the loop is
`block_threshold_ms` late, it takes the main thread's stack and logs `loop.blocked`
with the blocking call first, then `loop.unblocked` with the total. A C call that
holds the GIL starves that thread too: it can look only once the call has returned,
when the stack shows whatever the loop runs next, so it logs such a block as
`held_gil`, with no stack and no site. faulthandler's own C thread covers it, armed
to dump every stack if the heartbeat has not re-armed it for `stall_dump_s`."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import faulthandler
import linecache
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.watchdog.introspect import UNKNOWN, Frame, frame_stack, headline

log = structlog.get_logger("vigil.watchdog")

LAG_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0)
WINDOW_S = 60.0  # p50/p99/max are over this many recent seconds
REPEAT_LOG_S = 60.0  # a site that blocks again within this is counted, not logged
MAX_SITES = 100


class LagStats:
    """Loop lag: the recent samples (bounded) for p50/p99/max, and cumulative bucket
    counts, sum and max for metrics."""

    def __init__(self, window: int) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self.buckets = [0] * (len(LAG_BUCKETS_MS) + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def add(self, lag_ms: float) -> None:
        self.recent.append(lag_ms)
        self.buckets[bisect.bisect_left(LAG_BUCKETS_MS, lag_ms)] += 1
        self.count += 1
        self.sum_ms += lag_ms
        self.max_ms = max(self.max_ms, lag_ms)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.recent)
        if not ordered:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}

        def pct(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        return {"p50": pct(0.5), "p99": pct(0.99), "max": round(ordered[-1], 2)}


@dataclass
class Site:
    """A place the loop was seen blocked at, and how often."""

    frame: Frame
    count: int = 0
    total_s: float = 0.0
    last_logged: float = -1e18
    suppressed: int = 0


class LoopMonitor:
    """The lag task (runs in the loop) and the blocked-loop thread it owns."""

    def __init__(self, *, block_threshold_s: float, stall_dump_s: float) -> None:
        self.threshold_s = block_threshold_s
        self.stall_dump_s = stall_dump_s
        self.tick_s = min(0.1, block_threshold_s / 2)
        self.lag = LagStats(int(WINDOW_S / self.tick_s))
        # Read by the side thread; plain attribute reads and writes are atomic.
        self.due = time.monotonic() + self.tick_s  # when the lag task should next run
        self.heartbeat = time.monotonic()  # when it last ran
        self.ticks = 0
        self.running = False
        self.detector = BlockedDetector(self)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        loop = asyncio.get_running_loop()
        self.due = time.monotonic() + self.tick_s
        self.running = True
        try:
            with self.detector.watching(threading.get_ident(), loop), _stall_dumps() as arm:
                arm(self.stall_dump_s)
                armed_at = time.monotonic()
                task_status.started()
                while True:
                    self.due = time.monotonic() + self.tick_s
                    await anyio.sleep(self.tick_s)
                    now = time.monotonic()
                    self.lag.add(max(0.0, now - self.due) * 1000)
                    self.heartbeat = now
                    self.ticks += 1
                    # Re-arming starts a C thread: do it a few times per period only.
                    if now - armed_at > self.stall_dump_s / 3:
                        arm(self.stall_dump_s)
                        armed_at = now
        finally:
            self.running = False

    def status(self) -> dict[str, Any]:
        detector = self.detector
        # sorted() copies the values in one C call first: safe while the thread adds.
        sites = sorted(detector.sites.values(), key=lambda s: s.total_s, reverse=True)[:5]
        return {
            "lag_ms": {**self.lag.summary(), "window_s": WINDOW_S},
            "max_lag_ms": round(self.lag.max_ms, 2),
            "blocked_now": detector.blocked,
            "blocked_count": detector.count,
            "blocked_seconds": round(detector.total_s, 3),
            "threshold_ms": round(self.threshold_s * 1000),
            "held_gil": {
                "count": detector.held_gil.count,
                "total_s": round(detector.held_gil.total_s, 3),
            },
            "sites": [
                {"site": str(s.frame), "count": s.count, "total_s": round(s.total_s, 3)}
                for s in sites
            ],
        }


def _named(frame: Frame) -> dict[str, Any]:
    """A frame as log fields."""
    return {"file": frame.file, "line": frame.line, "function": frame.function}


@contextlib.contextmanager
def _stall_dumps() -> Iterator[Callable[[float], None]]:
    """Yields `arm(timeout_s)`: faulthandler dumps every thread's stack to stderr if
    not re-armed in time (repeating while the stall lasts); cancelled on exit."""
    usable = True

    def arm(timeout_s: float) -> None:
        nonlocal usable
        if not usable:
            return
        try:
            faulthandler.dump_traceback_later(timeout_s, repeat=True, file=sys.stderr)
        except (AttributeError, ValueError, OSError) as exc:  # no usable stderr
            usable = False
            log.warning("watchdog.stall_dump_unavailable", error=str(exc))

    try:
        yield arm
    finally:
        faulthandler.cancel_dump_traceback_later()


class BlockedDetector:
    """The side thread. Logs from itself: structlog's PrintLogger writes a line under
    a lock, and the counters it keeps are read by the loop without one (ints and
    floats are replaced whole)."""

    def __init__(self, monitor: LoopMonitor) -> None:
        self._monitor = monitor
        self.blocked = False
        self.count = 0
        self.total_s = 0.0
        self.sites: dict[tuple[str, int, str], Site] = {}
        # Blocks this thread saw only once they were over (C code holding the GIL):
        # counted and logged like a site, but not one: nobody saw where they were.
        self.held_gil = Site(UNKNOWN)
        self.current: Site | None = None  # where the loop is blocked now, if seen
        self._stop = threading.Event()
        self._loop_ident = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocked_tick = -1
        self._blocked_due = 0.0
        self._logged = False

    @contextlib.contextmanager
    def watching(self, loop_ident: int, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        self._loop_ident, self._loop = loop_ident, loop
        self._stop.clear()
        thread = threading.Thread(target=self._run, name="vigil-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=2.0)

    def _run(self) -> None:
        """Sleeps until the loop would be `threshold` late (it usually ticks before,
        moving that moment on), so a healthy loop costs a few wake-ups a second;
        during a block it polls, to see the end promptly."""
        monitor = self._monitor
        threshold = monitor.threshold_s
        poll_s = max(0.005, min(0.05, threshold / 5))
        while True:
            if self.blocked:
                wait_s = poll_s
            elif monitor.running:
                wait_s = max(0.005, monitor.due + threshold - time.monotonic())
            else:
                wait_s = threshold
            wake_at = time.monotonic() + wait_s
            if self._stop.wait(wait_s):
                return
            try:
                self._check(wake_at)
            except Exception:  # the watcher must outlive its own bugs
                log.exception("watchdog.thread_error")

    def _check(self, wake_at: float) -> None:
        monitor = self._monitor
        if not monitor.running:
            return
        if self.blocked:
            if monitor.ticks != self._blocked_tick:
                self._end()
            return
        late_s = time.monotonic() - monitor.due
        if late_s >= monitor.threshold_s:
            self._begin(late_s, wake_at)

    def _begin(self, late_s: float, wake_at: float) -> None:
        """The main thread's stack shows the blocking call only if this thread ran
        about when it meant to (`wake_at`); one that got the GIL a threshold later
        sees whatever ran after the call that held it."""
        monitor = self._monitor
        frame = sys._current_frames().get(self._loop_ident)
        sampled_late_s = time.monotonic() - wake_at
        if sampled_late_s > monitor.threshold_s:
            site, where = self.held_gil, self._held_gil_fields(sampled_late_s)
        else:
            stack = frame_stack(frame)
            top = headline(stack)
            site, where = self._site(top), self._site_fields(top, stack)
            self.current = site
        site.count += 1
        self.count += 1
        self._blocked_tick, self._blocked_due = monitor.ticks, monitor.due
        now = time.monotonic()
        self._logged = now - site.last_logged >= REPEAT_LOG_S
        self.blocked = True
        if not self._logged:
            site.suppressed += 1
            return
        log.warning(
            "loop.blocked",
            blocked_ms=round(late_s * 1000),
            threshold_ms=round(monitor.threshold_s * 1000),
            **where,
            times_here=site.count,
            not_logged_since_last=site.suppressed,
        )
        site.last_logged, site.suppressed = now, 0

    def _site_fields(self, top: Frame, stack: list[Frame]) -> dict[str, Any]:
        return {
            **_named(top),
            "code": linecache.getline(top.file, top.line).strip(),
            "task": self._current_task_name(),
            "stack": [str(f) for f in stack],
        }

    def _held_gil_fields(self, sampled_late_s: float) -> dict[str, Any]:
        return {
            "held_gil": True,
            "sampled_late_ms": round(sampled_late_s * 1000),
            "stall_dump_s": self._monitor.stall_dump_s,
            "hint": "C code held the GIL, so this thread could take the loop's stack only "
            "after that call returned, when it no longer shows it; faulthandler writes "
            "every thread's stack, the blocking line included, to stderr once a stall "
            "lasts watchdog.stall_dump_s",
        }

    def _end(self) -> None:
        total_s = max(0.0, self._monitor.heartbeat - self._blocked_due)
        self.total_s += total_s
        site = self.held_gil if self.current is None else self.current
        site.total_s += total_s
        if self._logged:
            # Logged before `blocked` clears: nothing (systemd pings) resumes first.
            where = {"held_gil": True} if site is self.held_gil else _named(site.frame)
            log.warning("loop.unblocked", blocked_ms=round(total_s * 1000), **where)
        self.current = None
        self.blocked = False

    def _site(self, frame: Frame) -> Site:
        key = (frame.file, frame.line, frame.function)
        site = self.sites.get(key)
        if site is None:
            if len(self.sites) >= MAX_SITES:
                del self.sites[min(self.sites, key=lambda k: self.sites[k].count)]
            site = self.sites[key] = Site(frame)
        return site

    def _current_task_name(self) -> str | None:
        """The task the loop is running, read from this thread (a dict lookup)."""
        if self._loop is None:
            return None
        try:
            task = asyncio.current_task(self._loop)
        except RuntimeError:
            return None
        return task.get_name() if task is not None else None
