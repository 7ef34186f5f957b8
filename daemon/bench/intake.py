"""`vigil bench intake`: accepted jobs/s with dispatch paused, through the two intakes
a script would use: `vigil submit --jsonl FILE` (the real CLI process, over the
control socket) and `POST /v1/jobs` with lists of jobs.

The JSONL file is written beforehand, streamed to disk; the CLI is timed from its
spawn (Python's start-up included) to its exit, which comes only after the daemon
committed the last batch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from daemon.bench.common import ANALYZER, Env, Setup, job, running, write_jsonl
from daemon.bench.report import Result, at_least, info
from daemon.bench.run import BenchError, child_env

TARGET_SOCKET_PER_S = 20_000
FULL_JOBS = 100_000
SMOKE_JOBS = 2_000
HTTP_BATCH = 1000
HTTP_PARALLEL = 4


async def submit_jsonl(env: Env, path: Path) -> float:
    """`vigil submit -a bench --jsonl PATH` as a user runs it; its wall time."""
    command = [sys.executable, "-m", "daemon", "submit", "-a", ANALYZER, "--jsonl", str(path)]
    cli_env = {**child_env(), "VIGIL_SOCKET": str(env.socket)}
    started = time.perf_counter()
    with anyio.fail_after(600):
        done = await anyio.run_process(
            command, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"vigil submit exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


async def post_batches(env: Env, start: int, n: int) -> float:
    """`POST /v1/jobs` with lists of HTTP_BATCH jobs, HTTP_PARALLEL at a time."""
    assert env.http_url is not None
    url = f"{env.http_url}/v1/jobs"
    firsts = iter(range(start, start + n, HTTP_BATCH))
    encode = msgspec.json.Encoder().encode

    async def sender() -> None:
        for first in firsts:
            body = encode([job(i) for i in range(first, min(start + n, first + HTTP_BATCH))])
            async with env.http.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                answer = await response.read()
                if response.status != 202:
                    raise BenchError(f"POST /v1/jobs: HTTP {response.status}: {answer[:300]!r}")

    started = time.perf_counter()
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            for _ in range(HTTP_PARALLEL):
                tg.start_soon(sender)
    return time.perf_counter() - started


async def _expect_queued(env: Env, n: int) -> None:
    queued = (await env.counts())["queued"]
    if queued != n:
        raise BenchError(f"{queued} jobs queued, expected {n}")


async def run(root: Path, jobs: int, judge: bool) -> Result:
    path = root / "intake.jsonl"
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    size = await anyio.to_thread.run_sync(write_jsonl, path, jobs)
    async with running(root / "daemon", Setup()) as env:
        await env.client.call("pause")
        cli_s = await submit_jsonl(env, path)
        await _expect_queued(env, jobs)
        http_s = await post_batches(env, jobs, jobs)
        await _expect_queued(env, 2 * jobs)
        rss_mb = env.daemon.memory_info().rss / 2**20
    await anyio.Path(path).unlink()
    socket_rate, http_rate = jobs / cli_s, jobs / http_s
    figures: dict[str, Any] = {
        "jobs": jobs,
        "jsonl_bytes": size,
        "socket": {"seconds": round(cli_s, 3), "per_s": round(socket_rate, 1)},
        "http": {
            "seconds": round(http_s, 3),
            "per_s": round(http_rate, 1),
            "batch": HTTP_BATCH,
            "parallel": HTTP_PARALLEL,
        },
        "daemon_rss_mb": round(rss_mb, 1),
    }
    return Result(
        "intake",
        f"{jobs:,} jobs through `vigil submit --jsonl` and through POST /v1/jobs, paused",
        figures,
        [
            at_least("socket (vigil submit --jsonl)", round(socket_rate), "jobs/s",
                     TARGET_SOCKET_PER_S, judge),
            info(f"HTTP (POST /v1/jobs, {HTTP_BATCH} a request)", round(http_rate), "jobs/s"),
        ],
    )  # fmt: skip
