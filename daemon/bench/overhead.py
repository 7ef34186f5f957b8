"""`vigil bench overhead`: end-to-end jobs/s against the raw loopback rate.

Jobs are submitted while dispatch is paused, then timed from the first attempt's
start to the last result committed (the daemon's own stamps in its database). The
yardstick is an aiohttp client sending the same request bodies to the same
simulated API with the same concurrency, run just before and just after, with the
daemon up and idle, so both see the same machine."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from daemon.bench.common import (
    Env,
    MachineCpu,
    Setup,
    api_only,
    cpu_s,
    db_window,
    raw_rate,
    running,
)
from daemon.bench.report import Result, at_least, info

TARGET_RATIO = 0.5
FULL_JOBS = 10_000
SMOKE_JOBS = 200


async def dispatch(
    env: Env,
    jobs: int,
    *,
    others: Sequence[Env] = (),
    window: Callable[[], Awaitable[tuple[float, float, int]]] | None = None,
) -> dict[str, Any]:
    """Submit `jobs` while paused, resume, wait until all are final; the rate from
    the first attempt's start to the last commit, and CPU per job of each process.

    On a shared store (`vigil bench cluster`): `others` are more daemons on env's
    store, paused and resumed with it (their CPU counted with its); `window` reads
    (first start, last finish, jobs finished) from that store, not env's SQLite."""
    nodes = [env, *others]
    for node in nodes:
        await node.client.call("pause")
    await env.submit(0, jobs)
    daemon_cpu = sum(cpu_s(node.daemon) for node in nodes)
    api_cpu = cpu_s(env.api) if env.api else 0.0
    machine_cpu = MachineCpu()
    started = time.perf_counter()
    for node in nodes:
        await node.client.call("resume")
    counts = await env.wait_finished(jobs, deadline_s=120 + jobs / 50)
    wall_s = time.perf_counter() - started
    split = machine_cpu.split()
    if window is None:
        first, last, done = await anyio.to_thread.run_sync(db_window, env.db_path)
    else:
        first, last, done = await window()
    span = max(last - first, 1e-6)
    return {
        "jobs": jobs,
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "seconds": round(span, 3),
        "per_s": round(done / span, 1),
        "wall_s": round(wall_s, 3),
        "daemon_cpu_us_per_job": round(
            (sum(cpu_s(node.daemon) for node in nodes) - daemon_cpu) / jobs * 1e6
        ),
        "api_cpu_us_per_job": (round((cpu_s(env.api) - api_cpu) / jobs * 1e6) if env.api else None),
        "machine_cpu_pct": split,
    }


async def run(root: Path, jobs: int, judge: bool) -> Result:
    setup = Setup()
    async with api_only(root) as url, running(root / "daemon", setup, api_url=url) as env:
        await env.client.call("pause")
        raw_requests = max(jobs, 2000)
        before = await raw_rate(url, raw_requests, setup.provider_concurrency)
        measured = await dispatch(env, jobs)
        after = await raw_rate(url, raw_requests, setup.provider_concurrency)
    raw = (before["per_s"] + after["per_s"]) / 2
    ratio = measured["per_s"] / raw if raw else 0.0
    figures = {
        **measured,
        "raw_per_s": round(raw, 1),
        "raw_before": before,
        "raw_after": after,
        "ratio": round(ratio, 3),
        "queue_max_concurrency": setup.queue_concurrency,
        "provider_max_concurrency": setup.provider_concurrency,
    }
    return Result(
        "overhead",
        f"{jobs:,} jobs, API latency 0, no limits: end-to-end vs raw loopback",
        figures,
        [
            info("end to end", measured["per_s"], "jobs/s"),
            info("raw loopback", round(raw, 1), "requests/s"),
            at_least("ratio to raw loopback", round(ratio, 3), "", TARGET_RATIO, judge),
        ],
    )
