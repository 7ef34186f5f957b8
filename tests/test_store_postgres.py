"""What only a shared store has, on a real PostgreSQL: nodes, their leases, the reaper
that takes over a silent node's attempts, fencing of a late finish, one migration for
nodes starting together, and refusals at start (newer schema, a name in use)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from daemon.config import SimulateConfig, StoreConfig
from daemon.jobs import Job, JobIds
from daemon.providers.client import ApiProvider
from daemon.providers.shared_state import ProviderSync
from daemon.simulated.server import SimulatedAPI
from daemon.store.base import AttemptEnd, NewJob, StoreError, StoreRefused
from daemon.store.pg_reads import safe_url
from daemon.store.pg_schema import SCHEMA_VERSION
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import Store
from tests.pg_server import PgServer
from tests.test_provider import chat, config, serve_app

pytestmark = pytest.mark.anyio

TIMEOUT_S = 30
IDS = JobIds()
OpenStore = Callable[..., AbstractAsyncContextManager[PostgresStore]]


def new_job(key: str | None = None) -> NewJob:
    """A valid job with a fresh id."""
    return NewJob(
        id=IDS.new(),
        analyzer="summarize",
        input={"text": "hello"},
        priority=0,
        idempotency_key=key,
        max_attempts=3,
        source="test",
    )


@pytest.fixture
def open_store(pg_dsn: str) -> OpenStore:
    """Open a PostgresStore on this test's database as the named node."""

    def make(node: str, **settings: Any) -> AbstractAsyncContextManager[PostgresStore]:
        return PostgresStore(StoreConfig(url=pg_dsn, node_name=node, **settings))

    return make


async def test_a_node_restarted_under_its_name_recovers_its_attempts_at_once(
    open_store: OpenStore,
) -> None:
    """A node that died mid-attempt (its jobs still `running` under its name) counts
    that attempt as crashed and requeues the job as it comes back, without a lease."""
    with anyio.fail_after(TIMEOUT_S):
        async with open_store("a") as a:
            [sub] = await a.submit([new_job()], max_backlog=100)
            [job] = await a.claim(1)
        async with open_store("a") as again:
            assert again.recovered == {"requeued": 1, "failed": 0}
            back = await again.get(sub.id)
            assert back is not None and (back.state, back.attempts) == ("queued", 1)
            [attempt] = await again.attempts(job.id)
            assert attempt.outcome == "crashed"


async def test_a_silent_node_is_taken_over_and_its_late_finish_refused(
    open_store: OpenStore,
) -> None:
    """Node a claims a job and falls silent; past the lease node b's reaper marks the
    attempt crashed and requeues the job, b runs it, and a's finish, arriving late,
    records nothing: the job has one result, and the refusal is counted."""
    with anyio.fail_after(TIMEOUT_S):
        async with open_store("b", lease_s=3) as b:
            async with open_store("a", lease_s=3) as a:
                [sub] = await a.submit([new_job()], max_backlog=100)
                [stale] = await a.claim(1)
            assert {n.name: n.alive for n in b.nodes()}.get("a", True)
            for _ in range(100):  # b's next count sees a's attempt
                if b.counts["running"] == 1:
                    break
                await anyio.sleep(0.1)
            # As with a large table, counting is put off: b's own moves keep the counts.
            b._counts_due = math.inf
            for _ in range(100):  # the reaper's round comes every second
                job = await b.get(sub.id)
                if job is not None and job.state == "queued":
                    break
                await anyio.sleep(0.2)
            assert {n.name: n.alive for n in b.nodes()}["a"] is False
            assert b.reaped == 1
            [mine] = await b.claim(1)
            assert mine.attempts == 2
            late = AttemptEnd(outcome="succeeded", result="from a", latency_ms=1)
            assert await b.finish(stale, late) is None
            assert b.refused_finishes == 1
            ok = AttemptEnd(outcome="succeeded", result="from b", latency_ms=1)
            assert await b.finish(mine, ok) == "succeeded"
            done = await b.get(sub.id)
            assert done is not None and done.result == "from b"
            outcomes = [a.outcome for a in await b.attempts(sub.id)]
            assert outcomes == ["crashed", "succeeded"]
            assert (b.counts["queued"], b.counts["running"], b.counts["succeeded"]) == (0, 0, 1)


