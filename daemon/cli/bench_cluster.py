"""`vigil bench cluster`: Vigil on a PostgreSQL server the benchmark starts itself
(pg_launch.py: a temp dir, a Unix socket, the server's default durability), beside
SQLite in the same run.

- overhead: the overhead scenario (bench_overhead.dispatch: submitted while paused,
  timed from the first attempt's start to the last result committed, the daemons'
  own stamps) on SQLite, then on PostgreSQL with 1, 2 and 3 daemons, each with its
  own state directory and socket and a fresh database; jobs are submitted through
  the first node. While the nodes run, their database's connections are counted
  (pg_stat_activity), idle and at the peak of the run.
- intake: `vigil submit --jsonl` into one PostgreSQL node, paused (and into SQLite,
  for comparison).
- claim: `PostgresStore.claim(64)` in this process at 1 k, 10 k, 100 k and 1 M queued,
  each claim handed back (`requeue`) so the next sees the same backlog; the queue is
  filled through `PostgresStore.submit` in batches of 10,000 (the store's own path),
  growing from the smallest size to the largest.
- takeover: two nodes with `lease_s = 3` and an API answering in ~2 s; both run
  jobs, one is SIGKILLed, and the time until every job it was running is running on
  the other (or finished) is measured on the database.

Every wait is bounded; all traffic goes to 127.0.0.1 and Unix sockets."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency

from daemon.cli.bench_backlog import PICKS, SIZES
from daemon.cli.bench_common import (
    ANALYZER,
    Env,
    Setup,
    api_only,
    cpu_s,
    daemon_config,
    job_input,
    percentiles,
    run_daemon,
    running,
    write_jsonl,
)
from daemon.cli.bench_intake import TARGET_SOCKET_PER_S, submit_jsonl
from daemon.cli.bench_overhead import dispatch
from daemon.cli.bench_report import Check, Result, at_least, at_most, info
from daemon.cli.bench_run import BenchError, beside, poll_until, simulated_api
from daemon.cli.pg_launch import Postgres, postgres
from daemon.config import StoreConfig
from daemon.jobs import JobIds
from daemon.store.base import NewJob
from daemon.store.postgres import PostgresStore

TARGET_PG_RATIO = 0.7  # one PostgreSQL node against SQLite, same run
TARGET_TAKEOVER_SLACK_S = 5.0  # takeover within lease_s + this
CONNECTIONS_PER_NODE = 4  # README "Cluster": the lock/LISTEN connection and a pool of 3
NODE_COUNTS = (1, 2, 3)
INTAKE_FACTOR = 10  # intake: 10 x the overhead's jobs (100,000 at full size)
CLAIM_FACTOR = 100  # claim: up to 100 x (1 M at full size)
FILL_BATCH = 10_000
TAKEOVER_LEASE_S = 3
TAKEOVER_LATENCY_MS = 2000
TAKEOVER_JOBS_PER_NODE = 8
SAMPLE_S = 0.1
POLL_S = 0.02
WAIT_S = 60.0
FINAL = ("succeeded", "failed", "canceled")


def node_config(api_url: str, setup: Setup, dsn: str, node: str, lease_s: float = 30) -> str:
    """The overhead's daemon config with a `[store]` on PostgreSQL."""
    store = f'\n[store]\nurl = "{dsn}"\nnode_name = "{node}"\nlease_s = {lease_s}\n'
    return daemon_config(api_url, setup) + store


@asynccontextmanager
async def nodes(
    root: Path, api_url: str, setup: Setup, dsn: str, n: int, lease_s: float = 30
) -> AsyncIterator[list[Env]]:
    """`n` daemons on one database, each with its own directory (state, socket, log);
    all stopped on exit."""
    async with AsyncExitStack() as stack:
        envs = []
        for i in range(1, n + 1):
            home = root / f"node-{i}"
            await anyio.Path(home).mkdir(parents=True, exist_ok=True)
            config = home / "vigil.toml"
            text = node_config(api_url, setup, dsn, f"node-{i}", lease_s)
            await anyio.Path(config).write_text(text)
            envs.append(
                await stack.enter_async_context(run_daemon(home, config, api_url, http=setup.http))
            )
        yield envs


async def _query(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn, timeout=WAIT_S)
    try:
        rows: list[Any] = await conn.fetch(sql, *args, timeout=WAIT_S)
        return rows
    finally:
        await conn.close()


