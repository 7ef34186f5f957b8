"""The performance benchmarks' command line: `vigil bench overhead|intake|backlog|
soak|watchdog|status|cluster|all` (`all`: every one but `cluster`, which starts a
PostgreSQL server of its own). Each scenario runs `vigil simulate-api` and `vigil run`
as separate processes with a fresh state directory, prints one JSON line (its
figures, its checks against the targets, the machine and versions, the command
that reproduces it), and at the end one table for all.

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
from typing import Any

import msgspec

from daemon.cli.bench_report import Result, table


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
        Scenario("intake", "accepted jobs/s: vigil submit --jsonl and POST /v1/jobs", 100_000,
                 2_000),
        Scenario("backlog", "1 M queued: RSS, restart to ready, time to pick", 1_000_000, 2_000),
        Scenario("soak", "continuous processing: RSS growth, fds, tasks, loop lag", 200_000,
                 600),
        Scenario("watchdog", "overhead with the watchdog on and off", 10_000, 150),
        Scenario("status", "GET /status and vigil status latency under load", 20_000, 300),
        Scenario("cluster", "PostgreSQL (started by the bench) on 1-3 nodes beside SQLite: "
                 "overhead, intake, claim at 1 M, takeover, connections", 10_000, 200),
    )
}  # fmt: skip
SMOKE_ROUNDS = 1


def add_parsers(kinds: Any) -> None:
    from daemon.cli.main import positive_int

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--jobs", type=positive_int, help="jobs (default: the scenario's full size)"
    )
    common.add_argument(
        "--smoke", action="store_true", help="a tiny run of each scenario; judges nothing"
    )
    common.add_argument("--json", action="store_true", help="print only the JSON lines")
    common.add_argument(
        "--keep", action="store_true", help="keep each scenario's directory (config, logs, db)"
    )
    for scenario in SCENARIOS.values():
        parser = kinds.add_parser(scenario.name, help=scenario.help, parents=[common])
        if scenario.name == "watchdog":
            parser.add_argument("--rounds", type=positive_int, default=7, help="on/off pairs")
        parser.set_defaults(func=run_perf, scenarios=[scenario.name])
    every = kinds.add_parser(
        "all", help="every performance scenario but cluster, one after another", parents=[common]
    )
    every.add_argument("--rounds", type=positive_int, default=7, help="watchdog: on/off pairs")
    # `all` is the SQLite suite: `cluster` needs PostgreSQL installed, and runs alone.
    every.set_defaults(func=run_perf, scenarios=[s for s in SCENARIOS if s != "cluster"])


def _runner(name: str, root: Path, jobs: int, judge: bool, rounds: int) -> Awaitable[Result]:
    from daemon.cli import (
        bench_backlog,
        bench_cluster,
        bench_intake,
        bench_overhead,
        bench_soak,
        bench_status,
        bench_watchdog,
    )

    if name == "watchdog":
        return bench_watchdog.run(root, jobs, judge, rounds)
    modules: dict[str, Callable[[Path, int, bool], Awaitable[Result]]] = {
        "overhead": bench_overhead.run,
        "intake": bench_intake.run,
        "backlog": bench_backlog.run,
        "soak": bench_soak.run,
        "status": bench_status.run,
        "cluster": bench_cluster.run,
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


def run_perf(args: argparse.Namespace) -> int:
    from daemon.cli.bench_common import machine
    from daemon.cli.bench_run import BenchError
    from daemon.cli.main import run_async

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
