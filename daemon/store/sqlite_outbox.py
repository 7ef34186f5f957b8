"""The SQLite store's part of results out (see `store.outbox`): each job end written
as an event with its deliveries, in the writer's transaction that ends the job
(`write_ends`); events read on the reader connection; deliveries claimed and ended
through the writer (a mixin: the store owns both connections)."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    route_lists,
    route_of,
)
from daemon.store.sqlite_batch import Tx, WriteOp
from daemon.store.sqlite_reads import SqliteReads

_EVENT_COLUMNS = "e.seq, e.job_id, e.analyzer, e.state, e.at, " + ", ".join(
    f"j.{c.strip()}" for c in JOB_COLUMNS.split(",")
)


# A job's end: its id, analyzer, the state it ended in, when.
End = tuple[str, str, str, float]


def write_ends(db: sqlite3.Connection, ends: Sequence[End], routes: Sequence[WebhookRoute]) -> None:
    """Each end as an event, and a delivery for every webhook that wants it, inside
    the writer's transaction that ends the jobs: whatever ends a job calls this."""
    for job_id, analyzer, state, at in ends:
        seq = db.execute(
            "INSERT INTO events (job_id, analyzer, state, at) VALUES (?, ?, ?, ?)",
            (job_id, analyzer, state, at),
        ).lastrowid
        if not routes:
            continue
        event = f"job.{state}"
        db.executemany(
            "INSERT INTO deliveries (id, webhook, seq, job_id, event, next_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (secrets.token_hex(16), r.name, seq, job_id, event, at, at)
                for r in routes
                if event in r.events and (not r.analyzers or analyzer in r.analyzers)
            ],
        )


def read_routes(db: sqlite3.Connection) -> tuple[WebhookRoute, ...]:
    return tuple(route_of(*row) for row in db.execute("SELECT * FROM webhooks"))


def _check_horizon(after: Cursor, pruned: int | None) -> None:
    """CursorExpired if retention pruned events after `after` (the beginning, 0,
    reads what is kept)."""
    if pruned is not None and 0 < after.seq < pruned:
        raise CursorExpired(str(after), str(Cursor(0, pruned)))


