"""`vigil bench retention`: a million finished jobs past their age, pruned by the
daemon's retention while it serves. How long pruning takes, and the event loop's lag
meanwhile (the watchdog's p99 over its window, read from `status` every second): the
prune runs in small batches with a pause between them, so the lag must stay what the
soak bench shows.

The jobs (and their events, past the 7 days events are kept) ended eight days ago;
`[retention] succeeded_days = 1`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

from daemon.bench.common import Setup, api_only, daemon_config, run_daemon
from daemon.bench.fill import finished_jobs
from daemon.bench.report import Result, at_most, info
from daemon.bench.run import BenchError

ENDED_AGO_S = 8 * 86_400.0
TARGET_LAG_P99_MS = 10.0  # the soak bench's worst one-second p99 is 9.5 ms
SAMPLE_S = 1.0
TIMEOUT_S = 3600.0


async def run(root: Path, jobs: int, judge: bool) -> Result:
    state = root / "state"
    await anyio.Path(state).mkdir(parents=True, exist_ok=True)
    fill_s = await finished_jobs(state / "vigil.db", jobs, 100, ENDED_AGO_S)
    lag_p99 = lag_max = 0.0
    samples = 0
    async with api_only(root) as url:
        config = root / "vigil.toml"
        text = daemon_config(url, Setup(http=False)) + "\n[retention]\nsucceeded_days = 1\n"
        await anyio.Path(config).write_text(text)
        async with run_daemon(root, config, url, http=False) as env:
            started = time.perf_counter()
            with anyio.move_on_after(TIMEOUT_S):
                while True:
                    status = await env.client.call("status")
                    lag = status["watchdog"]["loop"]["lag_ms"]
                    lag_p99, lag_max = max(lag_p99, lag["p99"]), max(lag_max, lag["max"])
                    samples += 1
                    deleted = status["retention"]
                    # Every event goes but the newest (retention always keeps it).
                    if status["jobs"]["succeeded"] == 0 and deleted["events_deleted"] >= jobs - 1:
                        break
                    await anyio.sleep(SAMPLE_S)
            prune_s = time.perf_counter() - started
            rss_mb = env.daemon.memory_info().rss / 2**20
    left = status["jobs"]["succeeded"]
    if left:
        raise BenchError(f"{left} jobs still there after {TIMEOUT_S:g} s of pruning")
    figures: dict[str, Any] = {
        "jobs": jobs,
        "fill_s": round(fill_s, 1),
        "prune_s": round(prune_s, 1),
        "pruned_per_s": round(jobs / prune_s, 1),
        "events_deleted": deleted["events_deleted"],
        "loop_lag_p99_ms_worst": lag_p99,
        "loop_lag_max_ms": lag_max,
        "samples": samples,
        "rss_mb_after": round(rss_mb, 1),
    }
    return Result(
        "retention",
        f"{jobs:,} finished jobs and their events pruned while serving: time, loop lag",
        figures,
        [
            at_most("loop lag p99 while pruning, worst sample", lag_p99, "ms", TARGET_LAG_P99_MS,
                    judge),
            info("pruned (jobs, attempts, events)", figures["pruned_per_s"], "jobs/s"),
            info("loop lag max while pruning", lag_max, "ms"),
        ],
    )  # fmt: skip
