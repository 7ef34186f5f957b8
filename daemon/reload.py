"""Live reload (SIGHUP, `vigil reload`): re-read the config, apply what can change
while running, and name what needs a restart.

A config that fails to parse or validate changes nothing: the daemon keeps running
on the old one and says why. What is applied: the log level, queue limits and
concurrency, analyzers (templates, handlers, attempts, timeouts), provider limits
and timeouts, base URLs, the spool's settings, the simulated API's behaviour, the
webhooks (added, removed, changed; their signing keys read again). What
needs a restart: anything that owns an open resource (state dir, socket, HTTP
listener, the spool's directory, a spool added or removed, providers added or
removed, a provider's kind, pool size or key variable). The reply names each key the
file changed, from and to, and whether it waits for a restart."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import anyio
import msgspec
import structlog

from daemon import systemd
from daemon.analyzers import Analyzer, build_analyzers
from daemon.config import (
    Config,
    ConfigError,
    ProviderConfig,
    SpoolConfig,
    load_config,
    redacted,
)
from daemon.config_rules import config_problems
from daemon.observe.logs import set_level
from daemon.runtime import Runtime
from daemon.store.base import StoreError
from daemon.webhooks.secrets import read_secrets, routes

log = structlog.get_logger("vigil.reload")


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One key the file changed (`queue.max_concurrency`), from and to its values as
    written in the config (a table added or removed is one change, `null` on the side
    it is missing from); `needs_restart` when the daemon keeps the old value for now."""

    key: str
    before: Any = msgspec.field(default=None, name="from")
    to: Any = None
    needs_restart: bool = False


class ReloadResult(msgspec.Struct, frozen=True, kw_only=True):
    applied: list[str]
    needs_restart: list[str]
    changes: list[Change] = []


class ReloadError(Exception):
    """The new config was refused; the daemon runs on as before."""


# What a running provider cannot change: its kind (another client or server), its
# connection pool, and its key variable (the log scrubber learns key values at start).
RESTART_ONLY = ("kind", "api_key_env", "max_connections")


def _restart_only_changes(before: ProviderConfig, after: ProviderConfig) -> list[str]:
    keys = [key for key in RESTART_ONLY if getattr(before, key) != getattr(after, key)]
    if before.simulate.dialect != after.simulate.dialect and "kind" not in keys:
        keys.append("simulate.dialect")  # the built-in API serves one dialect from start
    return keys


def _plan_spool(
    old: SpoolConfig | None, new: SpoolConfig | None, restart: list[str]
) -> SpoolConfig | None:
    """The spool settings to run on: the new ones, but the directory (it holds the
    files in flight) and the spool's presence need a restart."""
    if old is None or new is None:
        if old != new:
            restart.append(f"intake.spool ({'added' if old is None else 'removed'})")
        return old
    if new.dir != old.dir:
        restart.append("intake.spool.dir")
        return msgspec.structs.replace(new, dir=old.dir)
    return new


