"""The PostgreSQL store's part of results out (see `store.outbox`): events read in
transaction-id order below the oldest running transaction, deliveries claimed with
SKIP LOCKED so the nodes of a cluster share the sending (a mixin: the store owns the
pool)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from daemon.store.base import JOB_COLUMNS, row_to_job
from daemon.store.outbox import (
    DELIVERY_COLUMNS,
    PRUNE_BATCH,
    Cursor,
    CursorExpired,
    Delivery,
    DeliveryEnd,
    EventPage,
    WebhookCounts,
    WebhookRoute,
    counts_of,
    delivery_of,
    event_of,
)
from daemon.store.pg_reads import PgReads

_EVENT_COLUMNS = "e.xid, e.seq, e.job_id, e.analyzer, e.state, e.at, " + ", ".join(
    f"j.{c.strip()}" for c in JOB_COLUMNS.split(",")
)
_RETURNED = ", ".join(f"d.{c}" for c in DELIVERY_COLUMNS.split(", "))
# Every transaction with an id below this has ended: events up to it are final.
_SETTLED = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


def _check_horizon(after: Cursor, xid: int | None, seq: int | None) -> None:
    """CursorExpired if retention pruned events after `after` (the beginning reads
    what is kept)."""
    if xid is not None and seq is not None and after != Cursor() and after < Cursor(xid, seq):
        raise CursorExpired(str(after), str(Cursor(xid, seq)))


def ends_sql(ended: str) -> str:
    """CTEs writing, for each row of the CTE `ended` (id, analyzer, state, at: jobs this
    statement ends), its event and a delivery per webhook that wants it. Appended to
    the statement that ends the jobs, so they commit together. (Data-modifying CTEs run
    to completion whether the statement reads them or not.) A row trigger did this
    first; it cost 4-7 % of a cluster's throughput, one PL/pgSQL call a job."""
    return (
        f"ev AS (INSERT INTO events (job_id, analyzer, state, at) "
        f"SELECT id, analyzer, state, at FROM {ended} ORDER BY id "
        "RETURNING seq, job_id, analyzer, state, at), "
        "dl AS (INSERT INTO deliveries (webhook, seq, job_id, event, next_at, created_at) "
        "SELECT w.name, ev.seq, ev.job_id, 'job.' || ev.state, ev.at, ev.at "
        "FROM ev JOIN webhooks w ON ('job.' || ev.state) = ANY (w.events) "
        "AND (cardinality(w.analyzers) = 0 OR ev.analyzer = ANY (w.analyzers)) RETURNING 1) "
    )


