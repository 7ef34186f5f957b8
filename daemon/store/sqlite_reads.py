"""The SQLite store's reads: jobs, attempts, listings, spend and usage, on the second
connection, which WAL lets run beside the writer (a mixin: the store opens the
connection); and the writer's part for calls (`write_calls`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import aiosqlite

from daemon.jobs import Attempt, CallRecord, Job, State
from daemon.store.base import (
    ATTEMPT_COLUMNS,
    JOB_COLUMNS,
    StoreError,
    row_to_attempt,
    row_to_job,
)
from daemon.store.calls import (
    CALL_COLUMNS,
    USAGE_GROUPS,
    SpendDay,
    UsageQuery,
    UsageRow,
    call_rows,
    row_to_usage,
    spend_rows,
    usage_sql,
)
from daemon.store.filters import JobFilter, Params, count_sql, ids_sql, list_sql


class SqliteReads:
    _reader: aiosqlite.Connection | None

    @property
    def _read(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    async def get(self, job_id: str) -> Job | None:
        async with self._read.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
        ) as cur:
            row = await cur.fetchone()
        return row_to_job(row) if row else None

    async def get_by_idempotency_key(self, key: str) -> Job | None:
        """The job submitted with this key, if any (the spool resumes by key)."""
        async with self._read.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = ?", (key,)
        ) as cur:
            row = await cur.fetchone()
        return row_to_job(row) if row else None

    async def attempts(self, job_id: str) -> list[Attempt]:
        async with self._read.execute(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = ? ORDER BY id",
            (job_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [row_to_attempt(row) for row in rows]

    async def list_jobs(
        self, flt: JobFilter | None = None, *, limit: int = 50, walk: bool = False
    ) -> list[Job]:
        """The jobs `flt` matches (None: all), newest first, at most `limit`."""
        params = Params("qmark")
        sql = list_sql(JOB_COLUMNS, flt or JobFilter(), params, limit, walk=walk)
        async with self._read.execute(sql, params.values) as cur:
            return [row_to_job(row) for row in await cur.fetchall()]

    async def count_jobs(self, flt: JobFilter) -> dict[str, int]:
        """Jobs matching `flt`, by state (states with none left out)."""
        params = Params("qmark")
        async with self._read.execute(count_sql(flt, params), params.values) as cur:
            return {str(row[0]): int(row[1]) for row in await cur.fetchall()}

    async def find_ids(self, flt: JobFilter, limit: int) -> list[str]:
        """The first `limit` ids matching `flt`, oldest first."""
        params = Params("qmark")
        async with self._read.execute(ids_sql(flt, params, limit), params.values) as cur:
            return [str(row[0]) for row in await cur.fetchall()]

    async def states_of(self, job_ids: Sequence[str]) -> dict[str, State]:
        """Current state of each id (unknown ids are left out)."""
        out: dict[str, State] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i : i + 500]
            async with self._read.execute(
                f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            ) as cur:
                out.update({row[0]: row[1] for row in await cur.fetchall()})
        return out

    async def queued_of(self, analyzers: Sequence[str]) -> dict[str, int]:
        marks = ", ".join("?" * len(analyzers))
        async with self._read.execute(
            f"SELECT analyzer, count(*) FROM jobs WHERE state = 'queued' AND analyzer IN "
            f"({marks}) GROUP BY analyzer",
            tuple(analyzers),
        ) as cur:
            rows = await cur.fetchall()
        return {str(row[0]): int(row[1]) for row in rows}

    async def next_wake(self, after: float = 0.0) -> float | None:
        """When the earliest queued job waiting past `after` becomes ready (unix time)."""
        async with self._read.execute(
            "SELECT min(not_before) FROM jobs WHERE state = 'queued' AND not_before > ?",
            (after,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def spend_since(self, day: str) -> list[SpendDay]:
        async with self._read.execute(
            "SELECT scope, name, day, usd FROM spend WHERE day >= ?", (day,)
        ) as cur:
            rows = await cur.fetchall()
        return [SpendDay(*row) for row in rows]

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        sql = usage_sql(USAGE_GROUPS[query.by], ("?", "?"))
        async with self._read.execute(sql, (query.since, query.until)) as cur:
            rows = await cur.fetchall()
        return [row_to_usage(row) for row in rows]


_INSERT_CALL = f"INSERT INTO calls ({CALL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def write_calls(db: sqlite3.Connection, calls: Sequence[CallRecord]) -> None:
    """Store answered calls and add their cost to the day's spend (in the writer's
    transaction that records their attempt's end)."""
    if not calls:
        return
    db.executemany(_INSERT_CALL, call_rows(calls))
    if spent := spend_rows(calls):
        db.executemany(
            "INSERT INTO spend (scope, name, day, usd) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scope, name, day) DO UPDATE SET usd = usd + excluded.usd",
            spent,
        )
