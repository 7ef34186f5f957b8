"""End to end: `vigil run` as a subprocess, jobs through the CLI, results back out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from tests.daemon_proc import DaemonProcess, db_rows, run_cli, sim_config

StartDaemon = Callable[..., DaemonProcess]


def test_500_jobs_through_the_cli(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """500 jobs at 5 % API errors all end terminal, attempts recorded, results shown."""
    daemon = start_daemon(sim_config(error_rate=0.05, latency_ms=5))
    lines = [msgspec.json.encode({"text": f"document number {i}"}).decode() for i in range(500)]
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")

    done = run_cli(
        "submit",
        "-a",
        "summarize",
        "--jsonl",
        str(jsonl),
        "--wait",
        "--json",
        socket_path=daemon.socket_path,
    )
    assert done.returncode in (0, 1), done.stderr
    report = msgspec.json.decode(done.stdout)
    ids = report["ids"]
    assert len(set(ids)) == 500
    assert sum(report["counts"].values()) == 500
    assert set(report["counts"]) <= {"succeeded", "failed"}

    rows = db_rows(
        daemon.state_dir / "vigil.db",
        "SELECT j.state, j.attempts, count(a.id), sum(a.outcome = 'succeeded') "
        "FROM jobs j JOIN attempts a ON a.job_id = j.id GROUP BY j.id",
    )
    assert len(rows) == 500
    for state, attempts, recorded, successes in rows:
        assert recorded == attempts >= 1
        assert successes == (1 if state == "succeeded" else 0)
    retried = sum(1 for _, attempts, _, _ in rows if attempts > 1)
    assert retried > 0, "5 % errors over 500 jobs must cause some retries"

    shown = run_cli("show", ids[0], "--json", socket_path=daemon.socket_path)
    assert shown.returncode == 0, shown.stderr
    job = msgspec.json.decode(shown.stdout)
    assert job["job"]["id"] == ids[0]
    assert job["attempts"]
    if job["job"]["state"] == "succeeded":
        assert isinstance(job["job"]["result"], str) and job["job"]["result"]

    human = run_cli("show", ids[1], socket_path=daemon.socket_path)
    assert human.returncode == 0 and "attempts:" in human.stdout

    status = run_cli("status", "--json", socket_path=daemon.socket_path)
    counts = msgspec.json.decode(status.stdout)["jobs"]
    assert set(counts) == {"queued", "running", "succeeded", "failed", "canceled"}
    assert counts["succeeded"] + counts["failed"] == 500
    table = run_cli("status", socket_path=daemon.socket_path).stdout
    assert "logs: failed_writes 0  dropped_lines 0" in table, table
    assert daemon.terminate() == 0


def test_json_analyzer_and_job_objects(start_daemon: StartDaemon) -> None:
    """Whole job objects on stdin; JSON output is parsed and checked for its keys."""
    daemon = start_daemon(sim_config())
    jobs = [
        {
            "analyzer": "classify",
            "input": {"text": "I love it", "audience": "ops"},
            "priority": 5,
            "idempotency_key": "k1",
        },
        {
            "analyzer": "classify",
            "input": {"text": "I love it", "audience": "ops"},
            "idempotency_key": "k1",
        },
    ]
    stdin = "\n".join(msgspec.json.encode(j).decode() for j in jobs) + "\n"
    out = run_cli(
        "submit", "--jsonl", "-", "--wait", "--json", input=stdin, socket_path=daemon.socket_path
    )
    assert out.returncode == 0, out.stderr
    ids = msgspec.json.decode(out.stdout)["ids"]
    assert ids[0] == ids[1], "the same idempotency key returns the first job"
    job = daemon.call("show", id=ids[0])["job"]
    assert job["state"] == "succeeded"
    assert isinstance(job["result"], dict) and "sentiment" in job["result"]
    assert job["priority"] == 5
    assert job["usage"]["prompt_tokens"] > 0


def test_cancel_retry_pause_resume(start_daemon: StartDaemon) -> None:
    """Pause holds queued work, cancel ends it, retry requeues it, resume runs it."""
    daemon = start_daemon(sim_config())
    sock = daemon.socket_path
    assert run_cli("pause", socket_path=sock).returncode == 0
    out = run_cli("submit", "-a", "summarize", "--input", '{"text": "a"}', socket_path=sock)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert daemon.call("status")["state"] == "paused"
    assert daemon.call("show", id=job_id)["job"]["state"] == "queued"

    assert run_cli("cancel", job_id, socket_path=sock).returncode == 0
    assert daemon.call("show", id=job_id)["job"]["state"] == "canceled"
    again = run_cli("cancel", job_id, socket_path=sock)
    assert again.returncode == 1 and "invalid_state" in again.stderr

    assert run_cli("retry", job_id, socket_path=sock).returncode == 0
    assert run_cli("resume", socket_path=sock).returncode == 0
    assert daemon.wait_all_terminal(timeout_s=60)["succeeded"] == 1

    listed = run_cli("jobs", "--state", "succeeded", "--json", socket_path=sock)
    assert [j["id"] for j in msgspec.json.decode(listed.stdout)["jobs"]] == [job_id]
    table = run_cli("jobs", socket_path=sock)
    assert job_id in table.stdout and "succeeded" in table.stdout


def test_non_retryable_output_fails_without_retry(start_daemon: StartDaemon) -> None:
    """JSON output missing a required key is a failed attempt that is not retried."""
    extra = """
