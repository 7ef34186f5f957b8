"""The job store's contract on both backends (a real SQLite file, a real PostgreSQL
database): transitions, fencing, recovery, migrations; and what only SQLite has."""

from __future__ import annotations

import functools
import gc
import os
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import msgspec
import pytest

from daemon.jobs import ErrorInfo, Job, JobIds, Usage
from daemon.queue import Dispatcher
from daemon.store.base import (
    AttemptEnd,
    BacklogFull,
    Canceled,
    InvalidTransition,
    JobNotFound,
    NewJob,
    StoreError,
    Submitted,
)
from daemon.store.schema import SCHEMA_VERSION, SchemaTooNew, migrate
from daemon.store.sqlite import Store
from daemon.store.sqlite_batch import _is_fatal

pytestmark = pytest.mark.anyio

TIMEOUT_S = 20
BIG = 1_000_000
IDS = JobIds()

# The claim's inner SELECT, as daemon/store/store.py writes it.
CLAIM_SELECT = (
    "SELECT id FROM jobs WHERE state = 'queued' AND not_before <= ? "
    "ORDER BY priority DESC, id LIMIT ?"
)


def new_job(
    *,
    priority: int = 0,
    key: str | None = None,
    max_attempts: int = 3,
    input: dict[str, Any] | None = None,
) -> NewJob:
    """A valid job for the store, with a fresh time-ordered id."""
    return NewJob(
        id=IDS.new(),
        analyzer="summarize",
        input={"text": "hello"} if input is None else input,
        priority=priority,
        idempotency_key=key,
        max_attempts=max_attempts,
        source="test",
    )


def counts(store: Store) -> dict[str, int]:
    """The store's in-memory counters as a plain dict."""
    return dict(store.counts)


async def db_counts(store: Store) -> dict[str, int]:
    """What the database itself says, per state, for comparison with the counters."""
    out = dict.fromkeys(("queued", "running", "succeeded", "failed", "canceled"), 0)
    for job in await store.list_jobs(limit=100_000):
        out[job.state] += 1
    return out


async def get(store: Store, job_id: str) -> Job:
    """A job that must exist."""
    job = await store.get(job_id)
    assert job is not None
    return job


async def submit_one(store: Store, **kwargs: Any) -> str:
    """Submit a single job and return its id."""
    [sub] = await store.submit([new_job(**kwargs)], max_backlog=BIG)
    assert sub.created
    return sub.id


