"""`vigil bench backlog`: a million jobs queued. The daemon's RSS once they are in
(sampled while `vigil submit --jsonl` feeds them, and after), the time from
`vigil run` to ready after a restart on that database, and the time to pick the
next job at 1 k, 10 k, 100 k and 1 M queued.

Picking is timed with the daemon's own store code (`Store.claim`, group commit and
fsync included) in this process, once the daemon has stopped: the database is
trimmed from the newest end down to each size in turn, and each claim is handed
back (`requeue`) so the next one sees the same backlog."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency

from daemon.bench.common import (
    Setup,
    api_only,
    daemon_config,
    percentiles,
    rss_peak,
    run_daemon,
    write_jsonl,
)
from daemon.bench.intake import submit_jsonl
from daemon.bench.report import Result, at_most, info
from daemon.bench.run import BenchError
from daemon.store.sqlite import Store

TARGET_RSS_MB = 100
TARGET_READY_S = 2.0
FULL_JOBS = 1_000_000
SMOKE_JOBS = 2_000
SIZES = (1_000_000, 100_000, 10_000, 1_000)
PICKS = 20
SAMPLE_S = 0.5


async def _fill(root: Path, config: Path, url: str, jobs: int) -> dict[str, Any]:
    """Feed `jobs` through the CLI, paused, sampling the daemon's RSS meanwhile."""
    path = root / "backlog.jsonl"
    await anyio.to_thread.run_sync(write_jsonl, path, jobs)
    async with run_daemon(root, config, url, http=False) as env:
        await env.client.call("pause")
        start_rss = env.daemon.memory_info().rss / 2**20
        async with rss_peak(env.daemon, SAMPLE_S) as peak:
            fill_s = await submit_jsonl(env, path)
        queued = (await env.counts())["queued"]
        if queued != jobs:
            raise BenchError(f"{queued} jobs queued after the fill, expected {jobs}")
        rss = env.daemon.memory_info().rss / 2**20
    await anyio.Path(path).unlink()
    return {
        "fill_s": round(fill_s, 2),
        "fill_per_s": round(jobs / fill_s, 1),
        "rss_mb_at_start": round(start_rss, 1),
        "rss_mb_peak_while_filling": round(max(peak.mb, rss), 1),
        "rss_mb_after_fill": round(rss, 1),
    }


async def _restart(root: Path, config: Path, url: str, jobs: int) -> dict[str, Any]:
    """Start again on the same database. A pause is not persisted, so it is sent at
    once: the few jobs that ran in between are counted, not hidden."""
    async with run_daemon(root, config, url, http=False) as env:
        await env.client.call("pause")
        counts = await env.counts()
        if sum(counts.values()) != jobs:
            raise BenchError(f"{sum(counts.values())} jobs after the restart, not {jobs}")
        return {
            "ready_s": round(env.ready_s, 3),
            "queued_after_restart": counts["queued"],
            "rss_mb_after_restart": round(env.daemon.memory_info().rss / 2**20, 1),
        }


def _trim(db_path: Path, size: int) -> int:
    """Delete the newest queued jobs until `size` remain; returns how many remain."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        (queued,) = db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()
        extra = int(queued) - size
        if extra > 0:
            db.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' "
                "ORDER BY id DESC LIMIT ?)",
                (extra,),
            )
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return min(int(queued), size)
    finally:
        db.close()


async def _picks(db_path: Path, jobs: int) -> dict[str, dict[str, Any]]:
    """claim(1) and claim(64) latencies (ms) at each backlog size, largest first."""
    sizes = sorted({jobs, *(s for s in SIZES if s < jobs)}, reverse=True)
    out: dict[str, dict[str, Any]] = {}
    for size in sizes:
        queued = await anyio.to_thread.run_sync(_trim, db_path, size)
        row: dict[str, Any] = {"queued": queued}
        async with Store(db_path) as store:
            for limit in (1, 64):
                times = []
                for _ in range(PICKS):
                    started = time.perf_counter()
                    claimed = await store.claim(limit)
                    times.append((time.perf_counter() - started) * 1000)
                    await store.requeue(claimed, "benchmark")
                row[f"claim_{limit}_ms"] = percentiles(times)
        out[str(size)] = row
    return out


async def run(root: Path, jobs: int, judge: bool) -> Result:
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    async with api_only(root) as url:
        config = root / "vigil.toml"
        await anyio.Path(config).write_text(daemon_config(url, Setup(http=False)))
        fill = await _fill(root, config, url, jobs)
        restart = await _restart(root, config, url, jobs)
    picks = await _picks(root / "state" / "vigil.db", jobs)
    largest, smallest = picks[max(picks, key=int)], picks[min(picks, key=int)]
    big = largest["claim_64_ms"]["p50"] or 0.0
    small = smallest["claim_64_ms"]["p50"] or 0.0
    # "Flat": the largest backlog within twice the smallest's time (2 ms of slack, for
    # the fsync's own jitter at these sizes).
    flat_limit = max(2 * small, small + 2.0)
    figures = {
        "jobs": jobs,
        **fill,
        **restart,
        "pick": picks,
        "pick_flat_limit_ms": round(flat_limit, 3),
        "db_mb": round((root / "state" / "vigil.db").stat().st_size / 2**20, 1),
        "system_memory_available_mb": round(psutil.virtual_memory().available / 2**20),
    }
    return Result(
        "backlog",
        f"{jobs:,} jobs queued: RSS, restart to ready, time to pick the next job",
        figures,
        [
            at_most("RSS after the fill", fill["rss_mb_after_fill"], "MB", TARGET_RSS_MB, judge),
            at_most("RSS peak while filling", fill["rss_mb_peak_while_filling"], "MB",
                    TARGET_RSS_MB, judge),
            info("fill through vigil submit --jsonl", fill["fill_per_s"], "jobs/s"),
            at_most("restart: vigil run to ready", restart["ready_s"], "s", TARGET_READY_S, judge),
            info(f"claim(64) p50 at {smallest['queued']:,} queued", small, "ms"),
            at_most(f"claim(64) p50 at {largest['queued']:,} queued", big, "ms",
                    round(flat_limit, 3), judge),
        ],
    )  # fmt: skip