class PgOutbox(PgReads):
    _tx: Callable[..., AbstractAsyncContextManager[Any]]  # the store's write transaction

    async def events_after(self, after: Cursor, limit: int) -> EventPage:
        """Up to `limit` job ends after `after`, in order, each with its job; the
        horizon read with the page too (one statement, one snapshot), as on SQLite."""
        pruned = await self._fetch("SELECT xid, seq FROM events_pruned WHERE id = 1")
        _check_horizon(after, pruned[0][0] if pruned else None, pruned[0][1] if pruned else None)
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS}, p.xid, p.seq FROM events e "
            "LEFT JOIN jobs j ON j.id = e.job_id LEFT JOIN events_pruned p ON p.id = 1 "
            f"WHERE (e.xid, e.seq) > ($1, $2) AND e.xid < {_SETTLED} "
            "ORDER BY e.xid, e.seq LIMIT $3",
            after.xid,
            after.seq,
            limit,
        )
        if rows:
            _check_horizon(after, rows[0][-2], rows[0][-1])
        events = [
            event_of(
                Cursor(r[0], r[1]), r[2], r[3], r[4], r[5], row_to_job(r[6:-2]) if r[6] else None
            )
            for r in rows
        ]
        return EventPage(events, events[-1].cursor if events else str(after))

    async def events_head(self) -> Cursor:
        rows = await self._fetch(
            f"SELECT xid, seq FROM events WHERE xid < {_SETTLED} ORDER BY xid DESC, seq DESC "
            "LIMIT 1"
        )
        return Cursor(rows[0][0], rows[0][1]) if rows else Cursor()

    async def prune_events(self, before: float) -> int:
        """One batch of the oldest events that ended before `before` (a prefix in
        order, so the horizon a cursor is checked against is exact); the newest stays,
        as on SQLite."""
        async with self._tx() as conn:
            rows = await conn.fetch(
                f"SELECT xid, seq, at FROM events WHERE xid < {_SETTLED} "
                "AND (xid, seq) < (SELECT xid, seq FROM events ORDER BY xid DESC, seq DESC "
                "LIMIT 1) ORDER BY xid, seq LIMIT $1",
                PRUNE_BATCH,
            )
            last = None
            for xid, seq, at in rows:
                if at >= before:
                    break
                last = (xid, seq)
            if last is None:
                return 0
            gone = await conn.fetchval(
                "WITH d AS (DELETE FROM events WHERE (xid, seq) <= ($1, $2) RETURNING 1) "
                "SELECT count(*) FROM d",
                *last,
            )
            await conn.execute(
                "INSERT INTO events_pruned (id, xid, seq) VALUES (1, $1, $2) "
                "ON CONFLICT (id) DO UPDATE SET xid = $1, seq = $2",
                *last,
            )
        return int(gone)

    async def prune_deliveries(self, state: str, before: float) -> int:
        async with self._tx(single=True) as conn:
            gone = await conn.fetchval(
                "WITH d AS (DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries "
                "WHERE state = $1 AND finished_at < $2 LIMIT $3) RETURNING 1) "
                "SELECT count(*) FROM d",
                state,
                before,
                PRUNE_BATCH,
            )
        return int(gone)

    async def sync_webhooks(self, routes: Sequence[WebhookRoute]) -> None:
        """The configured webhooks (the last node to start or reload sets them: give
        every node the same `[webhooks]`)."""
        async with self._tx() as conn:
            await conn.execute("DELETE FROM webhooks")
            await conn.executemany(
                "INSERT INTO webhooks (name, events, analyzers) VALUES ($1, $2, $3)",
                [(r.name, list(r.events), list(r.analyzers)) for r in routes],
            )

    async def claim_deliveries(self, webhook: str, limit: int, lease_s: float) -> list[Delivery]:
        now = time.time()
        async with self._tx(single=True) as conn:
            rows = await conn.fetch(
                "WITH c AS (SELECT id FROM deliveries WHERE state = 'pending' AND webhook = $1 "
                "AND next_at <= $2 ORDER BY next_at, seq LIMIT $3 FOR UPDATE SKIP LOCKED) "
                "UPDATE deliveries d SET attempts = d.attempts + 1, next_at = $4 FROM c "
                f"WHERE d.id = c.id RETURNING {_RETURNED}",
                webhook,
                now,
                limit,
                now + lease_s,
            )
        return sorted((delivery_of(r) for r in rows), key=lambda d: d.created_at)

    async def end_delivery(self, delivery_id: str, end: DeliveryEnd) -> None:
        now = time.time()
        state = "delivered" if end.delivered else "dead" if end.retry_at is None else "pending"
        async with self._tx(single=True) as conn:
            await conn.execute(
                "UPDATE deliveries SET state = $1, next_at = $2, finished_at = $3, "
                "last_status = $4, last_error = $5 WHERE id = $6 AND state = 'pending'",
                state,
                now if end.retry_at is None else end.retry_at,
                None if state == "pending" else now,
                end.status,
                end.error,
                delivery_id,
            )

    async def next_delivery_at(self, webhook: str) -> float | None:
        rows = await self._fetch(
            "SELECT min(next_at) FROM deliveries WHERE state = 'pending' AND webhook = $1",
            webhook,
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def webhook_counts(self) -> dict[str, WebhookCounts]:
        rows = await self._fetch(
            "SELECT webhook, state, count(*), min(created_at) FROM deliveries "
            "WHERE state IN ('pending', 'dead') GROUP BY webhook, state"
        )
        return counts_of(rows)

    async def retry_dead(self, webhook: str) -> int:
        async with self._tx(single=True) as conn:
            n = await conn.fetchval(
                "WITH r AS (UPDATE deliveries SET state = 'pending', attempts = 0, "
                "next_at = $1, finished_at = NULL WHERE webhook = $2 AND state = 'dead' "
                "RETURNING 1) SELECT count(*) FROM r",
                time.time(),
                webhook,
            )
        return int(n)
