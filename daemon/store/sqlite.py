"""The job store: SQLite in WAL mode with a single group-committing writer.

Here is what each write does; how writes land, batched into transactions by one writer
task, is `sqlite_batch`. Reads use a second connection, which WAL lets run beside
writes (`sqlite_reads`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncGenerator, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, Self

import aiosqlite
import anyio
import structlog

from daemon.jobs import Job, State
from daemon.providers.limits import SharedRates
from daemon.providers.shared_state import SharedProviderState
from daemon.store.base import (
    JOB_COLUMNS,
    PROCESS_DIED,
    AttemptEnd,
    BacklogFull,
    Canceled,
    Cluster,
    EndValues,
    InvalidTransition,
    JobNotFound,
    NewJob,
    Node,
    StoreError,
    StoreOpenError,
    Submitted,
    TableStats,
    next_state,
    row_to_job,
)
from daemon.store.filters import BulkAction, BulkRow, JobFilter
from daemon.store.outbox import WebhookRoute
from daemon.store.schema import migrate
from daemon.store.sqlite_batch import Tx
from daemon.store.sqlite_bulk import bulk_step
from daemon.store.sqlite_health import DiskWatch
from daemon.store.sqlite_outbox import SqliteOutbox, read_routes, write_ends
from daemon.store.sqlite_reads import write_calls
from daemon.store.sqlite_submit import submit_op

log = structlog.get_logger("vigil.store")
Synchronous = Literal["NORMAL", "FULL", "EXTRA"]


class Store(SqliteOutbox, DiskWatch, anyio.AsyncContextManagerMixin):
    """Owns the database connections and the writer task for the daemon's lifetime."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        max_batch: int = 1024,
        max_waiting_writes: int = 8192,
        min_free_mb: int = 0,
    ) -> None:
        super().__init__(max_batch=max_batch, max_waiting_writes=max_waiting_writes)
        self.path = path
        self._min_free_bytes = min_free_mb * 1024 * 1024
        self.low_space: str | None = None  # set while free space is below min_free_mb
        self.rates: SharedRates | None = None  # one daemon: its budgets are its own
        self.provider_state: SharedProviderState | None = None
        self.refused_finishes = 0  # one daemon: an attempt is never taken over
        self.cluster: Cluster | None = None
        self._synchronous = synchronous
        self.recovered: dict[str, int] = {}
        self._reader: aiosqlite.Connection | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def cut_off(self) -> str | None:
        return None  # nobody else could take its attempts over

    def table_stats(self) -> dict[str, TableStats]:
        return {}  # one file; its size is the disk check's business

    def nodes(self) -> list[Node]:
        """One daemon: this one (a SQLite store is never shared)."""
        return [Node.this_daemon(self.counts["running"])]

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        await anyio.Path(self.path.parent).mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(_create_private, self.path)
        async with (
            self._send,
            self._receive,
            aiosqlite.connect(self.path, isolation_level=None) as db,
            aiosqlite.connect(self.path, isolation_level=None) as reader,
        ):
            try:
                await self._open(db, reader)
            except sqlite3.Error as exc:
                raise StoreOpenError(f"cannot open the database {self.path}: {exc}") from None
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(self._write_loop)
                    watch = anyio.CancelScope()
                    tg.start_soon(self._watch, watch)
                    try:
                        yield self
                    finally:
                        watch.cancel()
                        # Let every accepted write land before the connection closes.
                        self._send.close()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.Error as exc:  # committed work is safe in the WAL
                        log.warning("store.checkpoint_failed", error=str(exc))
                self._db = self._reader = None

    async def _open(self, db: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute(f"PRAGMA synchronous = {self._synchronous}")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA busy_timeout = 5000")
        await reader.execute("PRAGMA busy_timeout = 5000")
        await reader.execute("PRAGMA query_only = ON")
        await migrate(db)
        self._db, self._reader = db, reader
        # Before the writer starts, in aiosqlite's thread (as the writer's batches run).
        self.routes = await db._execute(read_routes, db._conn)  # type: ignore[no-untyped-call]
        self.recovered = await db._execute(  # type: ignore[no-untyped-call]
            _recover, db._conn, self.routes
        )
        await self._load_counts(db)

    # -- start-up ---------------------------------------------------------------

    async def _load_counts(self, db: aiosqlite.Connection) -> None:
        async with db.execute("SELECT state, count(*) FROM jobs GROUP BY state") as cur:
            for state, n in await cur.fetchall():
                self.counts[state] = n

    # -- writes -----------------------------------------------------------------

    async def submit(self, jobs: Sequence[NewJob], *, max_backlog: int) -> list[Submitted]:
        """Insert jobs in one transaction; a repeated idempotency key returns the
        first job (IdempotencyConflict if it is another job: `same_job`). All or
        nothing: over the backlog bound, nothing is inserted.
        Refused at once while the disk is nearly full or writes are failing: running
        attempts keep what room and writer time there is for their results."""
        if self.low_space or self.last_error:
            problem = self.low_space or f"database unwritable: {self.last_error}"
            raise StoreError(f"not accepting jobs: {problem}")

        def op(db: sqlite3.Connection, tx: Tx) -> list[Submitted]:
            queued = self.counts["queued"] + tx.current["queued"]
            return submit_op(db, tx, jobs, queued=queued, max_backlog=max_backlog)

        result: list[Submitted] = await self._write(op)
        return result

    async def claim(self, limit: int, skip_analyzers: Collection[str] = ()) -> list[Job]:
        """Move up to `limit` ready jobs to `running`, counting the attempt now, so a
        crash during it is counted too. Jobs of `skip_analyzers` (their provider is
        paused or its circuit open) stay queued."""
        skip = sorted(skip_analyzers)
        skip_sql = f"AND analyzer NOT IN ({','.join('?' * len(skip))}) " if skip else ""

        def op(db: sqlite3.Connection, tx: Tx) -> list[Job]:
            now = time.time()
            cur = db.execute(
                f"UPDATE jobs SET state = 'running', attempts = attempts + 1, "
                f"started_at = coalesce(started_at, ?) WHERE id IN ("
                f"SELECT id FROM jobs WHERE state = 'queued' AND not_before <= ? {skip_sql}"
                f"ORDER BY priority DESC, id LIMIT ?) RETURNING {JOB_COLUMNS}",
                (now, now, *skip, limit),
            )
            jobs = [row_to_job(row) for row in cur.fetchall()]
            db.executemany(
                "INSERT INTO attempts (job_id, n, started_at) VALUES (?, ?, ?)",
                [(job.id, job.attempts, now) for job in jobs],
            )
            tx.move("queued", "running", len(jobs))
            jobs.sort(key=lambda j: (-j.priority, j.id))
            return jobs

        result: list[Job] = await self._write(op)
        return result

    async def finish(self, job: Job, end: AttemptEnd) -> State | None:
        """Record an attempt's end and move the job on. Guarded on (running, attempt
        number), so only the attempt that owns the job can record its result: a
        result is recorded exactly once. Returns the job's new state (None: the job
        had already moved on, e.g. canceled)."""

        v = EndValues.of(end)

        def op(db: sqlite3.Connection, tx: Tx) -> State | None:
            now = time.time()
            write_calls(db, end.calls)  # spent whatever becomes of the job
            db.execute(
                "UPDATE attempts SET finished_at = ?, outcome = ?, http_status = ?, "
                "error_type = ?, error_message = ?, latency_ms = ?, prompt_tokens = ?, "
                "completion_tokens = ?, cost = ?, answer = ?, cached_tokens = ?, "
                "cache_write_tokens = ?, stop_reason = ?, phases = ? "
                "WHERE job_id = ? AND n = ? AND outcome = 'running'",
                (
                    now,
                    end.outcome,
                    end.http_status,
                    v.error_type,
                    v.error_message,
                    end.latency_ms,
                    v.attempt_prompt_tokens,
                    v.attempt_completion_tokens,
                    v.cost,
                    end.answer,
                    v.attempt_cached_tokens,
                    v.attempt_cache_write_tokens,
                    end.stop_reason,
                    v.phases_json,
                    job.id,
                    job.attempts,
                ),
            )
            new = next_state(job, end)
            cur = db.execute(
                "UPDATE jobs SET state = ?, not_before = ?, finished_at = ?, result = ?, "
                "error_type = ?, error_message = ?, attempts = attempts - ?, "
                "rate_limited = rate_limited + ?, "
                "prompt_tokens = coalesce(prompt_tokens, 0) + ?, "
                "completion_tokens = coalesce(completion_tokens, 0) + ?, "
                "cached_tokens = coalesce(cached_tokens, 0) + ?, "
                "cache_write_tokens = coalesce(cache_write_tokens, 0) + ?, "
                "cost = CASE WHEN ? IS NULL THEN cost ELSE coalesce(cost, 0) + ? END "
                "WHERE id = ? AND state = 'running' AND attempts = ?",
                (
                    new,
                    end.retry_at or 0.0,
                    None if new == "queued" else now,
                    v.result_json,
                    v.error_type,
                    v.error_message,
                    v.given_back,
                    v.given_back,
                    v.prompt_tokens,
                    v.completion_tokens,
                    v.cached_tokens,
                    v.cache_write_tokens,
                    v.cost,
                    v.cost,
                    job.id,
                    job.attempts,
                ),
            )
            if cur.rowcount != 1:
                return None
            if new != "queued":
                write_ends(db, [(job.id, job.analyzer, new, now)], self.routes)
            tx.move("running", new)
            return new

        result: State | None = await self._write(op)
        return result

    async def requeue(
        self,
        jobs: Iterable[Job],
        reason: str,
        *,
        outcome: Literal["interrupted", "deferred"] = "interrupted",
        not_before: float = 0.0,
    ) -> int:
        """Give back attempts that did not really happen: cut short by our own
        shutdown (`interrupted`), or refused before any request because the provider
        is paused or its circuit open (`deferred`, until `not_before`). They do not
        count against `max_attempts`; the attempt row stays, with that outcome."""
        rows = [(job.id, job.attempts) for job in jobs]
        error_type = outcome.capitalize()

        def op(db: sqlite3.Connection, tx: Tx) -> int:
            now = time.time()
            moved = 0
            for job_id, n in rows:
                cur = db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = attempts - 1, "
                    "not_before = ? WHERE id = ? AND state = 'running' AND attempts = ?",
                    (not_before, job_id, n),
                )
                if cur.rowcount == 1:
                    moved += 1
                    db.execute(
                        "UPDATE attempts SET outcome = ?, finished_at = ?, "
                        "error_type = ?, error_message = ? "
                        "WHERE job_id = ? AND n = ? AND outcome = 'running'",
                        (outcome, now, error_type, reason, job_id, n),
                    )
            tx.move("running", "queued", moved)
            return moved

        result: int = await self._write(op)
        return result

    async def cancel(self, job_id: str) -> Canceled:
        """Cancel a queued or running job; says the state it was in."""

        def op(db: sqlite3.Connection, tx: Tx) -> Canceled:
            state, analyzer = _state_of(db, job_id)
            if state not in ("queued", "running"):
                raise InvalidTransition(
                    f"job {job_id} is {state}; only queued or running jobs can be canceled"
                )
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'canceled', finished_at = ? WHERE id = ?",
                (now, job_id),
            )
            write_ends(db, [(job_id, analyzer, "canceled", now)], self.routes)
            db.execute(
                "UPDATE attempts SET outcome = 'canceled', finished_at = ? "
                "WHERE job_id = ? AND outcome = 'running'",
                (now, job_id),
            )
            tx.move(state, "canceled")
            return Canceled(state, analyzer)

        result: Canceled = await self._write(op)
        return result

    async def retry(self, job_ids: Sequence[str] | None, *, max_backlog: int) -> int:
        """Put failed or canceled jobs back in the queue with `max_attempts` more
        attempts; `None` retries every failed job. Attempt numbers keep counting up,
        so a stale attempt of the earlier run can never record over the new one."""

        def op(db: sqlite3.Connection, tx: Tx) -> int:
            if job_ids is not None:
                for job_id in job_ids:
                    state, _ = _state_of(db, job_id)
                    if state not in ("failed", "canceled"):
                        raise InvalidTransition(
                            f"job {job_id} is {state}; only failed or canceled jobs retry"
                        )
            where, params = (
                ("state = 'failed'", ())
                if job_ids is None
                else (f"id IN ({','.join('?' * len(job_ids))})", tuple(job_ids))
            )
            moving: dict[str, int] = dict(
                db.execute(f"SELECT state, count(*) FROM jobs WHERE {where} GROUP BY state", params)
            )
            total = sum(moving.values())
            queued = self.counts["queued"] + tx.current["queued"]
            if queued + total > max_backlog:
                raise BacklogFull(queued, max_backlog)
            db.execute(
                f"UPDATE jobs SET state = 'queued', max_attempts = attempts + max_attempts, "
                f"not_before = 0, "
                f"finished_at = NULL WHERE {where}",
                params,
            )
            for old, n in moving.items():
                tx.move(old, "queued", n)
            return total

        result: int = await self._write(op)
        return result

    async def purge(self, older_than_s: float) -> int:
        """Delete finished jobs (and their attempts) that ended before the cut-off."""
        cutoff = time.time() - older_than_s

        def op(db: sqlite3.Connection, tx: Tx) -> int:
            rows = db.execute(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'canceled') "
                "AND finished_at <= ? RETURNING state",
                (cutoff,),
            ).fetchall()
            gone = Counter(row[0] for row in rows)
            for state, n in gone.items():
                tx.move(state, None, n)
            return sum(gone.values())

        result: int = await self._write(op)
        return result

    async def bulk_step(
        self, action: BulkAction, flt: JobFilter, *, limit: int, max_backlog: int
    ) -> list[BulkRow]:
        """One batch of a bulk action, in one transaction (see `store.bulk`)."""

        def op(db: sqlite3.Connection, tx: Tx) -> list[BulkRow]:
            queued = self.counts["queued"] + tx.current["queued"]
            return bulk_step(
                db,
                tx,
                action,
                flt,
                limit=limit,
                queued=queued,
                max_backlog=max_backlog,
                routes=self.routes,
            )

        result: list[BulkRow] = await self._write(op)
        return result