async def claim_one(store: Store) -> Job:
    """Claim exactly one job."""
    [job] = await store.claim(1)
    return job


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open SQLite store (for what only SQLite has: group commit, its planner)."""
    async with Store(tmp_path / "vigil.db", synchronous="NORMAL") as opened:
        yield opened


# -- submit --------------------------------------------------------------------------


async def test_submit_returns_ids_and_updates_counts(store: Store) -> None:
    """Submitted jobs come back created, in order, and are counted and readable."""
    with anyio.fail_after(TIMEOUT_S):
        jobs = [new_job(input={"text": f"doc {i}"}) for i in range(3)]
        out = await store.submit(jobs, max_backlog=BIG)
        assert out == [Submitted(j.id, True) for j in jobs]
        assert counts(store)["queued"] == 3
        assert await db_counts(store) == counts(store)
        first = await get(store, jobs[0].id)
        assert first.state == "queued"
        assert first.attempts == 0
        assert first.input == {"text": "doc 0"}
        assert first.source == "test"
        assert first.max_attempts == 3
        assert first.result is None
        assert first.error is None


async def test_idempotency_key_returns_first_job(store: Store) -> None:
    """A second submit with the same key returns the first job and inserts nothing."""
    with anyio.fail_after(TIMEOUT_S):
        first = new_job(key="k1")
        assert await store.submit([first], max_backlog=BIG) == [Submitted(first.id, True)]
        again = new_job(key="k1")
        assert await store.submit([again], max_backlog=BIG) == [Submitted(first.id, False)]
        assert await store.get(again.id) is None
        assert counts(store)["queued"] == 1
        assert await db_counts(store) == counts(store)


async def test_idempotency_key_within_one_batch(store: Store) -> None:
    """Two jobs with one key in the same batch: the second is the first."""
    with anyio.fail_after(TIMEOUT_S):
        a, b, other = new_job(key="same"), new_job(key="same"), new_job(key="other")
        out = await store.submit([a, b, other], max_backlog=BIG)
        assert out == [Submitted(a.id, True), Submitted(a.id, False), Submitted(other.id, True)]
        assert counts(store)["queued"] == 2
        assert await db_counts(store) == counts(store)


async def test_backlog_bound_refuses_the_whole_batch(store: Store) -> None:
    """Over `max_backlog` nothing of the batch is inserted; up to it, all is."""
    with anyio.fail_after(TIMEOUT_S):
        await store.submit([new_job(), new_job()], max_backlog=3)
        refused = [new_job(), new_job()]
        with pytest.raises(BacklogFull) as info:
            await store.submit(refused, max_backlog=3)
        assert (info.value.queued, info.value.limit) == (2, 3)
        for job in refused:
            assert await store.get(job.id) is None
        assert counts(store)["queued"] == 2
        await store.submit([new_job()], max_backlog=3)  # exactly at the bound is fine
        assert counts(store)["queued"] == 3
        assert await db_counts(store) == counts(store)


async def test_submit_is_all_or_nothing_when_an_op_fails_midway(store: Store) -> None:
    """A batch whose second job cannot be encoded leaves nothing behind."""
    with anyio.fail_after(TIMEOUT_S):
        good, bad = new_job(), new_job(input={"x": object()})
        with pytest.raises(TypeError):
            await store.submit([good, bad], max_backlog=BIG)
        assert await store.get(good.id) is None
        assert await db_counts(store) == counts(store)


# -- claim ---------------------------------------------------------------------------


async def test_claim_orders_by_priority_then_id_and_counts_attempts(store: Store) -> None:
    """Highest priority first, oldest first; each claim counts an attempt and records it."""
    with anyio.fail_after(TIMEOUT_S):
        ids = [await submit_one(store, priority=p) for p in (0, 5, 0, 5, 1)]
        first = await store.claim(2)
        assert [j.id for j in first] == [ids[1], ids[3]]
        rest = await store.claim(10)
        assert [j.id for j in rest] == [ids[4], ids[0], ids[2]]
        assert await store.claim(10) == []
        for job in first + rest:
            assert job.state == "running"
            assert job.attempts == 1
            assert job.started_at is not None
            [attempt] = await store.attempts(job.id)
            assert (attempt.n, attempt.outcome, attempt.finished_at) == (1, "running", None)
        assert counts(store)["running"] == 5
        assert counts(store)["queued"] == 0
        assert await db_counts(store) == counts(store)


async def test_retry_in_the_future_is_not_claimed(store: Store) -> None:
    """A job waiting for its retry time stays queued; next_wake says when it is due."""
    with anyio.fail_after(TIMEOUT_S):
        assert await store.next_wake() is None
        job_id = await submit_one(store)
        job = await claim_one(store)
        later = time.time() + 3600
        end = AttemptEnd(outcome="error", error=ErrorInfo("HTTP", "500"), retry_at=later)
        assert await store.finish(job, end) == "queued"
        assert await store.claim(10) == []
        assert await store.next_wake(after=time.time()) == pytest.approx(later)
        assert (await get(store, job_id)).not_before == pytest.approx(later)
        # A job without a retry time is ready now, is claimed at once, and does not hide
        # the waiting one from next_wake (which looks past now only).
        ready = await submit_one(store)
        assert await store.next_wake(after=time.time()) == pytest.approx(later)
        assert [j.id for j in await store.claim(10)] == [ready]
        assert await store.next_wake(after=later + 1) is None


async def test_commit_that_queues_jobs_wakes_waiters(store: Store) -> None:
    """A submit's commit notifies `store.wakeup`, so the dispatcher need not poll."""
    with anyio.fail_after(TIMEOUT_S):
        woke: list[bool] = []

        async def waiter() -> None:
            woke.append(await store.wakeup.wait(TIMEOUT_S))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await submit_one(store)
        assert woke == [True]


# -- finish --------------------------------------------------------------------------


