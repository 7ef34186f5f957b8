"""Live figures for systemd: `STATUS=` lines for `systemctl status`, and
`EXTEND_TIMEOUT_USEC` while a long drain is still making progress."""

from __future__ import annotations

import time

import anyio

from daemon import systemd
from daemon.queue import Dispatcher
from daemon.runtime import Runtime

STATUS_EVERY_S = 5.0
EXTEND_EVERY_S = 5.0
EXTEND_BY_US = 15_000_000


async def report_status(rt: Runtime) -> None:
    """Every few seconds: queued, running and the finish rate since the last line."""
    if not systemd.enabled():
        return
    last_finished, last_at = rt.dispatcher.finished, time.monotonic()
    while True:
        now, finished = time.monotonic(), rt.dispatcher.finished
        rate = (finished - last_finished) / max(now - last_at, 1e-9)
        last_finished, last_at = finished, now
        counts = rt.store.counts
        systemd.notify(
            f"STATUS={rt.state}: {counts['queued']} queued, {counts['running']} running, "
            f"{rate:.1f} attempts/s, {counts['succeeded']} succeeded, {counts['failed']} failed"
        )
        await anyio.sleep(STATUS_EVERY_S)


async def extend_while_draining(dispatcher: Dispatcher) -> None:
    """Ask systemd for more stop time, but only while attempts are still finishing: a
    drain that makes no progress is left to TimeoutStopSec."""
    if not systemd.enabled():
        return
    last = dispatcher.finished
    while True:
        await anyio.sleep(EXTEND_EVERY_S)
        if dispatcher.finished > last:
            systemd.notify(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_US}")
        last = dispatcher.finished
