"""Results out to the next system: job ends in order from a resumable cursor
(`events`: one page, long-polled; `watch`: a stream), and `export`: every matching job
with its result, streamed a page at a time so memory stays flat however many there are.

Read from the store, not from memory: a client that reconnects (or a daemon that
restarted) resumes from its cursor and misses nothing. The stream polls the store
every POLL_S, so ends on other nodes of a cluster arrive as promptly as our own."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
import msgspec
from msgspec import Meta

from daemon.control.protocol import Args, CommandError
from daemon.jobs import BatchId, Job, State, Tag, UnixTime
from daemon.runtime import Runtime
from daemon.store.filters import JobFilter
from daemon.store.outbox import Cursor, CursorError, CursorExpired, EventPage, JobEvent

POLL_S = 0.25  # how often a waiting reader looks for new ends
PAGE = 100  # events read at a time
EXPORT_PAGE = 500  # jobs read at a time (each with its input and result)
Ended = Literal["succeeded", "failed", "canceled"]


class EventsArgs(Args, frozen=True):
    """Job ends after `after` (none: from now on; "0": every end still kept)."""

    after: Annotated[str, Meta(max_length=64)] | None = None
    analyzer: str | None = None
    state: Ended | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = PAGE
    wait: Annotated[float, Meta(ge=0, le=60)] = 0.0  # long-poll: wait this long for one
    # watch: a None item after this long without an end (an SSE keep-alive)
    heartbeat_s: Annotated[float, Meta(gt=0, le=300)] | None = None


class ExportArgs(Args, frozen=True):
    state: State | None = None
    analyzer: str | None = None
    since: UnixTime | None = None  # created at or after
    until: UnixTime | None = None  # created before
    tag: Tag | None = None
    batch: BatchId | None = None


class _Reader:
    """A cursor over the events, filtered; every page moves it past what it read."""

    def __init__(self, rt: Runtime, args: EventsArgs) -> None:
        self._rt = rt
        self._args = args
        self.cursor: Cursor | None = None

    async def start(self) -> None:
        try:
            after = self._args.after
            self.cursor = Cursor.parse(after) if after else await self._rt.store.events_head()
        except CursorError as exc:
            raise CommandError("bad_args", f"after: {exc}") from None

    async def page(self, limit: int) -> tuple[list[JobEvent], bool]:
        """The matching events of the next page, and whether it was a full one (more
        may be waiting)."""
        assert self.cursor is not None
        try:
            got: EventPage = await self._rt.store.events_after(self.cursor, limit)
        except CursorExpired as exc:
            raise CommandError("cursor_expired", str(exc)) from None
        self.cursor = Cursor.parse(got.cursor)
        args = self._args
        matched = [
            e
            for e in got.events
            if (args.analyzer is None or e.analyzer == args.analyzer)
            and (args.state is None or e.event == f"job.{args.state}")
        ]
        return matched, len(got.events) == limit


def job_view(job: Job) -> dict[str, Any]:
    """The job as the API shows it, without its input: what goes out to other systems
    (events, webhooks). An input can be large (queue.max_input_bytes, a page of events
    a hundred of them) and is the client's own; a reader that needs it asks the API."""
    data: dict[str, Any] = msgspec.to_builtins(job)
    del data["input"]
    return data


def event_data(event: JobEvent) -> dict[str, Any]:
    return {
        "cursor": event.cursor,
        "event": event.event,
        "job_id": event.job_id,
        "analyzer": event.analyzer,
        "at": event.at,
        "job": None if event.job is None else job_view(event.job),
    }


async def events(rt: Runtime, args: EventsArgs) -> Any:
    """One page of ends after the cursor; with `wait`, held until there is one (or
    the time is up). `cursor` is where the next call resumes."""
    reader = _Reader(rt, args)
    await reader.start()
    deadline = anyio.current_time() + args.wait
    while True:
        found, full = await reader.page(args.limit)
        left = deadline - anyio.current_time()
        if found or left <= 0:
            break
        if not full:
            await anyio.sleep(min(POLL_S, left))
    return {"events": [event_data(e) for e in found], "cursor": str(reader.cursor)}


async def watch(rt: Runtime, args: EventsArgs) -> AsyncIterator[Any]:
    """Every end from the cursor on, one item each, until the client leaves (each
    event carries its cursor: resume from the last one seen). The first page is read
    here, so a bad or expired cursor is an error before anything is streamed."""
    reader = _Reader(rt, args)
    await reader.start()
    first = await reader.page(args.limit)
    return _follow(reader, args.limit, first, args.heartbeat_s)


async def _follow(
    reader: _Reader, limit: int, page: tuple[list[JobEvent], bool], heartbeat_s: float | None
) -> AsyncIterator[Any]:
    quiet_since = time.monotonic()
    while True:
        found, full = page
        for event in found:
            yield event_data(event)
        if found:
            quiet_since = time.monotonic()
        elif heartbeat_s is not None and time.monotonic() - quiet_since >= heartbeat_s:
            yield None
            quiet_since = time.monotonic()
        if not full:
            await anyio.sleep(POLL_S)
        page = await reader.page(limit)


async def export(rt: Runtime, args: ExportArgs) -> AsyncIterator[Any]:
    """Every matching job, newest first, a page at a time; the last line says the
    export is complete (`{"done": true, "jobs": N}`), so a cut-off one is told apart.
    Jobs submitted after it starts are not in it."""
    flt = JobFilter(
        states=None if args.state is None else (args.state,),
        analyzer=args.analyzer,
        since=args.since,
        until=args.until,
        tag=args.tag,
        batch=args.batch,
    )
    first = await rt.store.list_jobs(flt, limit=EXPORT_PAGE)
    return _pages(rt, flt, first)


async def _pages(rt: Runtime, flt: JobFilter, page: list[Any]) -> AsyncIterator[Any]:
    sent = 0
    while page:
        for job in page:
            yield {"job": msgspec.to_builtins(job)}
        sent += len(page)
        if len(page) < EXPORT_PAGE:
            break
        flt = msgspec.structs.replace(flt, before=page[-1].id)
        page = await rt.store.list_jobs(flt, limit=EXPORT_PAGE, walk=True)
    yield {"done": True, "jobs": sent}
