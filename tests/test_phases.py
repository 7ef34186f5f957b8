"""Where each attempt's time went (issue #15 part 3): the phases an attempt records
(queue, slot, budget, cool-down, API, record), measured on real parts: the provider's
own limits and HTTP client against a real server, and a daemon subprocess with its
SQLite file, its HTTP API, `/metrics`, `vigil show` and the status page.

No assertion is about speed: only how the phases relate to each other, to the
attempt's recorded duration, and to holds the test sets up (a wait never ends early)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web

from daemon.analyzers import Calls
from daemon.cli.render import millis
from daemon.config import ProviderConfig, SimulateConfig
from daemon.jobs import Job, Phases
from daemon.providers.base import ChatRequest, Message
from daemon.providers.client import ApiProvider
from daemon.providers.limits import Cost, ProviderLimits
from daemon.providers.phases import PhaseTimes
from daemon.queue import Claimed
from daemon.simulated.server import serve_simulated
from daemon.store.base import PHASES
from daemon.worker import phases_of
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows, run_cli
from tests.scripted_api import ScriptedAPI
from tests.test_job_browser import chromium, daemon, settle, submit
from tests.test_status_page import CHROMIUM, StartDaemon
from tests.torture_helpers import analyzer, openai_provider, threaded_api

BOUND_S = 30.0  # every wait in this file ends well before this
SUM_TOLERANCE_MS = 50.0  # the store's stamps vs the worker's clock: a commit or two apart
IN_ATTEMPT = ("slot_ms", "budget_ms", "cooldown_ms", "api_ms", "record_ms")
COOLDOWN_MS = 800  # the scripted API's retry-after-ms on its 429


def job(created_at: float, not_before: float = 0.0) -> Job:
    """A claimed job as the worker sees it."""
    return Job(
        id="j1",
        analyzer="a",
        input={},
        priority=0,
        idempotency_key=None,
        state="running",
        attempts=1,
        max_attempts=5,
        not_before=not_before,
        created_at=created_at,
        started_at=created_at,
        finished_at=None,
        result=None,
        error=None,
        usage=None,
        source="test",
    )


def in_attempt(phases: dict[str, float]) -> float:
    """The five phases within an attempt, added up (a phase left out took no time)."""
    return sum(phases.get(key, 0.0) for key in IN_ATTEMPT)


def attempts(proc: DaemonProcess) -> list[dict[str, Any]]:
    """Every recorded attempt straight from the daemon's SQLite file, with its job's
    stamps: the store's own duration to hold the phases against."""
    rows = db_rows(
        proc.state_dir / "vigil.db",
        "SELECT a.job_id, a.n, a.outcome, a.started_at, a.finished_at, a.phases, j.created_at "
        "FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.finished_at IS NOT NULL "
        "ORDER BY a.started_at",
    )
    return [
        {
            "job_id": job_id,
            "n": n,
            "started_at": started,
            "outcome": outcome,
            "duration_ms": (finished - started) * 1000,
            "since_created_ms": (started - created) * 1000,
            # Stored as a bare list, in the order of the Phases fields.
            "phases": dict(zip(PHASES, json.loads(phases), strict=True)) if phases else None,
        }
        for job_id, n, outcome, started, finished, phases, created in rows
    ]


def assert_adds_up(rows: list[dict[str, Any]]) -> None:
    """Each attempt's five phases add up to its recorded duration."""
    for row in rows:
        assert row["phases"] is not None, row
        gap = row["duration_ms"] - in_attempt(row["phases"])
        assert abs(gap) <= SUM_TOLERANCE_MS, row


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=BOUND_S) as response:
        body: bytes = response.read()
    return body


# -- the accumulator and the limits, in process -----------------------------------------


