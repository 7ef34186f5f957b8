"""`vigil bench throttle`: how close the throttle runs to an API's rate limits without
tripping them, how fast it learns a lower limit than it was given, and how fast a
backlog runs again after an outage; against the simulated API as a separate process.

Each scenario starts `vigil simulate-api` with the API's limits and latency, writes a
config pointing a `kind = "openai"` provider at it with the scenario's client limits,
runs `vigil run` with a fresh state directory, feeds it jobs over the control socket,
and reads what the API itself saw (GET /stats). How each kind of scenario measures:
bench_throttle_figures.py (throughput, learn) and bench_outage.py (outage)."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

if TYPE_CHECKING:  # the machinery (aiohttp and all) loads only when a bench runs
    from daemon.cli.bench_run import ApiSample, LogMark, Run

T = TypeVar("T")
Kind = Literal["throughput", "learn", "outage"]


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    api_rpm: int
    api_tpm: int
    latency_ms: float
    vigil_rpm: int
    vigil_tpm: int
    bound: Literal["requests", "tokens"] | None  # None: no warm-up, no window
    jobs: int
    text_chars: int
    max_tokens: int
    target_utilisation: float | None = None
    max_429_share: float | None = None  # learn: of the requests after the limit was learned
    kind: Kind = "throughput"
    max_attempts: int = 10
    breaker_open_s: float = 30.0  # the daemon's default

    @property
    def cost(self) -> int:
        """One request's charge against the bound budget, as the API counts it."""
        return 1 if self.bound != "tokens" else self.text_chars // 4 + self.max_tokens

    @property
    def api_limit(self) -> int:
        return self.api_tpm if self.bound == "tokens" else self.api_rpm

    @property
    def vigil_limit(self) -> int:
        return self.vigil_tpm if self.bound == "tokens" else self.vigil_rpm


SCENARIOS = {
    "request": Scenario(
        "request", "request-bound: API 3000 RPM, Vigil the same",
        api_rpm=3000, api_tpm=0, latency_ms=200, vigil_rpm=3000, vigil_tpm=0,
        bound="requests", jobs=2000, text_chars=400, max_tokens=50,
        target_utilisation=0.99, max_429_share=0.002,
    ),
    "misconfigured": Scenario(
        "misconfigured", "Vigil set 20 % above the API's real 3000 RPM",
        api_rpm=3000, api_tpm=0, latency_ms=200, vigil_rpm=3600, vigil_tpm=0,
        bound="requests", jobs=2000, text_chars=400, max_tokens=50,
        target_utilisation=0.97, max_429_share=0.01,
    ),
    "token": Scenario(
        "token", "token-bound: API 600,000 TPM, ~1,000-token requests",
        api_rpm=0, api_tpm=600_000, latency_ms=200, vigil_rpm=0, vigil_tpm=600_000,
        bound="tokens", jobs=600, text_chars=3000, max_tokens=250,
        target_utilisation=0.95, max_429_share=0.01,
    ),
    "misconfigured-small": Scenario(
        "misconfigured-small", "Vigil set x10 above the API's real 60 RPM (one a second)",
        api_rpm=60, api_tpm=0, latency_ms=200, vigil_rpm=600, vigil_tpm=0,
        bound=None, jobs=36, text_chars=400, max_tokens=50,
        max_429_share=0.01, kind="learn", max_attempts=3,
    ),
    "outage": Scenario(
        "outage", "API down when 300 jobs arrive, back on the same port later",
        api_rpm=0, api_tpm=0, latency_ms=200, vigil_rpm=0, vigil_tpm=0,
        bound=None, jobs=300, text_chars=400, max_tokens=50,
        kind="outage", breaker_open_s=5.0,
    ),
    "smoke": Scenario(
        "smoke", "a quick self-check with high limits (no targets)",
        api_rpm=600_000, api_tpm=0, latency_ms=5, vigil_rpm=600_000, vigil_tpm=0,
        bound=None, jobs=30, text_chars=200, max_tokens=50,
    ),
}  # fmt: skip
ALL = ("request", "misconfigured", "token", "misconfigured-small", "outage")
API_SLICE_S = 1.0  # the simulated API enforces its per-minute limits in 1-second slices
BREAKER_FAILURES = 5  # the daemon's default
_FILLER = " ".join(
    ["the launch of the new service went well and the team is happy with the results"] * 80
)


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
    from daemon.cli import bench_perf  # light: the machinery loads when a bench runs

    bench_perf.add_parsers(kinds)


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


