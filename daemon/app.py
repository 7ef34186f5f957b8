"""Assembles the daemon in dependency order and runs it until told to stop.

store -> providers -> runtime -> task group {dispatcher, webhooks, control socket, signals}.
Shutdown is one ordered, bounded, logged sequence, here and nowhere else: stop
intake, drain running attempts for `shutdown_grace_s`, requeue the rest, close the
services, let the store commit what is pending and checkpoint."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import structlog

from daemon import __version__, systemd
from daemon.analyzers import build_analyzers
from daemon.config import Config, redacted
from daemon.control.commands import obey
from daemon.control.server import ControlServer
from daemon.errors import StartupError
from daemon.intake.http import HttpServer
from daemon.intake.spool import SpoolIntake
from daemon.intake.submit import Intake
from daemon.live import Live
from daemon.observe.logs import LineWriter
from daemon.observe.ring import LogRing
from daemon.observe.sdstatus import extend_while_draining, report_status
from daemon.providers.client import ApiProvider
from daemon.providers.shared_state import ProviderSync
from daemon.queue import Dispatcher
from daemon.reload import ReloadError, reload
from daemon.retention import Retention
from daemon.runtime import Runtime
from daemon.simulated.server import SimulatedAPI, serve_simulated
from daemon.spend.guard import SpendGuard
from daemon.store.base import JobStore
from daemon.store.open import open_store
from daemon.watchdog.introspect import log_stacks
from daemon.watchdog.service import EX_RESTART, Watchdog
from daemon.webhooks.secrets import read_secrets, routes
from daemon.webhooks.sender import WebhookSender
from daemon.worker import Worker

log = structlog.get_logger("vigil.app")


class StateDirLocked(StartupError):
    """Another daemon uses this state directory."""


@asynccontextmanager
async def _state_lock(state_dir: Path) -> AsyncIterator[None]:
    """One daemon per state directory: a second one would be a second writer."""
    try:
        await anyio.Path(state_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "vigil.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # read-only, not ours, missing parent...
        raise StartupError(
            f"cannot use the state directory {state_dir}: {exc.strerror or exc}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirLocked(
                f"another vigil daemon is using {state_dir} (lock held on vigil.lock)"
            ) from None
        yield
    finally:
        os.close(fd)


async def _open_providers(
    config: Config, stack: AsyncExitStack
) -> tuple[dict[str, ApiProvider], dict[str, SimulatedAPI]]:
    providers: dict[str, ApiProvider] = {}
    simulated: dict[str, SimulatedAPI] = {}
    for name, cfg in config.providers.items():
        base_url = None
        if cfg.kind == "simulated":
            simulated[name], base_url = await stack.enter_async_context(
                serve_simulated(cfg.simulate)
            )
        providers[name] = await stack.enter_async_context(ApiProvider(name, cfg, base_url))
    return providers, simulated


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def block_signals() -> None:
    """Hold the daemon's signals back until `_watch_signals` receives them: before that
    (opening and recovering the store, say) their default actions would kill the
    process, SIGHUP and SIGUSR1 included. Threads started meanwhile inherit the mask,
    so every one of these signals reaches the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


async def _watch_signals(rt: Runtime, force: anyio.CancelScope) -> None:
    """The one owner of signals: the first TERM/INT drains, a second one forces;
    HUP reloads the config; USR1 writes every thread's and task's stack to the log."""
    with anyio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
        # Held back since start (`block_signals`): delivered now, to the receiver.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        try:
            await _handle_signals(rt, force, signals)
        finally:
            # Held back again before the receiver goes: the rest of shutdown (requeue,
            # checkpoint) must not meet a late signal's default action.
            block_signals()


