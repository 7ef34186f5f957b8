"""`vigil bench export`: a million finished jobs, each with a result, written out by
`vigil export --jsonl` as a user runs it. The daemon's RSS is sampled throughout: an
export reads, sends and forgets a page at a time, so it must stay within the backlog
bench's target however many jobs there are.

The jobs are made before the daemon starts (`bench.fill`), each with a result of
RESULT_CHARS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from daemon.bench.backlog import TARGET_RSS_MB
from daemon.bench.common import Setup, api_only, daemon_config, rss_peak, run_daemon
from daemon.bench.fill import finished_jobs
from daemon.bench.report import Result, at_most, info
from daemon.bench.run import BenchError, child_env

RESULT_CHARS = 400
SAMPLE_S = 0.25


def _lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


async def run(root: Path, jobs: int, judge: bool) -> Result:
    state = root / "state"
    await anyio.Path(state).mkdir(parents=True, exist_ok=True)
    fill_s = await finished_jobs(state / "vigil.db", jobs, RESULT_CHARS)
    out = root / "export.jsonl"
    async with api_only(root) as url:
        config = root / "vigil.toml"
        await anyio.Path(config).write_text(daemon_config(url, Setup(http=False)))
        async with run_daemon(root, config, url, http=False) as env:
            start_rss = env.daemon.memory_info().rss / 2**20
            command = [sys.executable, "-m", "daemon", "export", "--jsonl", str(out)]
            cli_env = {**child_env(), "VIGIL_SOCKET": str(env.socket)}
            async with rss_peak(env.daemon, SAMPLE_S) as peak_rss:
                started = time.perf_counter()
                with anyio.fail_after(1800):
                    done = await anyio.run_process(
                        command, env=cli_env, stdout=subprocess.DEVNULL, check=False
                    )
                export_s = time.perf_counter() - started
            end_rss = env.daemon.memory_info().rss / 2**20
            peak = max(peak_rss.mb, end_rss)
    if done.returncode != 0:
        raise BenchError(f"vigil export exited {done.returncode}: {done.stderr.decode()[-500:]}")
    written = await anyio.to_thread.run_sync(_lines, out)
    if written != jobs:
        raise BenchError(f"the export has {written} lines, expected {jobs}")
    figures: dict[str, Any] = {
        "jobs": jobs,
        "result_chars": RESULT_CHARS,
        "fill_s": round(fill_s, 1),
        "export_s": round(export_s, 2),
        "export_per_s": round(jobs / export_s, 1),
        "file_mb": round(out.stat().st_size / 2**20, 1),
        "rss_mb_at_start": round(start_rss, 1),
        "rss_mb_peak": round(peak, 1),
        "rss_mb_after": round(end_rss, 1),
    }
    await anyio.Path(out).unlink()
    return Result(
        "export",
        f"{jobs:,} finished jobs written out by vigil export --jsonl: RSS, rate",
        figures,
        [
            at_most("RSS peak while exporting", figures["rss_mb_peak"], "MB", TARGET_RSS_MB,
                    judge),
            info("RSS growth while exporting", round(peak - start_rss, 1), "MB"),
            info("export through vigil export --jsonl", figures["export_per_s"], "jobs/s"),
        ],
    )  # fmt: skip
