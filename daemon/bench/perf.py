"""The performance benchmarks: `vigil bench overhead|webhook|intake|backlog|
export|retention|soak|watchdog|status|cluster|all` (`all`: every one but `cluster`, which
starts a PostgreSQL server of its own; daemon/cli/bench.py parses the command line).
Each scenario runs `vigil simulate-api` and `vigil run` as separate processes with a
fresh state directory, prints one JSON line (its figures, its checks against the
targets, the machine and versions, the command that reproduces it), and at the end one
table for all.

Exit code: 0 when every judged target is met, 1 when one is missed or a run failed.
`--smoke` runs each scenario at a tiny size, judging nothing: the test suite uses
it so the benchmarks cannot rot."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from daemon.bench.report import Result, table

if TYPE_CHECKING:
    from daemon.bench import RunAsync


@dataclass(frozen=True)
class Scenario:
    name: str
    help: str
    full: int
    smoke: int


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("overhead", "end-to-end jobs/s against the raw loopback rate", 10_000, 200),
        Scenario("webhook", "what one webhook costs a job: overhead with and without",
                 10_000, 200),
        Scenario("intake", "accepted jobs/s: vigil submit --jsonl and POST /v1/jobs", 100_000,
                 2_000),
        Scenario("backlog", "1 M queued: RSS, restart to ready, time to pick", 1_000_000, 2_000),
        Scenario("export", "1 M finished jobs out through vigil export: RSS, rate", 1_000_000,
                 2_000),
        Scenario("retention", "1 M finished jobs pruned while serving: time, loop lag",
                 1_000_000, 2_000),
        Scenario("soak", "continuous processing: RSS growth, fds, tasks, loop lag", 200_000,
                 600),
        Scenario("watchdog", "overhead with the watchdog on and off", 10_000, 150),
        Scenario("status", "GET /status and vigil status latency under load", 20_000, 300),
        Scenario("cluster", "PostgreSQL (started by the bench) on 1-3 nodes beside SQLite: "
                 "overhead, intake, claim at 1 M, takeover, connections", 10_000, 200),
    )
}  # fmt: skip
SMOKE_ROUNDS = 1


def _runner(name: str, root: Path, jobs: int, judge: bool, rounds: int) -> Awaitable[Result]:
    from daemon.bench import (
        backlog,
        cluster,
        export,
        intake,
        overhead,
        retention,
        soak,
        status,
        watchdog,
        webhook,
    )

    if name == "watchdog":
        return watchdog.run(root, jobs, judge, rounds)
    modules: dict[str, Callable[[Path, int, bool], Awaitable[Result]]] = {
        "overhead": overhead.run,
        "intake": intake.run,
        "backlog": backlog.run,
        "export": export.run,
        "retention": retention.run,
        "webhook": webhook.run,
        "soak": soak.run,
        "status": status.run,
        "cluster": cluster.run,
    }
    return modules[name](root, jobs, judge)


def _command(name: str, args: argparse.Namespace, jobs: int) -> str:
    parts = ["vigil", "bench", name, "--jobs", str(jobs)]
    if name == "watchdog":
        parts += ["--rounds", str(_rounds(args))]
    if args.smoke:
        parts.append("--smoke")
    return shlex.join(parts)


def _rounds(args: argparse.Namespace) -> int:
    rounds: int = getattr(args, "rounds", 7)
    return SMOKE_ROUNDS if args.smoke else rounds


def run_perf(args: argparse.Namespace, run_async: RunAsync) -> int:
    """`vigil bench SCENARIO|all`, its arguments parsed by daemon/cli/bench.py; each
    scenario runs in its own event loop, started by `run_async` (the CLI's)."""
    from daemon.bench.common import machine
    from daemon.bench.run import BenchError

    host = machine()
    if not args.json:
        v = host["versions"]
        print(
            f"machine: {host['cpus']} CPUs, {host['cpu']}, {host['memory_mb']} MB, "
            f"load {host['load_avg_1m']}; vigil {v['vigil']}, Python {v['python']}, "
            f"SQLite {v['sqlite']}",
            file=sys.stderr,
        )
    results: list[Result] = []
    failed = False
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        jobs = args.jobs or (scenario.smoke if args.smoke else scenario.full)
        if not args.json:
            print(f"{name}: {scenario.help} ({jobs:,} jobs) ...", file=sys.stderr, flush=True)
        root = Path(tempfile.mkdtemp(prefix=f"vigil-bench-{name}-"))
        started = time.monotonic()
        holder: list[Result] = []

        async def go(
            name: str = name, root: Path = root, jobs: int = jobs, out: list[Result] = holder
        ) -> int:
            out.append(await _runner(name, root, jobs, not args.smoke, _rounds(args)))
            return 0

        try:
            run_async(go)
        except BenchError as exc:
            print(f"vigil bench: {name}: {exc}", file=sys.stderr)
            failed = True
            continue
        finally:
            if args.keep:
                print(f"{name}: kept {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)
        result = holder[0]
        result.figures["bench_wall_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        line = result.as_dict({**host, "load_avg_1m": _load()}, _command(name, args, jobs))
        print(msgspec.json.encode(line).decode(), flush=True)
    if not args.json and results:
        print()
        table(results)
    return 1 if failed or any(r.target_met is False for r in results) else 0


def _load() -> float:
    return round(os.getloadavg()[0], 2)
