"""`vigil bench throttle`: how close the throttle runs to an API's rate limits without
tripping them, how fast it learns a lower limit than it was given (or every limit, when
given none), how fast a backlog runs again after an outage, and whether an overloaded
API holds anybody back; against the simulated API as a separate process.

Each scenario (scenarios.py) starts `vigil simulate-api` with the API's dialect,
limits and latency, writes a config pointing a `kind = "openai"` or `kind =
"anthropic"` provider at it with the scenario's client limits, runs `vigil run` with a
fresh state directory, feeds it jobs over the control socket, and reads what the API
itself saw (GET /stats). How each kind of scenario measures: throttle_figures.py
(throughput, learn, overloaded) and outage.py (outage)."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from daemon.bench.scenarios import ALL, SCENARIOS, Scenario, make_job

if TYPE_CHECKING:  # the machinery (aiohttp and all) loads only when a bench runs
    from daemon.bench import RunAsync
    from daemon.bench.run import ApiSample, LogMark, Run

__all__ = ["cpu_model", "machine", "run_throttle"]

T = TypeVar("T")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()}


def run_throttle(args: argparse.Namespace, run_async: RunAsync) -> int:
    """`vigil bench throttle`, its arguments parsed by daemon/cli/bench.py."""
    from daemon.bench.outage import run_outage, summarize_outage
    from daemon.bench.run import BenchError, log_events
    from daemon.bench.throttle_figures import (
        METHODS,
        method_key,
        report,
        summarize,
        summarize_overloaded,
    )

    names = ALL if args.scenario == "all" else (args.scenario,)
    host = machine()
    if not args.json:
        print(
            f"machine: {host['cpus']} CPUs, {host['cpu']}, Python {host['python']}", file=sys.stderr
        )
        for key in dict.fromkeys(method_key(SCENARIOS[name]) for name in names):
            print(f"method ({key}): {METHODS[key]}", file=sys.stderr)
        print(file=sys.stderr)
    results: list[dict[str, Any]] = []
    for name in names:
        scenario = SCENARIOS[name]
        if args.jobs is not None:
            scenario = replace(scenario, jobs=args.jobs)
        if not args.json:
            print(f"{name}: {scenario.about} ...", file=sys.stderr, flush=True)
        root = Path(tempfile.mkdtemp(prefix=f"vigil-bench-{name}-"))
        try:
            if scenario.kind == "outage":
                outage = _blocking(run_async, run_outage, scenario, root)
                result = summarize_outage(scenario, outage, host)
            else:
                run = _blocking(run_async, _run, scenario, root)
                learned = log_events(root / "daemon.log", "provider.limit_learned")
                if scenario.kind == "overloaded":
                    result = summarize_overloaded(scenario, run, host)
                else:
                    result = summarize(scenario, run, learned, host)
        except BenchError as exc:
            print(f"vigil bench: {name}: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.keep:
                print(f"{name}: kept {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)
        results.append(result)
        print(msgspec.json.encode(result).decode(), flush=True)
    if not args.json:
        print()
        report(results)
    return 0 if all(r["target_met"] is not False for r in results) else 1


def _blocking(
    run_async: RunAsync, go: Callable[[Scenario, Path], Awaitable[T]], s: Scenario, root: Path
) -> T:
    """One scenario in its own event loop (the CLI's run_async, on uvloop)."""
    done: list[T] = []

    async def main() -> int:
        done.append(await go(s, root))
        return 0

    run_async(main)
    return done[0]


async def _run(s: Scenario, root: Path) -> Run:
    import aiohttp
    import anyio

    from daemon.bench.run import (
        attempt_rows,
        beside,
        daemon,
        drive,
        first_log_event,
        simulated_api,
    )
    from daemon.bench.scenarios import api_args, daemon_config
    from daemon.control.client import ControlClient

    async with simulated_api(api_args(s), root / "simulate-api.log") as url:
        config = root / "vigil.toml"
        await anyio.Path(config).write_text(daemon_config(s, url))
        async with (
            daemon(config, root / "state", root / "daemon.log") as socket,
            ControlClient(socket) as client,
            aiohttp.ClientSession() as http,
        ):
            stats_url = url.removesuffix("/v1") + "/stats"  # openai's is at /v1
            per_s = s.api_limit / 60 if s.bound else 0.0

            def warmed_up(sample: ApiSample, provider: dict[str, Any]) -> bool:
                if s.warm_up == "learned":  # every limit learned, no cool-down left
                    budgets = provider.get("budgets", {})
                    return provider.get("cooldown_s") == 0 and all(
                        budgets.get(name, {}).get("server_limit") == limit
                        for name, limit in s.api_limits.items()
                    )
                left = sample.left(s.bound)  # the API's initial burst spent
                return left is not None and left <= per_s

            rate_s = s.api_limit / 60 / s.cost  # requests a second at the API's limit
            deadline_s = 120 + 3 * (s.jobs / rate_s if rate_s else 0.0)
            learned: list[LogMark | None] = []

            async def watch_learning() -> None:
                learned.append(
                    await first_log_event(
                        root / "daemon.log",
                        "provider.limit_learned",
                        http,
                        stats_url,
                        timeout_s=deadline_s,
                    )
                )

            async def go() -> Run:
                return await drive(
                    client,
                    http,
                    stats_url,
                    make_job=lambda i: make_job(s, i),
                    jobs=s.jobs,
                    warmed_up=warmed_up if s.bound else None,
                    max_warm_up=5 * s.api_limit // s.cost if s.bound else 0,
                    # Enough waiting to keep the API busy ~10 s at its limit, no more:
                    # what waits when the window opens is measured too.
                    top_up_below=max(50, int(10 * per_s / s.cost)),
                    deadline_s=deadline_s,
                )

            if s.kind == "learn":
                run = await beside(go, watch_learning)
                run.learned = learned[0] if learned else None
            else:
                run = await go()
    if s.kind == "learn":
        run.db_attempts = attempt_rows(root / "state" / "vigil.db")
    return run
