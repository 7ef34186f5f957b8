"""The nodes of `vigil bench cluster` and the scenarios that are about them: several
daemons on one PostgreSQL database, each with its own directory, and the two scenarios
that start their own simulated API to watch the nodes cooperate (cluster.py
holds the store's own figures and the report).

- takeover: two nodes with `lease_s = 3` and an API answering in ~2 s; both run
  jobs, one is SIGKILLed, and the time until every job it was running is running on
  the other (or finished) is measured on the database.
- shared limit: three nodes with `requests_per_minute = 3000` each against an API
  that allows 3000 RPM in all (SHARED_METHOD): utilisation and 429 share by the API's
  own /stats, measured as `vigil bench throttle` measures them (run.py's samples,
  throttle_figures.window), and each node's share of the attempts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency

from daemon.bench.common import MAX_TOKENS, Env, Setup, daemon_config, job_input, run_daemon
from daemon.bench.pg_launch import Postgres
from daemon.bench.run import POLL_S as API_POLL_S
from daemon.bench.run import ApiSample, BenchError, api_sample, poll_until, simulated_api
from daemon.bench.scenarios import Scenario
from daemon.bench.throttle_figures import window

TAKEOVER_LEASE_S = 3
TAKEOVER_LATENCY_MS = 2000
TAKEOVER_JOBS_PER_NODE = 8
SHARED_NODES = 3
SHARED_RPM = 3000  # the API's limit, and each node's requests_per_minute
SHARED_LATENCY_MS = 200
SHARED_CONCURRENCY = 64  # providers.api.max_concurrency on each node
SHARED_JOBS = 4500
SHARED_SMOKE_JOBS = 150
TARGET_SHARED_UTILISATION = 0.97
TARGET_SHARED_429_SHARE = 0.01
POLL_S = 0.02
WAIT_S = 60.0
FINAL = ("succeeded", "failed", "canceled")

SHARED_METHOD = (
    "simulate-api --rpm 3000 --latency-ms 200 --seed 1 (one-second slices: its bucket "
    "holds at most 50 requests and starts full) and three daemons on one fresh "
    "PostgreSQL database, each with requests_per_minute = 3000 and max_concurrency = 64 "
    "on the provider (the shared GCRA row keeps the three to 3000 together). The window "
    "opens at the first /stats sample, before any request; then the jobs are submitted "
    "in round-robin batches over the nodes; it closes at the first sample (every 0.2 s) "
    "after which no job is left queued on the database. utilisation = admitted in the "
    "window / (3000 x window minutes + what the API's bucket held when it opened), on "
    "the API's clock; 429 share = the API's 429s / its requests over the whole run."
)
SHARED_SCENARIO = Scenario(
    name="shared limit",
    about="three nodes share one 3000 RPM limit",
    api_rpm=SHARED_RPM,
    api_tpm=0,
    latency_ms=SHARED_LATENCY_MS,
    vigil_rpm=SHARED_RPM,
    vigil_tpm=0,
    bound="requests",
    jobs=SHARED_JOBS,
    text_chars=len(job_input(0)["text"]),
    max_tokens=MAX_TOKENS,
    target_utilisation=TARGET_SHARED_UTILISATION,
    max_429_share=TARGET_SHARED_429_SHARE,
)


def node_config(
    api_url: str, setup: Setup, dsn: str, node: str, lease_s: float = 30, rpm: int = 0
) -> str:
    """The overhead's daemon config with a `[store]` on PostgreSQL (and, with `rpm`,
    that limit on the provider)."""
    text = daemon_config(api_url, setup)
    if rpm:
        header = "[providers.api]\n"
        if header not in text:
            raise BenchError("no [providers.api] table in the daemon config")
        text = text.replace(header, f"{header}requests_per_minute = {rpm}\n")
    store = f'\n[store]\nurl = "{dsn}"\nnode_name = "{node}"\nlease_s = {lease_s}\n'
    return text + store


@asynccontextmanager
async def nodes(
    root: Path, api_url: str, setup: Setup, dsn: str, n: int, lease_s: float = 30, rpm: int = 0
) -> AsyncIterator[list[Env]]:
    """`n` daemons on one database, each with its own directory (state, socket, log);
    all stopped on exit."""
    async with AsyncExitStack() as stack:
        envs = []
        for i in range(1, n + 1):
            home = root / f"node-{i}"
            await anyio.Path(home).mkdir(parents=True, exist_ok=True)
            config = home / "vigil.toml"
            text = node_config(api_url, setup, dsn, f"node-{i}", lease_s, rpm)
            await anyio.Path(config).write_text(text)
            envs.append(
                await stack.enter_async_context(run_daemon(home, config, api_url, http=setup.http))
            )
        yield envs


async def query(dsn: str, sql: str, *args: Any) -> list[Any]:
    """One statement on its own connection; its rows."""
    conn = await asyncpg.connect(dsn, timeout=WAIT_S)
    try:
        rows: list[Any] = await conn.fetch(sql, *args, timeout=WAIT_S)
        return rows
    finally:
        await conn.close()


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


async def _drive_shared(
    conn: Any, envs: Sequence[Env], http: aiohttp.ClientSession, stats_url: str, jobs: int,
    deadline_s: float,
) -> tuple[ApiSample, ApiSample, ApiSample]:  # fmt: skip
    """Open the window, submit `jobs` round-robin over the nodes, sample the API until
    every job is final: (window start, window end, last sample)."""
    start = await api_sample(http, stats_url)
    if start.requests:
        raise BenchError(f"the API had {start.requests} requests before the window opened")
    batch = max(1, min(500, -(-jobs // len(envs))))
    for i, first in enumerate(range(0, jobs, batch)):
        await envs[i % len(envs)].submit(first, min(batch, jobs - first))
    end: ApiSample | None = None
    sql = (
        "SELECT count(*) FILTER (WHERE state = 'queued') AS queued, "
        "count(*) FILTER (WHERE state = ANY($1)) AS final FROM jobs"
    )
    try:
        with anyio.fail_after(deadline_s):
            while True:
                sample = await api_sample(http, stats_url)
                row = await conn.fetchrow(sql, list(FINAL))
                if end is None and row["queued"] == 0:
                    end = sample
                if row["final"] >= jobs and end is not None:
                    return start, end, sample
                await anyio.sleep(API_POLL_S)
    except TimeoutError:
        raise BenchError(f"shared limit: jobs not finished within {deadline_s:g} s") from None


async def shared_limit(root: Path, pg: Postgres, jobs: int) -> dict[str, Any]:
    """Three nodes, one database, one API limit they share (SHARED_METHOD)."""
    dsn = await pg.create_database("shared_limit")
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    setup = Setup(provider_concurrency=SHARED_CONCURRENCY, http=False)
    api_args = ["--rpm", str(SHARED_RPM), "--latency-ms", str(SHARED_LATENCY_MS), "--seed", "1"]
    deadline_s = 120 + 3 * jobs / (SHARED_RPM / 60)
    conn = await asyncpg.connect(dsn, timeout=WAIT_S)
    try:
        async with (
            simulated_api(api_args, root / "simulate-api.log") as url,
            nodes(root, url, setup, dsn, SHARED_NODES, rpm=SHARED_RPM) as envs,
            aiohttp.ClientSession() as http,
        ):
            stats_url = url.removesuffix("/v1") + "/stats"
            start, end, last = await _drive_shared(conn, envs, http, stats_url, jobs, deadline_s)
        rows = await conn.fetch(
            "SELECT node, count(*) AS n, count(*) FILTER (WHERE outcome = 'rate_limited') AS r "
            "FROM attempts GROUP BY node ORDER BY node"
        )
        outcomes = {
            r["outcome"]: r["count"]
            for r in await conn.fetch("SELECT outcome, count(*) FROM attempts GROUP BY outcome")
        }
        states = {
            r["state"]: r["count"]
            for r in await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
        }
    finally:
        await conn.close()
    total = sum(r["n"] for r in rows) or 1
    share = last.rate_limited / last.requests if last.requests else 0.0
    return {
        "nodes": SHARED_NODES,
        "jobs": jobs,
        "api_limit_per_minute": SHARED_RPM,
        "vigil_limit_per_minute_each": SHARED_RPM,
        "api_latency_ms": SHARED_LATENCY_MS,
        "provider_max_concurrency": SHARED_CONCURRENCY,
        "window": window(SHARED_SCENARIO, start, end),
        "api_requests": last.requests,
        "api_rate_limited": last.rate_limited,
        "rate_limited_share": round(share, 5),
        "run_s": round(last.uptime_s - start.uptime_s, 2),
        "attempts_by_node": {r["node"]: r["n"] for r in rows},
        "attempt_share_by_node": {r["node"]: round(r["n"] / total, 3) for r in rows},
        "rate_limited_by_node": {r["node"]: r["r"] for r in rows},
        "attempts_by_outcome": outcomes,
        "jobs_by_state": states,
        "method": SHARED_METHOD,
    }