def _recover(db: sqlite3.Connection, routes: tuple[WebhookRoute, ...]) -> dict[str, int]:
    """Attempts cut off by a dead process count; their jobs retry or dead-letter (an
    end, with its event and deliveries)."""
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "UPDATE attempts SET outcome = 'crashed', finished_at = ?, error_type = ?, "
            "error_message = ? WHERE outcome = 'running'",
            (now, PROCESS_DIED.type, PROCESS_DIED.message),
        )
        failed = db.execute(
            "UPDATE jobs SET state = 'failed', finished_at = ?, error_type = ?, "
            "error_message = ? WHERE state = 'running' AND attempts >= max_attempts "
            "RETURNING id, analyzer",
            (now, PROCESS_DIED.type, PROCESS_DIED.message),
        ).fetchall()
        write_ends(db, [(jid, analyzer, "failed", now) for jid, analyzer in failed], routes)
        requeued = db.execute(
            "UPDATE jobs SET state = 'queued', not_before = 0, error_type = ?, "
            "error_message = ? WHERE state = 'running'",
            (PROCESS_DIED.type, PROCESS_DIED.message),
        ).rowcount
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return {"requeued": requeued, "failed": len(failed)}


def _state_of(db: sqlite3.Connection, job_id: str) -> tuple[State, str]:
    """The job's state and analyzer, inside the writer's transaction; JobNotFound if
    there is no such job."""
    row = db.execute("SELECT state, analyzer FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return row[0], row[1]


def _create_private(path: Path) -> None:
    """The database holds every input and result: a new one is created readable by its
    owner alone, whatever the umask (SQLite gives its -wal and -shm files the database
    file's mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
