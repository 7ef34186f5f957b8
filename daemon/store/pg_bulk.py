"""The PostgreSQL store's bulk step and filtered reads: one batch of a bulk cancel,
retry or purge in the caller's transaction, its rows locked as they are picked."""

from __future__ import annotations

import time
from typing import Any

from daemon.store.base import BacklogFull
from daemon.store.filters import BulkAction, BulkRow, JobFilter, Params, pick_sql
from daemon.store.pg_nodes import CHANNEL
from daemon.store.pg_outbox import ends_sql


async def bulk_step(
    conn: Any,
    action: BulkAction,
    flt: JobFilter,
    *,
    limit: int,
    queued: int,
    max_backlog: int,
) -> list[BulkRow]:
    """Up to `limit` matching jobs changed (`queued`: the queue's size as last known,
    for the backlog bound of a retry). A running job canceled here is marked so on
    whichever node runs it; that node's finish is then fenced out."""
    params = Params("numeric")
    sql = pick_sql(flt, params, limit=limit) + " FOR UPDATE"
    rows = [
        BulkRow(r["id"], r["state"], r["analyzer"]) for r in await conn.fetch(sql, *params.values)
    ]
    if not rows:
        return rows
    ids = [row.id for row in rows]
    now = time.time()
    if action == "purge":
        await conn.execute("DELETE FROM jobs WHERE id = ANY($1)", ids)
    elif action == "cancel":
        await conn.execute(
            "WITH ended AS (UPDATE jobs SET state = 'canceled', finished_at = $1, node = NULL "
            "WHERE id = ANY($2) RETURNING id, analyzer, state, finished_at AS at), "
            + ends_sql("ended")
            + "SELECT 1",
            now,
            ids,
        )
        running = [row.id for row in rows if row.was == "running"]
        if running:
            await conn.execute(
                "UPDATE attempts SET outcome = 'canceled', finished_at = $1 "
                "WHERE job_id = ANY($2) AND outcome = 'running'",
                now,
                running,
            )
    else:
        if queued + len(rows) > max_backlog:
            raise BacklogFull(queued, max_backlog)
        await conn.execute(
            "UPDATE jobs SET state = 'queued', max_attempts = attempts + max_attempts, "
            "rate_limited = 0, not_before = 0, finished_at = NULL WHERE id = ANY($1)",
            ids,
        )
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return rows