def test_phases_of_takes_the_claim_as_the_start_and_the_rest_as_record() -> None:
    """From the claim to the end: the wait before the worker started is the slot's, the
    provider's waits and requests are their own, the remainder is the record's; the
    queue is from ready (the later of created and not_before) to the claim."""
    calls = Calls({}, {})
    times = calls.times
    times.slot_s, times.budget_s, times.cooldown_s, times.api_s = 0.1, 1.5, 0.3, 0.4
    claim = Claimed(at=1000.0, mono=50.0)
    phases = phases_of(job(created_at=990.0, not_before=997.0), claim, 50.2, calls, 52.6)
    assert phases == Phases(
        queue_ms=3000.0,
        slot_ms=300.0,
        budget_ms=1500.0,
        cooldown_ms=300.0,
        api_ms=400.0,
        record_ms=100.0,
    )
    assert in_attempt(msgspec.to_builtins(phases)) == pytest.approx(2600.0)
    late = phases_of(job(created_at=1001.0), claim, 50.0, Calls({}, {}), 50.0)
    assert late == Phases()  # nothing negative: a clock a hair apart is no time at all


@pytest.mark.anyio
async def test_limits_put_each_wait_where_it_belongs() -> None:
    """A cool-down's wait is the cool-down's; a wait for a slot held by a request is the
    slot's; a wait for budget is the budget's, and so is a wait for a slot that callers
    waiting for budget hold (a rate limit, not the concurrency, is what holds it)."""
    with anyio.fail_after(BOUND_S):
        cool = ProviderLimits(max_concurrency=1, requests_per_minute=0, tokens_per_minute=0)
        cool.cool_down(0.3)
        cooled = PhaseTimes()
        async with cool.slot(Cost(1), cooled):
            pass
        assert cooled.cooldown_s >= 0.25 and cooled.budget_s < 0.1 and cooled.slot_s < 0.1
        cool.cool_down(10.0)
        cut = PhaseTimes()
        with anyio.move_on_after(0.2):  # an attempt's deadline, met while cooling down
            async with cool.slot(Cost(1), cut):
                pytest.fail("sent during a cool-down")
        assert cut.cooldown_s >= 0.15 and cut.budget_s < 0.05, "a wait cut short counts too"
        cool.cooldown_until = 0.0  # lifted (as the cool-down's end would)

        held, waiter = PhaseTimes(), PhaseTimes()
        got = anyio.Event()

        async def hold() -> None:
            async with cool.slot(Cost(1), held):
                got.set()
                await anyio.sleep(0.3)  # the request in flight

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await got.wait()
            async with cool.slot(Cost(1), waiter):
                pass
        assert waiter.slot_s >= 0.25 and waiter.budget_s < 0.1 and waiter.cooldown_s < 0.01

        # 240 a minute in quarter-second slices: room for one, then one each 0.25 s.
        paced = ProviderLimits(
            max_concurrency=1, requests_per_minute=240, tokens_per_minute=0, slice_s=0.25
        )
        first, second, third = PhaseTimes(), PhaseTimes(), PhaseTimes()
        async with paced.slot(Cost(1), first):
            pass

        async def pace(times: PhaseTimes) -> None:
            async with paced.slot(Cost(1), times):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(pace, second)
            while not paced.waiting:  # noqa: ASYNC110  (the second, asleep for budget in the slot)
                await anyio.sleep(0.005)
            tg.start_soon(pace, third)
        assert first.budget_s < 0.1 and first.slot_s < 0.1
        assert second.budget_s >= 0.2 and second.slot_s < 0.1
        assert third.budget_s >= 0.4 and third.slot_s < 0.05, (third.budget_s, third.slot_s)


@pytest.mark.anyio
async def test_calls_add_up_every_call_of_an_attempt() -> None:
    """A handler's two calls through `Calls`: their requests' time adds up in `api_s`,
    against the simulated API as a real HTTP server with a fixed latency."""
    settings = SimulateConfig(latency_ms=60, latency_sigma=0.0, seed=1)
    request = ChatRequest(model="m", messages=[Message("user", "hello")], max_tokens=20)
    with anyio.fail_after(BOUND_S):
        async with (
            serve_simulated(settings) as (_, url),
            ApiProvider("main", ProviderConfig(kind="openai", base_url=url)) as provider,
        ):
            calls = Calls({"main": provider}, {})
            await calls.complete("main", request)
            one = calls.times.api_s
            await calls.complete("main", request)
    assert one >= 0.05 and calls.times.api_s >= one + 0.05
    assert calls.times.budget_s < 0.05 and calls.times.cooldown_s < 0.05
    assert len(calls.records) == 2


