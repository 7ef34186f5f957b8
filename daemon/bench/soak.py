"""`vigil bench soak`: `--jobs N` of continuous processing (API latency 0, the queue
kept topped up) with the daemon's RSS, open fds, threads, asyncio tasks and event
loop lag p99 sampled every second. RSS growth is measured from the end of the
warm-up (the first WARM_UP share of the jobs) to the end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

from daemon.bench.common import Env, Setup, median, running
from daemon.bench.report import Result, at_most, info

TARGET_GROWTH = 0.05
FULL_JOBS = 200_000
SMOKE_JOBS = 600
WARM_UP = 0.2
SAMPLE_S = 1.0
LOW_WATER = 4_000
TOP_UP = 5_000


async def _sample(env: Env, started: float) -> dict[str, Any]:
    status = await env.status()
    watchdog = status.get("watchdog", {})
    jobs = status["jobs"]
    with env.daemon.oneshot():
        rss = env.daemon.memory_info().rss
        fds = env.daemon.num_fds()
        threads = env.daemon.num_threads()
    return {
        "t_s": round(time.perf_counter() - started, 2),
        "finished": jobs["succeeded"] + jobs["failed"] + jobs["canceled"],
        "queued": jobs["queued"],
        "rss_mb": round(rss / 2**20, 2),
        "fds": fds,
        "threads": threads,
        "tasks": watchdog.get("leaks", {}).get("tasks"),
        "lag_p99_ms": watchdog.get("loop", {}).get("lag_ms", {}).get("p99"),
    }


async def soak(env: Env, jobs: int) -> list[dict[str, Any]]:
    """Keep the queue topped up until `jobs` are submitted and finished; one sample
    a second (drift-corrected)."""
    samples: list[dict[str, Any]] = []
    submitted = 0
    started = time.perf_counter()
    next_at = started
    with anyio.fail_after(300 + jobs / 50):
        while True:
            sample = await _sample(env, started)
            samples.append(sample)
            if sample["finished"] >= jobs:
                return samples
            if submitted < jobs and sample["queued"] < LOW_WATER:
                n = min(TOP_UP, jobs - submitted)
                await env.submit(submitted, n)
                submitted += n
            next_at = max(next_at + SAMPLE_S, time.perf_counter())
            await anyio.sleep(next_at - time.perf_counter())


def _growth(samples: list[dict[str, Any]], jobs: int) -> tuple[float, float, float]:
    """(RSS after warm-up, RSS at the end, growth): medians of up to three samples at
    each end, so one sample caught mid-allocation does not decide."""
    warm = [s for s in samples if s["finished"] >= WARM_UP * jobs] or samples[-1:]
    base = median([s["rss_mb"] for s in warm[:3]])
    end = median([s["rss_mb"] for s in warm[-3:]])
    return base, end, end / base - 1


async def run(root: Path, jobs: int, judge: bool) -> Result:
    async with running(root / "daemon", Setup()) as env:
        samples = await soak(env, jobs)
    base, end, growth = _growth(samples, jobs)
    notes = []
    if len(samples) < 10:
        notes.append(f"only {len(samples)} samples: too short a run to judge growth")
    span = samples[-1]["t_s"] or 1.0
    lags = [s["lag_p99_ms"] for s in samples if s["lag_p99_ms"] is not None]
    tasks = [s["tasks"] for s in samples if s["tasks"] is not None]
    figures = {
        "jobs": jobs,
        "seconds": span,
        "per_s": round(jobs / span, 1),
        "rss_mb_after_warm_up": base,
        "rss_mb_end": end,
        "rss_growth": round(growth, 4),
        "rss_mb_peak": max(s["rss_mb"] for s in samples),
        "fds": {"min": min(s["fds"] for s in samples), "max": max(s["fds"] for s in samples)},
        "threads_max": max(s["threads"] for s in samples),
        "tasks": {"min": min(tasks), "max": max(tasks)} if tasks else None,
        "lag_p99_ms_max": max(lags) if lags else None,
        "samples": samples,
    }
    return Result(
        "soak",
        f"{jobs:,} jobs of continuous processing, sampled every {SAMPLE_S:g} s",
        figures,
        [
            at_most("RSS growth after warm-up", round(growth * 100, 2), "%",
                    TARGET_GROWTH * 100, judge),
            info("RSS at the end", end, "MB"),
            info("open fds, most", figures["fds"]["max"], ""),
            info("asyncio tasks, most", max(tasks) if tasks else None, ""),
            info("loop lag p99, worst sample", figures["lag_p99_ms_max"], "ms"),
        ],
        notes,
    )  # fmt: skip