def daemon_config(s: Scenario, url: str) -> str:
    return f"""
[http]
listen = ""

[queue]
max_concurrency = 96
backoff_base_s = 0.5
backoff_max_s = 10

[log]
format = "json"

[providers.api]
kind = "openai"
base_url = "{url}"
max_concurrency = 64
requests_per_minute = {s.vigil_rpm}
tokens_per_minute = {s.vigil_tpm}
timeout_s = 30
breaker_failures = {BREAKER_FAILURES}
breaker_open_s = {s.breaker_open_s}

[analyzers.bench]
provider = "api"
model = "gpt-4o-mini"
prompt = "{{text}}"
max_tokens = {s.max_tokens}
max_attempts = {s.max_attempts}
timeout_s = 120
"""


def api_args(s: Scenario) -> list[str]:
    return [
        *("--rpm", str(s.api_rpm), "--tpm", str(s.api_tpm), "--slice-s", str(API_SLICE_S)),
        *("--latency-ms", str(s.latency_ms), "--seed", "1"),
    ]


def make_job(s: Scenario, i: int) -> dict[str, Any]:
    text = (f"Document {i}. " + _FILLER)[: s.text_chars]
    return {"analyzer": "bench", "input": {"text": text}}


def run_throttle(args: argparse.Namespace) -> int:
    from daemon.cli.bench_outage import run_outage, summarize_outage
    from daemon.cli.bench_run import BenchError, log_events
    from daemon.cli.bench_throttle_figures import METHODS, report, summarize

    names = ALL if args.scenario == "all" else (args.scenario,)
    host = machine()
    if not args.json:
        print(
            f"machine: {host['cpus']} CPUs, {host['cpu']}, Python {host['python']}", file=sys.stderr
        )
        for kind in dict.fromkeys(SCENARIOS[name].kind for name in names):
            print(f"method ({kind}): {METHODS[kind]}", file=sys.stderr)
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
                outage = _blocking(run_outage, scenario, root)
                result = summarize_outage(scenario, outage, host)
            else:
                run = _blocking(_run, scenario, root)
                learned = log_events(root / "daemon.log", "provider.limit_learned")
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


def _blocking(go: Callable[[Scenario, Path], Awaitable[T]], s: Scenario, root: Path) -> T:
    """One scenario in its own event loop (the CLI's run_async, on uvloop)."""
    from daemon.cli.main import run_async

    done: list[T] = []

    async def main() -> int:
        done.append(await go(s, root))
        return 0

    run_async(main)
    return done[0]


async def _run(s: Scenario, root: Path) -> Run:
    import aiohttp
    import anyio

    from daemon.cli.bench_run import (
        attempt_rows,
        beside,
        daemon,
        drive,
        first_log_event,
        simulated_api,
    )
    from daemon.control.client import ControlClient

    async with simulated_api(api_args(s), root / "simulate-api.log") as url:
        config = root / "vigil.toml"
        await anyio.Path(config).write_text(daemon_config(s, url))
        async with (
            daemon(config, root / "state", root / "daemon.log") as socket,
            ControlClient(socket) as client,
            aiohttp.ClientSession() as http,
        ):
            stats_url = url.removesuffix("/v1") + "/stats"
            per_s = s.api_limit / 60 if s.bound else 0.0

            def burst_spent(sample: ApiSample) -> bool:
                left = sample.remaining_tokens if s.bound == "tokens" else sample.remaining_requests
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
                    burst_spent=burst_spent if s.bound else None,
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
