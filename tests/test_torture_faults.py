"""The API fault matrix: every way an OpenAI-compatible API misbehaves, injected for
real by the simulated API (one provider per fault, each pointed at `/fault/NAME/v1`),
against the daemon as a subprocess. For each fault: every job ends terminal with its
attempt history and an error naming the fault, the API sees no retry storm, and the
daemon stays healthy and keeps serving."""

from __future__ import annotations

import itertools
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from daemon.simulated.faults import FAULT_HEADER, FAULT_RETRY_AFTER_MS, FAULTS
from tests.daemon_proc import DaemonProcess, daemon_config, wait_until
from tests.torture_helpers import (
    ThreadedApi,
    analyzer,
    ledger_problems,
    openai_provider,
    threaded_api,
)

StartDaemon = Callable[..., DaemonProcess]
JOBS_PER_FAULT = 3
MAX_ATTEMPTS = 2
MAX_RATE_LIMITED = 3  # 429s spend no attempt: a job fails at its third
RATE_LIMIT_FAULTS = {"429", "429-no-retry-after"}
# The API's own "overloaded" (JSON 503, 529): not processed, so turned away like a 429
# (no attempt spent, bounded by max_rate_limited), but holding nobody else back.
OVERLOAD_FAULTS = {"503", "529"}
TURNED_AWAY_FAULTS = RATE_LIMIT_FAULTS | OVERLOAD_FAULTS
BREAKER_FAILURES = 3
BREAKER_OPEN_S = 1.0
PROVIDER_TIMEOUT_S = 1.0
DEFAULT_429_PAUSE_S = 1.0  # the provider's cool-down when a 429 carries no hint

# What every attempt's error ("Type: message") must contain: the fault itself, or an
# open circuit that names it as its last failure.
SIGNATURE = {
    "500": "HTTP 500",
    "502": "HTTP 502",
    "503": "HTTP 503",
    "529": "HTTP 529",
    "429": "HTTP 429",
    "429-no-retry-after": "HTTP 429",
    "reset": "ConnectionError",
    "hang": "Timeout",
    "slow-body": "Timeout",
    "malformed-json": "malformed answer",
    "no-choices": "choices",
    "bad-json-content": "OutputInvalid",
}
# Faults the breaker counts (no answer, timeout, 5xx but overloaded): after
# BREAKER_FAILURES in a row the provider fails fast instead of calling.
BREAKER_FAULTS = {"500", "502", "reset", "hang", "slow-body"}
# The least time between two requests of one job, on the API's clock.
MIN_GAP_S = {"429": FAULT_RETRY_AFTER_MS / 1000, "429-no-retry-after": DEFAULT_429_PAUSE_S}


def matrix_config(api: ThreadedApi) -> str:
    sections = [openai_provider("healthy", api.url, timeout_s=PROVIDER_TIMEOUT_S)]
    sections.append(analyzer("healthy", "healthy", output="json", max_attempts=MAX_ATTEMPTS))
    for fault in FAULTS:
        url = f"{api.root}/fault/{fault}/v1"
        sections.append(
            openai_provider(
                f"f{fault}",
                url,
                timeout_s=PROVIDER_TIMEOUT_S,
                breaker_failures=BREAKER_FAILURES,
                breaker_open_s=BREAKER_OPEN_S,
            )
        )
        sections.append(
            analyzer(
                fault,
                f"f{fault}",
                output="json",
                max_attempts=MAX_ATTEMPTS,
                max_rate_limited=MAX_RATE_LIMITED,
                timeout_s=5,
            )
        )
    return daemon_config("".join(sections), max_concurrency=64)


def _error_text(error: dict[str, str] | None) -> str:
    return "" if error is None else f"{error['type']}: {error['message']}"


