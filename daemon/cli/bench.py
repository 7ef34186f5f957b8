"""`vigil bench`'s command line: `vigil bench throttle` and the performance scenarios
(`overhead|webhook|intake|backlog|export|retention|soak|watchdog|status|cluster|all`). The
benchmarks themselves live in daemon/bench/ (throttle.py, perf.py and what they run),
loaded only when a bench runs; building this parser loads their scenario tables and
nothing heavier."""

from __future__ import annotations

import argparse
from typing import Any

from daemon.bench.scenarios import SCENARIOS


def add_parser(sub: Any) -> None:
    from daemon.cli.main import positive_int

    bench: argparse.ArgumentParser = sub.add_parser(
        "bench", help="benchmarks against the simulated API"
    )
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    throttle = kinds.add_parser(
        "throttle", help="how close the throttle runs to an API's rate limits"
    )
    throttle.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    throttle.add_argument(
        "--jobs", type=positive_int, help="jobs measured after the warm-up (default: per scenario)"
    )
    throttle.add_argument("--json", action="store_true", help="print only the JSON lines")
    throttle.add_argument(
        "--keep", action="store_true", help="keep each scenario's directory (config, logs, db)"
    )
    throttle.set_defaults(func=run_throttle)
    add_perf_parsers(kinds)


def add_perf_parsers(kinds: Any) -> None:
    from daemon.bench import perf  # light: the machinery loads when a bench runs
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
    for scenario in perf.SCENARIOS.values():
        parser = kinds.add_parser(scenario.name, help=scenario.help, parents=[common])
        if scenario.name == "watchdog":
            parser.add_argument("--rounds", type=positive_int, default=7, help="on/off pairs")
        parser.set_defaults(func=run_perf, scenarios=[scenario.name])
    every = kinds.add_parser(
        "all", help="every performance scenario but cluster, one after another", parents=[common]
    )
    every.add_argument("--rounds", type=positive_int, default=7, help="watchdog: on/off pairs")
    # `all` is the SQLite suite: `cluster` needs PostgreSQL installed, and runs alone.
    every.set_defaults(func=run_perf, scenarios=[s for s in perf.SCENARIOS if s != "cluster"])


def run_throttle(args: argparse.Namespace) -> int:
    from daemon.bench.throttle import run_throttle
    from daemon.cli.main import run_async

    return run_throttle(args, run_async)


def run_perf(args: argparse.Namespace) -> int:
    from daemon.bench.perf import run_perf
    from daemon.cli.main import run_async

    return run_perf(args, run_async)