async def test_finish_succeeded_stores_result_and_usage(store: Store) -> None:
    """Success records the result, the usage and the attempt's details."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        job = await claim_one(store)
        usage = Usage(prompt_tokens=10, completion_tokens=5, cost=0.25)
        end = AttemptEnd(
            outcome="succeeded",
            result={"summary": "short", "n": [1, 2]},
            usage=usage,
            http_status=200,
            latency_ms=12.5,
        )
        assert await store.finish(job, end) == "succeeded"
        done = await get(store, job_id)
        assert done.state == "succeeded"
        assert done.result == {"summary": "short", "n": [1, 2]}
        assert done.usage == usage
        assert done.error is None
        assert done.finished_at is not None
        [attempt] = await store.attempts(job_id)
        assert attempt.outcome == "succeeded"
        assert attempt.http_status == 200
        assert attempt.latency_ms == 12.5
        assert attempt.finished_at is not None
        assert counts(store)["succeeded"] == 1
        assert counts(store)["running"] == 0
        assert await db_counts(store) == counts(store)


async def test_usage_adds_up_over_attempts(store: Store) -> None:
    """Tokens spent by a failed attempt stay on the job's bill."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        first = await claim_one(store)
        failed = AttemptEnd(
            outcome="error",
            usage=Usage(prompt_tokens=10, completion_tokens=3),
            error=ErrorInfo("OutputInvalid", "not JSON"),
            retry_at=time.time() - 1,
        )
        assert await store.finish(first, failed) == "queued"
        second = await claim_one(store)
        ok = AttemptEnd(outcome="succeeded", result="x", usage=Usage(prompt_tokens=1))
        assert await store.finish(second, ok) == "succeeded"
        assert (await get(store, job_id)).usage == Usage(prompt_tokens=11, completion_tokens=3)


async def test_finish_with_retry_at_requeues(store: Store) -> None:
    """A retryable failure puts the job back in the queue, keeping the attempt count."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        job = await claim_one(store)
        end = AttemptEnd(
            outcome="error",
            error=ErrorInfo("HTTPError", "status 500"),
            http_status=500,
            retry_at=time.time() - 1,
        )
        assert await store.finish(job, end) == "queued"
        queued = await get(store, job_id)
        assert queued.state == "queued"
        assert queued.attempts == 1
        assert queued.error == ErrorInfo("HTTPError", "status 500")
        assert queued.finished_at is None
        assert counts(store)["queued"] == 1
        assert counts(store)["running"] == 0
        again = await claim_one(store)
        assert again.attempts == 2
        attempts = await store.attempts(job_id)
        assert [(a.n, a.outcome) for a in attempts] == [(1, "error"), (2, "running")]
        assert attempts[0].http_status == 500
        assert attempts[0].error == ErrorInfo("HTTPError", "status 500")


async def test_finish_without_retry_at_fails(store: Store) -> None:
    """A non-retryable failure dead-letters the job with its error."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        job = await claim_one(store)
        end = AttemptEnd(outcome="error", error=ErrorInfo("HTTPError", "status 401"))
        assert await store.finish(job, end) == "failed"
        failed = await get(store, job_id)
        assert failed.state == "failed"
        assert failed.error == ErrorInfo("HTTPError", "status 401")
        assert failed.finished_at is not None
        assert counts(store)["failed"] == 1
        assert await db_counts(store) == counts(store)


async def test_finish_at_max_attempts_fails_even_with_retry_at(store: Store) -> None:
    """The last attempt's failure dead-letters the job whatever retry_at says."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store, max_attempts=2)
        for expected in ("queued", "failed"):
            job = await claim_one(store)
            end = AttemptEnd(
                outcome="timeout", error=ErrorInfo("Timeout", "slow"), retry_at=time.time() - 1
            )
            assert await store.finish(job, end) == expected
        failed = await get(store, job_id)
        assert (failed.state, failed.attempts) == ("failed", 2)
        assert failed.error == ErrorInfo("Timeout", "slow")


async def test_second_finish_for_an_attempt_is_ignored(store: Store) -> None:
    """A result is recorded exactly once: a repeated finish returns None, changes nothing."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        job = await claim_one(store)
        assert await store.finish(job, AttemptEnd(outcome="succeeded", result=1)) == "succeeded"
        late = AttemptEnd(outcome="error", result=2, error=ErrorInfo("X", "late"))
        assert await store.finish(job, late) is None
        done = await get(store, job_id)
        assert (done.state, done.result, done.error) == ("succeeded", 1, None)
        [attempt] = await store.attempts(job_id)
        assert (attempt.outcome, attempt.error) == ("succeeded", None)
        assert counts(store)["succeeded"] == 1
        assert await db_counts(store) == counts(store)