async def _handle_signals(
    rt: Runtime, force: anyio.CancelScope, signals: AsyncIterator[int]
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            log_stacks(reason="SIGUSR1")
            continue
        if signum == signal.SIGHUP:
            with contextlib.suppress(ReloadError):  # logged; the old config stays
                await reload(rt)
            continue
        if rt.stopping:
            log.warning("daemon.forced_stop", signal=name)
            force.cancel()
            return
        log.info("daemon.stop_requested", signal=name)
        rt.request_stop()


async def run_daemon(
    config: Config,
    *,
    config_path: str | None = None,
    log_ring: LogRing | None = None,
    log_writer: LineWriter | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    started = time.monotonic()
    requeued: int | None = None  # stays None when a second signal cut the drain short
    secrets = read_secrets(config.webhooks)  # a missing key: ConfigError, exit 78
    async with (
        _state_lock(config.state_dir),
        open_store(config) as store,
    ):
        if any(store.recovered.values()):
            log.warning("store.recovered", **store.recovered)
        # Before any job ends here: the trigger that writes deliveries matches these.
        await store.sync_webhooks(routes(config))
        async with AsyncExitStack() as stack:
            providers, simulated = await _open_providers(config, stack)
            rt = _build_runtime(config, store, providers)
            spend = rt.spend
            assert spend is not None
            await spend.load()  # the day's and month's spend so far, before any call
            if store.cluster is not None:
                store.cluster.on_command = functools.partial(obey, rt)
            rt.simulated = simulated
            sender = rt.webhooks = WebhookSender(
                store, config.webhooks, secrets, rt.status_sections
            )
            sender.follow(rt.dispatcher)
            rt.config_path = config_path
            if log_ring is not None:
                rt.log_ring = log_ring
            rt.log_writer = log_writer
            control = ControlServer(rt, config.socket_path, config.daemon.socket_group)
            # Built before the dispatcher starts, so its metrics see every attempt.
            http = HttpServer(rt, config.http) if config.http.listen else None
            watchdog = Watchdog(rt)
            async with anyio.create_task_group() as tg:
                # Signals first: a SIGTERM during start-up then drains like any other.
                tg.start_soon(_watch_signals, rt, tg.cancel_scope, name="signals")
                await tg.start(watchdog.run, name="watchdog")
                await tg.start(spend.run, name="spend.refresh")
                await tg.start(rt.dispatcher.run)
                await tg.start(Retention(store, rt.live, rt.status_sections).run, name="retention")
                # Sends until the final cancel: deliveries of jobs ending in the drain go
                # out too; in-flight POSTs are then cut off, never waited for.
                await tg.start(sender.run, name="webhooks")
                if store.provider_state is not None:
                    sync = ProviderSync(providers, store.provider_state, config.store.node)
                    await tg.start(sync.run, name="providers.sync")
                await tg.start(control.run)
                # Stays up while draining (/readyz answers 503); the final cancel stops it.
                http_url = await tg.start(http.run) if http else None
                # What start-up built lives as long as the process: out of the collector's
                # sight, a full collection no longer rescans it (40-70 ms pauses under load).
                gc.collect()
                gc.freeze()
                systemd.notify("READY=1")
                rt.ready = True
                tg.start_soon(report_status, rt, name="systemd.status")
                log.info(
                    "daemon.started",
                    pid=os.getpid(),
                    version=__version__,
                    socket=str(control.path),
                    http=http_url,
                    db=store.location,
                    jobs=dict(store.counts),
                    config=redacted(config),
                )
                if config.intake.spool is not None:
                    spool = SpoolIntake(rt.intake, store, rt.live)
                    rt.status_sections["spool"] = spool.status
                    rt.health.register(spool.check)
                    # Stops claiming once intake closes (below); keeps moving finished
                    # files out while draining; the final cancel stops it.
                    await tg.start(spool.run, name="spool")
                while not rt.stopping:
                    await rt.stop_requested.wait()
                systemd.notify("STOPPING=1")
                rt.intake.closed_reason = "the daemon is shutting down"
                grace = config.daemon.shutdown_grace_s
                log.info("daemon.draining", running=len(rt.dispatcher.active), grace_s=grace)
                async with anyio.create_task_group() as drain_tg:
                    drain_tg.start_soon(extend_while_draining, rt.dispatcher)
                    requeued = await rt.dispatcher.drain(grace)
                    drain_tg.cancel_scope.cancel()
                tg.cancel_scope.cancel()
    # max_rss_mb asked for a restart: a distinct exit code systemd restarts on.
    code = EX_RESTART if watchdog.restart_requested else 0
    log.info(
        "daemon.stopped",
        exit_code=code,
        restart_reason=watchdog.restart_requested,
        requeued=requeued,
        jobs=dict(store.counts),
        accepted=rt.intake.accepted,
        finished=rt.dispatcher.finished,
        uptime_s=round(time.monotonic() - started, 1),
    )
    return code


def _build_runtime(config: Config, store: JobStore, providers: dict[str, ApiProvider]) -> Runtime:
    live = Live(config, build_analyzers(config))
    for name, provider in providers.items():
        # A circuit that closes frees its held jobs: claim them now, not at the next poll.
        provider.breaker.on_close = store.wakeup.notify
        # In a cluster the budgets and 429 holds are the database's, keyed by provider.
        provider.limits.shared, provider.limits.shared_key = store.rates, name
    guard = SpendGuard(store)
    guard.configure(config)
    worker = Worker(live, providers, guard=guard)
    dispatcher = Dispatcher(
        store,
        worker.attempt,
        max_concurrency=config.queue.max_concurrency,
        held_analyzers=worker.held_analyzers,
        shared=bool(config.store.url),
    )
    # An attempt's calls are in the store once its end is: the guard stops counting
    # them as its own unstored spend.
    dispatcher.on_finish.append(lambda job, end, new: guard.recorded(end.calls))
    rt = Runtime(live, store, providers, Intake(store, live), dispatcher, spend=guard)
    rt.status_sections["budgets"] = guard.status
    return rt
