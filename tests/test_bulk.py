"""Bulk actions and idempotency conflicts in the store's contract, on both backends (a
real SQLite file, a real PostgreSQL database): filters, batches, exact counts."""

# The `store` fixture (both backends) is test_store's, imported: its uses shadow it.

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from daemon.config import Config, QueueConfig, RetentionConfig
from daemon.jobs import ErrorInfo, JobIds
from daemon.retention import DAY_S, keep_for
from daemon.store.base import AttemptEnd, BacklogFull, IdempotencyConflict, NewJob, Submitted
from daemon.store.bulk import run_bulk
from daemon.store.filters import JobFilter
from tests.test_store import BIG, TIMEOUT_S, claim_one, counts, db_counts, get

pytestmark = pytest.mark.anyio
IDS = JobIds()


def job(analyzer: str = "summarize", *, key: str | None = None, text: str = "hi") -> NewJob:
    """A valid job of that analyzer, with a fresh time-ordered id."""
    return NewJob(
        id=IDS.new(),
        analyzer=analyzer,
        input={"text": text},
        priority=0,
        idempotency_key=key,
        max_attempts=1,
        source="test",
    )


async def submit(store: Any, jobs: list[NewJob]) -> list[str]:
    """Submit jobs that must all be created; their ids."""
    out = await store.submit(jobs, max_backlog=BIG)
    assert all(s.created for s in out)
    return [s.id for s in out]


async def fail(store: Any, error_type: str) -> str:
    """A job that ran once and failed with `error_type`."""
    [job_id] = await submit(store, [job()])
    claimed = await claim_one(store)
    assert claimed.id == job_id
    end = AttemptEnd(outcome="error", error=ErrorInfo(error_type, "boom"))
    assert await store.finish(claimed, end) == "failed"
    return job_id


async def succeed(store: Any) -> str:
    """A job that ran once and succeeded."""
    [job_id] = await submit(store, [job()])
    claimed = await claim_one(store)
    assert await store.finish(claimed, AttemptEnd(outcome="succeeded", result="ok")) == "succeeded"
    return job_id


async def test_bulk_cancel_by_analyzer_in_batches_keeps_counts_exact(store: Any) -> None:
    """Canceling by analyzer in batches of 3 takes every queued and running job of it
    (their attempts marked canceled), none of the other analyzer, counts exact."""
    with anyio.fail_after(TIMEOUT_S):
        await submit(store, [job("classify")])
        running = await claim_one(store)
        targets = await submit(store, [job("classify") for _ in range(7)])
        others = await submit(store, [job("summarize") for _ in range(4)])
        seen: list[str] = []
        result = await run_bulk(
            store,
            "cancel",
            JobFilter(analyzer="classify"),
            max_backlog=BIG,
            batch=3,
            on_rows=lambda rows: seen.extend(r.id for r in rows),
        )
        assert (result.matched, result.changed) == (8, 8)
        assert result.by_state == {"queued": 7, "running": 1}
        assert sorted(seen) == sorted([running.id, *targets])
        assert sorted(result.sample) == sorted(seen)
        assert counts(store)["canceled"] == 8 and counts(store)["queued"] == 4
        assert await db_counts(store) == {**dict.fromkeys(counts(store), 0), **counts(store)}
        assert [a.outcome for a in await store.attempts(running.id)] == ["canceled"]
        assert {(await get(store, i)).state for i in others} == {"queued"}


async def test_dry_run_counts_and_samples_without_changing_anything(store: Any) -> None:
    """A dry run says how many and shows at most 10 ids, oldest first; nothing moves."""
    with anyio.fail_after(TIMEOUT_S):
        ids = await submit(store, [job() for _ in range(12)])
        before = counts(store)
        result = await run_bulk(store, "cancel", JobFilter(), dry_run=True, max_backlog=BIG)
        assert (result.matched, result.changed) == (12, 0)
        assert result.by_state == {"queued": 12, "running": 0}
        assert result.sample == ids[:10]
        assert counts(store) == before
        assert await store.count_jobs(JobFilter(states=("queued",))) == {"queued": 12}


async def test_bulk_retry_by_error_type_only_touches_failed_and_canceled(store: Any) -> None:
    """Retry with error_type requeues only the failed jobs of that type, with a fresh
    attempt budget; a retried job is never met twice in one pass."""
    with anyio.fail_after(TIMEOUT_S):
        timeouts = [await fail(store, "Timeout") for _ in range(3)]
        other = await fail(store, "HTTPError")
        result = await run_bulk(
            store, "retry", JobFilter(error_type="Timeout"), max_backlog=BIG, batch=2
        )
        assert result.by_state == {"failed": 3, "canceled": 0}
        for job_id in timeouts:
            again = await get(store, job_id)
            assert (again.state, again.max_attempts) == ("queued", 2)
        assert (await get(store, other)).state == "failed"
        assert counts(store)["queued"] == 3 and counts(store)["failed"] == 1
        assert await db_counts(store) == {**dict.fromkeys(counts(store), 0), **counts(store)}


