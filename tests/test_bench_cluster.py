"""`vigil bench cluster --smoke` end to end: it starts its own PostgreSQL server,
runs the overhead on SQLite and on 1, 2 and 3 PostgreSQL nodes, intake, claim
latency, a takeover after SIGKILL and three nodes sharing one API's rate limit, and
prints one JSON line. Only the output's
shape and that every job finished are checked: no timing at this size."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency
import pytest

from daemon.bench.perf import SCENARIOS
from daemon.bench.pg_launch import unavailable

SMOKE_TIMEOUT_S = 120  # the run itself takes ~35 s; the margin is for a busy machine

pytestmark = pytest.mark.skipif(
    unavailable() is not None, reason=f"no PostgreSQL for the benchmark: {unavailable()}"
)


def _bench_processes() -> set[int]:
    """This benchmark's PostgreSQL servers still running (their socket directory is
    named vigil-bench-pg-...)."""
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        if any("vigil-bench-pg-" in part for part in process.info["cmdline"] or ()):
            found.add(process.pid)
    return found


def test_cluster_smoke() -> None:
    before = _bench_processes()
    env = {k: v for k, v in os.environ.items() if k not in ("VIGIL_CONFIG", "VIGIL_SOCKET")}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "bench", "cluster", "--smoke", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = msgspec.json.decode(lines[0])
    assert result["scenario"] == "cluster"
    assert result["target_met"] is None  # a smoke run judges nothing
    assert result["command"].startswith("vigil bench cluster ")
    assert all(check["met"] is None for check in result["checks"])
    figures = result["figures"]
    jobs = SCENARIOS["cluster"].smoke
    assert figures["jobs"] == jobs
    assert figures["postgres"]["fsync"] == "on"  # the server's default durability

    over = figures["overhead"]
    assert set(over) == {"sqlite", "postgres_1", "postgres_2", "postgres_3"}
    for name, run in over.items():
        assert run["succeeded"] == run["jobs"] == jobs, name
        assert run["per_s"] > 0, name
    for n in (1, 2, 3):
        run = over[f"postgres_{n}"]
        assert sum(run["attempts_by_node"].values()) == jobs
        assert set(run["attempts_by_node"]) <= {f"node-{i}" for i in range(1, n + 1)}
        assert run["connections"]["peak"] >= n  # every node holds its lock connection
    assert figures["pg1_to_sqlite"] > 0

    intake = figures["intake"]
    assert intake["jobs"] == 10 * jobs  # each count is checked on the database by the bench
    assert intake["postgres"]["per_s"] > 0 and intake["sqlite"]["per_s"] > 0

    claim = figures["claim"]
    assert set(claim["pick"]) == {"1000", "10000", "20000"}
    assert all(row["claim_64_ms"]["n"] == 20 for row in claim["pick"].values())
    assert claim["pick_after_analyze"]["queued"] == 20_000

    turn = figures["takeover"]
    assert turn["killed_node_running"] == turn["jobs"] // 2
    assert turn["jobs_by_state"] == {"succeeded": turn["jobs"]}
    assert turn["attempts_by_outcome"]["crashed"] == turn["killed_node_running"]
    assert turn["jobs_with_two_results"] == 0
    assert turn["nodes_seen"] == {"node-1": True, "node-2": False}
    assert turn["taken_over_s"] > 0

    shared = figures["shared_limit"]
    assert shared["jobs_by_state"] == {"succeeded": shared["jobs"]}
    assert sum(shared["attempts_by_node"].values()) == shared["api_requests"]
    assert set(shared["attempts_by_node"]) <= {"node-1", "node-2", "node-3"}
    assert shared["window"] is not None and shared["window"]["seconds"] > 0
    assert shared["window"]["left_at_start"] == shared["api_limit_per_minute"] // 60
    assert 0 <= shared["rate_limited_share"] <= 1

    # The server it started is stopped (others' servers, started before, may run on).
    assert _bench_processes() <= before