async def test_finish_of_an_earlier_attempt_is_ignored(store: Store) -> None:
    """An attempt that lost the job to a retry cannot record over the current one."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        stale = await claim_one(store)
        retry = AttemptEnd(outcome="timeout", error=ErrorInfo("Timeout", "t"), retry_at=0.5)
        assert await store.finish(stale, retry) == "queued"
        current = await claim_one(store)
        assert await store.finish(stale, AttemptEnd(outcome="succeeded", result="old")) is None
        assert await store.finish(current, AttemptEnd(outcome="succeeded", result="new")) == (
            "succeeded"
        )
        assert (await get(store, job_id)).result == "new"


async def test_finish_of_an_attempt_canceled_then_retried_is_ignored(store: Store) -> None:
    """The attempt that ran before a cancel and a retry cannot record the new run's result."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        stale = await claim_one(store)
        await store.cancel(job_id)
        assert await store.retry([job_id], max_backlog=BIG) == 1
        current = await claim_one(store)
        assert await store.finish(stale, AttemptEnd(outcome="succeeded", result="old")) is None
        assert await store.finish(current, AttemptEnd(outcome="succeeded", result="new")) == (
            "succeeded"
        )
        assert (await get(store, job_id)).result == "new"


async def test_finish_that_raises_changes_nothing(store: Store) -> None:
    """A finish that fails (unencodable result) leaves the attempt and the job as they were."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        job = await claim_one(store)
        with pytest.raises(TypeError):
            await store.finish(job, AttemptEnd(outcome="succeeded", result=object()))
        assert (await get(store, job_id)).state == "running"
        [attempt] = await store.attempts(job_id)
        assert attempt.outcome == "running"


# -- requeue, cancel, retry, purge ----------------------------------------------------


async def test_requeue_gives_the_attempt_back(store: Store) -> None:
    """Our own shutdown's cut-off attempts do not count and are marked interrupted."""
    with anyio.fail_after(TIMEOUT_S):
        ids = [await submit_one(store) for _ in range(2)]
        jobs = await store.claim(10)
        assert await store.requeue(jobs, "daemon shutting down") == 2
        for job_id in ids:
            job = await get(store, job_id)
            assert (job.state, job.attempts) == ("queued", 0)
            [attempt] = await store.attempts(job_id)
            assert attempt.outcome == "interrupted"
            assert attempt.error == ErrorInfo("Interrupted", "daemon shutting down")
            assert attempt.finished_at is not None
        assert counts(store)["queued"] == 2
        assert counts(store)["running"] == 0
        assert await store.requeue(jobs, "again") == 0  # already given back
        assert await db_counts(store) == counts(store)


async def test_cancel_queued_and_running(store: Store) -> None:
    """Cancel works on queued and running jobs; the running attempt's finish is ignored."""
    with anyio.fail_after(TIMEOUT_S):
        running_id = await submit_one(store, priority=1)
        queued_id = await submit_one(store)
        running = await claim_one(store)
        assert running.id == running_id
        assert await store.cancel(queued_id) == Canceled("queued", "summarize")
        assert (await store.cancel(running_id)).was == "running"
        for job_id in (queued_id, running_id):
            job = await get(store, job_id)
            assert job.state == "canceled"
            assert job.finished_at is not None
        [attempt] = await store.attempts(running_id)
        assert attempt.outcome == "canceled"
        assert await store.finish(running, AttemptEnd(outcome="succeeded", result=1)) is None
        assert (await get(store, running_id)).state == "canceled"
        assert counts(store)["canceled"] == 2
        assert await db_counts(store) == counts(store)


