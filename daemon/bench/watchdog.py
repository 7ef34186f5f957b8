"""`vigil bench watchdog`: the overhead scenario with `watchdog.enabled` on and off,
in alternating rounds against one simulated API, so drift on the machine hits
both alike (the method of benchmarks/watchdog_cost.py, folded in here).

A round runs both back to back, in an order that alternates; the ratio reported
is the median of the rounds' own on/off ratios (paired runs saw the same load),
beside the ratio of the medians and the CPU time per job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.bench.common import Setup, api_only, median, running
from daemon.bench.overhead import dispatch
from daemon.bench.report import Result, at_least, info

TARGET_RATIO = 0.98
FULL_JOBS = 10_000
SMOKE_JOBS = 150
FULL_ROUNDS = 7


async def run(root: Path, jobs: int, judge: bool, rounds: int = FULL_ROUNDS) -> Result:
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    async with api_only(root) as url:
        for round_no in range(rounds):
            order = (False, True) if round_no % 2 == 0 else (True, False)
            for enabled in order:
                name = f"round{round_no + 1}-{'on' if enabled else 'off'}"
                async with running(root / name, Setup(watchdog=enabled), api_url=url) as env:
                    runs[enabled].append(await dispatch(env, jobs))
    on = [r["per_s"] for r in runs[True]]
    off = [r["per_s"] for r in runs[False]]
    paired = median([a / b for a, b in zip(on, off, strict=True)])
    cpu_on = median([r["daemon_cpu_us_per_job"] for r in runs[True]])
    cpu_off = median([r["daemon_cpu_us_per_job"] for r in runs[False]])
    cpu_ratio = round(cpu_on / cpu_off, 4) if cpu_off else None
    figures: dict[str, Any] = {
        "jobs": jobs,
        "rounds": rounds,
        "on_per_s": on,
        "off_per_s": off,
        "median_on_per_s": median(on),
        "median_off_per_s": median(off),
        "ratio_of_medians": round(median(on) / median(off), 4),
        "paired_ratio": round(paired, 4),
        "cpu_us_per_job_on": cpu_on,
        "cpu_us_per_job_off": cpu_off,
        "cpu_ratio": cpu_ratio,
    }
    return Result(
        "watchdog",
        f"overhead scenario ({jobs:,} jobs) with the watchdog on and off, {rounds} rounds",
        figures,
        [
            info("jobs/s off (median)", median(off), "jobs/s"),
            info("jobs/s on (median)", median(on), "jobs/s"),
            at_least("throughput on/off (paired)", round(paired, 4), "", TARGET_RATIO, judge),
            info("CPU per job on/off", cpu_ratio, ""),
        ],
    )
