"""Finished jobs made fast for the benchmarks that need many (`export`, `retention`):
submitted in batches with the daemon's own store code, then marked succeeded with a
result in one statement, each end written as an event by the store's own `write_ends`
(as the daemon writes them)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import msgspec

from daemon.bench.common import ANALYZER
from daemon.jobs import JobIds
from daemon.store.base import NewJob
from daemon.store.sqlite import Store
from daemon.store.sqlite_outbox import write_ends

BATCH = 5000


async def finished_jobs(
    db_path: Path, jobs: int, result_chars: int, ended_ago_s: float | None = None
) -> float:
    """`jobs` succeeded jobs, each with a result of `result_chars`, ended one second
    after they were made (or `ended_ago_s` ago); returns the seconds it took."""
    started = time.perf_counter()
    ids = JobIds()
    async with Store(db_path, synchronous="NORMAL") as store:
        for first in range(0, jobs, BATCH):
            batch = [
                NewJob(
                    id=ids.new(),
                    analyzer=ANALYZER,
                    input={"text": f"document {i}"},
                    priority=0,
                    idempotency_key=None,
                    max_attempts=3,
                    source="bench",
                )
                for i in range(first, min(jobs, first + BATCH))
            ]
            await store.submit(batch, max_backlog=jobs)
    result = msgspec.json.encode({"summary": "x" * result_chars}).decode()
    ended = "created_at + 1" if ended_ago_s is None else str(time.time() - ended_ago_s)

    def finish() -> None:
        with sqlite3.connect(db_path) as db:
            ends = db.execute(
                "UPDATE jobs SET state = 'succeeded', attempts = 1, started_at = created_at, "
                f"finished_at = {ended}, result = ? RETURNING id, analyzer, finished_at",
                (result,),
            ).fetchall()
            ends.sort()  # ids are time-ordered: the events in the order the jobs were made
            write_ends(db, [(jid, analyzer, "succeeded", at) for jid, analyzer, at in ends], ())

    await anyio.to_thread.run_sync(finish)
    return time.perf_counter() - started