class SqliteOutbox(SqliteReads):
    routes: tuple[WebhookRoute, ...]  # the configured webhooks (read at open, kept in step)

    if TYPE_CHECKING:  # the store's writer (BatchWriter)

        async def _write(self, op: WriteOp) -> Any: ...

    async def events_after(self, after: Cursor, limit: int) -> EventPage:
        """Up to `limit` job ends after `after`, oldest first, each with its job. The
        horizon is read with the page too (one statement, one snapshot): a prune between
        a check and the read cannot let a cursor skip what it deleted."""
        async with self._read.execute("SELECT seq FROM events_pruned WHERE id = 1") as cur:
            pruned = await cur.fetchone()
        _check_horizon(after, pruned[0] if pruned else None)
        async with self._read.execute(
            f"SELECT {_EVENT_COLUMNS}, (SELECT seq FROM events_pruned WHERE id = 1) "
            "FROM events e LEFT JOIN jobs j ON j.id = e.job_id "
            "WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
            (after.seq, limit),
        ) as cur:
            rows = list(await cur.fetchall())
        if rows:
            _check_horizon(after, rows[0][-1])
        events = [
            event_of(Cursor(0, r[0]), r[1], r[2], r[3], r[4], row_to_job(r[5:-1]) if r[5] else None)
            for r in rows
        ]
        return EventPage(events, events[-1].cursor if events else str(after))

    async def events_head(self) -> Cursor:
        """The newest event's cursor (a watch "from now" starts there)."""
        async with self._read.execute("SELECT max(seq) FROM events") as cur:
            row = await cur.fetchone()
        return Cursor(0, row[0] if row and row[0] is not None else 0)

    async def prune_events(self, before: float) -> int:
        """One batch of the oldest events, those that ended before `before`, deleted
        (a prefix in order, so the horizon a cursor is checked against is exact). The
        newest stays: a sequence number is never given out twice."""

        def op(db: sqlite3.Connection, tx: Tx) -> int:
            rows = db.execute(
                "SELECT seq, at FROM events WHERE seq < (SELECT max(seq) FROM events) "
                "ORDER BY seq LIMIT ?",
                (PRUNE_BATCH,),
            ).fetchall()
            last = None
            for seq, at in rows:
                if at >= before:
                    break
                last = seq
            if last is None:
                return 0
            gone = db.execute("DELETE FROM events WHERE seq <= ?", (last,)).rowcount
            db.execute(
                "INSERT INTO events_pruned (id, seq) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq",
                (last,),
            )
            return int(gone)

        result: int = await self._write(op)
        return result

    async def prune_deliveries(self, state: str, before: float) -> int:
        """One batch of delivered or dead deliveries that ended before `before`."""

        def op(db: sqlite3.Connection, tx: Tx) -> int:
            return int(
                db.execute(
                    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries "
                    "WHERE state = ? AND finished_at < ? LIMIT ?)",
                    (state, before, PRUNE_BATCH),
                ).rowcount
            )

        result: int = await self._write(op)
        return result

    async def sync_webhooks(self, routes: Sequence[WebhookRoute]) -> None:
        """The configured webhooks, which the ends written from now on are matched
        against (kept in the database for the ends start-up recovery makes)."""

        def op(db: sqlite3.Connection, tx: Tx) -> None:
            db.execute("DELETE FROM webhooks")
            db.executemany(
                "INSERT INTO webhooks (name, events, analyzers) VALUES (?, ?, ?)",
                [(r.name, *route_lists(r)) for r in routes],
            )

        await self._write(op)
        self.routes = tuple(routes)

    async def claim_deliveries(self, webhook: str, limit: int, lease_s: float) -> list[Delivery]:
        """Up to `limit` due deliveries of `webhook`, oldest first, each attempt
        counted and held for `lease_s` (after which, unended, it is due again)."""

        def op(db: sqlite3.Connection, tx: Tx) -> list[Delivery]:
            now = time.time()
            rows = db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_at = ? WHERE id IN "
                "(SELECT id FROM deliveries WHERE state = 'pending' AND webhook = ? "
                f"AND next_at <= ? ORDER BY next_at, seq LIMIT ?) RETURNING {DELIVERY_COLUMNS}",
                (now + lease_s, webhook, now, limit),
            ).fetchall()
            return sorted((delivery_of(r) for r in rows), key=lambda d: d.created_at)

        result: list[Delivery] = await self._write(op)
        return result

    async def end_delivery(self, delivery_id: str, end: DeliveryEnd) -> None:
        def op(db: sqlite3.Connection, tx: Tx) -> None:
            now = time.time()
            state = "delivered" if end.delivered else "dead" if end.retry_at is None else "pending"
            db.execute(
                "UPDATE deliveries SET state = ?, next_at = ?, finished_at = ?, "
                "last_status = ?, last_error = ? WHERE id = ? AND state = 'pending'",
                (
                    state,
                    now if end.retry_at is None else end.retry_at,
                    None if state == "pending" else now,
                    end.status,
                    end.error,
                    delivery_id,
                ),
            )

        await self._write(op)

    async def next_delivery_at(self, webhook: str) -> float | None:
        """When `webhook`'s earliest pending delivery is due (None: none pending)."""
        async with self._read.execute(
            "SELECT min(next_at) FROM deliveries WHERE state = 'pending' AND webhook = ?",
            (webhook,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def webhook_counts(self) -> dict[str, WebhookCounts]:
        """Pending and dead deliveries per webhook (delivered ones are not counted
        here: there are many, and they are the sender's to count)."""
        async with self._read.execute(
            "SELECT webhook, state, count(*), min(created_at) FROM deliveries "
            "WHERE state IN ('pending', 'dead') GROUP BY webhook, state"
        ) as cur:
            rows = await cur.fetchall()
        return counts_of(list(rows))

    async def retry_dead(self, webhook: str) -> int:
        """Dead-lettered deliveries of `webhook` become due again, attempts reset."""

        def op(db: sqlite3.Connection, tx: Tx) -> int:
            return int(
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?, "
                    "finished_at = NULL WHERE webhook = ? AND state = 'dead'",
                    (time.time(), webhook),
                ).rowcount
            )

        result: int = await self._write(op)
        return result