async def pg_window(dsn: str) -> tuple[float, float, int]:
    """bench_common.db_window on PostgreSQL: (first attempt started, last job finished,
    jobs finished)."""
    rows = await _query(
        dsn,
        "SELECT (SELECT min(started_at) FROM attempts), max(finished_at), count(finished_at) "
        "FROM jobs",
    )
    first, last, done = rows[0]
    if first is None or last is None:
        raise BenchError("no finished attempt in the database")
    return float(first), float(last), int(done)


class Connections:
    """The database's connections (pg_stat_activity), sampled every SAMPLE_S."""

    def __init__(self, pg: Postgres, dbname: str) -> None:
        self.pg, self.dbname = pg, dbname
        self.samples: list[int] = []

    async def count(self, conn: Any) -> int:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", self.dbname
        )
        return n

    async def watch(self) -> None:
        conn = await asyncpg.connect(self.pg.dsn(), timeout=WAIT_S)  # not counted: "postgres"
        try:
            while True:
                self.samples.append(await self.count(conn))
                await anyio.sleep(SAMPLE_S)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()


async def _pg_overhead(
    root: Path, pg: Postgres, api_url: str, setup: Setup, n: int, jobs: int
) -> dict[str, Any]:
    dbname = f"overhead_{n}"
    dsn = await pg.create_database(dbname)
    async with nodes(root / f"postgres-{n}", api_url, setup, dsn, n) as envs:
        watcher = Connections(pg, dbname)
        await anyio.sleep(1.5)  # a heartbeat round on every node: the idle connections
        conn = await asyncpg.connect(pg.dsn(), timeout=WAIT_S)
        try:
            idle = await watcher.count(conn)
        finally:
            await conn.close()
        pg_cpu = pg.cpu_s()
        measured = await beside(
            lambda: _measured(envs, jobs, window=functools.partial(pg_window, dsn)),
            watcher.watch,
        )
        pg_cpu = pg.cpu_s() - pg_cpu
    by_node = await _query(dsn, "SELECT node, count(*) FROM attempts GROUP BY node ORDER BY node")
    peak = max(watcher.samples, default=0)
    return {
        **measured,
        "nodes": n,
        "attempts_by_node": {r["node"]: r["count"] for r in by_node},
        "postgres_cpu_us_per_job": round(pg_cpu / jobs * 1e6),
        "connections": {
            "idle": idle,
            "peak": peak,
            "peak_per_node": round(peak / n, 2),
            "samples": len(watcher.samples),
        },
    }


async def _commits(envs: Sequence[Env]) -> int:
    """The nodes' store commits so far (status store.commits: SQLite's group commits,
    PostgreSQL's transactions)."""
    return sum([int((await env.status())["store"]["commits"]) for env in envs])


async def _measured(
    envs: Sequence[Env],
    jobs: int,
    window: Callable[[], Awaitable[tuple[float, float, int]]] | None = None,
) -> dict[str, Any]:
    """bench_overhead.dispatch on these nodes, and the store commits it took a job."""
    commits = await _commits(envs)
    measured = await dispatch(envs[0], jobs, others=envs[1:], window=window)
    measured["commits_per_job"] = round((await _commits(envs) - commits) / jobs, 2)
    return measured


async def overhead(root: Path, pg: Postgres, api_url: str, jobs: int) -> dict[str, Any]:
    """The same jobs on SQLite, then on PostgreSQL with 1, 2, 3 nodes, one API."""
    setup = Setup()
    async with running(root / "sqlite", setup, api_url=api_url) as env:
        runs = {"sqlite": await _measured([env], jobs)}
    for n in NODE_COUNTS:
        runs[f"postgres_{n}"] = await _pg_overhead(root, pg, api_url, setup, n, jobs)
    return runs


async def _submit_file(
    env: Env, path: Path, jobs: int, queued: Callable[[], Awaitable[int]]
) -> dict[str, Any]:
    """`vigil submit --jsonl` into a paused daemon; `queued()` counts what landed."""
    await env.client.call("pause")
    daemon_cpu = cpu_s(env.daemon)
    seconds = await submit_jsonl(env, path)
    landed = await queued()
    if landed != jobs:
        raise BenchError(f"{landed} jobs queued after vigil submit --jsonl, expected {jobs}")
    return {
        "seconds": round(seconds, 3),
        "per_s": round(jobs / seconds, 1),
        "daemon_cpu_us_per_job": round((cpu_s(env.daemon) - daemon_cpu) / jobs * 1e6),
        "daemon_rss_mb": round(env.daemon.memory_info().rss / 2**20, 1),
    }


