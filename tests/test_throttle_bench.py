"""`vigil bench throttle` end to end (tiny runs, so it cannot rot), its figures on
synthetic records, and the throttle's figures in `vigil status` of a real daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.bench.outage import OutageRun, summarize_outage
from daemon.bench.run import ApiSample, AttemptRow, LogMark, Run, log_events
from daemon.bench.scenarios import ALL, SCENARIOS, api_args, daemon_config, make_job
from daemon.bench.throttle_figures import report, summarize, summarize_overloaded
from daemon.config import parse_config
from tests.daemon_proc import run_cli, sim_config

HOST = {"cpus": 2, "cpu": "test", "python": "3.11"}


def _sample(requests: int, limited: int, uptime_s: float, left: int = 0) -> ApiSample:
    """What /stats says after `requests`, `limited` of them answered 429."""
    admitted = requests - limited
    by_status = {"200": admitted, "429": limited} if limited else {"200": admitted}
    return ApiSample(requests, by_status, admitted, admitted * 150, left, None, uptime_s)


def _bench_json(*args: str) -> dict[str, Any]:
    done = run_cli("bench", "throttle", *args, "--json")
    assert done.returncode in (0, 1), done.stderr  # 1: a target missed, judged below
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = msgspec.json.decode(lines[0])
    return result


def test_bench_smoke_runs_both_processes_and_reports() -> None:
    """The smoke scenario runs the API and the daemon as processes and prints one JSON
    line with what the API saw."""
    done = run_cli("bench", "throttle", "--scenario", "smoke", "--json", "--jobs", "20")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result: dict[str, Any] = msgspec.json.decode(lines[0])
    assert result["scenario"] == "smoke"
    assert result["jobs"]["submitted"] == 20
    assert result["jobs"]["succeeded"] == 20
    assert result["whole_run"]["requests"] == 20  # counted by the API itself
    assert result["rate_limited_share"] == 0
    assert result["target_met"] is None
    assert result["machine"]["cpus"] >= 1


def test_bench_usage_error() -> None:
    """An unknown scenario is a usage error, before anything starts."""
    done = run_cli("bench", "throttle", "--scenario", "nope")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_status_shows_throttle_figures(start_daemon: Any) -> None:
    """`vigil status --json` carries latency percentiles, budgets, circuit and
    concurrency for each provider."""
    daemon = start_daemon(sim_config(api_rpm=6000))
    daemon.call(
        "submit", jobs=[{"analyzer": "summarize", "input": {"text": f"doc {i}"}} for i in range(5)]
    )
    daemon.wait_all_terminal(60)
    done = run_cli("status", "--json", socket_path=daemon.socket_path)
    assert done.returncode == 0, done.stderr
    sim = msgspec.json.decode(done.stdout)["providers"]["sim"]
    assert sim["by_status"] == {"200": 5}
    assert sim["p50_latency_ms"] is not None
    assert sim["p99_latency_ms"] >= sim["p50_latency_ms"]
    assert sim["circuit"]["state"] == "closed"
    assert sim["concurrency_limit"] == 16
    assert sim["budgets"]["requests"]["server_limit"] == 6000  # learned from the headers
    assert sim["cooldown_s"] == 0


def _learn_run(after_429: int, failed: int = 0) -> Run:
    """36 jobs; 9 requests (8 answered 429) before the limit was learned at 0.5 s,
    then `after_429` more 429s among the requests after it."""
    learned_at = 1_000.0
    mark = LogMark(
        {"budget": "requests", "server_limit": 60, "per_minute": 60, "was": 600},
        learned_at,
        _sample(9, 8, 0.5),
        learned_at + 0.01,
    )
    requests = 9 + 35 + after_429
    rows = [AttemptRow("rate_limited", learned_at - 0.01, learned_at + 0.002)] * 8
    rows += [AttemptRow("rate_limited", learned_at + 5, learned_at + 5)] * after_429
    return Run(
        submitted=36,
        all_admitted=_sample(requests - failed, 8 + after_429, 39.0),
        last=_sample(requests, 8 + after_429, 39.3),
        first=_sample(1, 0, 0.4),
        learned=mark,
        jobs={"queued": 0, "running": 0, "succeeded": 36 - failed, "failed": failed},
        db_attempts=rows,
    )


def test_learning_figures_split_429s_at_the_learned_limit() -> None:
    """429s the API counted before the first learned limit are not judged; those after
    are, against the requests after; a failed job misses the target too."""
    s = SCENARIOS["misconfigured-small"]
    result = summarize(s, _learn_run(after_429=0), [], HOST)
    learning = result["learning"]
    assert learning["before"] == {"requests": 9, "rate_limited": 8}
    assert learning["after"] == {"requests": 35, "rate_limited": 0, "share": 0.0}
    assert learning["lag_ms"] == 10.0
    assert learning["daemon_429_rows"] == 8
    assert learning["daemon_429_rows_started_after"] == 0
    assert learning["steady"]["admitted"] == 35 and learning["steady"]["seconds"] == 38.5
    assert result["target_met"] is True
    missed = summarize(s, _learn_run(after_429=1), [], HOST)
    assert missed["learning"]["after"]["rate_limited"] == 1
    assert missed["learning"]["daemon_429_rows_started_after"] == 1
    assert missed["target_met"] is False  # 1 of 36 is over 1 %
    assert summarize(s, _learn_run(after_429=0, failed=1), [], HOST)["target_met"] is False
    no_learning = summarize(s, msgspec.structs.replace(_learn_run(0), learned=None), [], HOST)
    assert no_learning["learning"] is None and no_learning["target_met"] is False


def _outage_run(running_s: float, failed: int = 0) -> OutageRun:
    return OutageRun(
        submitted=300,
        down_s=5.6,
        returned_at=2_000.0,
        circuit_at_return={"state": "open", "opened": 2},
        half_open_at_s=running_s - 0.3,
        probe=_sample(1, 0, running_s - 0.28),
        running=_sample(2, 0, running_s),
        done=_sample(300, 0, running_s + 2),
        jobs={"queued": 0, "running": 0, "succeeded": 300 - failed, "failed": failed},
        opened_at=[1_994.0, 1_999.0],
        closed_at=[2_000.0 + running_s - 0.01],
        db_attempts=[AttemptRow("deferred", 0.0, 1.0)] * 95 + [AttemptRow("error", 0.0, 1.0)],
    )


def test_outage_figures_judge_the_return_to_running() -> None:
    """Recovery is timed from the API's return; running later than breaker_open_s, or a
    failed job, misses the target; attempt rows are counted by outcome."""
    s = SCENARIOS["outage"]
    result = summarize_outage(s, _outage_run(4.75), HOST)
    assert result["recovery"]["running_s"] == 4.75
    assert result["recovery"]["probe_after_half_open_s"] == 0.02
    assert result["recovery"]["circuit_closed_s"] == 4.74
    assert result["attempt_rows"] == {"deferred": 95, "error": 1}
    assert result["outage"]["opened_total"] == 2
    assert result["target_met"] is True
    assert summarize_outage(s, _outage_run(5.2), HOST)["target_met"] is False
    assert summarize_outage(s, _outage_run(4.0, failed=1), HOST)["target_met"] is False
    learn = summarize(SCENARIOS["misconfigured-small"], _learn_run(0), [], HOST)
    report([learn, result])  # one table per kind, without error


def test_log_events_reads_whole_json_lines(tmp_path: Path) -> None:
    """Only the named event's lines count, stamped with their own time."""
    log = tmp_path / "daemon.log"
    log.write_text(
        '{"event":"provider.limit_learned","timestamp":"2026-01-01T00:00:01.500000Z"}\n'
        "not json provider.limit_learned\n"
        '{"event":"job.attempt","note":"provider.limit_learned"}\n'
    )
    events = log_events(log, "provider.limit_learned")
    assert [e["timestamp"] for e in events] == ["2026-01-01T00:00:01.500000Z"]
    assert log_events(tmp_path / "missing.log", "x") == []