async def test_nodes_share_one_queue_and_one_idempotency_key(open_store: OpenStore) -> None:
    """Two nodes claim from one queue without taking a job twice, and the same key sent
    to both at once makes one job."""
    with anyio.fail_after(TIMEOUT_S):
        async with open_store("a") as a, open_store("b") as b:
            subs: list[Any] = []

            async def send(store: PostgresStore) -> None:
                subs.extend(await store.submit([new_job(key="same")], max_backlog=100))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send, a)
                tg.start_soon(send, b)
            assert len({s.id for s in subs}) == 1
            assert sorted(s.created for s in subs) == [False, True]
            await a.submit([new_job() for _ in range(40)], max_backlog=100)
            claimed: list[str] = []

            async def take(store: PostgresStore) -> None:
                for _ in range(10):
                    claimed.extend(job.id for job in await store.claim(3))

            async with anyio.create_task_group() as tg:
                tg.start_soon(take, a)
                tg.start_soon(take, b)
            assert len(claimed) == len(set(claimed)) == 41
            names = {n.name for n in b.nodes()}  # b started second: it saw a
            assert {"a", "b"} <= names


async def test_nodes_starting_together_migrate_once(open_store: OpenStore, pg_dsn: str) -> None:
    """Three nodes opening an empty database at once: one migration, three nodes."""
    with anyio.fail_after(TIMEOUT_S):
        opened: list[str] = []

        async def start(name: str) -> None:
            async with open_store(name) as store:
                opened.append(store.node)

        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(start, name)
        assert sorted(opened) == ["a", "b", "c"]
        conn = await asyncpg.connect(pg_dsn)
        try:
            versions = await conn.fetch("SELECT version FROM vigil_schema")
        finally:
            await conn.close()
        assert sorted(v["version"] for v in versions) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_newer_schema_and_a_name_in_use_are_refused(
    open_store: OpenStore, pg_dsn: str
) -> None:
    """Start refusals a human must fix are StoreRefused (exit 78), naming the reason."""
    with anyio.fail_after(TIMEOUT_S):
        async with open_store("a"):
            with pytest.raises(StoreRefused, match="another daemon named 'a'"):
                async with open_store("a"):
                    pytest.fail("a second daemon named a started")
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("INSERT INTO vigil_schema (version) VALUES (99)")
        finally:
            await conn.close()
        with pytest.raises(StoreRefused, match="schema version 99 is newer"):
            async with open_store("b"):
                pytest.fail("opened a newer schema")


async def test_an_unreachable_database_is_a_clear_start_error(tmp_path: Any) -> None:
    """No server at the address: one line naming the database, exit 1 (a restart may
    help), never the password."""
    url = f"postgresql://vigil@/vigil?host={tmp_path}&port=1"
    with anyio.fail_after(TIMEOUT_S), pytest.raises(Exception) as info:
        async with PostgresStore(StoreConfig(url=url, password_env="VIGIL_TEST_PG_PW")):
            pytest.fail("opened")
    assert info.type.__name__ == "StoreOpenError"
    assert "cannot connect to the database" in str(info.value)
    assert getattr(info.value, "exit_code", None) == 1


def test_safe_url_drops_a_password() -> None:
    """A URL shown in status and logs never carries a password."""
    assert safe_url("postgresql://u:s3cret@db:5432/v") == "postgresql://u@db:5432/v"
    assert safe_url("postgresql://u@db/v") == "postgresql://u@db/v"


async def test_sqlite_store_reports_itself_as_the_one_node(tmp_path: Any) -> None:
    """On SQLite `nodes` is this daemon alone, alive (status has the same shape)."""
    async with Store(tmp_path / "v.db") as store:
        [node] = store.nodes()
    assert node.alive and node.heartbeat_age_s == 0


async def test_the_store_carries_on_after_the_database_restarts(
    open_store: OpenStore, pg_server: PgServer
) -> None:
    """PostgreSQL restarted under a node (pg_ctl restart -m fast): writes fail with
    StoreError while it is away, then succeed again by themselves; nothing committed is
    lost and the store never closes."""
    with anyio.fail_after(TIMEOUT_S):
        async with open_store("a") as a:
            [before] = await a.submit([new_job()], max_backlog=100)
            await anyio.to_thread.run_sync(pg_server.restart)
            for _ in range(100):
                try:
                    [after] = await a.submit([new_job()], max_backlog=100)
                    break
                except StoreError:
                    await anyio.sleep(0.1)
            else:
                pytest.fail("writes never came back")
            assert {j.id for j in await a.list_jobs()} == {before.id, after.id}
            await a.probe()
            assert a.last_error is None
            # The lock on its name and its LISTEN come back on a new connection.
            for _ in range(100):
                if a.relocks:
                    break
                await anyio.sleep(0.1)
            assert a.relocks == 1 and a.name_lost is None
            woke: list[bool] = []
            async with open_store("b") as b, anyio.create_task_group() as tg:

                async def waiter() -> None:
                    woke.append(await a.wakeup.wait(10))

                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await b.submit([new_job()], max_backlog=100)
            assert woke == [True]
            with pytest.raises(StoreRefused):  # the name is locked again
                async with open_store("a"):
                    pytest.fail("a second node named a")