async def intake(root: Path, pg: Postgres, api_url: str, jobs: int) -> dict[str, Any]:
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    path = root / "intake.jsonl"
    size = await anyio.to_thread.run_sync(write_jsonl, path, jobs)
    setup = Setup(http=False)
    dsn = await pg.create_database("intake")
    sql = "SELECT count(*) FROM jobs WHERE state = 'queued'"

    async def pg_queued() -> int:
        return int((await _query(dsn, sql))[0][0])

    async with nodes(root / "postgres", api_url, setup, dsn, 1) as envs:
        server_cpu = pg.cpu_s()
        pg_run = await _submit_file(envs[0], path, jobs, pg_queued)
        pg_run["postgres_cpu_us_per_job"] = round((pg.cpu_s() - server_cpu) / jobs * 1e6)
    async with running(root / "sqlite", setup, api_url=api_url) as env:

        async def sqlite_queued() -> int:
            return (await env.counts())["queued"]

        sqlite_run = await _submit_file(env, path, jobs, sqlite_queued)
    await anyio.Path(path).unlink()
    return {"jobs": jobs, "jsonl_bytes": size, "postgres": pg_run, "sqlite": sqlite_run}


def _new_jobs(ids: JobIds, start: int, n: int) -> list[NewJob]:
    return [
        NewJob(
            id=ids.new(),
            analyzer=ANALYZER,
            input=job_input(i),
            priority=0,
            idempotency_key=None,
            max_attempts=3,
            source="bench",
        )
        for i in range(start, start + n)
    ]


async def _picks(store: PostgresStore, queued: int) -> dict[str, Any]:
    """claim(1) and claim(64), PICKS times each, every claim handed back."""
    row: dict[str, Any] = {}
    for limit in (1, 64):
        times = []
        for _ in range(PICKS):
            started = time.perf_counter()
            claimed = await store.claim(limit)
            times.append((time.perf_counter() - started) * 1000)
            if len(claimed) != limit:
                raise BenchError(f"claim({limit}) took {len(claimed)} of {queued} queued")
            await store.requeue(claimed, "benchmark")
        row[f"claim_{limit}_ms"] = percentiles(times)
    return row


# Whether the planner had statistics for the jobs table (autovacuum's ANALYZE: the
# store runs none itself), and the table's size.
_TABLE_STATS = (
    "SELECT s.n_live_tup, s.n_dead_tup, s.last_autoanalyze IS NOT NULL AS auto_analyzed, "
    "c.reltuples::bigint AS planner_rows, pg_total_relation_size('jobs') AS bytes "
    "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid WHERE s.relname = 'jobs'"
)


async def claim(pg: Postgres, largest: int) -> dict[str, Any]:
    """claim(1) and claim(64) latencies (ms) at each backlog size, smallest first,
    the queue growing through the store's own submit between sizes; the table as the
    store leaves it (the planner's statistics are whatever autovacuum gathered by
    then). Then once more at the largest size after an explicit `ANALYZE jobs`."""
    sizes = sorted({largest, *(s for s in SIZES if s < largest)})
    dsn = await pg.create_database("claim")
    ids = JobIds()
    out: dict[str, Any] = {}
    filled, fill_s = 0, 0.0
    async with PostgresStore(StoreConfig(url=dsn, node_name="bench")) as store:
        for size in sizes:
            started = time.perf_counter()
            while filled < size:
                batch = min(FILL_BATCH, size - filled)
                await store.submit(_new_jobs(ids, filled, batch), max_backlog=10 * largest)
                filled += batch
            fill_s += time.perf_counter() - started
            table = dict((await _query(dsn, _TABLE_STATS))[0])
            out[str(size)] = {
                "queued": filled,
                "auto_analyzed": table["auto_analyzed"],
                "planner_rows": table["planner_rows"],
                **await _picks(store, filled),
            }
        await pg.execute("ANALYZE jobs", dbname="claim")
        analyzed = {"queued": filled, **await _picks(store, filled)}
    table = dict((await _query(dsn, _TABLE_STATS))[0])
    table["mb"] = round(table.pop("bytes") / 2**20, 1)
    return {
        "pick": out,
        "pick_after_analyze": analyzed,
        "fill": "PostgresStore.submit, batches of 10,000",
        "fill_per_s": round(filled / fill_s, 1),
        "jobs_table": table,
    }