async def test_cancel_of_a_finished_job_is_refused(store: Store) -> None:
    """Succeeded and canceled jobs cannot be canceled (again)."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await submit_one(store)
        job = await claim_one(store)
        await store.finish(job, AttemptEnd(outcome="succeeded", result=None))
        with pytest.raises(InvalidTransition, match="succeeded"):
            await store.cancel(job_id)
        other = await submit_one(store)
        await store.cancel(other)
        with pytest.raises(InvalidTransition, match="canceled"):
            await store.cancel(other)
        assert (await get(store, job_id)).state == "succeeded"
        assert await db_counts(store) == counts(store)


async def test_unknown_job_raises_job_not_found(store: Store) -> None:
    """Writes naming a job that does not exist raise JobNotFound; reads return None."""
    with anyio.fail_after(TIMEOUT_S):
        with pytest.raises(JobNotFound, match="nope"):
            await store.cancel("nope")
        with pytest.raises(JobNotFound, match="nope"):
            await store.retry(["nope"], max_backlog=BIG)
        assert await store.get("nope") is None
        assert await store.attempts("nope") == []


async def _failed_job(store: Store) -> str:
    """Submit, claim and fail one job; returns its id."""
    job_id = await submit_one(store)
    [job] = [j for j in await store.claim(100) if j.id == job_id]
    await store.finish(job, AttemptEnd(outcome="error", error=ErrorInfo("E", "boom")))
    return job_id


async def test_retry_puts_a_failed_job_back_with_a_fresh_budget(store: Store) -> None:
    """Retry of a failed job: queued, max_attempts more attempts with the count kept,
    not finished; a queued job refuses."""
    with anyio.fail_after(TIMEOUT_S):
        job_id = await _failed_job(store)
        before = await get(store, job_id)
        assert await store.retry([job_id], max_backlog=BIG) == 1
        job = await get(store, job_id)
        assert (job.state, job.attempts, job.finished_at) == ("queued", 1, None)
        assert job.max_attempts == before.max_attempts + 1
        assert counts(store)["queued"] == 1
        assert counts(store)["failed"] == 0
        with pytest.raises(InvalidTransition, match="queued"):
            await store.retry([job_id], max_backlog=BIG)
        assert await db_counts(store) == counts(store)


async def test_retry_none_retries_every_failed_job(store: Store) -> None:
    """`retry(None)` moves all failed jobs, and only those."""
    with anyio.fail_after(TIMEOUT_S):
        failed = [await _failed_job(store) for _ in range(3)]
        canceled = await submit_one(store)
        await store.cancel(canceled)
        assert await store.retry(None, max_backlog=BIG) == 3
        for job_id in failed:
            assert (await get(store, job_id)).state == "queued"
        assert (await get(store, canceled)).state == "canceled"
        assert await store.retry(None, max_backlog=BIG) == 0
        assert await store.retry([canceled], max_backlog=BIG) == 1
        assert counts(store)["queued"] == 4
        assert await db_counts(store) == counts(store)


async def test_retry_respects_the_backlog_bound(store: Store) -> None:
    """Retrying more than the backlog can take is refused whole."""
    with anyio.fail_after(TIMEOUT_S):
        failed = [await _failed_job(store) for _ in range(2)]
        await submit_one(store)
        with pytest.raises(BacklogFull):
            await store.retry(None, max_backlog=2)
        for job_id in failed:
            assert (await get(store, job_id)).state == "failed"
        assert counts(store)["failed"] == 2


async def test_purge_deletes_finished_jobs_and_their_attempts(store: Store) -> None:
    """Purge removes finished jobs past the cut-off with their attempts, keeps the rest."""
    with anyio.fail_after(TIMEOUT_S):
        failed = await _failed_job(store)
        succeeded = await submit_one(store)
        job = await claim_one(store)
        await store.finish(job, AttemptEnd(outcome="succeeded", result="ok"))
        canceled = await submit_one(store)
        await store.cancel(canceled)
        queued = await submit_one(store)
        assert await store.purge(3600) == 0  # nothing finished an hour ago
        assert await store.purge(0) == 3
        for job_id in (failed, succeeded, canceled):
            assert await store.get(job_id) is None
            assert await store.attempts(job_id) == []
        assert (await get(store, queued)).state == "queued"
        assert counts(store) == {
            "queued": 1,
            "running": 0,
            "succeeded": 0,
            "failed": 0,
            "canceled": 0,
        }
        assert await db_counts(store) == counts(store)


# -- group commit --------------------------------------------------------------------


async def test_concurrent_submits_share_commits(sqlite_store: Store) -> None:
    """SQLite's group commit: 300 concurrent submits share a handful of commits, none lost."""
    store = sqlite_store
    with anyio.fail_after(TIMEOUT_S):
        before = store.commits
        results: list[list[Submitted]] = []

        async def one() -> None:
            results.append(await store.submit([new_job()], max_backlog=BIG))

        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(one)
        # They queue while the first batch runs: a few batches, never one per submit.
        assert store.commits - before < 30
        assert len(results) == 300
        assert all(sub.created for [sub] in results)
        assert counts(store)["queued"] == 300
        assert await db_counts(store) == counts(store)


