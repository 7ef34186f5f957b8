"""`vigil bench throttle`: how close the throttle runs to an API's rate limits without
tripping them, against the simulated API as a separate process.

Each scenario starts `vigil simulate-api` with the API's limits and latency, writes a
config pointing a `kind = "openai"` provider at it with the scenario's client limits,
runs `vigil run` with a fresh state directory, feeds it jobs over the control socket,
and reads what the API itself saw (GET /stats). See METHOD for how it measures."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from daemon.cli import render

if TYPE_CHECKING:  # the machinery (aiohttp and all) loads only when a bench runs
    from daemon.cli.bench_run import ApiSample, Run

METHOD = (
    "The API's buckets start full (a minute's worth of burst), so the bench first feeds "
    "jobs until that burst is spent (the API has less than one second of refill left), "
    "then submits --jobs more and measures from that moment until no job is left "
    "waiting. achieved = what the API admitted in that window (requests, or tokens "
    "charged: prompt + max_tokens, as OpenAI counts them) per minute of the API's own "
    "clock; utilisation = admitted / (limit x window + what the bucket still held when "
    "the window opened). 429 share = the API's 429 answers / all requests it got, over "
    "the whole run, warm-up included."
)


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
    max_429_share: float | None = None

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
    "smoke": Scenario(
        "smoke", "a quick self-check with high limits (no targets)",
        api_rpm=600_000, api_tpm=0, latency_ms=5, vigil_rpm=600_000, vigil_tpm=0,
        bound=None, jobs=30, text_chars=200, max_tokens=50,
    ),
}  # fmt: skip
ALL = ("request", "misconfigured", "token")
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

[analyzers.bench]
provider = "api"
model = "gpt-4o-mini"
prompt = "{{text}}"
max_tokens = {s.max_tokens}
max_attempts = 10
timeout_s = 120
"""


def _api_args(s: Scenario) -> list[str]:
    return [
        *("--rpm", str(s.api_rpm), "--tpm", str(s.api_tpm)),
        *("--latency-ms", str(s.latency_ms), "--seed", "1"),
    ]


def run_throttle(args: argparse.Namespace) -> int:
    from daemon.cli.bench_run import BenchError

    names = ALL if args.scenario == "all" else (args.scenario,)
    host = machine()
    if not args.json:
        print(
            f"machine: {host['cpus']} CPUs, {host['cpu']}, Python {host['python']}\n"
            f"method: {METHOD}\n",
            file=sys.stderr,
        )
    results: list[dict[str, Any]] = []
    for name in names:
        scenario = SCENARIOS[name]
        if args.jobs is not None:
            scenario = replace(scenario, jobs=args.jobs)
        if not args.json:
            print(f"{name}: {scenario.about} ...", file=sys.stderr, flush=True)
        root = Path(tempfile.mkdtemp(prefix=f"vigil-bench-{name}-"))
        try:
            run = _run_blocking(scenario, root)
            result = summarize(scenario, run, _learned(root / "daemon.log"), host)
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


def _run_blocking(s: Scenario, root: Path) -> Run:
    """One scenario in its own event loop (the CLI's run_async, on uvloop)."""
    from daemon.cli.main import run_async

    runs: list[Run] = []

    async def go() -> int:
        runs.append(await _run(s, root))
        return 0

    run_async(go)
    return runs[0]


async def _run(s: Scenario, root: Path) -> Run:
    import aiohttp
    import anyio

    from daemon.cli.bench_run import daemon, drive, simulated_api
    from daemon.control.client import ControlClient

    async with simulated_api(_api_args(s), root / "simulate-api.log") as url:
        config = root / "vigil.toml"
        await anyio.Path(config).write_text(daemon_config(s, url))
        async with (
            daemon(config, root / "state", root / "daemon.log") as socket,
            ControlClient(socket) as client,
            aiohttp.ClientSession() as http,
        ):
            per_s = s.api_limit / 60 if s.bound else 0.0

            def burst_spent(sample: ApiSample) -> bool:
                left = sample.remaining_tokens if s.bound == "tokens" else sample.remaining_requests
                return left is not None and left <= per_s

            def make_job(i: int) -> dict[str, Any]:
                text = (f"Document {i}. " + _FILLER)[: s.text_chars]
                return {"analyzer": "bench", "input": {"text": text}}

            work_s = s.jobs * s.cost / per_s if per_s else 0.0
            return await drive(
                client,
                http,
                url.removesuffix("/v1") + "/stats",
                make_job=make_job,
                jobs=s.jobs,
                burst_spent=burst_spent if s.bound else None,
                max_warm_up=5 * s.api_limit // s.cost if s.bound else 0,
                # Enough waiting to keep the API busy ~10 s at its limit, no more: what
                # waits when the window opens is measured too.
                top_up_below=max(50, int(10 * per_s / s.cost)),
                deadline_s=120 + 3 * (60 + work_s),
            )