async def _until(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> float:
    """Poll `check()` every POLL_S until true; the seconds it took."""
    started = time.perf_counter()

    async def done() -> bool | None:
        return True if await check() else None

    await poll_until(done, every_s=POLL_S, timeout_s=timeout_s, what=what)
    return time.perf_counter() - started


async def takeover(root: Path, pg: Postgres, per_node: int) -> dict[str, Any]:
    """Node 2 runs `per_node` jobs, node 1 as many of its own (with room for more:
    what is measured is the takeover, not node 1's capacity); node 2 is SIGKILLed;
    how long until node 1 has taken its jobs over."""
    dsn = await pg.create_database("takeover")
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    api_args = ["--latency-ms", str(TAKEOVER_LATENCY_MS), "--latency-sigma", "0.05"]
    conn = await asyncpg.connect(dsn, timeout=WAIT_S)
    try:
        async with (
            simulated_api([*api_args, "--seed", "1"], root / "simulate-api.log") as url,
            nodes(root, url, Setup(http=False), dsn, 2, TAKEOVER_LEASE_S) as (one, two),
        ):

            async def running_on(node: str) -> int:
                n: int = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE state = 'running' AND node = $1", node
                )
                return n

            await one.client.call("pause")
            await two.submit(0, per_node)
            await _until(lambda: _is(running_on("node-2"), per_node), "node 2 running its jobs")
            await two.client.call("pause")  # its attempts run on; node 1 gets the next jobs
            await one.submit(per_node, per_node)
            await one.client.call("resume")
            await _until(lambda: _is(running_on("node-1"), per_node), "node 1 running its jobs")
            two.daemon.kill()
            killed = time.perf_counter()
            await _until(lambda: _gone(two), "node 2 dying")  # never reaped here: see _gone
            victims = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM jobs WHERE state = 'running' AND node = 'node-2'"
                )
            ]

            async def moved(*, requeued_only: bool) -> bool:
                row = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE state = 'running' AND node = 'node-2') AS old, "
                    "count(*) FILTER (WHERE state = 'running' AND node = 'node-1' "
                    "OR state = ANY($2)) AS taken FROM jobs WHERE id = ANY($1)",
                    victims,
                    list(FINAL),
                )
                assert row is not None
                return bool(row["old"] == 0 if requeued_only else row["taken"] == len(victims))

            await _until(lambda: moved(requeued_only=True), "node 2's jobs requeued")
            reaped_s = time.perf_counter() - killed
            await _until(lambda: moved(requeued_only=False), "node 2's jobs taken over")
            taken_s = time.perf_counter() - killed
            await _until(lambda: _is(_all_final(conn), 2 * per_node), "every job final")
            done_s = time.perf_counter() - killed
            seen = await one.status()
        outcomes = {
            r["outcome"]: r["count"]
            for r in await conn.fetch("SELECT outcome, count(*) FROM attempts GROUP BY outcome")
        }
        doubles = await conn.fetchval(
            "SELECT count(*) FROM (SELECT job_id FROM attempts WHERE outcome = 'succeeded' "
            "GROUP BY job_id HAVING count(*) > 1) t"
        )
        jobs = {
            r["state"]: r["count"]
            for r in await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
        }
    finally:
        await conn.close()
    return {
        "lease_s": TAKEOVER_LEASE_S,
        "api_latency_ms": TAKEOVER_LATENCY_MS,
        "jobs": 2 * per_node,
        "killed_node_running": len(victims),
        "requeued_s": round(reaped_s, 3),
        "taken_over_s": round(taken_s, 3),
        "all_finished_s": round(done_s, 3),
        "jobs_by_state": jobs,
        "attempts_by_outcome": outcomes,
        "jobs_with_two_results": doubles,
        "nodes_seen": {n["name"]: n["alive"] for n in seen.get("nodes", [])},
    }