def test_fault_matrix(start_daemon: StartDaemon) -> None:
    """Each injected API fault ends every job terminal with its attempts and a clear
    error, without a retry storm, and leaves the daemon healthy and serving."""
    with threaded_api() as api:
        daemon = start_daemon(matrix_config(api))
        jobs = [
            {"analyzer": fault, "input": {"text": f"{fault} job {i}"}}
            for fault in FAULTS
            for i in range(JOBS_PER_FAULT)
        ]
        ids = daemon.call("submit", jobs=jobs)["ids"]
        wait_until(
            lambda: daemon.call("status")["jobs"]["failed"] == len(ids),
            timeout_s=120,
            what=f"every faulted job failed (at the end: {daemon.call('status')['jobs']})",
        )
        status = daemon.call("status")
        shown = {job_id: daemon.call("show", id=job_id) for job_id in ids}
        seen = api.seen()
        api_stats = api.stats()

        # The daemon is healthy and serves: a healthy provider's jobs still succeed.
        assert status["health"]["live"] and status["health"]["ready"], status["health"]
        good = daemon.call("submit", jobs=[{"analyzer": "healthy", "input": {"text": "fine"}}] * 3)[
            "ids"
        ]
        wait_until(lambda: daemon.call("status")["jobs"]["succeeded"] == 3, what="recovery")
    assert not ledger_problems(daemon.state_dir / "vigil.db")
    assert len(good) == 3

    requests_by_fault: dict[str, list[Any]] = defaultdict(list)
    for request in seen:
        requests_by_fault[request.fault].append(request)
    assert api_stats["faults"] == {fault: len(requests_by_fault[fault]) for fault in FAULTS}, (
        "every request to a fault path was answered with its fault"
    )

    for fault in FAULTS:
        mine = [s for s in shown.values() if s["job"]["analyzer"] == fault]
        assert len(mine) == JOBS_PER_FAULT
        # A 429 spends no attempt: the job fails at its MAX_RATE_LIMITED-th, its first
        # counted attempt.
        single = fault == "bad-json-content" or fault in TURNED_AWAY_FAULTS
        expected_attempts = 1 if single else MAX_ATTEMPTS
        expected_requests = MAX_RATE_LIMITED if fault in TURNED_AWAY_FAULTS else expected_attempts
        for entry in mine:
            job = entry["job"]
            # Attempts given back unmade (the circuit was open) or refused by a 429 are
            # kept but not counted.
            attempts = [
                a for a in entry["attempts"] if a["outcome"] not in ("deferred", "rate_limited")
            ]
            limited = [a for a in entry["attempts"] if a["outcome"] == "rate_limited"]
            if fault in TURNED_AWAY_FAULTS:
                assert job["rate_limited"] == len(limited) == MAX_RATE_LIMITED - 1, (fault, job)
                status_code = 429 if fault in RATE_LIMIT_FAULTS else int(fault)
                assert {a["http_status"] for a in limited} == {status_code}, (fault, limited)
                assert "max_rate_limited" in _error_text(job["error"]), (fault, job["error"])
            else:
                assert limited == [], (fault, limited)
            assert job["state"] == "failed", (fault, job)
            assert job["attempts"] == expected_attempts == len(attempts), (fault, attempts)
            assert SIGNATURE[fault] in _error_text(job["error"]), (fault, job["error"])
            if fault in OVERLOAD_FAULTS:
                assert job["error"]["type"] == "Overloaded", (fault, job["error"])
            for attempt in attempts:
                assert attempt["outcome"] in ("error", "timeout"), (fault, attempt)
                assert attempt["finished_at"] >= attempt["started_at"]
                assert SIGNATURE[fault] in _error_text(attempt["error"]), (fault, attempt)
            if fault.isdigit():
                assert attempts[0]["http_status"] == int(fault), (fault, attempts[0])
            if fault == "bad-json-content":
                # Answered and billed, though it failed the check: both kept on the attempt.
                [failed] = attempts
                assert failed["answer"] and "{" not in failed["answer"], failed
                assert failed["usage"]["completion_tokens"] > 0, failed
                assert job["usage"] == failed["usage"], job

        # No retry storm: never more than one request per attempt, and ...
        requests = requests_by_fault[fault]
        provider = status["providers"][f"f{fault}"]
        assert len(requests) == provider["requests"], (fault, "both sides count alike")
        assert len(requests) <= JOBS_PER_FAULT * expected_requests, fault
        if fault in BREAKER_FAULTS:
            # ... a failing API is left alone once the circuit opens: beyond the
            # failures that open it (and requests already under way), one probe per
            # BREAKER_OPEN_S at most.
            assert provider["circuit"]["opened"] >= 1, (fault, provider["circuit"])
            span_s = requests[-1].at - requests[0].at
            probes = span_s / BREAKER_OPEN_S + 1
            assert len(requests) <= BREAKER_FAILURES + JOBS_PER_FAULT + probes, (
                fault,
                [round(r.at - requests[0].at, 2) for r in requests],
            )
        if fault in OVERLOAD_FAULTS:
            # ... an overloaded API holds nobody back with a cool-down (its circuit may
            # open: an API that answers nothing but "overloaded" for longer than
            # breaker_open_s is failing, not busy).
            assert provider["cooldowns"] == 0, provider
            assert provider["overloaded"] == len(requests), fault
        if fault in MIN_GAP_S:
            # ... and a job's next request waits out the server's hint (or the
            # default cool-down): measured by the API, a lower bound only.
            by_job: dict[str, list[float]] = defaultdict(list)
            for request in requests:
                by_job[request.text].append(request.at)
            assert len(by_job) == JOBS_PER_FAULT, (fault, sorted(by_job))
            for times in by_job.values():
                assert len(times) == MAX_RATE_LIMITED, (fault, times)
                gaps = [b - a for a, b in itertools.pairwise(times)]
                assert min(gaps) >= MIN_GAP_S[fault] - 0.02, (fault, gaps)
            assert provider["rate_limited"] == len(requests), fault


# Those a plain client can read whole (hang, slow-body and reset are seen end to end
# by the matrix).
ANSWERED = [f for f in FAULTS if f not in ("hang", "slow-body", "reset")]


@pytest.mark.parametrize("fault", ANSWERED)
def test_simulated_api_injects_faults_by_header(fault: str) -> None:
    """The simulated API answers the `x-sim-fault` header with that fault (the
    matrix's faults, checked one level down), and counts it in /stats."""
    body = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}]})
    with threaded_api() as api:
        request = urllib.request.Request(
            f"{api.url}/chat/completions", data=body, headers={FAULT_HEADER: fault}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        assert api.stats()["faults"] == {fault: 1}
    if fault[:3].isdigit():
        assert status == int(fault[:3])
        return
    assert status == 200
    if fault == "malformed-json":
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(raw)
        return
    answer = msgspec.json.decode(raw)
    if fault == "no-choices":
        assert "choices" not in answer
    else:
        assert "{" not in answer["choices"][0]["message"]["content"]


def test_unknown_fault_is_a_clear_400() -> None:
    """An unknown fault name gets OpenAI's 400 shape naming the known ones."""
    body = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}]})
    with threaded_api() as api:
        request = urllib.request.Request(f"{api.root}/fault/nope/v1/chat/completions", data=body)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    error = msgspec.json.decode(caught.value.read())["error"]
    assert "nope" in error["message"] and "slow-body" in error["message"]
