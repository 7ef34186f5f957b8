"""`vigil bench throttle --scenario outage`: the API is down when a backlog arrives
and comes back later on the same port; how long from its return until the backlog runs
again, and what the wait cost (attempt rows written, jobs failed). See OUTAGE_METHOD.

Every wait is bounded; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import msgspec

from daemon.bench.run import (
    POLL_S,
    ApiSample,
    AttemptRow,
    BenchError,
    api_sample,
    attempt_rows,
    daemon,
    event_time,
    free_port,
    log_events,
    poll_until,
    simulated_api,
    submit_jobs,
)
from daemon.cli import render
from daemon.control.client import ControlClient

if TYPE_CHECKING:
    from daemon.bench.scenarios import Scenario

OUTAGE_METHOD = (
    "The daemon starts with the API down (nothing listens on its port: connection "
    "refused) and gets the whole backlog at once. Once its circuit has opened twice "
    "(after breaker_failures failures, then after a failed half-open probe), the bench "
    "starts the simulated API again on the same port at once: about the least "
    "favourable moment, nearly a whole breaker_open_s before the next probe (the "
    "bench's status poll and the API's start-up take some of it). down = from the "
    "backlog's submission to the API listening again. Times after that are from the "
    "API's return, on the new API process's own clock (it starts a few ms before it "
    "listens, so every figure is slightly long); its /stats is sampled every 20 ms. "
    "half_open = when the circuit was due to half-open (the daemon's status right "
    "after the return); probe = the first sample with a request admitted; running = "
    "the first sample with a request admitted beyond the probe (the held backlog "
    "claimed again); done = the first poll (every 0.2 s) at which the daemon counted "
    "every job finished. circuit_closed = the daemon's log stamp of "
    "provider.circuit_closed against the bench's clock when the API said it listens. "
    "Target: return -> running <= breaker_open_s, and no job failed. attempt_rows = the "
    "daemon's attempt rows by outcome (deferred: claimed while the circuit refused "
    "calls and given back, no attempt spent; error: a request refused), read from its "
    "database after it stopped."
)
FINE_POLL_S = 0.02
CIRCUIT_OPENS_BEFORE_RETURN = 2  # the first opening and one failed probe


class OutageRun(msgspec.Struct, kw_only=True):
    """What the outage run recorded: the API's samples after its return (its own clock
    starts at the return), the daemon's view then and at the end, and its records."""

    submitted: int = 0
    down_s: float = 0.0  # from the backlog's submission to the API listening again
    returned_at: float = 0.0  # wall clock when the API said it listens again
    circuit_at_return: dict[str, Any] = {}
    half_open_at_s: float | None = None  # API clock, from the status at the return
    probe: ApiSample | None = None
    running: ApiSample | None = None
    done: ApiSample | None = None
    jobs: dict[str, int] = {}
    provider: dict[str, Any] = {}
    attempts: dict[str, int] = {}
    opened_at: list[float] = []  # provider.circuit_opened log stamps (wall clock)
    closed_at: list[float] = []  # provider.circuit_closed log stamps
    db_attempts: list[AttemptRow] = []
    wall_s: float = 0.0


def _circuit(status: dict[str, Any]) -> dict[str, Any]:
    provider: dict[str, Any] = next(iter(status["providers"].values()), {})
    circuit: dict[str, Any] = provider.get("circuit", {})
    return circuit