async def _gone(env: Env) -> bool:
    """Dead (a zombie until its runner reaps it). Not psutil's wait(): that would reap
    the child behind the back of the runner, whose own wait would then never end."""
    try:
        return bool(env.daemon.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def _is(value: Awaitable[int], expected: int) -> bool:
    return bool(await value == expected)


async def _all_final(conn: Any) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM jobs WHERE state = ANY($1)", list(FINAL))
    return n


def _checks(figures: dict[str, Any], judge: bool) -> list[Check]:
    over, intake_, pick = figures["overhead"], figures["intake"], figures["claim"]["pick"]
    ratio = figures["pg1_to_sqlite"]
    # Flat: no larger backlog's p50 over twice the smallest's (the worst one judged).
    small = pick[min(pick, key=int)]
    large = max(
        (row for row in pick.values() if row is not small),
        key=lambda row: row["claim_64_ms"]["p50"] or 0.0,
        default=small,
    )
    small_ms = small["claim_64_ms"]["p50"] or 0.0
    large_ms = large["claim_64_ms"]["p50"] or 0.0
    analyzed = figures["claim"]["pick_after_analyze"]
    turn = figures["takeover"]
    peak = max(over[f"postgres_{n}"]["connections"]["peak_per_node"] for n in NODE_COUNTS)
    checks = [info("overhead: SQLite", over["sqlite"]["per_s"], "jobs/s")]
    checks += [
        info(f"overhead: PostgreSQL, {n} node{'s' if n > 1 else ''}",
             over[f"postgres_{n}"]["per_s"], "jobs/s")
        for n in NODE_COUNTS
    ]  # fmt: skip
    return [
        *checks,
        at_least("PostgreSQL 1 node / SQLite", ratio, "", TARGET_PG_RATIO, judge),
        at_least("intake: vigil submit --jsonl, PostgreSQL", round(intake_["postgres"]["per_s"]),
                 "jobs/s", TARGET_SOCKET_PER_S, judge),
        info("intake: vigil submit --jsonl, SQLite", round(intake_["sqlite"]["per_s"]), "jobs/s"),
        info(f"claim(64) p50 at {small['queued']:,} queued", small_ms, "ms"),
        at_most(f"claim(64) p50, worst: at {large['queued']:,} queued", large_ms, "ms",
                round(2 * small_ms, 3), judge),
        info(f"claim(64) p50 at {analyzed['queued']:,} after ANALYZE jobs",
             analyzed["claim_64_ms"]["p50"], "ms"),
        at_most("takeover after SIGKILL", turn["taken_over_s"], "s",
                turn["lease_s"] + TARGET_TAKEOVER_SLACK_S, judge),
        at_most("connections per node (peak)", peak, "", CONNECTIONS_PER_NODE, judge),
    ]  # fmt: skip


async def run(root: Path, jobs: int, judge: bool) -> Result:
    """`jobs` for the overhead runs; intake takes 10 x, claim up to 100 x that."""
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    per_node = TAKEOVER_JOBS_PER_NODE if judge else TAKEOVER_JOBS_PER_NODE // 2
    async with postgres() as pg:
        async with api_only(root) as url:
            over = await overhead(root / "overhead", pg, url, jobs)
            intake_ = await intake(root / "intake", pg, url, INTAKE_FACTOR * jobs)
        picks = await claim(pg, CLAIM_FACTOR * jobs)
        turn = await takeover(root / "takeover", pg, per_node)
        settings = pg.settings
    sqlite_rate = over["sqlite"]["per_s"]
    figures: dict[str, Any] = {
        "jobs": jobs,
        "postgres": {**settings, "socket": "unix", "started_by": "the benchmark"},
        "overhead": over,
        "pg1_to_sqlite": round(over["postgres_1"]["per_s"] / sqlite_rate, 3) if sqlite_rate else 0,
        "intake": intake_,
        "claim": picks,
        "takeover": turn,
    }
    durability = ", ".join(
        f"{k}={settings[k]}" for k in ("fsync", "synchronous_commit", "full_page_writes")
    )
    return Result(
        "cluster",
        f"PostgreSQL {settings['server_version'].split()[0]} beside SQLite: {jobs:,} jobs on "
        f"1-3 nodes, intake, claim at {CLAIM_FACTOR * jobs:,} queued, takeover, connections",
        figures,
        _checks(figures, judge),
        [
            f"PostgreSQL {settings['server_version']}, {durability}, "
            f"shared_buffers={settings['shared_buffers']}, Unix socket; jobs submitted through "
            "node 1",
        ],
    )
