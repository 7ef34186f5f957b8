"""`vigil bench overhead|intake|backlog|soak|watchdog|status` end to end at a tiny size
(`--smoke`), so the benchmarks cannot rot: each runs `vigil simulate-api` and
`vigil run` as processes and prints one JSON line with its figures. Targets are not
judged at this size; full sizes run only when asked (`vigil bench all`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.bench.common import jsonl_lines, percentiles, write_jsonl
from daemon.bench.perf import SCENARIOS
from daemon.bench.report import Result, at_least, at_most, info
from tests.daemon_proc import run_cli


def _one_result(*args: str) -> dict[str, Any]:
    done = run_cli("bench", *args, "--smoke", "--json")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = msgspec.json.decode(lines[0])
    assert result["target_met"] is None  # a smoke run judges nothing
    assert result["machine"]["cpus"] >= 1
    assert result["machine"]["versions"]["vigil"]
    assert result["command"].startswith(f"vigil bench {args[0]} ")
    return result


def test_overhead_smoke() -> None:
    """Every job succeeds; the rate, the raw yardstick and their ratio are figures."""
    figures = _one_result("overhead")["figures"]
    assert figures["succeeded"] == figures["jobs"] == SCENARIOS["overhead"].smoke
    assert figures["per_s"] > 0 and figures["raw_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["per_s"] / figures["raw_per_s"], rel=0.01)


def test_intake_smoke() -> None:
    """Both intakes accept every job (checked against the daemon's queued count)."""
    figures = _one_result("intake")["figures"]
    assert figures["jobs"] == SCENARIOS["intake"].smoke
    assert figures["socket"]["per_s"] > 0 and figures["http"]["per_s"] > 0


def test_backlog_smoke() -> None:
    """The backlog is filled, survives a restart, and picks are timed at each size."""
    figures = _one_result("backlog")["figures"]
    assert figures["rss_mb_after_fill"] > 0 and figures["ready_s"] > 0
    assert set(figures["pick"]) == {"2000", "1000"}
    assert all(row["claim_64_ms"]["n"] == 20 for row in figures["pick"].values())


def test_export_smoke() -> None:
    """Every job comes out (the scenario checks the file's lines), RSS sampled."""
    figures = _one_result("export")["figures"]
    assert figures["jobs"] == SCENARIOS["export"].smoke
    assert figures["rss_mb_peak"] >= figures["rss_mb_at_start"] > 0


def test_webhook_smoke() -> None:
    """With a webhook every job's delivery comes in; both sides are measured."""
    figures = _one_result("webhook")["figures"]
    assert figures["jobs"] == SCENARIOS["webhook"].smoke
    assert len(figures["on"]) == len(figures["off"]) == 1
    assert figures["on"][0]["succeeded"] == figures["off"][0]["succeeded"] == figures["jobs"]


def test_retention_smoke() -> None:
    """Every job and its event is pruned while the loop lag is sampled."""
    figures = _one_result("retention")["figures"]
    assert figures["jobs"] == SCENARIOS["retention"].smoke
    assert figures["events_deleted"] == figures["jobs"] - 1  # the newest event stays
    assert figures["samples"] >= 1 and figures["loop_lag_p99_ms_worst"] >= 0


def test_soak_smoke() -> None:
    """Samples carry RSS, fds, tasks and loop lag; every job finishes."""
    figures = _one_result("soak")["figures"]
    last = figures["samples"][-1]
    assert last["finished"] == SCENARIOS["soak"].smoke
    assert last["rss_mb"] > 0 and last["fds"] > 0 and last["tasks"] is not None


def test_watchdog_smoke() -> None:
    """One round runs the daemon with the watchdog on and off."""
    figures = _one_result("watchdog")["figures"]
    assert len(figures["on_per_s"]) == len(figures["off_per_s"]) == 1
    assert figures["paired_ratio"] > 0


def test_status_smoke() -> None:
    """GET /status and the socket's status are probed while the load runs."""
    figures = _one_result("status")["figures"]
    assert figures["http_status_ms"]["n"] >= 1 and figures["socket_status_ms"]["n"] >= 1
    assert figures["vigil_status_process_ms"]["n"] == 1


def test_bench_usage_error() -> None:
    """A scenario that does not exist is a usage error, before anything starts."""
    done = run_cli("bench", "nope")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_jsonl_is_streamed_in_chunks(tmp_path: Path) -> None:
    """The JSONL for a big backlog is made a chunk at a time and decodes line by line."""
    chunks = list(jsonl_lines(25_000, chunk=10_000))
    assert len(chunks) == 3
    path = tmp_path / "jobs.jsonl"
    size = write_jsonl(path, 25_000)
    lines = path.read_bytes().splitlines()
    assert size == path.stat().st_size and len(lines) == 25_000
    assert msgspec.json.decode(lines[-1]) == {
        "text": "Document 24999: the launch of the new service went well."
    }


def test_checks_judge_targets() -> None:
    """A check is met, missed, or not judged (smoke); a result is met only if all are."""
    assert at_least("x", 0.6, "", 0.5, judge=True).met is True
    assert at_most("x", 25.0, "ms", 20.0, judge=True).met is False
    assert at_least("x", 0.1, "", 0.5, judge=False).met is None
    assert info("x", 1.0, "jobs/s").met is None
    result = Result("s", "about", {}, [at_least("x", 1, "", 0, True), info("y", 2, "")])
    assert result.target_met is True
    result.checks.append(at_most("z", 3, "", 1, True))
    assert result.target_met is False
    assert percentiles([]) == {"p50": None, "p99": None, "max": None, "n": 0}
    assert percentiles([float(i) for i in range(1, 101)])["p99"] == 100.0