[analyzers.strict]
provider = "sim"
model = "sim-small"
prompt = "Rate {text}"
output = "json"
required_keys = ["no_such_key"]
max_attempts = 5
"""
    daemon = start_daemon(sim_config(extra=extra))
    data = daemon.call("submit", jobs={"analyzer": "strict", "input": {"text": "x"}})
    daemon.wait_all_terminal(timeout_s=60)
    shown = daemon.call("show", id=data["ids"][0])
    assert shown["job"]["state"] == "failed"
    assert shown["job"]["attempts"] == 1
    assert shown["job"]["error"]["type"] == "OutputInvalid"
    assert "no_such_key" in shown["job"]["error"]["message"]


def test_python_handler_calls_go_through_the_provider(start_daemon: StartDaemon) -> None:
    """A `handler = "pkg.mod:func"` analyzer runs; its calls' usage adds up."""
    extra = """
[analyzers.combo]
handler = "tests.handlers:two_calls"
provider = "sim"
model = "sim-small"
max_tokens = 40
"""
    daemon = start_daemon(sim_config(extra=extra))
    before = daemon.call("status")["providers"]["sim"]["requests"]
    data = daemon.call("submit", jobs={"analyzer": "combo", "input": {"text": "hello"}})
    daemon.wait_all_terminal(timeout_s=60)
    job = daemon.call("show", id=data["ids"][0])["job"]
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["job"] == job["id"]
    assert job["result"]["summary"] and job["result"]["labels"]
    assert daemon.call("status")["providers"]["sim"]["requests"] - before == 2
    assert job["usage"]["prompt_tokens"] > 0 and job["usage"]["completion_tokens"] > 0


def test_logs_carry_job_fields_and_never_the_key(start_daemon: StartDaemon) -> None:
    """Job log lines carry job_id/analyzer/attempt; the API key appears nowhere."""
    secret = "sk-test-4f9a8b7c6d5e4f3a2b1c"
    config = sim_config(error_rate=0.3).replace(
        'kind = "simulated"', 'kind = "simulated"\napi_key_env = "VIGIL_TEST_KEY"'
    )
    daemon = start_daemon(config, env={"VIGIL_TEST_KEY": secret})
    daemon.call("submit", jobs=[{"analyzer": "summarize", "input": {"text": "x"}}] * 20)
    daemon.wait_all_terminal(timeout_s=60)
    status = run_cli("status", "--json", socket_path=daemon.socket_path)
    assert daemon.terminate() == 0

    events = daemon.events()
    started = next(e for e in events if e["event"] == "daemon.started")
    assert started["pid"] == daemon.proc.pid and started["version"]
    assert started["config"]["providers"]["sim"]["api_key_env"] == "VIGIL_TEST_KEY"
    attempts = [e for e in events if e["event"] == "job.attempt"]
    assert len(attempts) >= 20
    assert all({"job_id", "analyzer", "attempt"} <= e.keys() for e in attempts)
    assert any(e["outcome"] == "error" for e in attempts)
    stopped = next(e for e in events if e["event"] == "daemon.stopped")
    assert stopped["jobs"]["succeeded"] + stopped["jobs"]["failed"] == 20
    assert secret not in daemon.log_path.read_text()
    assert secret not in status.stdout