async def test_bulk_retry_over_the_backlog_bound_changes_nothing(store: Any) -> None:
    """A retry that would pass max_backlog is refused whole, before any batch."""
    with anyio.fail_after(TIMEOUT_S):
        for _ in range(3):
            await fail(store, "X")
        await submit(store, [job()])
        with pytest.raises(BacklogFull):
            await run_bulk(store, "retry", JobFilter(), max_backlog=3)
        assert counts(store)["failed"] == 3


async def test_bulk_purge_deletes_only_finished_jobs_matching(store: Any) -> None:
    """Purge with no state deletes succeeded, failed and canceled jobs (attempts too)
    but never queued or running ones; finished_before and before narrow it."""
    with anyio.fail_after(TIMEOUT_S):
        old_ok = await succeed(store)
        failed = await fail(store, "X")
        late = await succeed(store)
        queued = await submit(store, [job() for _ in range(2)])
        narrowed = await run_bulk(store, "purge", JobFilter(before=late), max_backlog=BIG)
        assert narrowed.by_state == {"succeeded": 1, "failed": 1, "canceled": 0}
        assert await store.get(old_ok) is None and await store.get(failed) is None
        assert await store.attempts(old_ok) == []
        future = JobFilter(finished_before=time.time() - 3600)
        assert (await run_bulk(store, "purge", future, max_backlog=BIG)).changed == 0
        rest = await run_bulk(store, "purge", JobFilter(), max_backlog=BIG, batch=1)
        assert rest.changed == 1
        assert [(await get(store, i)).state for i in queued] == ["queued", "queued"]
        assert counts(store)["succeeded"] == counts(store)["failed"] == 0
        assert await db_counts(store) == {**dict.fromkeys(counts(store), 0), **counts(store)}


async def test_created_window_filters(store: Any) -> None:
    """since/until select by creation time: [since, until)."""
    with anyio.fail_after(TIMEOUT_S):
        first = await submit(store, [job()])
        await anyio.sleep(0.05)
        cut = time.time()
        await anyio.sleep(0.05)
        second = await submit(store, [job()])
        assert await store.find_ids(JobFilter(until=cut), 10) == first
        assert await store.find_ids(JobFilter(since=cut), 10) == second
        assert await store.find_ids(JobFilter(states=("queued",), ids=()), 10) == []


async def test_idempotency_conflict_writes_nothing(store: Any) -> None:
    """The same key with another input or analyzer is a conflict naming the key and the
    first job; nothing of that submit is written. The same job again (keys in another
    order) still returns the first."""
    with anyio.fail_after(TIMEOUT_S):
        first = NewJob(
            id=IDS.new(), analyzer="summarize", input={"a": 1, "b": 2}, priority=0,
            idempotency_key="k1", max_attempts=1, source="test",
        )  # fmt: skip
        [sub] = await store.submit([first], max_backlog=BIG)
        same = NewJob(
            id=IDS.new(), analyzer="summarize", input={"b": 2, "a": 1}, priority=0,
            idempotency_key="k1", max_attempts=1, source="test",
        )  # fmt: skip
        assert await store.submit([same], max_backlog=BIG) == [Submitted(sub.id, False)]
        for bad in (job(key="k1", text="other"), job("classify", key="k1")):
            with pytest.raises(IdempotencyConflict) as caught:
                await store.submit([job(), bad], max_backlog=BIG)
            assert (caught.value.key, caught.value.job_id) == ("k1", sub.id)
        assert counts(store)["queued"] == 1
        assert await db_counts(store) == {**dict.fromkeys(counts(store), 0), "queued": 1}


def test_retention_ages_take_the_shorter_of_both_forms() -> None:
    """Per-state days and queue.retain_finished_s: the shorter applies; 0 is forever."""
    config = Config(
        retention=RetentionConfig(succeeded_days=1, failed_days=0, canceled_days=10),
        queue=QueueConfig(retain_finished_s=2 * DAY_S),
    )
    assert keep_for(config) == {"succeeded": DAY_S, "failed": 2 * DAY_S, "canceled": 2 * DAY_S}
    forever = Config(retention=RetentionConfig(succeeded_days=0, failed_days=0, canceled_days=0))
    assert keep_for(forever) == {"succeeded": 0.0, "failed": 0.0, "canceled": 0.0}
    assert keep_for(Config()) == {
        "succeeded": 7 * DAY_S,
        "failed": 30 * DAY_S,
        "canceled": 7 * DAY_S,
    }
