"""The running daemon's shared state: what observers (control commands, status)
read, and the few levers they pull. It owns nothing; app.py builds and runs it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from daemon import __version__
from daemon.config import Config
from daemon.intake.submit import Intake
from daemon.jobs import STATES
from daemon.live import Live
from daemon.observe.health import Check, Health
from daemon.observe.logs import LineWriter
from daemon.observe.ring import LogRing
from daemon.providers.client import ApiProvider
from daemon.queue import Dispatcher
from daemon.simulated.server import SimulatedAPI
from daemon.store.base import JobStore
from daemon.wakeup import Wakeup

if TYPE_CHECKING:
    from daemon.spend.guard import SpendGuard
    from daemon.watchdog.service import Watchdog
    from daemon.webhooks.sender import WebhookSender


@dataclass
class Runtime:
    live: Live
    store: JobStore
    providers: dict[str, ApiProvider]
    intake: Intake
    dispatcher: Dispatcher
    started_at: float = field(default_factory=time.time)
    stop_requested: Wakeup = field(default_factory=Wakeup)
    stopping: bool = False
    ready: bool = False  # READY=1 was sent: start-up is over
    health: Health = field(default_factory=Health)
    log_ring: LogRing = field(default_factory=LogRing)
    log_writer: LineWriter | None = None  # stdout's writer, when logging was configured
    config_path: str | None = None
    simulated: dict[str, SimulatedAPI] = field(default_factory=dict)
    watchdog: Watchdog | None = None  # set by app.py; the debug commands use it
    spend: SpendGuard | None = None  # the budgets (app.py); status, reload and metrics read it
    webhooks: WebhookSender | None = None  # the sender (app.py); reload and commands use it
    # Components add their own part of `status` here (watchdog, http, spool...).
    status_sections: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.health.register(self._core_checks)

    def _core_checks(self) -> list[Check]:
        queued, limit = self.store.counts["queued"], self.config.queue.max_backlog
        error = self.store.last_error
        checks = [
            Check(name="store", ok=error is None, reason=f"database unwritable: {error}"),
            Check(name="disk", ok=not self.store.low_space, reason=self.store.low_space or ""),
            Check(
                name="backlog",
                ok=queued < limit,
                reason=f"backlog full: {queued} queued, limit {limit}",
            ),
            Check(
                name="intake",
                ok=not self.intake.closed_reason,
                reason=self.intake.closed_reason or "",
            ),
        ]
        # A paused provider or an open circuit: its jobs wait, which is worth saying,
        # but the daemon is alive and still takes work.
        for name, p in self.providers.items():
            held = p.held_reason()
            checks.append(
                Check(name=f"provider.{name}", ok=held is None, affects="none", reason=held or "")
            )
        return checks

    @property
    def config(self) -> Config:
        return self.live.config

    def request_stop(self) -> None:
        self.stopping = True
        self.stop_requested.notify()

    @property
    def state(self) -> str:
        if self.stopping:
            return "stopping"
        if self.intake.closed_reason:
            return "draining"
        return "paused" if self.dispatcher.paused else "running"

    def status(self) -> dict[str, Any]:
        """The status every surface shows (socket, CLI, later HTTP)."""
        counts = self.store.counts
        return {
            "version": __version__,
            "pid": os.getpid(),
            "state": self.state,
            "uptime_s": round(time.time() - self.started_at, 1),
            "jobs": {state: counts[state] for state in STATES},
            "queue": {
                "max_concurrency": self.dispatcher.max_concurrency,
                "active": len(self.dispatcher.active),
                "max_backlog": self.config.queue.max_backlog,
                "paused": self.dispatcher.paused,
                "accepted": self.intake.accepted,
                "finished": self.dispatcher.finished,
            },
            "attempts": dict(self.dispatcher.outcomes),
            "providers": {name: provider_status(p) for name, p in self.providers.items()},
            "nodes": [msgspec.to_builtins(node) for node in self.store.nodes()],
            "store": {
                "backend": "postgresql" if self.config.store.url else "sqlite",
                "path": self.store.location,
                "commits": self.store.commits,
                "commit_errors": self.store.commit_errors,
                "finishes_refused": self.store.refused_finishes,
                "last_error": self.store.last_error,
                "low_space": self.store.low_space,
            },
            "socket": self.config.daemon.socket,
            "logs": self.log_writer.status() if self.log_writer else None,
            "health": msgspec.to_builtins(self.health.report()),
            **{name: section() for name, section in self.status_sections.items()},
        }


def provider_status(provider: ApiProvider) -> dict[str, Any]:
    """Requests by status, 429s, latency (avg, p50/p99), tokens, in-flight, budgets
    (levels and learned limits), cool-down, circuit state, concurrency limit."""
    return provider.status()
