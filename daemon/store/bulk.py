"""Bulk actions (cancel, retry, purge by filter; retention) on either store, in
bounded batches: each batch is one short write transaction of at most `batch` jobs,
so a bulk action over a million jobs never holds the writer long nor loads every id
into memory, and the store's counts follow each batch exactly."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import msgspec

from daemon.store.base import BacklogFull
from daemon.store.filters import ACTS_ON, BulkAction, BulkRow, JobFilter

if TYPE_CHECKING:
    from daemon.store.base import JobStore

BULK_BATCH = 1000  # jobs per transaction
SAMPLE = 10  # ids a bulk answer shows


class BulkResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a bulk action matched and changed (a dry run changes nothing), by the
    state the jobs were in, with a sample of their ids."""

    matched: int
    changed: int
    by_state: dict[str, int]
    sample: list[str]


async def run_bulk(
    store: JobStore,
    action: BulkAction,
    flt: JobFilter,
    *,
    dry_run: bool = False,
    max_backlog: int,
    batch: int = BULK_BATCH,
    pause_s: float = 0.0,
    on_rows: Callable[[Sequence[BulkRow]], None] | None = None,
) -> BulkResult:
    """Apply `action` to the jobs `flt` matches among those it can touch (ACTS_ON),
    batch by batch (`pause_s` between batches lets other writes through); jobs
    submitted meanwhile are left alone. `on_rows` sees each committed batch."""
    flt = flt.within(ACTS_ON[action]).settled_by(time.time())
    states = flt.states or ()
    if dry_run or action == "retry":
        found = await store.count_jobs(flt)
        matched = sum(found.values())
        if dry_run:
            by_state: dict[str, int] = {s: found.get(s, 0) for s in states}
            sample = await store.find_ids(flt, SAMPLE)
            return BulkResult(matched=matched, changed=0, by_state=by_state, sample=sample)
        queued = store.counts["queued"]
        if queued + matched > max_backlog:  # refused whole, before any batch
            raise BacklogFull(queued, max_backlog)
    done: Counter[str] = Counter()
    sample = []
    while True:
        rows = await store.bulk_step(action, flt, limit=batch, max_backlog=max_backlog)
        done.update(row.was for row in rows)
        sample.extend(row.id for row in rows[: SAMPLE - len(sample)])
        if on_rows is not None and rows:
            on_rows(rows)
        if len(rows) < batch:
            break
        await anyio.sleep(pause_s)
    changed = done.total()
    by_state = {str(s): done[s] for s in states}
    return BulkResult(matched=changed, changed=changed, by_state=by_state, sample=sample)