async def test_failing_op_in_a_batch_spares_the_others(store: Store) -> None:
    """In a shared transaction one op's error reaches its caller only."""
    with anyio.fail_after(TIMEOUT_S):
        taken = new_job()
        await store.submit([taken], max_backlog=BIG)
        errors: list[BaseException] = []
        good: list[str] = []

        async def expect_error(op: Callable[[], Awaitable[object]]) -> None:
            try:
                await op()
            except (JobNotFound, StoreError) as exc:
                errors.append(exc)

        async def submit_good() -> None:
            [sub] = await store.submit([new_job()], max_backlog=BIG)
            good.append(sub.id)

        duplicate_id = msgspec.structs.replace(new_job(input={"dup": True}), id=taken.id)
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(submit_good)
                if i == 10:
                    tg.start_soon(expect_error, functools.partial(store.cancel, "nope"))
                    tg.start_soon(
                        expect_error,
                        functools.partial(store.submit, [duplicate_id], max_backlog=BIG),
                    )
        assert sorted(type(e).__name__ for e in errors) == ["JobNotFound", "OpFailed"]
        # The duplicate was rolled back to its savepoint inside a shared transaction;
        # alone, it would have failed a whole commit.
        assert store.commit_errors == 0
        assert len(good) == 20
        assert (await get(store, taken.id)).input == {"text": "hello"}
        assert counts(store)["queued"] == 21
        assert await db_counts(store) == counts(store)


# -- crash recovery ------------------------------------------------------------------


async def test_crash_mid_attempt_requeues_and_counts_the_attempt(tmp_path: Path) -> None:
    """A job left running by a dead process runs again; the cut-off attempt counts."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "vigil.db"
        async with Store(path) as store:
            job_id = await submit_one(store, max_attempts=3)
            await claim_one(store)
            # Leave without finishing: what a killed process leaves behind.
        async with Store(path) as store:
            assert store.recovered == {"requeued": 1, "failed": 0}
            job = await get(store, job_id)
            assert (job.state, job.attempts) == ("queued", 1)
            [attempt] = await store.attempts(job_id)
            assert attempt.outcome == "crashed"
            assert attempt.error == ErrorInfo("ProcessDied", "process died during the attempt")
            assert attempt.finished_at is not None
            assert counts(store)["queued"] == 1
            assert counts(store)["running"] == 0
            again = await claim_one(store)
            assert again.attempts == 2


async def test_crash_on_the_last_attempt_dead_letters(tmp_path: Path) -> None:
    """A job that used its last attempt when the process died fails, naming why."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "vigil.db"
        async with Store(path) as store:
            job_id = await submit_one(store, max_attempts=1)
            await claim_one(store)
        async with Store(path) as store:
            assert store.recovered == {"requeued": 0, "failed": 1}
            job = await get(store, job_id)
            assert (job.state, job.attempts) == ("failed", 1)
            assert job.error is not None
            assert job.error.message == "process died during the attempt"
            assert job.finished_at is not None
            [attempt] = await store.attempts(job_id)
            assert attempt.outcome == "crashed"
            assert counts(store)["failed"] == 1
            assert counts(store)["running"] == 0


