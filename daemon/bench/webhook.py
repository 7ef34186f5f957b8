"""`vigil bench webhook`: what one configured webhook costs a job. The overhead
scenario's run, with and without `[webhooks.bench]` (every event) pointed at a
receiver in this process that answers 204 at once, in alternating rounds on one
simulated API: the daemon's CPU per job from the submit until the last delivery is in
(the sender works after the jobs' ends), the jobs' rate, each side's median, and how
long after the last job's end the deliveries were all in."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from daemon.bench.common import Setup, api_only, cpu_s, running
from daemon.bench.overhead import dispatch
from daemon.bench.report import Result, info
from daemon.bench.run import BenchError

SECRET_ENV = "VIGIL_BENCH_WEBHOOK_SECRET"
ROUNDS = 3
SMOKE_ROUNDS = 1
DELIVERY_TIMEOUT_S = 300.0


class _Receiver:
    """Counts the deliveries (by id) and when the last one came; `all_in` is set once
    the number expected is in."""

    def __init__(self) -> None:
        self.expect(0)

    def expect(self, n: int) -> None:
        self.seen: set[str] = set()
        self.wanted = n
        self.last_at = 0.0
        self.all_in = anyio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.add(request.headers["Vigil-Delivery"])
        self.last_at = time.time()
        if len(self.seen) >= self.wanted:
            self.all_in.set()
        return web.Response(status=204)


@asynccontextmanager
async def _receiver() -> AsyncIterator[tuple[str, _Receiver]]:
    receiver = _Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/hook", receiver
    finally:
        await runner.cleanup()


def _section(url: str) -> str:
    return f'\n[webhooks.bench]\nurl = "{url}"\nsecret_env = "{SECRET_ENV}"\n'


async def run(root: Path, jobs: int, judge: bool) -> Result:
    rounds = SMOKE_ROUNDS if jobs < 1000 else ROUNDS
    os.environ.setdefault(SECRET_ENV, "bench-webhook-signing-key-0123456789")
    off: list[dict[str, Any]] = []
    on: list[dict[str, Any]] = []
    settle: list[float] = []
    async with api_only(root) as url, _receiver() as (hook_url, receiver):
        for r in range(rounds):
            for hooked in (False, True) if r % 2 == 0 else (True, False):
                setup = Setup(extra=_section(hook_url) if hooked else "")
                where = root / f"round{r}-{'on' if hooked else 'off'}"
                async with running(where, setup, api_url=url) as env:
                    receiver.expect(jobs)
                    cpu_before = cpu_s(env.daemon)
                    measured = await dispatch(env, jobs)
                    if hooked:
                        ended = time.time()
                        with anyio.move_on_after(DELIVERY_TIMEOUT_S):
                            await receiver.all_in.wait()
                        if len(receiver.seen) < jobs:
                            raise BenchError(f"{len(receiver.seen)} of {jobs} deliveries came")
                        settle.append(max(0.0, receiver.last_at - ended))
                    # Submit to the last delivery in: the sender's work comes after the
                    # jobs' ends, and counts.
                    cpu_us = (cpu_s(env.daemon) - cpu_before) / jobs * 1e6
                    (on if hooked else off).append({**measured, "total_cpu_us_per_job": cpu_us})

    def median(side: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(m[key] for m in side))

    cpu_off, cpu_on = median(off, "total_cpu_us_per_job"), median(on, "total_cpu_us_per_job")
    rate_off, rate_on = median(off, "per_s"), median(on, "per_s")
    cost = round(cpu_on - cpu_off, 1)
    ratio = round(rate_on / rate_off, 3) if rate_off else None
    delivered_after = round(max(settle), 2)
    figures: dict[str, Any] = {
        "jobs": jobs,
        "rounds": rounds,
        "cpu_us_per_job_off": round(cpu_off),
        "cpu_us_per_job_on": round(cpu_on),
        "cost_cpu_us_per_job": cost,
        "per_s_off": rate_off,
        "per_s_on": rate_on,
        "rate_ratio": ratio,
        "delivered_after_s": delivered_after,
        "off": off,
        "on": on,
    }
    return Result(
        "webhook",
        f"{jobs:,} jobs with and without one webhook (a receiver answering 204), "
        f"{rounds} alternating round(s): CPU per job, rate",
        figures,
        [
            info("daemon CPU per job (submit to last delivery), no webhook", round(cpu_off), "us"),
            info("daemon CPU per job (submit to last delivery), one webhook", round(cpu_on), "us"),
            info("cost of one webhook", cost, "us/job"),
            info("rate with / without", ratio, ""),
            info("last delivery after the last job's end", delivered_after, "s"),
        ],
    )  # fmt: skip
