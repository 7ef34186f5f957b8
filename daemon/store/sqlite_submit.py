"""The SQLite store's submit: a batch of validated jobs inserted by the single writer
(`sqlite_batch`) in its transaction, all or nothing, with their tags."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from daemon.store.base import (
    KEYED_COLUMNS,
    BacklogFull,
    NewJob,
    Submitted,
    job_row,
    same_job,
)
from daemon.store.sqlite_batch import Tx

_INSERT_JOB = (
    "INSERT INTO jobs (id, analyzer, input, priority, idempotency_key, state, max_attempts, "
    "created_at, source, tags, batch, not_before) "
    "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (idempotency_key) DO NOTHING"
)
_INSERT_TAG = "INSERT INTO job_tags (tag, job_id) VALUES (?, ?)"


def submit_op(
    db: sqlite3.Connection, tx: Tx, jobs: Sequence[NewJob], *, queued: int, max_backlog: int
) -> list[Submitted]:
    """Insert `jobs` (`queued`: the queue's size now, for the backlog bound); a
    repeated idempotency key returns the first job, or raises IdempotencyConflict,
    which undoes the whole op."""
    if queued + len(jobs) > max_backlog:
        raise BacklogFull(queued, max_backlog)
    now = time.time()
    rows: dict[str, tuple[Any, ...]] = {job.id: job_row(job, now) for job in jobs}
    # Jobs without a key cannot collide: one statement for all of them.
    plain = [job for job in jobs if job.idempotency_key is None]
    db.executemany(_INSERT_JOB, [rows[job.id] for job in plain])
    tx.move(None, "queued", len(plain))
    created = list(plain)
    out: list[Submitted] = []
    for job in jobs:
        if job.idempotency_key is None:
            out.append(Submitted(job.id, True))
            continue
        cur = db.execute(_INSERT_JOB, rows[job.id])
        if cur.rowcount == 1:
            tx.move(None, "queued")
            created.append(job)
            out.append(Submitted(job.id, True))
            continue
        row = db.execute(
            f"SELECT {KEYED_COLUMNS} FROM jobs WHERE idempotency_key = ?",
            (job.idempotency_key,),
        ).fetchone()
        assert row is not None
        out.append(same_job(job, *row))
    db.executemany(_INSERT_TAG, [(tag, job.id) for job in created for tag in job.tags])
    return out
