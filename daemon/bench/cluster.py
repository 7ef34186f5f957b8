"""`vigil bench cluster`: Vigil on a PostgreSQL server the benchmark starts itself
(pg_launch.py: a temp dir, a Unix socket, the server's default durability), beside
SQLite in the same run.

- overhead: the overhead scenario (overhead.dispatch: submitted while paused,
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
- takeover and shared limit: the nodes cooperating, each with its own simulated
  API (cluster_nodes.py, which also starts the nodes).

Every wait is bounded; all traffic goes to 127.0.0.1 and Unix sockets."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from daemon.bench.backlog import PICKS, SIZES
from daemon.bench.cluster_nodes import (
    SHARED_JOBS,
    SHARED_SMOKE_JOBS,
    TAKEOVER_JOBS_PER_NODE,
    TARGET_SHARED_429_SHARE,
    TARGET_SHARED_UTILISATION,
    WAIT_S,
    nodes,
    query,
    shared_limit,
    takeover,
)
from daemon.bench.common import (
    ANALYZER,
    Env,
    Setup,
    api_only,
    cpu_s,
    job_input,
    percentiles,
    running,
    write_jsonl,
)
from daemon.bench.intake import TARGET_SOCKET_PER_S, submit_jsonl
from daemon.bench.overhead import dispatch
from daemon.bench.pg_launch import Postgres, postgres
from daemon.bench.report import Check, Result, at_least, at_most, info
from daemon.bench.run import BenchError, beside
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
SAMPLE_S = 0.1


async def pg_window(dsn: str) -> tuple[float, float, int]:
    """common.db_window on PostgreSQL: (first attempt started, last job finished,
    jobs finished)."""
    rows = await query(
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
    by_node = await query(dsn, "SELECT node, count(*) FROM attempts GROUP BY node ORDER BY node")
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
    """overhead.dispatch on these nodes, and the store commits it took a job."""
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
        return int((await query(dsn, sql))[0][0])

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
            table = dict((await query(dsn, _TABLE_STATS))[0])
            out[str(size)] = {
                "queued": filled,
                "auto_analyzed": table["auto_analyzed"],
                "planner_rows": table["planner_rows"],
                **await _picks(store, filled),
            }
        await pg.execute("ANALYZE jobs", dbname="claim")
        analyzed = {"queued": filled, **await _picks(store, filled)}
    table = dict((await query(dsn, _TABLE_STATS))[0])
    table["mb"] = round(table.pop("bytes") / 2**20, 1)
    return {
        "pick": out,
        "pick_after_analyze": analyzed,
        "fill": "PostgresStore.submit, batches of 10,000",
        "fill_per_s": round(filled / fill_s, 1),
        "jobs_table": table,
    }


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
    turn, shared = figures["takeover"], figures["shared_limit"]
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
        at_least("shared limit: utilisation, 3 nodes", (shared["window"] or {}).get("utilisation"),
                 "", TARGET_SHARED_UTILISATION, judge),
        at_most("shared limit: 429 share", shared["rate_limited_share"], "",
                TARGET_SHARED_429_SHARE, judge),
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
        shared = await shared_limit(
            root / "shared-limit", pg, SHARED_JOBS if judge else SHARED_SMOKE_JOBS
        )
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
        "shared_limit": shared,
    }
    durability = ", ".join(
        f"{k}={settings[k]}" for k in ("fsync", "synchronous_commit", "full_page_writes")
    )
    return Result(
        "cluster",
        f"PostgreSQL {settings['server_version'].split()[0]} beside SQLite: {jobs:,} jobs on "
        f"1-3 nodes, intake, claim at {CLAIM_FACTOR * jobs:,} queued, takeover, connections, "
        "3 nodes sharing one rate limit",
        figures,
        _checks(figures, judge),
        [
            f"PostgreSQL {settings['server_version']}, {durability}, "
            f"shared_buffers={settings['shared_buffers']}, Unix socket; jobs submitted through "
            "node 1",
        ],
    )
