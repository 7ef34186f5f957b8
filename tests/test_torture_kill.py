"""The kill loop: jobs against an API that fails 5 % of requests, the daemon SIGKILLed
at random moments (mid-submit, mid-attempt) and restarted each time, so start-up
recovery runs after every kill (a kill waits until the restarted daemon answers: none
lands inside recovery itself).

The simulated API runs as its own process (`python -m daemon simulate-api`), so its
request count spans every restart. A submitter keeps submitting batches keyed by
idempotency keys and resubmits a batch whose acknowledgement a kill swallowed. After
the last restart: every accepted job is terminal, none is lost or duplicated, none has
two recorded results, and the API saw no more requests than attempts were recorded."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.daemon_proc import DaemonProcess, daemon_config, db_rows
from tests.torture_helpers import (
    SimApiProcess,
    Submitter,
    analyzer,
    ledger_problems,
    openai_provider,
)

MAX_ATTEMPTS = 5
BATCH = 100


def kill_loop(
    tmp_path: Path, *, jobs: int, kills: int, seed: int, pause_s: float
) -> dict[str, Any]:
    """Run the loop and check every promise; returns the figures for the report."""
    rng = random.Random(seed)
    started = time.monotonic()
    api = SimApiProcess.start(
        tmp_path / "api.log",
        *("--error-rate", "0.05", "--latency-ms", "100", "--latency-sigma", "0.3"),
        *("--seed", str(seed)),
    )
    try:
        config = daemon_config(
            openai_provider("api", api.url, max_concurrency=16, timeout_s=10)
            + analyzer("summarize", "api", max_attempts=MAX_ATTEMPTS),
            max_concurrency=32,
        )
        daemon = DaemonProcess.start(tmp_path / "d", config)
        try:
            deadline = time.monotonic() + 60 + jobs * 0.05 + jobs / BATCH * pause_s
            submitter = Submitter([daemon], jobs, deadline, pause_s, batch=BATCH)
            thread = threading.Thread(target=submitter.run, name="submitter")
            thread.start()
            running_at_kills = []
            for _ in range(kills):
                time.sleep(rng.uniform(0.0, 1.5))
                running_at_kills.append(daemon.call("status")["jobs"]["running"])
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait(10)
                time.sleep(rng.choice([0.0, 0.0, 0.1, 0.5]))
                daemon.restart()
            thread.join(timeout=max(0.0, submitter.deadline - time.monotonic()) + 5)
            assert not thread.is_alive() and submitter.error is None, submitter.error
            final = daemon.wait_all_terminal(timeout_s=60 + jobs * 0.05)
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
        stats = api.stats()
    finally:
        api.stop()

    db = daemon.state_dir / "vigil.db"
    # Accepted = acknowledged: each key once, under the id it was acknowledged with.
    assert len(submitter.acked) == jobs
    stored = dict(db_rows(db, "SELECT idempotency_key, id FROM jobs"))
    assert stored == submitter.acked, "a job was lost, duplicated or renamed"
    assert final["succeeded"] + final["failed"] == jobs, final
    assert not ledger_problems(db)
    # Every job's end was written as an event with it, whatever the kills cut: each
    # job's last event says how it ended (the stream a consumer resumes misses none).
    last_events = dict(
        db_rows(
            db,
            "SELECT job_id, state FROM events "
            "WHERE seq IN (SELECT max(seq) FROM events GROUP BY job_id)",
        )
    )
    assert last_events == dict(db_rows(db, "SELECT id, state FROM jobs")), "an end has no event"
    attempt_rows = db_rows(db, "SELECT count(*) FROM attempts")[0][0]
    crashed = db_rows(db, "SELECT count(*) FROM attempts WHERE outcome = 'crashed'")[0][0]
    counted = db_rows(db, "SELECT sum(attempts) FROM jobs")[0][0]
    # Every request follows a committed attempt row, so the API cannot have seen more.
    assert stats["requests"] <= attempt_rows <= jobs * MAX_ATTEMPTS, (stats, attempt_rows)
    assert stats["by_status"].get("200", 0) >= final["succeeded"]
    assert stats["in_flight"] == 0
    if any(running_at_kills):
        assert crashed > 0, "kills with attempts running left no crashed attempt"
    figures = {
        "jobs": jobs,
        "kills": kills,
        "succeeded": final["succeeded"],
        "failed": final["failed"],
        "lost": sum(stored.get(key) != job_id for key, job_id in submitter.acked.items()),
        "duplicated": len(stored) - len(submitter.acked),
        "attempts_counted": counted,
        "attempt_rows": attempt_rows,
        "crashed_attempts": crashed,
        "api_requests": stats["requests"],
        "api_500s": stats["by_status"].get("500", 0),
        "api_client_gone": stats["by_status"].get("499", 0),
        "batches_resent": submitter.resent,
        "running_at_kills": running_at_kills,
        "seconds": round(time.monotonic() - started, 1),
    }
    print("kill loop:", msgspec.json.encode(figures).decode())
    return figures


def test_kill_loop_short(tmp_path: Path) -> None:
    """300 jobs, 3 SIGKILLs at random moments: nothing lost, duplicated or run past its
    attempts; the API's count agrees."""
    figures = kill_loop(tmp_path, jobs=300, kills=3, seed=8, pause_s=0.3)
    assert figures["crashed_attempts"] > 0, "no kill landed while attempts ran"


@pytest.mark.slow
def test_kill_loop_5000_jobs_20_kills(tmp_path: Path) -> None:
    """The issue's loop: 5,000 jobs, 5 % API errors, 20 SIGKILLs and restarts."""
    figures = kill_loop(tmp_path, jobs=5000, kills=20, seed=20, pause_s=0.6)
    assert figures["crashed_attempts"] > 0
