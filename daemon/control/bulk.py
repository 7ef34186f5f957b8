"""The bulk commands: `cancel`, `retry` and `purge`, for one job by id (as always) or
for every job a filter matches, in bounded batches (`daemon.store.bulk`). A filter
that is missing altogether is refused unless `all` is set, with what it would touch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from daemon.control.protocol import Args, CommandError
from daemon.jobs import BatchId, State, Tag, UnixTime
from daemon.runtime import Runtime
from daemon.store.base import Canceled
from daemon.store.bulk import BulkResult, run_bulk
from daemon.store.filters import ACTS_ON, BulkAction, BulkRow, JobFilter

MAX_IDS = 1000  # ids in one filter (the status page acts on the jobs it shows)
VERB = {"cancel": "cancel", "retry": "retry", "purge": "delete"}


class FilterArgs(Args, frozen=True):
    """Which jobs a bulk command acts on (every field set must match), and how."""

    state: State | None = None
    analyzer: str | None = None
    error_type: str | None = None
    since: UnixTime | None = None  # created at or after (unix time)
    until: UnixTime | None = None  # created before
    before: str | None = None  # id below this one (ids are time-ordered)
    tag: Tag | None = None  # carries this tag
    batch: BatchId | None = None
    ids: Annotated[list[str], Meta(max_length=MAX_IDS)] | None = None  # one of these jobs
    dry_run: bool = False  # count and sample, change nothing
    all: bool = False  # no filter: act on every job the command can touch

    def job_filter(self) -> JobFilter:
        return JobFilter(
            states=None if self.state is None else (self.state,),
            analyzer=self.analyzer,
            error_type=self.error_type,
            since=self.since,
            until=self.until,
            before=self.before,
            tag=self.tag,
            batch=self.batch,
            ids=None if self.ids is None else tuple(self.ids),
        )

    def filtered(self) -> bool:
        return self.job_filter() != JobFilter()


class CancelArgs(FilterArgs, frozen=True):
    id: str | None = None


class RetryArgs(FilterArgs, frozen=True):
    id: str | None = None
    failed: bool = False  # the older form of state: failed


class PurgeArgs(FilterArgs, frozen=True):
    older_than_s: Annotated[float, Meta(ge=0)] | None = None  # finished at least this long ago


def _one_id(args: CancelArgs | RetryArgs) -> str | None:
    """The job id of the single-job form, or None; an id with a filter is refused."""
    if args.id is None:
        return None
    if args.filtered() or args.dry_run or args.all or getattr(args, "failed", False):
        raise CommandError("bad_args", "give either a job id or a filter, not both")
    return args.id


async def _bulk(
    rt: Runtime, action: BulkAction, args: FilterArgs, flt: JobFilter, filtered: bool
) -> dict[str, Any]:
    if args.state is not None and args.state not in ACTS_ON[action]:
        can = ", ".join(ACTS_ON[action])
        raise CommandError(
            "bad_args",
            f"{action}: state {args.state} never matches: {action} acts only on {can} jobs",
            [{"index": None, "field": "state", "message": f"{action} acts only on {can}"}],
        )
    if args.since is not None and args.until is not None and args.since > args.until:
        raise CommandError("bad_args", f"{action}: since is after until")
    max_backlog = rt.config.queue.max_backlog
    if not filtered and not args.all and not args.dry_run:
        would = await run_bulk(rt.store, action, flt, dry_run=True, max_backlog=max_backlog)
        raise CommandError(
            "filter_required",
            f"{action} without a filter would {VERB[action]} {_summary(would)}; "
            "pass all (--all) to do that, or a filter",
            msgspec.to_builtins(would),
        )

    def canceled(rows: Sequence[BulkRow]) -> None:
        for row in rows:
            rt.dispatcher.job_canceled(row.id, Canceled(row.was, row.analyzer))

    on_rows = canceled if action == "cancel" else None
    result = await run_bulk(
        rt.store, action, flt, dry_run=args.dry_run, max_backlog=max_backlog, on_rows=on_rows
    )
    return {**msgspec.to_builtins(result), "action": action, "dry_run": args.dry_run}


def _summary(result: BulkResult) -> str:
    """ "3657 jobs (succeeded 3000, failed 600, canceled 57)"."""
    parts = ", ".join(f"{state} {n}" for state, n in result.by_state.items() if n)
    return f"{result.matched} job(s)" + (f" ({parts})" if parts else "")


async def cancel(rt: Runtime, args: CancelArgs) -> Any:
    job_id = _one_id(args)
    if job_id is not None:
        canceled = await rt.store.cancel(job_id)
        rt.dispatcher.job_canceled(job_id, canceled)
        return {"id": job_id, "was": canceled.was, "state": "canceled"}
    return await _bulk(rt, "cancel", args, args.job_filter(), args.filtered())


async def retry(rt: Runtime, args: RetryArgs) -> Any:
    job_id = _one_id(args)
    if job_id is not None:
        n = await rt.store.retry([job_id], max_backlog=rt.config.queue.max_backlog)
        return {"requeued": n}
    flt = args.job_filter()
    if args.failed:
        if args.state not in (None, "failed"):
            raise CommandError("bad_args", "failed: true means state failed; give one of them")
        flt = msgspec.structs.replace(flt, states=("failed",))
    data = await _bulk(rt, "retry", args, flt, args.filtered() or args.failed)
    return {**data, "requeued": data["changed"]}


async def purge(rt: Runtime, args: PurgeArgs) -> Any:
    flt = args.job_filter()
    if args.older_than_s is not None:
        flt = msgspec.structs.replace(flt, finished_before=time.time() - args.older_than_s)
    data = await _bulk(rt, "purge", args, flt, args.filtered() or args.older_than_s is not None)
    return {**data, "deleted": data["changed"]}
