"""The job store in PostgreSQL, shared by several daemons (README "Cluster").

Each daemon is a node: a row with a heartbeat on the database's clock, and a session
advisory lock on its name (released the moment the process dies; it refuses a second
daemon of that name). Claims skip each other's rows and count the attempt at once;
every finish is fenced on the attempt number it was claimed with, so a node presumed
dead that comes back records nothing. The reaper (one node at a time) takes over a
silent node's attempts as SQLite's start-up recovery would; a node restarted under its
name recovers its own at once. Connections: one for the lock and LISTEN, a pool of
`POOL_SIZE` for the rest; no transaction is held open across an API call."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, Self

import anyio
import asyncpg
import structlog

from daemon.config import StoreConfig
from daemon.jobs import STATES, Job, State
from daemon.providers.limits import SharedRates
from daemon.providers.shared_state import SharedProviderState
from daemon.store import pg_bulk, pg_jobs, pg_nodes
from daemon.store.base import (
    AttemptEnd,
    BacklogFull,
    Canceled,
    Cluster,
    ClusterCommand,
    NewJob,
    Node,
    OpFailed,
    StoreError,
    StoreOpenError,
    StoreRefused,
    Submitted,
    TableStats,
    next_state,
)
from daemon.store.filters import MOVES_TO, BulkAction, BulkRow, JobFilter
from daemon.store.pg_batch import Batcher
from daemon.store.pg_nodes import CHANNEL
from daemon.store.pg_outbox import PgOutbox
from daemon.store.pg_providers import PgProviderState
from daemon.store.pg_rates import PgRates
from daemon.store.pg_reads import DB_ERRORS, reason, safe_url
from daemon.store.pg_schema import REAPER_LOCK, migrate
from daemon.store.schema import SchemaTooNew
from daemon.wakeup import Wakeup

log = structlog.get_logger("vigil.store")
POOL_SIZE = 3
TABLES_EVERY_S = 30.0
End = tuple[Job, AttemptEnd, State]
COUNTS_SHARE = 0.05  # of the time spent counting jobs by state, at most
COUNTS_MAX_EVERY_S = 30.0
ANALYZE_AFTER = 1000  # queued jobs beyond twice the last analyzed count
CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 30.0
_LOGIN_REFUSED = (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)


class PostgresStore(PgOutbox, anyio.AsyncContextManagerMixin):
    """Owns the node's connections and its heartbeat/reaper task for the daemon's life."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.node = config.node
        self.counts: Counter[str] = Counter(dict.fromkeys(STATES, 0))
        self.recovered: dict[str, int] = {}
        self.wakeup = Wakeup()
        self.commits = 0
        self.commit_errors = 0
        self.commit_seconds = 0.0
        self.last_error: str | None = None
        self.low_space: str | None = None  # the database server watches its own disk
        self.rates: SharedRates | None = None  # the providers' budgets, once open
        self.provider_state: SharedProviderState | None = None  # breakers, pauses: likewise
        self.cluster: Cluster | None = self
        self.on_command: Callable[[ClusterCommand], Awaitable[None]] | None = None
        self._last_command = 0
        self.refused_finishes = 0  # fenced out: this node's attempt had been taken over
        self.reaped = 0  # attempts of dead nodes this node recovered
        self._nodes: list[Node] = []
        self._tables: dict[str, TableStats] = {}
        self._tables_read = 0.0  # monotonic; table sizes are read every TABLES_EVERY_S
        self._counts_due = 0.0  # monotonic: when the counts are read again
        # Attempt ends, written together when they come together (group commit).
        self._ends: Batcher[End, tuple[bool, str | None]] = Batcher(self._write_ends)
        self._analyzed_queued = 0  # the queue's size when this node last ran ANALYZE
        self._heartbeat_ok = time.monotonic()
        self._pool: asyncpg.Pool | None = None
        self._lock_conn: Any = None
        self._password: str | None = None
        self.relocks = 0  # the lock connection was re-established (after a database restart)
        self.name_lost: str | None = None  # set if another daemon took our name meanwhile

    @property
    def location(self) -> str:
        return safe_url(self.config.url)

    def nodes(self) -> list[Node]:
        return list(self._nodes)

    @property
    def cut_off(self) -> str | None:
        silent_s = time.monotonic() - self._heartbeat_ok
        if silent_s <= self.config.lease_s:
            return None
        return (
            f"no heartbeat reached the database for {silent_s:.0f} s (store.lease_s is "
            f"{self.config.lease_s:g}): other nodes may have taken this one's attempts over"
        )

    def table_stats(self) -> dict[str, TableStats]:
        return dict(self._tables)

    # -- life -------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        env = self.config.password_env
        self._password = password = os.environ.get(env) if env else None
        try:
            lock_conn = await self._connect(password)
        except _LOGIN_REFUSED as exc:
            raise StoreRefused(
                f"the database {self.location} refused the login: {reason(exc)}"
            ) from None
        except (*DB_ERRORS, ValueError) as exc:
            raise StoreOpenError(
                f"cannot connect to the database {self.location}: {reason(exc)}"
            ) from None
        self._lock_conn = lock_conn
        try:
            await self._open(lock_conn, password)
            assert self._pool is not None
            async with self._pool, anyio.create_task_group() as tg:
                await self._listen(lock_conn)
                tg.start_soon(self._maintain, name="store.heartbeat")
                await tg.start(self._ends.run, name="store.ends")
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._pool = None
            with anyio.CancelScope(shield=True), contextlib.suppress(*DB_ERRORS):
                await self._lock_conn.close(timeout=5)

    async def _relock(self) -> None:
        """The connection holding our name's lock (and LISTEN) died with the database
        (a restart, a failover): take the lock again on a new one. Should another
        daemon have taken the name meanwhile, this one stops claiming and says why."""
        conn = await self._connect(self._password)
        try:
            held = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", pg_nodes.lock_key(self.node)
            )
            if held:
                await self._listen(conn)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(*DB_ERRORS):
                await conn.close(timeout=5)
            raise
        self._lock_conn = conn
        self.relocks += 1
        if held:
            log.info("store.node_relocked", node=self.node)
            return
        self.name_lost = (
            f"another daemon took the node name {self.node!r} while the database was away: "
            "this one claims no more jobs; restart it under its own name"
        )
        log.error("store.node_name_lost", node=self.node, reason=self.name_lost)

    async def _connect(self, password: str | None) -> Any:
        return await asyncpg.connect(self.config.url, password=password, timeout=CONNECT_TIMEOUT_S)

    async def _open(self, lock_conn: Any, password: str | None) -> None:
        try:
            await migrate(lock_conn)
            held = await lock_conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", pg_nodes.lock_key(self.node)
            )
        except SchemaTooNew as exc:
            raise StoreRefused(str(exc)) from None
        except DB_ERRORS as exc:
            raise StoreOpenError(f"cannot prepare the database: {reason(exc)}") from None
        if not held:
            raise StoreRefused(
                f"another daemon named {self.node!r} is using the database {self.location} "
                "(store.node_name must be unique)"
            )
        try:
            self._pool = await asyncpg.create_pool(
                self.config.url,
                password=password,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=STATEMENT_TIMEOUT_S,
                # The pool's connections keep no session state (no SET, LISTEN or
                # session lock: those live on the lock connection), so the reset
                # query asyncpg runs on every release would be a wasted round trip.
                reset=_keep_session,
            )
            self.rates = PgRates(self._pool)
            self.provider_state = PgProviderState(self._pool, self.node)
            await pg_nodes.register(lock_conn, self.node)
            # Our name's lock is ours: any attempt still marked ours is from our last life.
            self.recovered = await pg_nodes.recover(lock_conn, [self.node])
            self._last_command = await pg_nodes.latest_command(lock_conn)
            await self._refresh(lock_conn)
        except DB_ERRORS as exc:
            raise StoreOpenError(f"cannot prepare the database: {reason(exc)}") from None

    async def _listen(self, conn: Any) -> None:
        if self.config.poll_only:
            return
        await conn.add_listener(CHANNEL, lambda *_: self.wakeup.notify())

    async def _maintain(self) -> None:
        """Heartbeat, counts, the node list and the reaper, every lease_s / 3; a failed
        round is logged and the next one tries again (the database may be restarting)."""
        interval = self.config.lease_s / 3
        while True:
            await anyio.sleep(min(interval, 1.0))
            try:
                await self._beat()
            except DB_ERRORS as exc:
                self._failed(exc)
            except Exception:
                log.exception("store.maintain_failed")

    async def _beat(self) -> None:
        assert self._pool is not None
        if self._lock_conn.is_closed() and self.name_lost is None:
            await self._relock()
        if self.name_lost is not None:
            self.last_error = self.name_lost
            return
        async with self._pool.acquire() as conn:
            await pg_nodes.heartbeat(conn, self.node)
            self._heartbeat_ok = time.monotonic()
            self.last_error = None
            dead: list[str] = []
            taken = {"requeued": 0, "failed": 0}
            async with conn.transaction():
                if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REAPER_LOCK):
                    dead, taken = await pg_nodes.reap(conn, self.node, self.config.lease_s)
            if any(taken.values()):  # committed now: the dispatcher finds the jobs ready
                self._move("running", "queued", taken["requeued"])
                self._move("running", "failed", taken["failed"])
                self.reaped += sum(taken.values())
                log.warning("store.nodes_reaped", nodes=dead, **taken)
                self.wakeup.notify()
            await self._refresh(conn)
            commands = await pg_nodes.new_commands(conn, self._last_command)
        for command_id, cmd, issued_by in commands:
            self._last_command = command_id
            log.info("store.cluster_command", cmd=cmd, issued_by=issued_by)
            if self.on_command is not None:
                await self.on_command(cmd)

    async def _refresh(self, conn: Any) -> None:
        """The cluster's counts and nodes. Counting scans the jobs table, so with a large
        backlog it runs less often: its cost kept near COUNTS_SHARE of the time (our own
        moves show in the counts meanwhile)."""
        now = time.monotonic()
        if now >= self._counts_due:
            self.counts = await pg_nodes.read_counts(conn)
            took = time.monotonic() - now
            self._counts_due = now + min(COUNTS_MAX_EVERY_S, took / COUNTS_SHARE)
            await self._analyze_if_grown(conn)
        self._nodes = await pg_nodes.read_nodes(conn, self.config.lease_s)
        if time.monotonic() - self._tables_read >= TABLES_EVERY_S:
            self._tables_read = time.monotonic()
            self._tables = await pg_nodes.read_tables(conn)

    async def _analyze_if_grown(self, conn: Any) -> None:
        """A queue that has more than doubled outruns autovacuum's statistics, and
        without them the claim's plan sorts the whole queue: refresh them now (a
        handful of times as a backlog grows: 1 k, 3 k, 7 k, ...)."""
        queued = self.counts["queued"]
        if queued > 2 * self._analyzed_queued + ANALYZE_AFTER:
            self._analyzed_queued = queued
            await conn.execute("ANALYZE jobs")

    async def broadcast(self, cmd: ClusterCommand) -> None:
        async with self._tx() as conn:
            await pg_nodes.add_command(conn, cmd, self.node)

    # -- the write path ---------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self.commit_errors += 1
        self.last_error = f"{type(exc).__name__}: {reason(exc)}"

    @asynccontextmanager
    async def _tx(self, *, single: bool = False) -> AsyncGenerator[Any]:
        """One write transaction (`single`: one statement, atomic by itself, so no
        BEGIN and COMMIT round trips); database faults become StoreError (the
        dispatcher retries a finished attempt's record until it lands), an error of the
        operation itself OpFailed."""
        if self._pool is None:
            raise StoreError("the store is not open")
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn:
                if single:
                    yield conn
                else:
                    async with conn.transaction():
                        yield conn
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            raise OpFailed(str(exc)) from None
        except (ValueError, OverflowError) as exc:  # a value the driver cannot send
            raise OpFailed(f"{type(exc).__name__}: {exc}") from None
        except DB_ERRORS as exc:
            self._failed(exc)
            raise StoreError(f"database write failed: {reason(exc)}") from None
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started
        self.last_error = None

    def _move(self, old: str | None, new: str | None, n: int = 1) -> None:
        """Our own moves show in the counts at once; the next refresh makes them exact."""
        if old:
            self.counts[old] -= n
        if new:
            self.counts[new] += n

    async def probe(self) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE nodes SET heartbeat_at = now() WHERE name = $1", self.node)

    async def submit(self, jobs: Sequence[NewJob], *, max_backlog: int) -> list[Submitted]:
        """Insert jobs in one transaction; a repeated idempotency key (from any node)
        returns the first job. Over the backlog bound nothing is inserted."""
        if self.last_error:
            raise StoreError(f"not accepting jobs: database unwritable: {self.last_error}")
        queued = self.counts["queued"]
        if queued + len(jobs) > max_backlog:
            raise BacklogFull(queued, max_backlog)
        async with self._tx() as conn:
            out = await pg_jobs.submit(conn, jobs)
        created = sum(1 for sub in out if sub.created)
        self._move(None, "queued", created)
        pool = self._pool
        if pool is not None:
            with contextlib.suppress(*DB_ERRORS):  # statistics can wait for the next beat
                async with pool.acquire() as conn:
                    await self._analyze_if_grown(conn)
        return out

    async def claim(self, limit: int, skip_analyzers: Collection[str] = ()) -> list[Job]:
        """Move up to `limit` ready jobs to `running` on this node, counting the attempt
        now. A node whose heartbeat is overdue claims nothing: it may be presumed dead."""
        if self.name_lost or time.monotonic() - self._heartbeat_ok > self.config.lease_s * 2 / 3:
            return []
        async with self._tx(single=True) as conn:
            jobs = await pg_jobs.claim(conn, self.node, limit, skip_analyzers)
        self._move("queued", "running", len(jobs))
        jobs.sort(key=lambda j: (-j.priority, j.id))
        return jobs

    async def finish(self, job: Job, end: AttemptEnd) -> State | None:
        """Record an attempt's end, fenced on (running, attempt number): a node whose
        attempt was taken over (presumed dead) records nothing; that is counted and
        logged. Returns the job's new state, or None."""
        new = next_state(job, end)
        moved, state = await self._ends.submit((job, end, new))
        if not moved:
            if state != "canceled":
                self.refused_finishes += 1
                log.warning(
                    "store.finish_refused",
                    job_id=job.id,
                    attempt=job.attempts,
                    state=state,
                    reason="the attempt no longer owns the job (taken over after this node "
                    "was presumed dead)",
                )
            return None
        self._move("running", new)
        return new

    async def _write_ends_with_calls(self, ends: Sequence[End]) -> list[tuple[bool, str | None]]:
        """The ends, and the calls their attempts made in the same transaction (one
        statement, with no transaction round trips, when there are none)."""
        calls = [call for _, end, _ in ends for call in end.calls]
        async with self._tx(single=not calls) as conn:
            written = await pg_jobs.record_ends(conn, ends)
            await pg_jobs.write_calls(conn, calls)
            return written

    async def _write_ends(self, ends: Sequence[End]) -> list[tuple[bool, str | None] | Exception]:
        """One statement for the batch; should one end be refused for itself (a value
        PostgreSQL will not take), each is written alone so only that one fails."""
        try:
            return list(await self._write_ends_with_calls(ends))
        except OpFailed:
            if len(ends) == 1:
                raise
        results: list[tuple[bool, str | None] | Exception] = []
        for job, end, new in ends:
            try:
                [result] = await self._write_ends_with_calls([(job, end, new)])
                results.append(result)
            except StoreError as exc:
                results.append(exc)
        return results

    async def requeue(
        self,
        jobs: Iterable[Job],
        reason: str,
        *,
        outcome: Literal["interrupted", "deferred"] = "interrupted",
        not_before: float = 0.0,
    ) -> int:
        """Give back attempts that did not really happen; they do not count."""
        rows = [(job.id, job.attempts) for job in jobs]
        async with self._tx() as conn:
            moved = await pg_jobs.requeue(conn, rows, reason, outcome, not_before)
        self._move("running", "queued", moved)
        return moved

    async def cancel(self, job_id: str) -> Canceled:
        async with self._tx() as conn:
            canceled = await pg_jobs.cancel(conn, job_id)
        self._move(canceled.was, "canceled")
        return canceled

    async def retry(self, job_ids: Sequence[str] | None, *, max_backlog: int) -> int:
        async with self._tx() as conn:
            moved = await pg_jobs.retry(conn, job_ids, self.counts["queued"], max_backlog)
        for old, n in moved.items():
            self._move(old, "queued", n)
        return sum(moved.values())

    async def purge(self, older_than_s: float) -> int:
        async with self._tx() as conn:
            rows = await conn.fetch(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'canceled') "
                "AND finished_at <= $1 RETURNING state",
                time.time() - older_than_s,
            )
        for state, n in Counter(r["state"] for r in rows).items():
            self._move(state, None, n)
        return len(rows)

    async def bulk_step(
        self, action: BulkAction, flt: JobFilter, *, limit: int, max_backlog: int
    ) -> list[BulkRow]:
        """One batch of a bulk action, in one transaction (see `store.bulk`)."""
        async with self._tx() as conn:
            rows = await pg_bulk.bulk_step(
                conn,
                action,
                flt,
                limit=limit,
                queued=self.counts["queued"],
                max_backlog=max_backlog,
            )
        for row in rows:
            self._move(row.was, MOVES_TO[action])
        return rows


async def _keep_session(conn: Any) -> None:
    """The pool's reset: nothing to undo (see create_pool above)."""
