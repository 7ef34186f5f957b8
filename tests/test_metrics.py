"""GET /metrics from a real daemon, read back with prometheus_client's own text
parser; the watchdog and circuit readers against the shapes they may meet; and the
alert rules, which must only name series the daemon exposes."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from daemon.observe.metrics import circuit_state, lag_histogram, watchdog_metrics
from tests.daemon_proc import DaemonProcess, sim_config

StartDaemon = Callable[..., DaemonProcess]
ALERTS = Path(__file__).parent.parent / "config" / "alerts.yml"
JOB = {"analyzer": "summarize", "input": {"text": "a good day"}}
FULL_WATCHDOG = {
    "loop": {
        "lag_ms": {"p50": 1.0, "p99": 20.0, "max": 300.0, "window_s": 60},
        "blocked_count": 2,
        "blocked_seconds": 1.5,
    },
    "memory": {"rss_mb": 80.0, "growth_events": 1},
}


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


class Families:
    """Parsed exposition: sample values looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in self.families.values()
            for s in f.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def names(self) -> set[str]:
        """Every series name a family stands for (`x_total`, `x_bucket`...), samples or not."""
        return {
            family.name + suffix
            for family in self.families.values()
            for suffix in _SUFFIXES.get(family.type, ("",))
        }


class _Fixed:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> Families:
    return Families(generate_latest(_Fixed(families)).decode())


async def scrape(daemon: DaemonProcess) -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    url = await anyio.to_thread.run_sync(daemon.http_url)
    async with aiohttp.ClientSession(url) as session, session.get("/metrics") as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


async def status(daemon: DaemonProcess) -> Any:
    return await anyio.to_thread.run_sync(daemon.call, "status")


@pytest.mark.anyio
async def test_metrics_carry_the_expected_series(start_daemon: StartDaemon) -> None:
    """After three jobs ran over HTTP, the text parses and holds the job, API, store,
    process and HTTP series with the right values."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0"), env={"VIGIL_HTTP_TOKEN": ""})
    url = await anyio.to_thread.run_sync(proc.http_url)
    async with aiohttp.ClientSession(url) as session:
        async with session.post("/v1/jobs", json=[JOB] * 3) as r:
            assert r.status == 202
        async with session.request("PROPFIND", "/status") as r:  # a method not in the set
            assert r.status == 405
    with anyio.fail_after(30):
        while True:  # `finished` counts up after the finish hooks ran
            if (await status(proc))["queue"]["finished"] >= 3:
                break
            await anyio.sleep(0.05)
    content_type, text = await scrape(proc)
    assert content_type.startswith("text/plain; version=0.0.4")
    m = Families(text)

    assert {m.value("vigil_jobs", state=s) for s in ("queued", "running", "failed")} == {0}
    assert m.value("vigil_jobs", state="succeeded") == 3
    assert m.value("vigil_jobs", state="canceled") == 0
    assert m.value("vigil_jobs_submitted_total") == 3
    assert m.value("vigil_jobs_finished_total", analyzer="summarize", outcome="succeeded") == 3
    assert m.value("vigil_attempts_total", analyzer="summarize", outcome="succeeded") == 3
    assert m.value("vigil_job_duration_seconds_count", analyzer="summarize") == 3
    assert m.value("vigil_job_duration_seconds_sum", analyzer="summarize") > 0
    assert m.value("vigil_job_queue_wait_seconds_count", analyzer="summarize") == 3
    assert m.value("vigil_job_queue_wait_seconds_bucket", analyzer="summarize", le="+Inf") == 3

    assert m.value("vigil_api_requests_total", provider="sim", status="200") == 3
    assert m.value("vigil_api_request_duration_seconds_count", provider="sim") == 3
    assert m.value("vigil_api_request_duration_seconds_sum", provider="sim") > 0
    assert m.value("vigil_api_tokens_total", provider="sim", kind="prompt") > 0
    assert m.value("vigil_api_tokens_total", provider="sim", kind="completion") > 0
    assert m.value("vigil_api_rate_limited_total", provider="sim") == 0
    assert m.value("vigil_api_in_flight", provider="sim") == 0
    assert m.value("vigil_api_paused", provider="sim") == 0

    assert m.value("vigil_db_commit_duration_seconds_count") > 0
    assert m.value("vigil_db_commit_errors_total") == 0
    assert m.value("vigil_db_writable") == 1
    assert m.value("vigil_process_rss_bytes") > 10_000_000
    assert m.value("vigil_process_open_fds") > 3
    assert m.value("vigil_tasks") > 1
    assert (m.value("vigil_live"), m.value("vigil_ready")) == (1, 1)
    assert m.value("vigil_queue_max_backlog") == 1_000_000
    assert m.value("vigil_http_requests_total", route="/v1/jobs", method="POST", status="202") == 1
    assert (
        m.value("vigil_http_requests_total", route="unmatched", method="other", status="405") == 1
    )
    assert "PROPFIND" not in text  # labels come from bounded sets, not from the client
    if "circuit" in (await status(proc))["providers"]["sim"]:
        assert m.value("vigil_api_circuit_state", provider="sim", state="closed") == 1
        assert m.value("vigil_api_circuit_open", provider="sim") == 0
    if "watchdog" in await status(proc):  # the watchdog's own figures, when it runs
        assert m.value("vigil_loop_blocked_total") >= 0
        assert m.families["vigil_loop_lag_seconds"].type == "histogram"


@pytest.mark.anyio
async def test_metrics_follow_backpressure_and_pause(start_daemon: StartDaemon) -> None:
    """A paused daemon with a full backlog shows it: paused, not ready, backlog check down."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0", max_backlog=2))
    await anyio.to_thread.run_sync(proc.call, "pause")
    await anyio.to_thread.run_sync(lambda: proc.call("submit", jobs=[JOB, JOB]))
    m = Families((await scrape(proc))[1])
    assert m.value("vigil_queue_paused") == 1
    assert m.value("vigil_jobs", state="queued") == 2
    assert m.value("vigil_ready") == 0 and m.value("vigil_live") == 1
    assert m.value("vigil_health_check", check="backlog") == 0
    assert m.value("vigil_health_check", check="store") == 1