async def test_clean_reopen_recovers_nothing_and_keeps_jobs(tmp_path: Path) -> None:
    """Jobs survive a close and reopen; with nothing running, nothing is recovered."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "vigil.db"
        async with Store(path) as store:
            ids = [await submit_one(store) for _ in range(3)]
        async with Store(path) as store:
            assert store.recovered == {"requeued": 0, "failed": 0}
            assert counts(store)["queued"] == 3
            assert {j.id for j in await store.list_jobs()} == set(ids)


async def test_writes_after_close_raise_store_error(tmp_path: Path) -> None:
    """A closed store refuses writes and reads with StoreError."""
    with anyio.fail_after(TIMEOUT_S):
        async with Store(tmp_path / "vigil.db") as store:
            pass
        with pytest.raises(StoreError):
            await store.submit([new_job()], max_backlog=BIG)
        with pytest.raises(StoreError):
            await store.get("x")


# -- schema --------------------------------------------------------------------------


async def _user_version(path: Path) -> int:
    async with aiosqlite.connect(path) as db, db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_fresh_database_is_at_schema_version(tmp_path: Path) -> None:
    """A new database ends at SCHEMA_VERSION."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "sub" / "vigil.db"
        async with Store(path):
            pass
        assert await _user_version(path) == SCHEMA_VERSION


async def test_version_zero_database_is_migrated(tmp_path: Path) -> None:
    """An empty file (user_version 0) gets every migration and then works."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "vigil.db"
        path.touch()
        assert await _user_version(path) == 0
        async with Store(path) as store:
            job_id = await submit_one(store)
            assert (await get(store, job_id)).state == "queued"
        assert await _user_version(path) == SCHEMA_VERSION


async def test_migrate_reports_start_version_and_is_idempotent(tmp_path: Path) -> None:
    """migrate() returns the version it found; a second run changes nothing."""
    with anyio.fail_after(TIMEOUT_S):
        async with aiosqlite.connect(tmp_path / "m.db", isolation_level=None) as db:
            assert await migrate(db) == 0
            assert await migrate(db) == SCHEMA_VERSION


async def _open_expecting(path: Path, error: type[Exception]) -> None:
    """Open a Store on `path`, expecting start-up to raise `error`; then collect garbage,
    so whatever the failed Store left unclosed is reported inside the calling test."""
    try:
        async with Store(path):
            pytest.fail("the store opened")
    except error:
        pass
    gc.collect()


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Unraisable exceptions (e.g. ResourceWarning from __del__) seen during the test."""
    caught: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: caught.append(repr(u.exc_value)))
    return caught


async def _make_newer_db(path: Path) -> None:
    async with aiosqlite.connect(path) as db:
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        await db.commit()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database from a newer Vigil raises SchemaTooNew and is left without our tables."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "vigil.db"
        await _make_newer_db(path)
        async with aiosqlite.connect(path, isolation_level=None) as db:
            with pytest.raises(SchemaTooNew, match=str(SCHEMA_VERSION + 1)):
                await migrate(db)
        await _open_expecting(path, SchemaTooNew)
        assert await _user_version(path) == SCHEMA_VERSION + 1
        async with (
            aiosqlite.connect(path) as db,
            db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur,
        ):
            assert await cur.fetchall() == []


async def test_failed_open_leaves_nothing_unclosed(tmp_path: Path, unraisable: list[str]) -> None:
    """A Store whose start-up fails (SchemaTooNew) closes what it created."""
    with anyio.fail_after(TIMEOUT_S):
        path = tmp_path / "vigil.db"
        await _make_newer_db(path)
        await _open_expecting(path, SchemaTooNew)
        assert unraisable == []