def test_bench_misconfigured_small_learns_the_limit() -> None:
    """A tiny real run: the daemon learns the API's 60 RPM from its headers, every job
    succeeds (429s spend no attempt), and the 429s are split at that moment."""
    result = _bench_json("--scenario", "misconfigured-small", "--jobs", "4")
    assert result["jobs"]["succeeded"] == 4 and result["jobs"]["failed"] == 0
    learning = result["learning"]
    assert learning["first_learned"]["server_limit"] == 60
    before, after = learning["before"], learning["after"]
    assert before["requests"] + after["requests"] == result["whole_run"]["requests"]
    assert learning["daemon_429_rows"] == result["whole_run"]["rate_limited"]


def test_bench_outage_recovers_on_the_same_port() -> None:
    """A tiny real run: the API is down, the circuit opens twice, the API comes back on
    the same port, and every job then succeeds."""
    result = _bench_json("--scenario", "outage", "--jobs", "20")
    assert result["jobs"]["succeeded"] == 20 and result["jobs"]["failed"] == 0
    assert result["outage"]["circuit_opened_before_return"] >= 2
    recovery = result["recovery"]
    assert recovery["probe_s"] is not None and recovery["running_s"] >= recovery["probe_s"]
    assert result["attempt_rows"]["succeeded"] == 20
    assert result["whole_run"]["api_admitted"] == 20


