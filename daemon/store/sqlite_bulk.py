"""The SQLite store's bulk step: one batch of a bulk cancel, retry or purge, as a
write op run by the single writer (`sqlite_batch`) in its transaction."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from daemon.store.base import BacklogFull
from daemon.store.filters import MOVES_TO, BulkAction, BulkRow, JobFilter, Params, pick_sql
from daemon.store.outbox import WebhookRoute
from daemon.store.sqlite_batch import Tx
from daemon.store.sqlite_outbox import write_ends


def bulk_step(
    db: sqlite3.Connection,
    tx: Tx,
    action: BulkAction,
    flt: JobFilter,
    *,
    limit: int,
    queued: int,
    max_backlog: int,
    routes: Sequence[WebhookRoute],
) -> list[BulkRow]:
    """Up to `limit` matching jobs changed (`queued`: the queue's size now, for the
    backlog bound of a retry; a cancel is each job's end, matched against `routes`);
    their counter moves go on `tx`."""
    params = Params("qmark")
    sql = pick_sql(flt, params, limit=limit)
    rows = [BulkRow(*row) for row in db.execute(sql, params.values)]
    if not rows:
        return rows
    ids = [(row.id,) for row in rows]
    now = time.time()
    if action == "purge":
        db.executemany("DELETE FROM jobs WHERE id = ?", ids)  # attempts: ON DELETE CASCADE
    elif action == "cancel":
        db.executemany(
            "UPDATE jobs SET state = 'canceled', finished_at = ? WHERE id = ?",
            [(now, row.id) for row in rows],
        )
        write_ends(db, [(row.id, row.analyzer, "canceled", now) for row in rows], routes)
        db.executemany(
            "UPDATE attempts SET outcome = 'canceled', finished_at = ? "
            "WHERE job_id = ? AND outcome = 'running'",
            [(now, row.id) for row in rows if row.was == "running"],
        )
    else:
        if queued + len(rows) > max_backlog:
            raise BacklogFull(queued, max_backlog)
        db.executemany(
            "UPDATE jobs SET state = 'queued', max_attempts = attempts + max_attempts, "
            "rate_limited = 0, not_before = 0, finished_at = NULL WHERE id = ?",
            ids,
        )
    for row in rows:
        tx.move(row.was, MOVES_TO[action])
    return rows