def _plan(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run on (new, with restart-only parts kept as they are), what
    changes, and what needs a restart."""
    restart: list[str] = []
    keep: dict[str, Any] = {}
    for section in ("daemon", "http", "watchdog"):
        if getattr(old, section) != getattr(new, section):
            restart.append(section)
            keep[section] = getattr(old, section)
    spool = _plan_spool(old.intake.spool, new.intake.spool, restart)
    if spool != new.intake.spool:
        keep["intake"] = msgspec.structs.replace(new.intake, spool=spool)
    if (old.log.format, old.log.ring_size) != (new.log.format, new.log.ring_size):
        restart.append("log.format/log.ring_size")
    providers = dict(new.providers)
    for name in sorted(old.providers.keys() | new.providers.keys()):
        before, after = old.providers.get(name), new.providers.get(name)
        if before is None or after is None:
            restart.append(f"providers.{name} ({'added' if before is None else 'removed'})")
            if before is None:
                providers.pop(name)
            else:
                providers[name] = before
        elif keys := _restart_only_changes(before, after):
            restart.extend(f"providers.{name}.{key}" for key in keys)
            # Another kind's settings mean something else (a simulated API's, an API's
            # base URL): kept whole. Otherwise the rest of its new settings apply.
            providers[name] = (
                before
                if "kind" in keys
                else msgspec.structs.replace(
                    after,
                    simulate=msgspec.structs.replace(
                        after.simulate, dialect=before.simulate.dialect
                    ),
                    **{key: getattr(before, key) for key in keys if key in RESTART_ONLY},
                )
            )
    planned = msgspec.structs.replace(
        new,
        providers=providers,
        log=msgspec.structs.replace(new.log, format=old.log.format, ring_size=old.log.ring_size),
        **keep,
    )
    # What was kept for a restart must still fit the rest (an analyzer on a provider
    # that is not running, a kept spool whose analyzer is gone): refused whole. With
    # nothing kept, the plan is the new config, checked when it was loaded.
    problems = config_problems(planned) if restart else []
    if problems:
        raise ReloadError("; ".join(problems) + " (parts that need a restart were kept)")
    changed = [
        field
        for field in ("log", "queue", "providers", "analyzers", "intake", "webhooks")
        if getattr(old, field) != getattr(planned, field)
    ]
    return planned, changed, restart


_ABSENT: Any = object()  # a key one side does not have (a table added or removed)


def _differences(
    before: Any, after: Any, path: tuple[str, ...], out: list[tuple[tuple[str, ...], Any, Any]]
) -> None:
    """The leaf keys where two configs (as plain data) differ, in the file's order."""
    if before == after:
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for key in [*before, *(k for k in after if k not in before)]:
            _differences(before.get(key, _ABSENT), after.get(key, _ABSENT), (*path, key), out)
        return
    out.append((path, None if before is _ABSENT else before, None if after is _ABSENT else after))


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def describe(old: Config, new: Config, planned: Config) -> list[Change]:
    """What the file changed, key by key; a change the plan did not take (it runs on
    the old value) needs a restart. The values are the config's own: variable names,
    never the secrets in them (nor a webhook URL's query)."""
    found: list[tuple[tuple[str, ...], Any, Any]] = []
    _differences(redacted(old), redacted(new), (), found)
    running = redacted(planned)
    return [
        Change(
            key=".".join(path),
            before=before,
            to=after,
            needs_restart=_lookup(running, path) != after,
        )
        for path, before, after in found
    ]


class _Prepared(NamedTuple):
    planned: Config
    changed: list[str]
    restart: list[str]
    changes: list[Change]
    analyzers: dict[str, Analyzer]
    secrets: dict[str, bytes]  # each webhook's signing key


def _prepare(old: Config, path: str | None) -> _Prepared:
    """Read, plan and build in one trip to a thread: the file, the checks (a group
    lookup may ask NSS) and the handlers' imports all block."""
    new = load_config(path)
    planned, changed, restart = _plan(old, new)
    return _Prepared(
        planned,
        changed,
        restart,
        describe(old, new, planned),
        build_analyzers(planned),
        read_secrets(planned.webhooks),
    )


async def reload(rt: Runtime) -> ReloadResult:
    """Apply the config file as it is now; raises ReloadError and changes nothing
    when it is invalid. systemd hears of it only between start-up and stop: READY=1
    before start-up is over, or after STOPPING=1, would tell it something false."""
    announce = rt.ready and not rt.stopping
    if announce:
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        try:
            planned, changed, restart, changes, analyzers, secrets = await anyio.to_thread.run_sync(
                _prepare, rt.config, rt.config_path
            )
            # The one write: refused, it leaves everything as it was.
            await rt.store.sync_webhooks(routes(planned))
        except (ConfigError, ReloadError, StoreError) as exc:
            log.error("reload.failed", error=str(exc), config=rt.config_path)
            raise ReloadError(str(exc)) from None
        except Exception as exc:  # anything else: the old config keeps running all the same
            log.error("reload.failed", error=f"{type(exc).__name__}: {exc}")
            raise ReloadError(f"{type(exc).__name__}: {exc}") from None
        rt.live.config = planned
        rt.live.analyzers = analyzers
        if rt.spend is not None:
            rt.spend.configure(planned)  # a raised budget applies to the next call
        set_level(planned.log.level)
        rt.dispatcher.set_max_concurrency(planned.queue.max_concurrency)
        for name, provider in rt.providers.items():
            cfg = planned.providers[name]
            provider.configure(cfg)
            simulated = rt.simulated.get(name)
            if simulated is not None:
                simulated.configure(cfg.simulate)
        if rt.log_writer is not None and rt.log_writer.redactor is not None:
            # A webhook added, or pointed at another variable: its key is masked too.
            rt.log_writer.redactor.learn(key.decode() for key in secrets.values())
        if rt.webhooks is not None:
            rt.webhooks.configure(planned.webhooks, secrets)
        rt.live.reloaded.notify()
        log.info(
            "reload.done",
            applied=changed,
            needs_restart=restart,
            changes=msgspec.to_builtins(changes),
        )
        return ReloadResult(applied=changed, needs_restart=restart, changes=changes)
    finally:
        if announce:
            systemd.notify("READY=1")