def test_bench_request_window_spans_the_jobs() -> None:
    """With one-second slices the window opens at the first sample, before any job
    waits; it must close only once the jobs submitted then have been claimed."""
    result = _bench_json("--scenario", "request", "--jobs", "200")
    window = result["window"]
    assert window is not None, result
    assert window["admitted"] >= 100 and window["left_at_start"] == 50
    assert result["jobs"]["succeeded"] == 200


ANTHROPIC_LIMITS = {"requests": 4000, "input_tokens": 400_000, "output_tokens": 200_000}


def test_anthropic_scenarios_run_in_all_and_configure_an_anthropic_provider() -> None:
    """--scenario all runs the Anthropic scenarios too; each one's config is a valid
    kind = "anthropic" provider at the API root with no key, its API speaks Anthropic."""
    assert {"anthropic-request", "anthropic-learned", "anthropic-overloaded"} <= set(ALL)
    learned = SCENARIOS["anthropic-learned"]
    assert learned.cost == 1000 == len(make_job(learned, 7)["input"]["text"]) // 4
    assert learned.api_limits == ANTHROPIC_LIMITS and learned.vigil_limits == {}
    assert learned.api_limit == 400_000 and learned.vigil_limit == 0
    config = parse_config(daemon_config(learned, "http://127.0.0.1:9"))
    provider = config.providers["api"]
    assert provider.kind == "anthropic" and provider.base_url == "http://127.0.0.1:9"
    assert provider.api_key_env == "" and provider.requests_per_minute == 0
    assert provider.input_tokens_per_minute == 0 == provider.output_tokens_per_minute
    args = api_args(learned)
    assert args[args.index("--dialect") + 1] == "anthropic"
    assert args[args.index("--itpm") + 1] == "400000" and "--tpm" not in args
    overloaded = api_args(SCENARIOS["anthropic-overloaded"])
    assert overloaded[overloaded.index("--overload-rate") + 1] == "0.3"
    request = parse_config(daemon_config(SCENARIOS["anthropic-request"], "http://h:1"))
    assert request.providers["api"].requests_per_minute == 3000
    assert "--dialect" not in api_args(SCENARIOS["request"])


def _anthropic_sample(requests: int, limited: int, uptime_s: float, left: int) -> ApiSample:
    """/stats in the anthropic dialect: 1000 input tokens charged per admitted request."""
    admitted = requests - limited
    by_status = {"200": admitted, "429": limited} if limited else {"200": admitted}
    return ApiSample(
        requests,
        by_status,
        admitted,
        0,
        4000,
        None,
        uptime_s,
        dialect="anthropic",
        input_tokens_charged=admitted * 1000,
        remaining_input_tokens=left,
    )


def _learned_run(later_429: int, budgets: dict[str, int] = ANTHROPIC_LIMITS) -> Run:
    """A 64-request storm (58 answered 429) in the warm-up, a 60 s window at the ITPM
    from a full input bucket, then `later_429` more 429s."""
    start = _anthropic_sample(64, 58, 1.5, 6667)
    end = _anthropic_sample(64 + 406 + later_429, 58 + later_429, 61.5, 0)
    return Run(
        submitted=406,
        first=_anthropic_sample(64, 58, 0.1, 0),
        window_start=start,
        window_end=end,
        last=end,
        jobs={"queued": 0, "running": 0, "succeeded": 406, "failed": 0},
        provider={"budgets": {k: {"per_minute": v} for k, v in budgets.items()}},
    )


def test_learned_figures_judge_429s_after_the_warm_up_and_the_limits_learned() -> None:
    """Where Vigil learns every limit, the warm-up's 429 storm is reported apart and
    only the 429s after it are judged; a limit not learned misses the target."""
    s = SCENARIOS["anthropic-learned"]
    result = summarize(s, _learned_run(later_429=0), [], HOST)
    assert result["warm_up"] == {"at_api_s": 1.5, "requests": 64, "rate_limited": 58}
    assert result["rate_limited_counted"] == {
        "counted": "after warm-up",
        "requests": 406,
        "rate_limited": 0,
        "share": 0.0,
    }
    assert result["whole_run"]["rate_limited"] == 58
    window = result["window"]
    assert window["input_tokens_charged"] == 406_000 and window["left_at_start"] == 6667
    assert window["utilisation"] == round(406_000 / (400_000 + 6667), 4)
    assert result["learned_limits"] == ANTHROPIC_LIMITS
    assert result["target"]["learned"] == ANTHROPIC_LIMITS
    assert result["target_met"] is True
    assert summarize(s, _learned_run(later_429=5), [], HOST)["target_met"] is False
    unlearned = {**ANTHROPIC_LIMITS, "output_tokens": 0}
    assert summarize(s, _learned_run(0, unlearned), [], HOST)["target_met"] is False
    request = summarize(SCENARIOS["anthropic-request"], _learned_run(0), [], HOST)
    assert request["rate_limited_counted"]["counted"] == "whole run"
    assert request["learned_limits"] is None and "learned" not in request["target"]


