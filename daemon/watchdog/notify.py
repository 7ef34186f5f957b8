"""systemd's watchdog: `WATCHDOG=1` from the event loop, only while healthy.

Sent at half of `WATCHDOG_USEC` by a task in the loop, so a loop that hangs stops
the pings by itself; the health model withholds them too while the loop is seen
blocked or the database refuses writes. systemd then restarts the process (with
SIGABRT first, which faulthandler turns into every thread's stack in the journal).
Draining, pausing or a full backlog are not reasons: the process is not wedged."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import structlog

from daemon import systemd
from daemon.observe.health import Health

log = structlog.get_logger("vigil.watchdog")

# Checks whose failure means "restart me": every `live` check, plus these.
WEDGED_CHECKS = frozenset({"store"})


def ping_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC, if systemd asks this process (WATCHDOG_PID) for pings."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted_pid = environ.get("WATCHDOG_PID")
    if wanted_pid:
        try:
            if int(wanted_pid) != pid:
                return None
        except ValueError:
            return None
    return usec / 2e6


class SystemdPinger:
    def __init__(
        self,
        health: Health,
        environ: Mapping[str, str] | None = None,
        send: Callable[[str], bool] = systemd.notify,
    ) -> None:
        self._health = health
        self._send = send
        self.interval_s = ping_interval_s(os.environ if environ is None else environ, os.getpid())
        self.sent = 0
        self.withheld = 0
        self._withholding: list[str] = []
        self._missed = 0

    def reasons(self) -> list[str]:
        """Why the process should not say it is alive now (empty: it should)."""
        report = self._health.report()
        return [
            f"{c.name}: {c.reason}"
            for c in report.checks
            if not c.ok and (c.affects == "live" or c.name in WEDGED_CHECKS)
        ]

    async def run(self) -> None:
        interval = self.interval_s
        if interval is None:
            return
        log.info("systemd.watchdog", ping_every_s=interval)
        next_at = anyio.current_time()
        while True:
            self._ping_once()
            # Drift-free schedule; after a long stall, start afresh rather than burst.
            now = anyio.current_time()
            next_at = max(next_at + interval, now)
            await anyio.sleep(next_at - now)

    def _ping_once(self) -> None:
        try:
            reasons = self.reasons()
        except Exception:  # health that cannot be read is not health
            log.exception("systemd.health_failed")
            reasons = ["health: the checks could not be evaluated"]
        if reasons:
            self.withheld += 1
            self._missed += 1
            # One missed ping is a blip (a block the loop check saw end); a second in
            # a row is half-way to systemd's restart, and worth a line.
            if self._missed == 2:
                log.error("systemd.watchdog_withheld", reasons=reasons)
            self._withholding = reasons
            return
        if self._missed >= 2:
            log.warning("systemd.watchdog_resumed", missed=self._missed)
        self._missed = 0
        self._withholding = []
        if self._send("WATCHDOG=1"):
            self.sent += 1

    def status(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "pings": self.sent,
            "withheld": self.withheld,
            "withholding": self._withholding,
        }
