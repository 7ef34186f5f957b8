"""The SQLite store's single writer: group commit. Apart from the store, which says
what each write does; this is how every write lands, and when it counts as done.

Every write goes through one task that gathers what is waiting into one transaction
(group commit): a thousand concurrent submits cost one fsync, not a thousand, and
there is never more than one writer to contend for the lock. A caller's `await`
returns only once its write is committed, which is what makes an acknowledgement to
a client a promise.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import anyio
from anyio.abc import TaskStatus

from daemon.jobs import STATES
from daemon.store.base import OpFailed, StoreError
from daemon.wakeup import Wakeup


@dataclass
class Tx:
    """Per-batch bookkeeping: state moves are applied to the counters only on commit."""

    current: Counter[str] = field(default_factory=Counter)
    probed: bool = False  # a write probe ran: committing proves the disk writable

    def move(self, old: str | None, new: str | None, n: int = 1) -> None:
        if old:
            self.current[old] -= n
        if new:
            self.current[new] += n


# A write as plain sqlite3 calls, run in the connection's thread: a whole batch of
# them costs one hop there (and one wake-up of the loop), not one per statement.
WriteOp = Callable[[sqlite3.Connection, Tx], Any]


@dataclass
class _Pending:
    op: WriteOp
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


class BatchWriter:
    """The writer's half of the SQLite store (a base of `Store`, which opens `_db`
    and runs `_write_loop` for its lifetime): `_write` queues an op and returns once
    it is committed, each commit brings `counts` and the commit statistics up to date,
    and `probe` tells whether the database can be written at all."""

    def __init__(self, *, max_batch: int, max_waiting_writes: int) -> None:
        self._max_batch = max_batch
        self._send, self._receive = anyio.create_memory_object_stream[_Pending](max_waiting_writes)
        self.counts: Counter[str] = Counter(dict.fromkeys(STATES, 0))
        self.wakeup = Wakeup()  # a commit made jobs ready (others may poke it too)
        self.commits = 0
        self.commit_errors = 0
        self.commit_seconds = 0.0
        self.last_error: str | None = None
        self._db: aiosqlite.Connection | None = None

    async def probe(self) -> None:
        """A write that changes nothing yet touches the disk (the schema version in the
        header, rewritten): an empty transaction would succeed on a full or read-only
        disk. Raises StoreError while the database cannot be written."""

        def op(db: sqlite3.Connection, tx: Tx) -> None:
            row = db.execute("PRAGMA user_version").fetchone()
            db.execute(f"PRAGMA user_version = {int(row[0]) if row else 0}")
            tx.probed = True

        await self._write(op)

    async def _write(self, op: WriteOp) -> Any:
        """Queue a write and wait until it is committed; raises what the op raised."""
        pending = _Pending(op)
        try:
            await self._send.send(pending)
        except anyio.ClosedResourceError:
            raise StoreError("the store is closing") from None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _write_loop(self, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                # A batch commits or rolls back whole, even if shutdown cancels us.
                with anyio.CancelScope(shield=True):
                    await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        assert self._db is not None
        db = self._db
        tx = Tx()
        started = time.perf_counter()
        changes = db.total_changes
        try:
            # One hop for the whole batch. aiosqlite's own thread and connection
            # (private API, pinned in uv.lock): the only way into its transaction
            # without a hop per call.
            await db._execute(  # type: ignore[no-untyped-call]
                _run_transaction, db._conn, batch, tx
            )
        except sqlite3.Error as exc:
            self.commit_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # a failed disk may refuse this too
                    await db.execute("ROLLBACK")
            for item in batch:
                item.result, item.error = None, StoreError(f"database write failed: {exc}")
        else:
            self.commits += 1
            self.commit_seconds += time.perf_counter() - started
            if tx.probed or db.total_changes != changes:  # an empty commit proves nothing
                self.last_error = None
            self.counts.update(tx.current)
            if tx.current["queued"] > 0:
                self.wakeup.notify()
        for item in batch:
            item.done.set()


def _run_transaction(db: sqlite3.Connection, batch: list[_Pending], tx: Tx) -> None:
    """A batch of ops as one transaction, in the connection's thread. Ops rarely
    fail, so the batch first runs without savepoints (two statements fewer an op);
    if one fails, it all rolls back and runs again, each op in its own savepoint, so
    only the failed one is undone (ops read and write only the database: rerunnable).
    A lone op needs no savepoint: its failure rolls back the whole transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        _run_ops(db, batch, tx, isolate=False)
        if len(batch) > 1 and any(item.error is not None for item in batch):
            db.execute("ROLLBACK")
            for item in batch:
                item.result = item.error = None
            tx.current.clear()
            tx.probed = False
            db.execute("BEGIN IMMEDIATE")
            _run_ops(db, batch, tx, isolate=True)
        db.execute("ROLLBACK" if len(batch) == 1 and batch[0].error is not None else "COMMIT")
    except sqlite3.Error:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                db.execute("ROLLBACK")
        raise


def _run_ops(db: sqlite3.Connection, batch: list[_Pending], tx: Tx, isolate: bool) -> None:
    """Each op's result or error onto its item, its counter moves undone if it failed;
    `isolate` wraps each in a savepoint so a failure undoes that op's writes alone. A
    fatal error propagates: it spoils the whole batch."""
    for item in batch:
        before = Counter(tx.current)
        if isolate:
            db.execute("SAVEPOINT op")
        try:
            item.result = item.op(db, tx)
        except sqlite3.Error as exc:
            if _is_fatal(exc):
                raise
            item.error = OpFailed(str(exc))
        except (ValueError, OverflowError) as exc:  # a value sqlite3 cannot bind
            item.error = OpFailed(f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            item.error = exc
        if item.error is not None:
            tx.current = before
            if isolate:
                db.execute("ROLLBACK TO op")
        if isolate:
            db.execute("RELEASE op")


# SQLite's primary result codes for faults of the database, not of one operation.
_FATAL_CODES = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def _is_fatal(exc: sqlite3.Error) -> bool:
    """Errors that spoil the whole transaction, not only the one operation: they fail
    the batch and show in readiness. A constraint or a bad value fails its op alone."""
    # Errors the sqlite3 module raises itself carry no code: a misused API (a wrong
    # binding, say), which concerns the one operation.
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _FATAL_CODES
