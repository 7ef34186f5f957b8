"""The PostgreSQL store's reads: jobs, attempts, listings, for any node's control
commands and HTTP API (a mixin: the store owns the connection pool)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from daemon.jobs import Attempt, Job, State
from daemon.store.base import (
    ATTEMPT_COLUMNS,
    JOB_COLUMNS,
    StoreError,
    row_to_attempt,
    row_to_job,
)
from daemon.store.calls import (
    USAGE_GROUPS,
    SpendDay,
    UsageQuery,
    UsageRow,
    row_to_usage,
    usage_sql,
)
from daemon.store.filters import JobFilter, Params, count_sql, ids_sql, list_sql

PG_GROUPS = {"day": "to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"}
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgReads:
    _pool: Any

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            rows: list[Any] = await self._pool.fetch(sql, *args)
        except DB_ERRORS as exc:
            raise StoreError(f"database read failed: {reason(exc)}") from None
        return rows

    async def get(self, job_id: str) -> Job | None:
        rows = await self._fetch(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        return row_to_job(rows[0]) if rows else None

    async def get_by_idempotency_key(self, key: str) -> Job | None:
        rows = await self._fetch(f"SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1", key)
        return row_to_job(rows[0]) if rows else None

    async def spend_since(self, day: str) -> list[SpendDay]:
        rows = await self._fetch("SELECT scope, name, day, usd FROM spend WHERE day >= $1", day)
        return [SpendDay(*row) for row in rows]

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        group = PG_GROUPS.get(query.by, USAGE_GROUPS[query.by])
        rows = await self._fetch(usage_sql(group, ("$1", "$2")), query.since, query.until)
        return [row_to_usage(row) for row in rows]

    async def attempts(self, job_id: str) -> list[Attempt]:
        rows = await self._fetch(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = $1 ORDER BY id",
            job_id,
        )
        return [row_to_attempt(row) for row in rows]

    async def list_jobs(
        self, flt: JobFilter | None = None, *, limit: int = 50, walk: bool = False
    ) -> list[Job]:
        """The jobs `flt` matches (None: all), newest first, at most `limit` (`walk`:
        SQLite's; PostgreSQL's indexes on (state, id) serve a paging reader)."""
        params = Params("numeric")
        sql = list_sql(JOB_COLUMNS, flt or JobFilter(), params, limit)
        return [row_to_job(row) for row in await self._fetch(sql, *params.values)]

    async def count_jobs(self, flt: JobFilter) -> dict[str, int]:
        """Jobs matching `flt`, by state (states with none left out)."""
        params = Params("numeric")
        rows = await self._fetch(count_sql(flt, params), *params.values)
        return {str(row[0]): int(row[1]) for row in rows}

    async def find_ids(self, flt: JobFilter, limit: int) -> list[str]:
        """The first `limit` ids matching `flt`, oldest first."""
        params = Params("numeric")
        rows = await self._fetch(ids_sql(flt, params, limit), *params.values)
        return [str(row[0]) for row in rows]

    async def states_of(self, job_ids: Sequence[str]) -> dict[str, State]:
        rows = await self._fetch("SELECT id, state FROM jobs WHERE id = ANY($1)", list(job_ids))
        return {r["id"]: r["state"] for r in rows}

    async def queued_of(self, analyzers: Sequence[str]) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT analyzer, count(*) FROM jobs WHERE state = 'queued' AND analyzer = ANY($1) "
            "GROUP BY analyzer",
            list(analyzers),
        )
        return {row[0]: row[1] for row in rows}

    async def next_wake(self, after: float = 0.0) -> float | None:
        rows = await self._fetch(
            "SELECT min(not_before) FROM jobs WHERE state = 'queued' AND not_before > $1", after
        )
        value = rows[0][0] if rows else None
        return None if value is None else float(value)


def reason(exc: BaseException) -> str:
    """An error's text for logs and status: the driver's message, never a password
    (asyncpg's messages do not carry it; the URL in ours has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def safe_url(url: str) -> str:
    """The URL with any password taken out (config refuses one; libpq's are elsewhere)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