# -- a daemon: its store, `vigil show`, /v1/jobs/{id}, /metrics, the status page ---------


def test_a_rate_limit_shows_as_budget_and_the_phases_add_up(start_daemon: StartDaemon) -> None:
    """120 requests a minute (two at once, then one each 0.5 s) and six jobs at once:
    the held jobs' budget waits show what held them, every attempt's phases add up to
    its recorded duration, `vigil show` prints the timeline, and /metrics has the
    phases by provider."""
    with threaded_api() as api:
        config = daemon_config(
            openai_provider("main", api.url, requests_per_minute=120) + analyzer("a", "main"),
            http_listen="127.0.0.1:0",
        )
        proc = start_daemon(config)
        ids = proc.call(
            "submit", jobs=[{"analyzer": "a", "input": {"text": f"doc {i}"}} for i in range(6)]
        )["ids"]
        proc.wait_all_terminal(timeout_s=BOUND_S)
        rows = attempts(proc)
        metrics = fetch(proc.http_url() + "/metrics").decode()
        held = max(rows, key=lambda r: r["phases"]["budget_ms"])
        shown = run_cli("show", held["job_id"], socket_path=proc.socket_path)

    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    assert all(r["outcome"] == "succeeded" for r in rows), rows
    assert_adds_up(rows)
    for row in rows:  # the queue: from created to claimed, before the attempt
        assert abs(row["phases"].get("queue_ms", 0.0) - row["since_created_ms"]) <= SUM_TOLERANCE_MS
        assert row["phases"]["api_ms"] > 0
    # Nominal waits 0, 0.1, 0.6, 1.1, 1.6 and 2.1 s: a wait is never shorter than its hold.
    budgets = sorted(r["phases"].get("budget_ms", 0.0) for r in rows)
    assert budgets[-1] >= 1500 and sum(b >= 400 for b in budgets) >= 4, budgets
    assert held["phases"]["budget_ms"] >= 0.7 * held["duration_ms"], held

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    at = lines.index(
        "where the time went (timeline: s slot, b budget, c cool-down, a API, r record):"
    )
    assert lines[at + 1].split() == [
        "N",
        "QUEUE",
        "SLOT",
        "BUDGET",
        "COOLDOWN",
        "API",
        "RECORD",
        "TIMELINE",
    ]
    cells = lines[at + 2].split()
    phases = held["phases"]
    assert cells[:7] == ["1", *(millis(phases.get(key, 0.0)) for key in ("queue_ms", *IN_ATTEMPT))]
    assert len(cells[7]) == 20 and cells[7].count("b") >= 14, cells
    assert max(len(line) for line in lines[at : at + 3]) <= 80

    def sample(name: str, phase: str, le: str | None = None) -> float:
        """A sample of the exposition text, whatever order its labels come in."""
        want = {"provider": "main", "phase": phase, **({"le": le} if le else {})}
        for line in metrics.splitlines():
            head, _, value = line.rpartition(" ")
            found = re.fullmatch(r"(\w+)\{(.*)\}", head)
            if found and found.group(1) == name:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2)))
                if labels == want:
                    return float(value)
        raise AssertionError(f"no {name} {want} in /metrics")

    for phase in ("slot", "budget", "cooldown", "api", "record"):
        assert sample("vigil_attempt_phase_seconds_count", phase) == len(rows)
    budget_s = sum(budgets) / 1000
    assert sample("vigil_attempt_phase_seconds_sum", "budget") == pytest.approx(budget_s)
    assert sample("vigil_attempt_phase_seconds_sum", "cooldown") == pytest.approx(0.0, abs=0.01)
    held_s = held["phases"]["budget_ms"] / 1000
    assert sample("vigil_attempt_phase_seconds_bucket", "budget", le="1.0") <= len(rows) - 1
    assert sample("vigil_attempt_phase_seconds_bucket", "budget", le="+Inf") == len(rows)
    assert held_s > 1.0


class CoolingAPI(ScriptedAPI):
    """The scripted API, its 429s asking for a longer cool-down."""

    async def _chat(self, request: web.Request) -> web.Response:
        response = await super()._chat(request)
        if response.status == 429:
            response.headers["retry-after-ms"] = str(COOLDOWN_MS)
        return response