async def run_outage(s: Scenario, root: Path) -> OutageRun:
    from daemon.bench.scenarios import api_args, daemon_config, make_job

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = root / "vigil.toml"
    await anyio.Path(config).write_text(daemon_config(s, f"{base}/v1"))
    log_path = root / "daemon.log"
    run = OutageRun()
    started = time.monotonic()
    async with (
        daemon(config, root / "state", log_path) as socket,
        ControlClient(socket) as client,
        aiohttp.ClientSession() as http,
    ):
        run.submitted = await submit_jobs(client, lambda i: make_job(s, i), 0, s.jobs)
        down_from = time.monotonic()

        async def opened_enough() -> dict[str, Any] | None:
            circuit = _circuit(await client.call("status"))
            return circuit if circuit.get("opened", 0) >= CIRCUIT_OPENS_BEFORE_RETURN else None

        await poll_until(
            opened_enough,
            every_s=POLL_S,
            timeout_s=60 + CIRCUIT_OPENS_BEFORE_RETURN * s.breaker_open_s,
            what=f"the circuit opening {CIRCUIT_OPENS_BEFORE_RETURN} times",
        )
        async with simulated_api(api_args(s), root / "simulate-api.log", port=port) as url:
            run.returned_at = time.time()
            run.down_s = time.monotonic() - down_from
            if url != f"{base}/v1":
                raise BenchError(f"the API came back on {url}, not {base}/v1")
            run.circuit_at_return = _circuit(await client.call("status"))
            now = await api_sample(http, f"{base}/stats")
            left = run.circuit_at_return.get("half_open_in_s")
            run.half_open_at_s = None if left is None else now.uptime_s + left
            recovery_s = 60 + 3 * s.breaker_open_s

            def admitted(n: int) -> Callable[[], Awaitable[ApiSample | None]]:
                async def check() -> ApiSample | None:
                    sample = await api_sample(http, f"{base}/stats")
                    return sample if sample.admitted >= n else None

                return check

            run.probe = await poll_until(
                admitted(1), every_s=FINE_POLL_S, timeout_s=recovery_s, what="a request admitted"
            )
            run.running = await poll_until(
                admitted(2), every_s=FINE_POLL_S, timeout_s=recovery_s, what="the backlog running"
            )

            async def all_done() -> dict[str, Any] | None:
                status: dict[str, Any] = await client.call("status")
                counts = status["jobs"]
                finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
                return status if finished >= run.submitted else None

            status = await poll_until(
                all_done, every_s=POLL_S, timeout_s=recovery_s + s.jobs, what="every job finishing"
            )
            run.done = await api_sample(http, f"{base}/stats")
            run.jobs = status["jobs"]
            run.provider = next(iter(status["providers"].values()), {})
            run.attempts = status.get("attempts", {})
    run.wall_s = time.monotonic() - started
    run.opened_at = [event_time(e) for e in log_events(log_path, "provider.circuit_opened")]
    run.closed_at = [event_time(e) for e in log_events(log_path, "provider.circuit_closed")]
    run.db_attempts = attempt_rows(root / "state" / "vigil.db")
    return run


def _s(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def summarize_outage(s: Scenario, run: OutageRun, host: dict[str, Any]) -> dict[str, Any]:
    from daemon.bench.scenarios import BREAKER_FAILURES

    rows = Counter(row.outcome for row in run.db_attempts)
    closed = [t - run.returned_at for t in run.closed_at if t >= run.returned_at]
    probe_s = run.probe.uptime_s if run.probe else None
    running_s = run.running.uptime_s if run.running else None
    all_ok = run.jobs.get("succeeded") == run.submitted and not run.jobs.get("failed")
    met = all_ok and running_s is not None and running_s <= s.breaker_open_s
    return {
        "scenario": s.name,
        "kind": s.kind,
        "about": s.about,
        "latency_ms": s.latency_ms,
        "breaker": {"failures": BREAKER_FAILURES, "open_s": s.breaker_open_s},
        "jobs": {"submitted": run.submitted, **run.jobs},
        "outage": {
            "down_s": round(run.down_s, 2),
            "circuit_opened_before_return": run.circuit_at_return.get("opened"),
            "circuit_at_return": run.circuit_at_return.get("state"),
            "opened_total": len(run.opened_at),
        },
        "recovery": {
            "half_open_s": _s(run.half_open_at_s),
            "probe_s": _s(probe_s),
            "probe_after_half_open_s": _s(
                probe_s - run.half_open_at_s
                if probe_s is not None and run.half_open_at_s is not None
                else None
            ),
            "circuit_closed_s": _s(closed[0]) if closed else None,
            "running_s": _s(running_s),
            "done_s": _s(run.done.uptime_s if run.done else None),
        },
        "attempt_rows": dict(sorted(rows.items())),
        "target": {"max_running_s": s.breaker_open_s, "failed": 0},
        "target_met": met,
        "whole_run": {
            "wall_s": round(run.wall_s, 2),
            "api_requests": run.done.requests if run.done else 0,
            "api_admitted": run.done.admitted if run.done else 0,
        },
        "vigil": {"circuit": run.provider.get("circuit"), "attempts": run.attempts},
        "machine": host,
        "method": OUTAGE_METHOD,
    }


def outage_table(results: list[dict[str, Any]]) -> None:
    def sec(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for r in results:
        rec, rows_by = r["recovery"], r["attempt_rows"]
        rows.append(
            [
                r["scenario"],
                f"{r['outage']['down_s']:.1f}",
                r["outage"]["opened_total"],
                sec(rec["half_open_s"]),
                sec(rec["probe_s"]),
                sec(rec["running_s"]),
                f"<= {r['target']['max_running_s']:g}",
                sec(rec["done_s"]),
                rows_by.get("deferred", 0),
                rows_by.get("error", 0),
                r["jobs"].get("failed", 0),
                {True: "yes", False: "NO", None: "-"}[r["target_met"]],
            ]
        )
    headers = ["scenario", "down s", "opened", "half-open s", "probe s", "running s"]
    headers += ["target", "done s", "deferred rows", "error rows", "failed", "met"]
    render.table(headers, rows)