async def test_nodes_share_one_rate_budget_and_one_429_hold(open_store: OpenStore) -> None:
    """Two nodes, each configured with the API's whole 1200 RPM, send together: the
    budget is the cluster's, so the API (enforcing 20 a second) refuses none. A 429
    seen by one node holds the other back for its retry-after."""
    api = SimulatedAPI(SimulateConfig(latency_ms=0, requests_per_minute=1200, seed=3))
    with anyio.fail_after(TIMEOUT_S):
        async with (
            serve_app(api.app()) as (seen, url),
            open_store("a") as a,
            open_store("b") as b,
            ApiProvider("main", config(url, requests_per_minute=1200)) as on_a,
            ApiProvider("main", config(url, requests_per_minute=1200)) as on_b,
        ):
            for store, provider in ((a, on_a), (b, on_b)):
                provider.limits.shared, provider.limits.shared_key = store.rates, "main"
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(on_a.complete, chat())
                    tg.start_soon(on_b.complete, chat())
            assert api.stats().by_status == {"200": 60}
            held_at = anyio.current_time()
            await on_a.limits.hold_shared(1.0)
            await on_b.complete(chat())
            assert seen.times[-1] - held_at >= 0.9
    assert on_a.limits.shared_errors == on_b.limits.shared_errors == 0


async def test_nodes_share_one_breaker_and_one_pause_per_provider(open_store: OpenStore) -> None:
    """A circuit one node opens is open on the others within a sync round, and closes
    there when the node whose probe succeeded closes it; a refused key's pause on one
    node holds the others, and a resume on any node lifts it everywhere."""
    api = SimulatedAPI(SimulateConfig(latency_ms=0, seed=3))
    with anyio.fail_after(TIMEOUT_S):
        async with (
            serve_app(api.app()) as (_, url),
            open_store("a") as a,
            open_store("b") as b,
            ApiProvider("main", config(url, breaker_failures=2)) as on_a,
            ApiProvider("main", config(url, breaker_failures=2)) as on_b,
            anyio.create_task_group() as tg,
        ):
            for store, provider in ((a, on_a), (b, on_b)):
                shared = store.provider_state
                assert shared is not None
                await tg.start(ProviderSync({"main": provider}, shared, store.node).run)

            async def until(check: Callable[[], bool]) -> None:
                for _ in range(100):
                    if check():
                        return
                    await anyio.sleep(0.1)
                pytest.fail("the other node did not follow")

            on_a.breaker.failed("HTTP 503", probe=False)
            on_a.breaker.failed("HTTP 503", probe=False)
            await until(lambda: on_b.breaker.state == "open")
            assert not on_b.available()
            assert "opened by node a" in (on_b.held_reason() or "")
            on_a.breaker.configure(failures=0, open_s=30.0, probe_wait_s=30.0)  # a closes it
            await until(lambda: on_b.breaker.state == "closed")

            on_b.pause("HTTP 401: the API key in $X was refused")
            await until(lambda: on_a.paused_reason is not None)
            assert "(on node b)" in (on_a.paused_reason or "")
            assert on_a.resume() is None
            await until(lambda: on_b.paused_reason is None)
            tg.cancel_scope.cancel()


async def test_attempt_ends_that_come_together_are_written_together(
    open_store: OpenStore,
) -> None:
    """Ends that come at once share a few statements (group commit); each is still
    fenced on its own: a stale end among them records nothing, and one PostgreSQL
    refuses (a lone surrogate) fails alone while the others are recorded."""
    ok = AttemptEnd(outcome="succeeded", result="done", latency_ms=1)
    bad = AttemptEnd(outcome="succeeded", result="\ud800", latency_ms=1)
    results: dict[str, object] = {}

    async def end(store: PostgresStore, key: str, job: Job, attempt_end: AttemptEnd) -> None:
        try:
            results[key] = await store.finish(job, attempt_end)
        except StoreError as exc:
            results[key] = type(exc).__name__

    with anyio.fail_after(TIMEOUT_S):
        async with open_store("a") as a:
            await a.submit([new_job() for _ in range(30)], max_backlog=100)
            jobs = await a.claim(30)
            before = a.commits
            async with anyio.create_task_group() as tg:
                for job in jobs[:20]:
                    tg.start_soon(end, a, job.id, job, ok)
            assert set(results.values()) == {"succeeded"} and len(results) == 20
            assert a.commits - before < 10, a.commits - before
            results.clear()
            stale = msgspec.structs.replace(jobs[20], attempts=jobs[20].attempts + 1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(end, a, "stale", stale, ok)
                tg.start_soon(end, a, "bad", jobs[21], bad)
                for job in jobs[22:]:
                    tg.start_soon(end, a, job.id, job, ok)
            assert results.pop("stale") is None
            assert results.pop("bad") == "OpFailed"
            assert set(results.values()) == {"succeeded"} and len(results) == 8
            assert (await a.get(jobs[20].id)).state == "running"  # type: ignore[union-attr]