@pytest.mark.anyio
async def test_a_429_cool_down_shows_on_the_job_that_waited_it_out(
    start_daemon: StartDaemon,
) -> None:
    """One request at a time; the first answer is a 429 asking for 0.8 s: the job it
    turned away records the request (its API time), the other waits the cool-down out
    and records it as such; GET /v1/jobs/{id} and the socket's `show` carry the phases
    as the store has them."""
    with CoolingAPI([429]) as api:
        config = daemon_config(
            openai_provider("main", api.url, max_concurrency=1) + analyzer("a", "main"),
            http_listen="127.0.0.1:0",
        )
        proc = start_daemon(config)
        jobs = [{"analyzer": "a", "input": {"text": f"doc {i}"}} for i in range(2)]
        ids = (await proc.acall("submit", jobs=jobs))["ids"]
        await proc.wait_for_status(lambda s: s["jobs"]["succeeded"] == 2, timeout_s=BOUND_S)
        rows = attempts(proc)
        url = await anyio.to_thread.run_sync(proc.http_url)
        over_http = {
            job_id: msgspec.json.decode(
                await anyio.to_thread.run_sync(fetch, f"{url}/v1/jobs/{job_id}")
            )
            for job_id in ids
        }
        over_socket = {job_id: await proc.acall("show", id=job_id) for job_id in ids}

    assert api.statuses[0] == 429 and api.statuses.count(429) == 1, api.statuses
    assert_adds_up(rows)
    [turned_away] = [r for r in rows if r["outcome"] == "rate_limited"]
    assert turned_away["phases"]["api_ms"] > 0
    waited = [
        r for r in rows if r["outcome"] == "succeeded" and r["job_id"] != turned_away["job_id"]
    ]
    assert len(waited) == 1, rows
    cooldown_ms = waited[0]["phases"].get("cooldown_ms", 0.0)
    assert cooldown_ms >= 0.6 * COOLDOWN_MS, waited
    assert waited[0]["phases"].get("budget_ms", 0.0) < cooldown_ms

    for row in rows:
        for shown in (over_http[row["job_id"]], over_socket[row["job_id"]]):
            # A 429 spends no attempt: the retry that follows has the same number.
            [attempt] = [a for a in shown["attempts"] if a["started_at"] == row["started_at"]]
            assert attempt["phases"] == row["phases"], (attempt, row)


@pytest.mark.anyio
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
async def test_the_status_page_shows_each_attempts_phases(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The job view's attempts carry a bar of the attempt's phases and each phase's
    time, as /v1/jobs/{id} has them, under the page's CSP (a violation fails)."""
    proc = daemon(start_daemon)
    [job_id] = await submit(proc, {"analyzer": "summarize", "input": {"text": "hello"}})
    await settle(proc)
    [attempt] = (await proc.acall("show", id=job_id))["attempts"]
    phases = attempt["phases"]
    async with chromium(tmp_path) as page:
        await page.goto(f"{proc.http_url()}/#job={job_id}")
        await page.wait("document.querySelector('#job-state').textContent === 'succeeded'")
        items = await page.eval(
            "[...document.querySelectorAll('#job-attempts .phase')]"
            ".map((e) => [e.dataset.phase, e.textContent])"
        )
        segments = await page.eval(
            "[...document.querySelectorAll('#job-attempts .phase-bar > span')]"
            ".map((e) => [e.className, Number(e.style.flexGrow)])"
        )
        width = await page.eval(
            "document.querySelector('#job-attempts .phase-bar').getBoundingClientRect().width"
        )
    labels = ["queue", "slot", "budget", "cool-down", "API", "record"]
    keys = ["queue", "slot", "budget", "cooldown", "api", "record"]
    assert [key for key, _ in items] == keys
    for (key, text), label in zip(items, labels, strict=True):
        ms = phases.get(f"{key}_ms", 0.0)
        assert text.startswith(label + " "), text
        assert (text == f"{label} 0") == (ms < 0.05), (text, ms)
    expected = [
        [f"ph-{key}", phases[f"{key}_ms"]] for key in keys[1:] if phases.get(f"{key}_ms", 0.0) > 0
    ]
    assert segments == expected and ["ph-api", phases["api_ms"]] in segments
    assert width > 50