def _overloaded_run(cooldowns: int = 0, opened: int = 0, failed: int = 0) -> Run:
    """300 jobs against a 529 storm: 130 requests answered overloaded."""
    last = ApiSample(430, {"200": 300, "529": 130}, 430, 0, None, None, 12.0)
    return Run(
        submitted=300,
        first=ApiSample(64, {"200": 0}, 64, 0, None, None, 0.1),
        last=last,
        jobs={"queued": 0, "running": 0, "succeeded": 300 - failed, "failed": failed},
        provider={
            "overloaded": 130,
            "cooldowns": cooldowns,
            "circuit": {"state": "closed", "opened": opened},
        },
        attempts={"succeeded": 300 - failed, "rate_limited": 130},
        wall_s=12.3,
    )


def test_overloaded_figures_judge_that_nobody_was_held() -> None:
    """A 529 storm meets its target only if every job succeeded with no cool-down and
    the circuit never opened."""
    s = SCENARIOS["anthropic-overloaded"]
    result = summarize_overloaded(s, _overloaded_run(), HOST)
    assert result["api"]["overloaded"] == 130 == result["vigil"]["overloaded"]
    assert result["vigil"]["cooldowns"] == 0 and result["vigil"]["circuit_opened"] == 0
    assert result["wall_s"] == 12.3
    assert result["target_met"] is True
    assert summarize_overloaded(s, _overloaded_run(cooldowns=1), HOST)["target_met"] is False
    assert summarize_overloaded(s, _overloaded_run(opened=1), HOST)["target_met"] is False
    assert summarize_overloaded(s, _overloaded_run(failed=1), HOST)["target_met"] is False
    learned = summarize(SCENARIOS["anthropic-learned"], _learned_run(0), [], HOST)
    report([learned, result])  # the Anthropic rows in their tables, without error


@pytest.mark.slow  # the normal suite keeps its twin (see README "Tests")
def test_bench_anthropic_request_window_spans_the_jobs() -> None:
    """A tiny real run in Anthropic's dialect: requests bind, the window opens at the
    first sample and every job succeeds."""
    result = _bench_json("--scenario", "anthropic-request", "--jobs", "100")
    assert result["dialect"] == "anthropic"
    window = result["window"]
    assert window is not None, result
    assert window["left_at_start"] == 50 and window["input_tokens_charged"] > 0
    assert result["jobs"]["succeeded"] == 100 and result["jobs"]["failed"] == 0


def test_bench_anthropic_learned_learns_the_three_limits() -> None:
    """A tiny real run: Vigil, told no limits, learns the API's three from its headers,
    every job succeeds, and the 429s after the warm-up are counted apart from it."""
    result = _bench_json("--scenario", "anthropic-learned", "--jobs", "20")
    assert result["learned_limits"] == ANTHROPIC_LIMITS
    learned = {e["budget"]: e["server_limit"] for e in result["vigil"]["limit_learned"]}
    assert learned == ANTHROPIC_LIMITS
    jobs = result["jobs"]
    assert jobs["succeeded"] == jobs["submitted"] >= 20 and jobs["failed"] == 0
    warm_up, counted = result["warm_up"], result["rate_limited_counted"]
    assert counted["counted"] == "after warm-up" and result["window"] is not None
    assert warm_up["requests"] + counted["requests"] == result["whole_run"]["requests"]
    assert (
        warm_up["rate_limited"] + counted["rate_limited"] == (result["whole_run"]["rate_limited"])
    )


def test_bench_anthropic_overloaded_holds_nobody() -> None:
    """A tiny real run: the API turns 30 % of requests away with 529; every job
    succeeds, with no cool-down and no open circuit."""
    result = _bench_json("--scenario", "anthropic-overloaded", "--jobs", "20")
    assert result["jobs"]["succeeded"] == 20 and result["jobs"]["failed"] == 0
    api, vigil = result["api"], result["vigil"]
    assert api["overloaded"] > 0 and api["overloaded"] == vigil["overloaded"]
    assert api["requests"] == 20 + api["overloaded"]
    assert vigil["cooldowns"] == 0 and vigil["circuit_opened"] == 0
    assert result["target_met"] is True