@pytest.mark.anyio
async def test_alert_rules_name_only_exposed_series(start_daemon: StartDaemon) -> None:
    """Every vigil_ series config/alerts.yml uses is one the daemon exposes (a rule on a
    misspelt series would never fire)."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0"))
    exposed = Families((await scrape(proc))[1]).names()
    exposed |= render(watchdog_metrics(FULL_WATCHDOG)).names()
    text = ALERTS.read_text()
    used = set(re.findall(r"\bvigil_[a-z0-9_]+", text))
    assert used, "no vigil_ series found in alerts.yml"
    assert used <= exposed, sorted(used - exposed)
    for alert in ("VigilLoopBlocked", "VigilMemoryGrowth", "VigilBacklogNearFull"):
        assert f"alert: {alert}" in text
    for alert in ("VigilProviderPaused", "VigilProviderCircuitOpen", "VigilAttemptErrorRate"):
        assert f"alert: {alert}" in text


def test_watchdog_figures_are_read_defensively() -> None:
    """Figures the watchdog offers become series (ms to s); odd or missing ones do not,
    and never raise."""
    m = render(watchdog_metrics(FULL_WATCHDOG))
    assert m.value("vigil_loop_lag_p50_seconds") == pytest.approx(0.001)
    assert m.value("vigil_loop_lag_p99_seconds") == pytest.approx(0.02)
    assert m.value("vigil_loop_lag_max_seconds") == pytest.approx(0.3)
    assert m.value("vigil_loop_blocked_total") == 2
    assert m.value("vigil_loop_blocked_seconds_total") == 1.5
    assert m.value("vigil_memory_growth_events_total") == 1
    odd_shapes: list[Any] = [{}, None, [], "x", {"loop": "busy"}, {"loop": {"lag_ms": [1, 2]}}]
    for odd in odd_shapes:
        assert list(watchdog_metrics(odd)) == []


def test_circuit_state_is_read_defensively() -> None:
    """The breaker state is taken from a string or a {"state": ...} mapping, else None."""
    assert circuit_state({"circuit": "open"}) == "open"
    assert circuit_state({"circuit": {"state": "half-open", "failures": 3}}) == "half_open"
    assert circuit_state({"breaker": "closed"}) == "closed"
    assert circuit_state({}) is None
    assert circuit_state({"circuit": 5}) is None


def test_lag_histogram_is_cumulative_and_defensive() -> None:
    """Per-bucket lag counts become a cumulative histogram in seconds; a shape that
    does not fit the bounds gives none."""
    lag = SimpleNamespace(buckets=[3, 0, 2, 1], count=6, sum_ms=700.0)
    histogram = lag_histogram(lag, (1.0, 10.0, 100.0))
    assert histogram is not None
    m = render([histogram])
    assert [m.value("vigil_loop_lag_seconds_bucket", le=le) for le in ("0.001", "0.01", "0.1")] == [
        3,
        3,
        5,
    ]
    assert m.value("vigil_loop_lag_seconds_bucket", le="+Inf") == 6
    assert m.value("vigil_loop_lag_seconds_count") == 6
    assert m.value("vigil_loop_lag_seconds_sum") == pytest.approx(0.7)
    assert lag_histogram(lag, (1.0, 10.0)) is None
    assert lag_histogram(SimpleNamespace(buckets=[1, 2]), (1.0,)) is None
    assert lag_histogram(None, (1.0,)) is None