def _learned(log_path: Path) -> list[dict[str, Any]]:
    """The daemon's provider.limit_learned events (what header sync adopted)."""
    found = []
    try:
        lines = log_path.read_bytes().splitlines()
    except OSError:
        return []
    for line in lines:
        if b"provider.limit_learned" not in line:
            continue
        try:
            event = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        found.append({k: event.get(k) for k in ("budget", "server_limit", "per_minute", "was")})
    return found


def _window(s: Scenario, a: ApiSample, b: ApiSample) -> dict[str, Any] | None:
    span = b.uptime_s - a.uptime_s
    if span <= 0:
        return None
    tokens = s.bound == "tokens"
    used = b.tokens_charged - a.tokens_charged if tokens else b.admitted - a.admitted
    left = (a.remaining_tokens if tokens else a.remaining_requests) or 0
    capacity = s.api_limit * span / 60 + left
    return {
        "seconds": round(span, 2),
        "requests": b.requests - a.requests,
        "admitted": b.admitted - a.admitted,
        "tokens_charged": b.tokens_charged - a.tokens_charged,
        "rate_limited": b.rate_limited - a.rate_limited,
        "left_at_start": left,
        "achieved_per_minute": round(used / span * 60, 1),
        "utilisation": round(used / capacity, 4),
    }


def summarize(
    s: Scenario, run: Run, learned: list[dict[str, Any]], host: dict[str, Any]
) -> dict[str, Any]:
    last, first = run.last, run.first
    window = None
    if run.window_start is not None and run.window_end is not None:
        window = _window(s, run.window_start, run.window_end)
    requests = last.requests if last else 0
    share = (last.rate_limited / requests) if last and requests else 0.0
    met: bool | None = None
    if s.target_utilisation is not None and s.max_429_share is not None:
        met = (
            window is not None
            and window["utilisation"] >= s.target_utilisation
            and share <= s.max_429_share
        )
    span = last.uptime_s - first.uptime_s if last and first else 0.0
    p = run.provider
    budgets = p.get("budgets", {})
    return {
        "scenario": s.name,
        "about": s.about,
        "bound": s.bound,
        "api_limit_per_minute": s.api_limit,
        "vigil_limit_per_minute": s.vigil_limit,
        "latency_ms": s.latency_ms,
        "jobs": {"submitted": run.submitted, **run.jobs},
        "window": window,
        "rate_limited_share": round(share, 5),
        "target": {"utilisation": s.target_utilisation, "max_429_share": s.max_429_share},
        "target_met": met,
        "whole_run": {
            "seconds": round(span, 2),
            "requests": requests,
            "admitted": last.admitted if last else 0,
            "rate_limited": last.rate_limited if last else 0,
            "wall_s": round(run.wall_s, 2),
        },
        "vigil": {
            "rate_limited": p.get("rate_limited"),
            "p50_latency_ms": p.get("p50_latency_ms"),
            "p99_latency_ms": p.get("p99_latency_ms"),
            "budgets": {k: v.get("per_minute") for k, v in budgets.items()},
            "limit_learned": learned,
            "retried": run.attempts.get("retried", 0),
        },
        "machine": host,
        "method": METHOD if s.bound else "no warm-up and no window: whole-run figures only",
    }


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        w = r["window"] or {}
        target = r["target"]
        rows.append(
            [
                r["scenario"],
                r["api_limit_per_minute"] or "-",
                r["vigil_limit_per_minute"] or "-",
                f"{w['seconds']:.1f}" if w else "-",
                w.get("admitted", "-"),
                f"{w['achieved_per_minute']:,.0f}" if w else "-",
                f"{w['utilisation']:.2%}" if w else "-",
                f">= {target['utilisation']:.0%}" if target["utilisation"] else "-",
                f"{r['rate_limited_share']:.3%}",
                f"<= {target['max_429_share']:.1%}" if target["max_429_share"] else "-",
                {True: "yes", False: "NO", None: "-"}[r["target_met"]],
            ]
        )
    render.table(
        [
            "scenario",
            "api limit/min",
            "vigil limit/min",
            "window s",
            "admitted",
            "achieved/min",
            "utilisation",
            "target",
            "429 share",
            "max",
            "met",
        ],
        rows,
    )
