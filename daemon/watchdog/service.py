"""The watchdog component: starts the monitors, owns their tasks and the side
thread, registers its health checks and its part of `status`.

With `watchdog.enabled = false` only the systemd pings run (systemd would kill a
process that stops them); nothing else is installed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency
import structlog
from anyio.abc import TaskStatus

from daemon.config import WatchdogConfig
from daemon.observe.health import Check
from daemon.watchdog.hooks import faulthandler_enabled, loop_exceptions_to_log, warnings_to_log
from daemon.watchdog.leaks import LeakWatch
from daemon.watchdog.loop import LoopMonitor
from daemon.watchdog.memory import MemoryWatch, read_process
from daemon.watchdog.notify import SystemdPinger
from daemon.watchdog.stuck import StuckWatch
from daemon.watchdog.tasks import TaskRegistry

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.config import Config
    from daemon.live import Live
    from daemon.observe.health import Health
    from daemon.queue import Dispatcher

log = structlog.get_logger("vigil.watchdog")

# Exit code after a graceful restart asked for by `watchdog.max_rss_mb` (EX_TEMPFAIL):
# non-zero, so systemd's Restart=on-failure starts the daemon again.
EX_RESTART = 75


class Host(Protocol):
    """What the watchdog uses of the daemon's Runtime (daemon/runtime.py), which holds the
    watchdog in turn: named here so that this module does not import runtime.py."""

    @property
    def config(self) -> Config: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def live(self) -> Live: ...
    @property
    def health(self) -> Health: ...
    @property
    def status_sections(self) -> dict[str, Callable[[], Any]]: ...

    watchdog: Watchdog | None

    def request_stop(self) -> None: ...


class Watchdog:
    def __init__(self, rt: Host, config: WatchdogConfig | None = None) -> None:
        self._rt = rt
        self.config = cfg = config or rt.config.watchdog
        self.restart_requested: str | None = None
        self.registry = TaskRegistry()
        self.loop = LoopMonitor(
            block_threshold_s=cfg.block_threshold_ms / 1000, stall_dump_s=cfg.stall_dump_s
        )
        self.memory = MemoryWatch(cfg, self._request_restart)
        self.leaks = LeakWatch(cfg, lambda: self.registry.alive, lambda: self.registry.total)
        self.stuck = StuckWatch(rt.dispatcher, rt.live, cfg.stuck_margin_s)
        self.pinger = SystemdPinger(rt.health)
        if cfg.enabled:
            self.stuck.attach()
            rt.health.register(self._checks)
        rt.status_sections["watchdog"] = self.status
        rt.watchdog = self

    def _request_restart(self, reason: str) -> None:
        """max_rss_mb: drain and exit with EX_RESTART (app.py reads the flag)."""
        if self.restart_requested is None:
            self.restart_requested = reason
            self._rt.request_stop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        with contextlib.ExitStack() as hooks:
            if cfg.enabled:
                loop = asyncio.get_running_loop()
                hooks.enter_context(self.registry.installed(loop))
                hooks.enter_context(warnings_to_log())
                hooks.enter_context(loop_exceptions_to_log(loop))
                hooks.enter_context(faulthandler_enabled())
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.pinger.run, name="watchdog.systemd")
                if cfg.enabled:
                    now = anyio.current_time()
                    self.memory.start(now)
                    self.leaks.start(now)
                    await tg.start(self.loop.run, name="watchdog.loop")
                    tg.start_soon(self._sample, name="watchdog.sampler")
                    tg.start_soon(self.memory.run, name="watchdog.memory")
                    tg.start_soon(self.stuck.run, name="watchdog.stuck")
                task_status.started()

    async def _sample(self) -> None:
        """Every `sample_s`: one psutil read (in a thread) for memory and leaks."""
        proc = psutil.Process()
        next_at = anyio.current_time()
        while True:
            try:
                sample = await anyio.to_thread.run_sync(read_process, proc)
                now = anyio.current_time()
                self.memory.observe(sample, now)
                self.leaks.observe(sample, now)
            except (psutil.Error, OSError) as exc:  # one failed sample is not the end
                log.warning("watchdog.sample_failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("watchdog.sample_failed")
            now = anyio.current_time()
            next_at = max(next_at + self.config.sample_s, now)
            await anyio.sleep(next_at - now)

    def _checks(self) -> list[Check]:
        detector = self.loop.detector
        late_s = time.monotonic() - self.loop.due
        blocked = detector.blocked or (self.loop.running and late_s > self.loop.threshold_s)
        site = detector.current
        where = f" at {site.frame}" if site is not None else ""
        checks = [
            Check(name="loop", ok=not blocked, affects="live", reason=f"event loop blocked{where}")
        ]
        if self.config.max_rss_mb:
            checks.append(
                Check(
                    name="memory",
                    ok=not self.memory.over_limit,
                    reason=f"RSS over watchdog.max_rss_mb ({self.config.max_rss_mb} MB): "
                    "restarting",
                )
            )
        return checks

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {"enabled": self.config.enabled}
        if self.config.enabled:
            data.update(
                loop=self.loop.status(),
                memory=self.memory.status(),
                leaks=self.leaks.status(),
                stuck=self.stuck.status(),
            )
        data["systemd"] = self.pinger.status()
        data["restart_requested"] = self.restart_requested
        return data
