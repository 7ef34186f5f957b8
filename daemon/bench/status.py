"""`vigil bench status`: how fast `GET /status` and the socket's `status` (what
`vigil status` sends) answer while the overhead scenario runs.

Each socket probe opens a new connection, as the CLI does; `vigil status` itself
adds Python's start-up, timed separately on a few real runs of the command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from daemon.bench.common import Env, Setup, api_only, percentiles, running
from daemon.bench.overhead import dispatch
from daemon.bench.report import Result, at_most, info
from daemon.bench.run import BenchError, child_env
from daemon.control.client import ControlClient

TARGET_P99_MS = 20.0
FULL_JOBS = 20_000
SMOKE_JOBS = 300
PROBE_EVERY_S = 0.05
CLI_RUNS = 3


async def _probe_http(env: Env) -> float:
    assert env.http_url is not None
    started = time.perf_counter()
    async with env.http.get(f"{env.http_url}/status") as response:
        await response.read()
        if response.status != 200:
            raise BenchError(f"GET /status: HTTP {response.status}")
    return (time.perf_counter() - started) * 1000


async def _probe_socket(env: Env) -> float:
    started = time.perf_counter()
    async with ControlClient(env.socket) as client:
        await client.call("status")
    return (time.perf_counter() - started) * 1000


async def _cli_status(env: Env) -> float:
    command = [sys.executable, "-m", "daemon", "status", "--json"]
    started = time.perf_counter()
    with anyio.fail_after(60):
        done = await anyio.run_process(
            command,
            env={**child_env(), "VIGIL_SOCKET": str(env.socket)},
            stdout=subprocess.DEVNULL,
            check=False,
        )
    if done.returncode != 0:
        raise BenchError(f"vigil status exited {done.returncode}")
    return (time.perf_counter() - started) * 1000


async def run(root: Path, jobs: int, judge: bool) -> Result:
    http_ms: list[float] = []
    socket_ms: list[float] = []
    cli_ms: list[float] = []
    async with api_only(root) as url, running(root / "daemon", Setup(), api_url=url) as env:
        measured: dict[str, Any] = {}

        async def load() -> None:
            measured.update(await dispatch(env, jobs))

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            while True:  # at least one probe, however short the load
                http_ms.append(await _probe_http(env))
                socket_ms.append(await _probe_socket(env))
                if len(cli_ms) < CLI_RUNS and len(socket_ms) % 20 == 1:
                    cli_ms.append(await _cli_status(env))
                if measured:
                    break
                await anyio.sleep(PROBE_EVERY_S)
    http, socket = percentiles(http_ms), percentiles(socket_ms)
    figures = {
        "jobs": jobs,
        "load_per_s": measured["per_s"],
        "http_status_ms": http,
        "socket_status_ms": socket,
        "vigil_status_process_ms": percentiles(cli_ms),
    }
    return Result(
        "status",
        f"GET /status and the socket's status while {jobs:,} jobs run (overhead scenario)",
        figures,
        [
            info("GET /status p50", http["p50"], "ms"),
            at_most("GET /status p99", http["p99"], "ms", TARGET_P99_MS, judge),
            info("socket status p50", socket["p50"], "ms"),
            at_most("socket status p99", socket["p99"], "ms", TARGET_P99_MS, judge),
            info("vigil status, whole process", percentiles(cli_ms)["p50"], "ms"),
        ],
    )
