"""What each control command does. Each takes typed args and returns plain data;
failures are CommandErrors with a code, so every surface reports them alike."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from daemon.control import bulk, results
from daemon.control.protocol import Args, CommandError
from daemon.intake.submit import IntakeClosed, SubmitError, field_error
from daemon.jobs import BatchId, Job, State, Tag, UnixTime
from daemon.observe.ring import LEVELS, LogFilter
from daemon.reload import ReloadError, reload
from daemon.runtime import Runtime
from daemon.spend.report import DEFAULT_SPAN_S, total_of
from daemon.store.base import (
    BacklogFull,
    ClusterCommand,
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    StoreError,
    UsageQuery,
)
from daemon.store.filters import JobFilter
from daemon.watchdog.introspect import task_report, thread_report
from daemon.webhooks import commands as webhooks


class NoArgs(Args, frozen=True):
    pass


class NodeArgs(Args, frozen=True):
    cluster: bool = False  # every node sharing the store, not only this one


class SubmitArgs(Args, frozen=True):
    jobs: Any
    # Which intake the jobs came through (HTTP passes "http"); recorded on each job.
    source: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]*$", max_length=32)] = "socket"


class JobsArgs(Args, frozen=True):
    state: State | None = None
    analyzer: str | None = None
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 50
    before: str | None = None
    tag: Tag | None = None
    batch: BatchId | None = None
    q: Annotated[str, Meta(min_length=1, max_length=100)] | None = None  # text in the id

    def job_filter(self, *, paged: bool) -> JobFilter:
        """The jobs asked for; `paged`: from the cursor on (else every page's)."""
        return JobFilter(
            states=None if self.state is None else (self.state,),
            analyzer=self.analyzer,
            tag=self.tag,
            batch=self.batch,
            id_contains=self.q,
            before=self.before if paged else None,
        )


class IdArgs(Args, frozen=True):
    id: str


class LogsArgs(Args, frozen=True):
    n: Annotated[int, Meta(ge=0, le=100_000)] = 50
    level: Literal["debug", "info", "warning", "error", "critical"] = "debug"
    job: str | None = None
    since: str | None = None  # ISO 8601 UTC, e.g. 2026-11-23T18:00:00Z
    follow: bool = False


class UsageArgs(Args, frozen=True):
    since: UnixTime | None = None  # default: DEFAULT_SPAN_S before `until`
    until: UnixTime | None = None  # default: now
    by: Literal["day", "analyzer", "provider", "model"] = "day"


class ProgressArgs(Args, frozen=True):
    ids: Annotated[list[str], Meta(max_length=100_000)] | None = None
    batch: BatchId | None = None  # instead of ids: every job of that batch


class DebugTasksArgs(Args, frozen=True):
    limit: Annotated[int, Meta(ge=1, le=100_000)] = 1000


class DebugMemoryArgs(Args, frozen=True):
    seconds: Annotated[float, Meta(ge=0.1, le=300)] = 5.0  # tracemalloc on for this long
    top: Annotated[int, Meta(ge=1, le=200)] = 20


def job_data(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(job)
    return data


async def status(rt: Runtime, _: NoArgs) -> Any:
    return rt.status()


async def submit(rt: Runtime, args: SubmitArgs) -> Any:
    submitted = await rt.intake.submit(args.jobs, source=args.source)
    return {
        "ids": [s.id for s in submitted],
        "created": sum(s.created for s in submitted),
        "existing": sum(not s.created for s in submitted),
    }


async def jobs(rt: Runtime, args: JobsArgs) -> Any:
    """Newest first. One row past the page tells whether another page exists, so
    `next_before` (the cursor to pass as `before`) is null on the last page; `total`
    counts every job the filter matches, on every page; null with `q`, whose match
    is a scan: the page stops at `limit` matches, a count would read every job."""
    found = await rt.store.list_jobs(args.job_filter(paged=True), limit=args.limit + 1)
    page = found[: args.limit]
    more = len(found) > args.limit
    total = None
    if args.q is None:
        total = sum((await rt.store.count_jobs(args.job_filter(paged=False))).values())
    return {
        "jobs": [job_data(j) for j in page],
        "next_before": page[-1].id if more else None,
        "total": total,
    }


async def usage(rt: Runtime, args: UsageArgs) -> Any:
    """What the answered calls in [since, until) used and cost, one row per day
    (UTC), analyzer, provider or model, and their total."""
    until = time.time() if args.until is None else args.until
    since = until - DEFAULT_SPAN_S if args.since is None else args.since
    if since > until:
        raise CommandError(
            "bad_args",
            f"usage: since: {since:.0f} is after until ({until:.0f})",
            [{"index": None, "field": "since", "message": "after until"}],
        )
    rows = await rt.store.usage(UsageQuery(since=since, until=until, by=args.by))
    return {
        "since": since,
        "until": until,
        "by": args.by,
        "rows": msgspec.to_builtins(rows),
        "total": msgspec.to_builtins(total_of(rows)),
    }


async def show(rt: Runtime, args: IdArgs) -> Any:
    job = await rt.store.get(args.id)
    if job is None:
        raise JobNotFound(args.id)
    attempts = await rt.store.attempts(args.id)
    return {"job": job_data(job), "attempts": msgspec.to_builtins(attempts)}


def pause_here(rt: Runtime) -> dict[str, Any]:
    rt.dispatcher.set_paused(True)
    return {"state": rt.state}


def resume_here(rt: Runtime) -> dict[str, Any]:
    """Resume starting attempts, reopen intake after a drain, and lift providers
    paused by a refused key or an exhausted quota (the operator says it is fixed).
    A provider whose key variable is not set stays paused, and the reply says why."""
    lifted: list[str] = []
    still: dict[str, str] = {}
    for name, provider in rt.providers.items():
        if provider.paused_reason:
            reason = provider.resume()
            if reason is None:
                lifted.append(name)
            else:
                still[name] = reason
    if rt.intake.closed_reason == DRAINING and not rt.stopping:
        rt.intake.closed_reason = None
    rt.dispatcher.set_paused(False)
    return {"state": rt.state, "providers_resumed": lifted, "providers_still_paused": still}


def drain_here(rt: Runtime) -> dict[str, Any]:
    """Stop intake and stop starting attempts; running ones finish. For maintenance:
    wait for `running` to reach 0, then stop or restart the daemon."""
    if not rt.stopping:
        rt.intake.closed_reason = DRAINING
    rt.dispatcher.set_paused(True)
    return {"state": rt.state, "running": len(rt.dispatcher.active)}


HERE: dict[ClusterCommand, Callable[[Runtime], dict[str, Any]]] = {
    "pause": pause_here,
    "resume": resume_here,
    "drain": drain_here,
}


async def obey(rt: Runtime, cmd: ClusterCommand) -> None:
    """A `--cluster` command another node (or this one) gave: apply it here."""
    HERE[cmd](rt)


async def _on_node(rt: Runtime, cmd: ClusterCommand, args: NodeArgs) -> Any:
    """`pause`, `resume`, `drain`: this node at once; with `cluster`, every node sharing
    the store too (each within about a second)."""
    if args.cluster:
        if rt.store.cluster is None:
            raise CommandError(
                "bad_args",
                "--cluster needs a store other daemons share (store.url): this daemon runs "
                "alone, so the command was not applied",
            )
        await rt.store.cluster.broadcast(cmd)
    return {**HERE[cmd](rt), "cluster": args.cluster}


async def pause(rt: Runtime, args: NodeArgs) -> Any:
    return await _on_node(rt, "pause", args)


async def resume(rt: Runtime, args: NodeArgs) -> Any:
    return await _on_node(rt, "resume", args)


async def drain(rt: Runtime, args: NodeArgs) -> Any:
    return await _on_node(rt, "drain", args)


async def logs(rt: Runtime, args: LogsArgs) -> Any:
    """Recent events from the ring; with `follow`, a stream of them until the client
    closes (each reply line's data is one event)."""
    flt = LogFilter(level=LEVELS[args.level], job_id=args.job, since=args.since)
    if args.follow:
        return _follow(rt, flt, args.n)
    entries, _ = rt.log_ring.recent(flt, args.n)
    return {"events": [msgspec.Raw(e.line) for e in entries]}


async def _follow(rt: Runtime, flt: LogFilter, n: int) -> AsyncIterator[Any]:
    async for entry in rt.log_ring.follow(flt, n):
        yield msgspec.Raw(entry.line)


DRAINING = "draining (vigil drain); `vigil resume` reopens"


async def reload_config(rt: Runtime, _: NoArgs) -> Any:
    try:
        result = await reload(rt)
    except ReloadError as exc:
        message = f"reload refused, still on the old config: {exc}"
        raise CommandError("reload_failed", message) from None
    return msgspec.to_builtins(result)


async def progress(rt: Runtime, args: ProgressArgs) -> Any:
    """Counts by state of the jobs named by `ids` (`unknown`: ids with no job), or of
    every job of `batch` (`total`: how many it has now)."""
    if (args.ids is None) == (args.batch is None):
        raise CommandError("bad_args", "progress: give either ids or batch")
    if args.batch is not None:
        counts = await rt.store.count_jobs(JobFilter(batch=args.batch))
        return {"counts": counts, "unknown": 0, "total": sum(counts.values())}
    ids = args.ids or []
    states = await rt.store.states_of(ids)
    counts = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return {"counts": counts, "unknown": len(ids) - len(states), "total": len(ids)}


async def ping(rt: Runtime, _: NoArgs) -> Any:
    return {"pong": True, "pid": rt.status()["pid"]}


async def debug_tasks(rt: Runtime, args: DebugTasksArgs) -> Any:
    """Every asyncio task: name, state, age, coroutine, stack (innermost first)."""
    created = rt.watchdog.registry.created if rt.watchdog is not None else None
    return task_report(created, args.limit)


async def debug_stacks(rt: Runtime, _: NoArgs) -> Any:
    """Every thread's stack (innermost first)."""
    return thread_report()


async def debug_memory(rt: Runtime, args: DebugMemoryArgs) -> Any:
    """RSS and the allocation sites that grew (tracemalloc, on for `seconds`)."""
    if rt.watchdog is None:
        raise CommandError("unavailable", "the watchdog is not running")
    return await rt.watchdog.memory.report(args.seconds, args.top)


# Commands that change something: the control socket logs who asked (peer uid, pid).
MUTATING = frozenset(
    {"submit", "retry", "cancel", "purge", "pause", "resume", "drain", "reload", "webhooks_retry"}
)

Handler = Callable[[Runtime, Any], Awaitable[Any]]
COMMANDS: dict[str, tuple[type[Args], Handler]] = {
    "status": (NoArgs, status),
    "submit": (SubmitArgs, submit),
    "jobs": (JobsArgs, jobs),
    "usage": (UsageArgs, usage),
    "show": (IdArgs, show),
    "retry": (bulk.RetryArgs, bulk.retry),
    "cancel": (bulk.CancelArgs, bulk.cancel),
    "purge": (bulk.PurgeArgs, bulk.purge),
    "pause": (NodeArgs, pause),
    "resume": (NodeArgs, resume),
    "progress": (ProgressArgs, progress),
    "logs": (LogsArgs, logs),
    "events": (results.EventsArgs, results.events),
    "watch": (results.EventsArgs, results.watch),
    "export": (results.ExportArgs, results.export),
    "drain": (NodeArgs, drain),
    "reload": (NoArgs, reload_config),
    "ping": (NoArgs, ping),
    "debug_tasks": (DebugTasksArgs, debug_tasks),
    "debug_stacks": (NoArgs, debug_stacks),
    "debug_memory": (DebugMemoryArgs, debug_memory),
    "webhooks": (webhooks.ListArgs, webhooks.list_webhooks),
    "webhooks_retry": (webhooks.RetryArgs, webhooks.retry),
}


async def execute(rt: Runtime, cmd: str, raw_args: dict[str, Any]) -> Any:
    """Run one command; every expected failure comes out as a CommandError."""
    entry = COMMANDS.get(cmd)
    if entry is None:
        raise CommandError(
            "unknown_command", f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})"
        )
    args_type, handler = entry
    try:
        args = msgspec.convert(raw_args, args_type)
    except msgspec.ValidationError as exc:
        error = field_error(exc, None, "args")
        details = [msgspec.to_builtins(error)]
        raise CommandError("bad_args", f"{cmd}: {error.field}: {error.message}", details) from None
    try:
        return await handler(rt, args)
    except SubmitError as exc:
        raise CommandError("invalid_job", str(exc), msgspec.to_builtins(exc.errors)) from None
    except BacklogFull as exc:
        raise CommandError("backlog_full", str(exc), {"retry_after_s": 5}) from None
    except IntakeClosed as exc:
        raise CommandError("intake_closed", str(exc)) from None
    except IdempotencyConflict as exc:
        conflict = {"key": exc.key, "id": exc.job_id}
        raise CommandError("idempotency_conflict", str(exc), conflict) from None
    except JobNotFound as exc:
        raise CommandError("not_found", str(exc)) from None
    except InvalidTransition as exc:
        raise CommandError("invalid_state", str(exc)) from None
    except StoreError as exc:
        raise CommandError("store_error", str(exc)) from None