async def test_claim_select_uses_the_pick_index(sqlite_store: Store) -> None:
    """The claim's inner SELECT walks jobs_pick in order: no sort step (SQLite's plan)."""
    store = sqlite_store
    with anyio.fail_after(TIMEOUT_S):
        await store.submit([new_job(priority=i % 3) for i in range(50)], max_backlog=BIG)
        async with (
            aiosqlite.connect(store.path) as db,
            db.execute(f"EXPLAIN QUERY PLAN {CLAIM_SELECT}", (time.time(), 10)) as cur,
        ):
            plan = " | ".join(str(row[3]) for row in await cur.fetchall())
        assert "jobs_pick" in plan
        assert "TEMP B-TREE" not in plan


def test_database_faults_fail_the_batch_and_operation_errors_only_their_op(
    tmp_path: Path,
) -> None:
    """Classified by SQLite's result code: a read-only or corrupt database spoils the
    whole batch; a constraint or a bad statement fails one operation."""
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO t VALUES (1)")
    errors: list[sqlite3.Error] = []
    readonly = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    for conn, sql in (
        (readonly, "INSERT INTO t VALUES (2)"),
        (sqlite3.connect(path), "INSERT INTO t VALUES (1)"),
        (sqlite3.connect(path), "SELECT * FROM missing"),
    ):
        try:
            conn.execute(sql)
        except sqlite3.Error as exc:
            errors.append(exc)
        conn.close()
    assert [_is_fatal(e) for e in errors] == [True, False, False]
    path.write_bytes(b"\0" * 4096 * 4)  # no longer a database
    garbage = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError) as caught:
        garbage.execute("SELECT * FROM t")
    garbage.close()
    assert _is_fatal(caught.value)


async def run_until_failed(store: Store, end: AttemptEnd) -> None:
    """Dispatch with every attempt ending as `end`, until a job has failed."""

    async def execute(job: Job) -> AttemptEnd:
        return end

    dispatcher = Dispatcher(store, execute, max_concurrency=1)
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            while store.counts["failed"] == 0:  # noqa: ASYNC110  (the store's state)
                await anyio.sleep(0.01)
            await dispatcher.drain(1.0)
            tg.cancel_scope.cancel()


async def test_a_result_the_database_refuses_fails_the_job_instead_of_retrying(
    sqlite_store: Store,
) -> None:
    """An attempt's record SQLite will not take (here: longer than its length limit)
    is not retried forever: the attempt is recorded as failed, naming why, and the
    job ends while the database goes on serving."""
    store = sqlite_store
    job_id = await submit_one(store, max_attempts=1)
    db = store._db
    assert db is not None  # in the connection's own thread, as sqlite3 requires
    await db._execute(db._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 20_000)  # type: ignore[no-untyped-call]
    await run_until_failed(
        store, AttemptEnd(outcome="succeeded", result="x" * 50_000, latency_ms=1)
    )
    job = await get(store, job_id)
    assert job.state == "failed" and job.result is None
    assert job.error is not None and job.error.type == "RecordFailed"
    assert "too big" in job.error.message
    assert store.last_error is None  # the database itself is fine


async def test_an_error_text_sqlite3_cannot_bind_still_ends_the_job(store: Store) -> None:
    """A handler's exception text with a lone surrogate (sqlite3 cannot encode it)
    fails that record alone, as one SQLite refuses: the job ends, naming why, instead
    of staying `running` until a restart."""
    job_id = await submit_one(store, max_attempts=1)
    error = ErrorInfo("RuntimeError", "bad \ud800 text")
    await run_until_failed(store, AttemptEnd(outcome="error", error=error, latency_ms=1))
    job = await get(store, job_id)
    assert job.state == "failed" and job.error is not None
    assert job.error.type == "RecordFailed", job.error
    assert "could not be stored" in job.error.message and "surrogate" in job.error.message
    assert store.last_error is None


async def test_a_new_database_and_its_wal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Every input and result lives in the database: it, its WAL and its shared-memory
    file are 0600 even under a permissive umask."""
    old = os.umask(0o002)
    try:
        with anyio.fail_after(TIMEOUT_S):
            async with Store(tmp_path / "vigil.db") as store:
                await submit_one(store)
                modes = {
                    name: stat.S_IMODE((tmp_path / name).stat().st_mode)
                    for name in ("vigil.db", "vigil.db-wal", "vigil.db-shm")
                }
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(modes, 0o600), {k: oct(v) for k, v in modes.items()}
