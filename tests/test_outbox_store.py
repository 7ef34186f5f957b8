"""Results out at the store, on both backends (a real SQLite file, a real PostgreSQL
database): every way a job ends writes its event and the deliveries of the webhooks
that want it, in the same transaction; events read in order from a cursor, pruned as
a prefix with expired cursors refused; deliveries claimed, retried, dead-lettered,
requeued and pruned."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from daemon.config import StoreConfig
from daemon.jobs import ErrorInfo
from daemon.store.base import AttemptEnd
from daemon.store.outbox import Cursor, CursorError, CursorExpired, DeliveryEnd, WebhookRoute
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import Store
from tests.test_store import BIG, new_job

pytestmark = pytest.mark.anyio
TIMEOUT_S = 20
OK = AttemptEnd(outcome="succeeded", result={"ok": 1}, latency_ms=1)
FAILED = AttemptEnd(outcome="error", error=ErrorInfo("Boom", "no"), latency_ms=1)


async def ended(store: Any, n: int, end: AttemptEnd = OK) -> list[str]:
    """`n` jobs submitted, claimed and ended with `end` (max_attempts 1: a failure is final)."""
    subs = await store.submit([new_job(max_attempts=1) for _ in range(n)], max_backlog=BIG)
    for job in await store.claim(n):
        await store.finish(job, end)
    return [s.id for s in subs]


async def all_events(store: Any, after: Cursor | None = None, page: int = 3) -> list[Any]:
    after = after or Cursor()
    out: list[Any] = []
    while True:
        got = await store.events_after(after, page)
        out.extend(got.events)
        if not got.events:
            return out
        after = Cursor.parse(got.cursor)


async def test_every_way_a_job_ends_is_an_event_in_order(store: Any) -> None:
    """Succeeded, failed (last attempt), canceled (queued and running): one event
    each, in the order they ended, with the job; a requeue or a retry is none."""
    with anyio.fail_after(TIMEOUT_S):
        assert await store.events_head() == Cursor()
        [ok] = await ended(store, 1)
        [bad] = await ended(store, 1, FAILED)
        [queued] = [s.id for s in await store.submit([new_job()], max_backlog=BIG)]
        await store.cancel(queued)
        [running] = [s.id for s in await store.submit([new_job()], max_backlog=BIG)]
        [job] = await store.claim(1)
        await store.requeue([job], "shutdown")  # not an end
        [job] = await store.claim(1)
        await store.cancel(running)
        events = await all_events(store, page=2)
        assert [(e.job_id, e.event) for e in events] == [
            (ok, "job.succeeded"),
            (bad, "job.failed"),
            (queued, "job.canceled"),
            (running, "job.canceled"),
        ]
        assert events[0].job is not None and events[0].job.result == {"ok": 1}
        assert events[1].job is not None and events[1].job.error.type == "Boom"
        assert await store.events_head() == Cursor.parse(events[-1].cursor)
        # Read on from the third: only the fourth; from the last, nothing.
        rest = await store.events_after(Cursor.parse(events[2].cursor), 10)
        assert [e.job_id for e in rest.events] == [running]
        tail = await store.events_after(Cursor.parse(events[-1].cursor), 10)
        assert tail.events == [] and tail.cursor == events[-1].cursor
        # A retried job that ends again is a second event.
        assert await store.retry([bad], max_backlog=BIG) == 1
        [again] = await store.claim(1)
        await store.finish(again, OK)
        [last] = (await store.events_after(Cursor.parse(events[-1].cursor), 10)).events
        assert (last.job_id, last.event) == (bad, "job.succeeded")


async def test_a_purged_job_leaves_its_event_without_the_job(store: Any) -> None:
    """The stream still says the job ended; the job itself is gone."""
    with anyio.fail_after(TIMEOUT_S):
        [jid] = await ended(store, 1)
        assert await store.purge(0) == 1
        [event] = (await store.events_after(Cursor(), 10)).events
        assert (event.job_id, event.job) == (jid, None)


async def test_pruned_events_expire_older_cursors(store: Any) -> None:
    """Retention prunes the oldest events as a prefix; a cursor before the newest
    pruned one is refused (reading on would skip events), the beginning and later
    cursors read what is kept."""
    with anyio.fail_after(TIMEOUT_S):
        await ended(store, 3)
        first, second, third = await all_events(store)
        cut = second.at + 1e-6
        await ended(store, 1)
        assert await store.prune_events(cut) == 2
        with pytest.raises(CursorExpired, match="older than the events kept"):
            await store.events_after(Cursor.parse(first.cursor), 10)
        kept = await all_events(store)
        assert [e.job_id for e in kept][:1] == [third.job_id] and len(kept) == 2
        assert len(await all_events(store, Cursor.parse(second.cursor))) == 2
        assert await store.prune_events(0.0) == 0
        # However old, the newest event stays: its sequence number is never given again.
        assert await store.prune_events(time.time() + 1) == 1
        [newest] = await all_events(store)
        [later] = await ended(store, 1)
        [after] = (await store.events_after(Cursor.parse(newest.cursor), 10)).events
        assert after.job_id == later and Cursor.parse(after.cursor) > Cursor.parse(newest.cursor)


async def test_cursor_text_round_trips_and_garbage_is_refused() -> None:
    """The cursor is opaque to clients but must come back as it went out."""
    for cursor in (Cursor(), Cursor(0, 7), Cursor(812, 9)):
        assert Cursor.parse(str(cursor)) == cursor
    assert Cursor.parse("") == Cursor() and Cursor.parse(None) == Cursor()
    for bad in ("x", "1-2-3", "-5", "1-"):
        with pytest.raises(CursorError):
            Cursor.parse(bad)


async def test_deliveries_are_written_with_the_end_for_the_webhooks_that_want_them(
    store: Any,
) -> None:
    """A webhook gets the events it names, for its analyzers ([] for all); one
    delivery per webhook and event."""
    with anyio.fail_after(TIMEOUT_S):
        await store.sync_webhooks(
            [
                WebhookRoute("all", ("job.succeeded", "job.failed"), ()),
                WebhookRoute("fails", ("job.failed",), ()),
                WebhookRoute("other", ("job.succeeded",), ("translate",)),
            ]
        )
        [ok] = await ended(store, 1)
        [bad] = await ended(store, 1, FAILED)
        claimed = {
            name: [(d.job_id, d.event) for d in await store.claim_deliveries(name, 10, 30)]
            for name in ("all", "fails", "other")
        }
        assert claimed == {
            "all": [(ok, "job.succeeded"), (bad, "job.failed")],
            "fails": [(bad, "job.failed")],
            "other": [],
        }
        # Synced anew (a reload): the next ends follow the new routes.
        await store.sync_webhooks([WebhookRoute("other", ("job.succeeded",), ("summarize",))])
        [later] = await ended(store, 1)
        assert [d.job_id for d in await store.claim_deliveries("other", 10, 30)] == [later]
        assert await store.claim_deliveries("all", 10, 30) == []


async def test_a_delivery_is_leased_retried_dead_lettered_and_requeued(store: Any) -> None:
    """Claimed: held for the lease (no one else takes it), its attempt counted; a
    retry waits its time; past the lease an unended one is due again; a dead one is
    counted and requeued by `retry_dead`; ended ones are pruned by age."""
    with anyio.fail_after(TIMEOUT_S):
        await store.sync_webhooks([WebhookRoute("crm", ("job.succeeded",), ())])
        ids = await ended(store, 3)
        assert (await store.webhook_counts())["crm"].pending == 3
        d1, d2, d3 = await store.claim_deliveries("crm", 10, 30)
        assert [d.job_id for d in (d1, d2, d3)] == ids and d1.attempts == 1
        assert await store.claim_deliveries("crm", 10, 30) == []  # leased
        await store.end_delivery(d1.id, DeliveryEnd(delivered=True, status=200))
        await store.end_delivery(d2.id, DeliveryEnd(delivered=False, status=500, retry_at=0.0))
        await store.end_delivery(d3.id, DeliveryEnd(delivered=False, error="refused"))
        counts = (await store.webhook_counts())["crm"]
        assert (counts.pending, counts.dead) == (1, 1)
        [again] = await store.claim_deliveries("crm", 10, 30)
        assert (again.id, again.attempts) == (d2.id, 2)
        # A lease of 0: due again at once, as after a crash mid-POST.
        await store.end_delivery(again.id, DeliveryEnd(delivered=False, retry_at=time.time()))
        [leased] = await store.claim_deliveries("crm", 10, 0.0)
        [stolen] = await store.claim_deliveries("crm", 10, 30)
        assert leased.id == stolen.id == d2.id and stolen.attempts == 4
        assert await store.next_delivery_at("crm") is not None
        await store.end_delivery(stolen.id, DeliveryEnd(delivered=True, status=204))
        assert await store.next_delivery_at("crm") is None
        # A late end of a delivery already ended changes nothing.
        await store.end_delivery(leased.id, DeliveryEnd(delivered=False, error="late"))
        assert await store.retry_dead("crm") == 1
        [revived] = await store.claim_deliveries("crm", 10, 30)
        assert (revived.id, revived.attempts) == (d3.id, 1)
        await store.end_delivery(revived.id, DeliveryEnd(delivered=True, status=200))
        assert await store.webhook_counts() == {}
        assert await store.prune_deliveries("delivered", time.time() + 1) == 3
        assert await store.prune_deliveries("delivered", time.time() + 1) == 0


async def test_postgres_readers_never_pass_an_end_still_committing(
    request: pytest.FixtureRequest,
) -> None:
    """An end whose transaction is still open holds back the ends that committed
    after it began: a reader going by sequence alone would pass it and never see it."""
    import asyncpg

    from daemon.store import pg_jobs

    dsn = request.getfixturevalue("pg_dsn")
    with anyio.fail_after(TIMEOUT_S):
        async with PostgresStore(StoreConfig(url=dsn, node_name="reader")) as store:
            slow, fast = [s.id for s in await store.submit([new_job(), new_job()], max_backlog=BIG)]
            conn = await asyncpg.connect(dsn)
            try:
                tx = conn.transaction()
                await tx.start()
                await pg_jobs.cancel(conn, slow)  # as the store cancels: the end with it
                await store.cancel(fast)  # commits while the first is still open
                assert (await store.events_after(Cursor(), 10)).events == []
                await tx.commit()
            finally:
                await conn.close()
            got = [e.job_id for e in (await store.events_after(Cursor(), 10)).events]
            assert got == [slow, fast]


async def test_a_bulk_cancel_is_an_end_for_each_job(store: Any) -> None:
    """A bulk cancel's jobs each end: an event and the deliveries that want it."""
    from daemon.store.filters import JobFilter

    with anyio.fail_after(TIMEOUT_S):
        await store.sync_webhooks([WebhookRoute("crm", ("job.canceled",), ())])
        ids = [s.id for s in await store.submit([new_job() for _ in range(3)], max_backlog=BIG)]
        rows = await store.bulk_step(
            "cancel", JobFilter(states=("queued",)), limit=10, max_backlog=BIG
        )
        assert len(rows) == 3
        events = await all_events(store)
        assert sorted(e.job_id for e in events) == sorted(ids)
        assert {e.event for e in events} == {"job.canceled"}
        assert len(await store.claim_deliveries("crm", 10, 30)) == 3


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_recovery_at_start_ends_a_job_on_its_last_attempt_with_its_deliveries(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A daemon that died mid-attempt on a job's last attempt: the restart fails the
    job (an end), with its event and the delivery of the webhooks configured when it
    died (the store keeps them), before the new config is synced."""

    def opened() -> Any:
        if backend == "sqlite":
            return Store(tmp_path / "vigil.db", synchronous="NORMAL")
        dsn = request.getfixturevalue("pg_dsn")
        return PostgresStore(StoreConfig(url=dsn, node_name="node-a"))

    with anyio.fail_after(TIMEOUT_S):
        async with opened() as store:
            await store.sync_webhooks([WebhookRoute("crm", ("job.failed",), ())])
            [sub] = await store.submit([new_job(max_attempts=1)], max_backlog=BIG)
            await store.claim(1)  # and the process dies here
        async with opened() as again:
            assert again.recovered == {"requeued": 0, "failed": 1}
            [event] = (await again.events_after(Cursor(), 10)).events
            assert (event.job_id, event.event) == (sub.id, "job.failed")
            [delivery] = await again.claim_deliveries("crm", 10, 30)
            assert delivery.job_id == sub.id


async def test_an_export_walking_the_ids_reads_what_the_listing_does(store: Any) -> None:
    """An export's pages read along the ids (`walk`): the same jobs, in the same
    order, as the filter's own listing."""
    import msgspec

    from daemon.store.filters import JobFilter

    with anyio.fail_after(TIMEOUT_S):
        await ended(store, 5)
        await ended(store, 7, FAILED)
        await ended(store, 3)
        flt = JobFilter(states=("failed",), analyzer="summarize")
        listed = [job.id for job in await store.list_jobs(flt, limit=100)]
        walked: list[str] = []
        page = await store.list_jobs(flt, limit=3)
        while page:
            walked += [job.id for job in page]
            flt = msgspec.structs.replace(flt, before=page[-1].id)
            page = await store.list_jobs(flt, limit=3, walk=True)
        assert walked == listed and len(listed) == 7
