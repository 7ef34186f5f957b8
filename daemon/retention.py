"""Finished jobs are kept for a while, then deleted with their attempts, so the tables
stay bounded however long the daemon runs: `[retention]` gives an age per way of
ending (`succeeded_days`, `failed_days`, `canceled_days`; 0 keeps them), and the older
`queue.retain_finished_s` one age for all of them; where both apply the shorter wins.

Off the hot path: small batches (BATCH jobs a transaction) with a pause between them,
so the writer's queue never waits long behind a prune. The `calls` table (spend
history) is left alone. Job-end events and delivered webhook deliveries are kept
EVENTS_KEEP_S (a stream's cursor older than that is refused), dead-lettered
deliveries as long as failed jobs."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.config import Config
from daemon.jobs import State
from daemon.live import Live
from daemon.store.base import JobStore, StoreError
from daemon.store.bulk import run_bulk
from daemon.store.filters import BulkRow, JobFilter
from daemon.store.outbox import EVENTS_KEEP_S

log = structlog.get_logger("vigil.retention")
MAX_EVERY_S = 60.0
DAY_S = 86_400.0
BATCH = 500  # jobs deleted per transaction
PAUSE_S = 0.05  # between batches: other writes go first
FINISHED: tuple[State, ...] = ("succeeded", "failed", "canceled")


def keep_for(config: Config) -> dict[State, float]:
    """How long each finished state is kept, in seconds (0: forever)."""
    days = config.retention
    older = config.queue.retain_finished_s
    out: dict[State, float] = {}
    for state, keep_days in zip(
        FINISHED, (days.succeeded_days, days.failed_days, days.canceled_days), strict=True
    ):
        ages = [age for age in (keep_days * DAY_S, older) if age > 0]
        out[state] = min(ages) if ages else 0.0
    return out


class Retention:
    """Prunes finished jobs past their age, reading the live config each round (a
    reload applies); its figures are the status section `retention` (and metrics)."""

    def __init__(
        self, store: JobStore, live: Live, sections: dict[str, Callable[[], Any]] | None = None
    ) -> None:
        self._store = store
        self._live = live
        self.deleted_by_state: Counter[str] = Counter()
        self.outbox_deleted: Counter[str] = Counter()  # events, deliveries
        self.last_run: float | None = None  # unix time the last round ended
        self.last_deleted = 0
        self.last_error: str | None = None
        if sections is not None:
            sections["retention"] = self.status

    @property
    def deleted(self) -> int:
        return self.deleted_by_state.total()

    def status(self) -> dict[str, Any]:
        return {
            "keep_s": dict(keep_for(self._live.config)),
            "deleted": {state: self.deleted_by_state[state] for state in FINISHED},
            "events_deleted": self.outbox_deleted["events"],
            "deliveries_deleted": self.outbox_deleted["deliveries"],
            "last_run": self.last_run,
            "last_deleted": self.last_deleted,
            "last_error": self.last_error,
        }

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """A round every tenth of the shortest age (1 s to MAX_EVERY_S); a failed round
        is logged, not fatal: the next one tries again."""
        task_status.started()
        while True:
            keep = keep_for(self._live.config)
            try:
                await self.prune(keep)
            except StoreError as exc:
                self.last_error = str(exc)
                log.warning("retention.failed", error=str(exc))
            ages = [age for age in keep.values() if age > 0]
            await anyio.sleep(min(MAX_EVERY_S, max(1.0, min(ages) / 10)) if ages else MAX_EVERY_S)

    async def prune(self, keep: dict[State, float], now: float | None = None) -> int:
        """One round: each state's jobs finished longer ago than its age, deleted;
        counted batch by batch, so a round cut short still counts what it did."""
        now = time.time() if now is None else now
        gone: Counter[str] = Counter()

        def count(rows: Sequence[BulkRow]) -> None:
            gone.update(row.was for row in rows)
            self.deleted_by_state.update(row.was for row in rows)

        for state, age in keep.items():
            if age > 0:
                await run_bulk(
                    self._store,
                    "purge",
                    JobFilter(states=(state,), finished_before=now - age),
                    max_backlog=self._live.config.queue.max_backlog,
                    batch=BATCH,
                    pause_s=PAUSE_S,
                    on_rows=count,
                )
        await self._prune_outbox(now, keep["failed"])
        self.last_run, self.last_deleted, self.last_error = time.time(), gone.total(), None
        if gone:
            log.info("retention.purged", deleted=gone.total(), by_state=dict(gone))
        return gone.total()

    async def _prune_outbox(self, now: float, failed_s: float) -> None:
        """Old events and ended deliveries, a batch at a time, until none is left."""
        store = self._store
        while n := await store.prune_events(now - EVENTS_KEEP_S):
            self.outbox_deleted["events"] += n
            await anyio.sleep(PAUSE_S)
        ages = {"delivered": EVENTS_KEEP_S, "dead": failed_s}
        for state, age in ages.items():
            while age > 0 and (n := await store.prune_deliveries(state, now - age)):
                self.outbox_deleted["deliveries"] += n
                await anyio.sleep(PAUSE_S)
