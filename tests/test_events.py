"""Results out as a stream and an export, end to end: `GET /v1/events` (SSE and long
poll) and `vigil watch` resumed across a SIGKILL and restart of the daemon miss
nothing and repeat nothing; `vigil export` and `GET /v1/export` write every matching
job with its result, in constant memory, and never leave a file that looks whole
when cut off. Plus the pieces: expired cursors, retention of events and deliveries."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import psutil  # type: ignore[import-untyped]
import pytest

from daemon.config import Config
from daemon.control.protocol import CommandError
from daemon.control.results import EventsArgs, events
from daemon.live import Live
from daemon.retention import Retention, keep_for
from daemon.runtime import Runtime
from daemon.store.base import AttemptEnd
from daemon.store.outbox import EVENTS_KEEP_S, DeliveryEnd, WebhookRoute
from daemon.store.sqlite import Store
from tests.daemon_proc import CLI_TIMEOUT_S, run_cli, sim_config, wait_until
from tests.test_store import BIG, new_job

StartDaemon = Callable[..., Any]
HTTP = "127.0.0.1:0"


class SseReader(threading.Thread):
    """An EventSource as a browser runs it: reads events until the connection ends,
    and remembers the last `id` to resume from."""

    def __init__(self, url: str, last_id: str | None) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.last_id = last_id
        self.events: list[dict[str, Any]] = []
        self.ended = threading.Event()

    def run(self) -> None:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        try:
            conn.request("GET", "/v1/events", headers=headers)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            event: dict[str, str] = {}
            while line := response.readline():
                text = line.decode().rstrip("\n")
                if not text:
                    if "data" in event:
                        self.events.append(json.loads(event["data"]))
                        self.last_id = event["id"]
                    event = {}
                elif not text.startswith(":"):
                    key, _, value = text.partition(": ")
                    event[key] = value
        except (OSError, http.client.HTTPException):
            pass  # the daemon went away: the caller reconnects
        finally:
            conn.close()
            self.ended.set()


def get_json(url: str, timeout_s: float = 30) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def submit(daemon: Any, n: int, **extra: Any) -> list[str]:
    jobs = [{"analyzer": "summarize", "input": {"text": f"doc {i}"}, **extra} for i in range(n)]
    ids: list[str] = daemon.call("submit", jobs=jobs)["ids"]
    return ids


def test_a_stream_resumed_after_a_daemon_restart_misses_nothing_and_repeats_nothing(
    start_daemon: StartDaemon,
) -> None:
    """SSE (by Last-Event-ID) and `vigil watch` (reconnecting by itself) follow 40 jobs
    across a SIGKILL and a restart: each job's end comes exactly once, in cursor order."""
    daemon = start_daemon(sim_config(latency_ms=150, http_listen=HTTP, max_concurrency=4))
    url = daemon.http_url()
    _, page = get_json(f"{url}/v1/events")
    head = page["cursor"]
    watch = subprocess.Popen(
        [sys.executable, "-m", "daemon", "watch", "--jsonl", "--after", head],
        env={**os.environ, "VIGIL_SOCKET": str(daemon.socket_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched: list[dict[str, Any]] = []
    pump = threading.Thread(
        target=lambda: watched.extend(json.loads(line) for line in cast(Any, watch.stdout)),
        daemon=True,
    )
    pump.start()
    try:
        sse = SseReader(url, head)
        sse.start()
        ids = submit(daemon, 40)
        wait_until(lambda: len(sse.events) >= 8, 60, "some ends streamed")
        daemon.proc.kill()
        daemon.proc.wait(10)
        assert sse.ended.wait(30), "the stream did not end with the daemon"
        first = sse.events
        assert len(first) < len(ids), "every job ended before the kill: nothing to resume"
        daemon.restart()
        again = SseReader(daemon.http_url(), sse.last_id)
        again.start()
        wait_until(lambda: len(first) + len(again.events) >= len(ids), 120, "all ends streamed")
        wait_until(lambda: len(watched) >= len(ids), 60, "vigil watch saw every end")
    finally:
        watch.terminate()
        watch.wait(10)
        pump.join(10)
        stderr = cast(Any, watch.stderr).read()
        cast(Any, watch.stdout).close()
        cast(Any, watch.stderr).close()
    for stream in (first + again.events, watched):
        assert sorted(e["job_id"] for e in stream) == sorted(ids)  # once each
        assert all(e["event"] == "job.succeeded" and e["job"]["result"] for e in stream)
        seqs = [int(e["cursor"]) for e in stream]
        assert seqs == sorted(seqs)
    assert "reconnected" in stderr, stderr


def test_long_poll_filters_and_bad_cursors(start_daemon: StartDaemon) -> None:
    """`wait` holds the request until an end comes; filters narrow the page while the
    cursor still moves past what they left out; a cursor Vigil never gave is a 400."""
    daemon = start_daemon(sim_config(latency_ms=5, http_listen=HTTP))
    url = daemon.http_url()
    status, page = get_json(f"{url}/v1/events")
    assert (status, page["events"]) == (200, [])
    answer: list[Any] = []
    poll = threading.Thread(
        target=lambda: answer.append(get_json(f"{url}/v1/events?after={page['cursor']}&wait=30"))
    )
    poll.start()
    time.sleep(0.3)  # the poll is waiting: nothing has ended yet
    assert not answer
    [jid] = submit(daemon, 1)
    poll.join(40)
    status, got = answer[0]
    assert status == 200 and [e["job_id"] for e in got["events"]] == [jid]
    assert "input" not in got["events"][0]["job"]  # large, and the client's own
    daemon.call("submit", jobs=[{"analyzer": "classify", "input": {"text": "t", "audience": "a"}}])
    daemon.wait_all_terminal()
    _, only = get_json(f"{url}/v1/events?after=0&analyzer=classify")
    assert [e["analyzer"] for e in only["events"]] == ["classify"]
    _, none = get_json(f"{url}/v1/events?after={only['cursor']}&state=failed")
    assert none["events"] == [] and none["cursor"] == only["cursor"]
    status, bad = get_json(f"{url}/v1/events?after=nonsense")
    assert status == 400 and bad["error"]["code"] == "bad_args"
    assert "not a cursor" in bad["error"]["message"]
    out = run_cli("watch", "--after", "x-1", socket_path=daemon.socket_path)
    assert out.returncode != 0 and "not a cursor" in out.stderr


def test_export_writes_every_matching_job_and_only_those(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """By state, analyzer, tag and batch, to a file (created 0600: results are
    private) or to stdout, and over HTTP: each line a job with its result."""
    daemon = start_daemon(sim_config(latency_ms=1, http_listen=HTTP))
    plain = submit(daemon, 12)
    tagged = submit(daemon, 5, tags=["vip"], batch="b1")
    daemon.wait_all_terminal()
    out_file = tmp_path / "out.jsonl"
    done = run_cli(
        "export", "--state", "succeeded", "--jsonl", str(out_file), socket_path=daemon.socket_path
    )
    assert done.returncode == 0, done.stderr
    assert f"17 jobs to {out_file}" in done.stderr
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert sorted(j["id"] for j in lines) == sorted(plain + tagged)
    assert all(j["state"] == "succeeded" and j["result"] for j in lines)
    assert out_file.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*.partial"))
    batch = run_cli("export", "--batch", "b1", "--jsonl", "-", socket_path=daemon.socket_path)
    assert sorted(json.loads(x)["id"] for x in batch.stdout.splitlines()) == sorted(tagged)
    with urllib.request.urlopen(f"{daemon.http_url()}/v1/export?tag=vip", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        assert sorted(json.loads(x)["id"] for x in r.read().splitlines()) == sorted(tagged)
    none = run_cli("export", "--state", "failed", "--jsonl", "-", socket_path=daemon.socket_path)
    assert none.returncode == 0 and none.stdout == "" and "0 jobs" in none.stderr


async def _fill(path: Path, n: int, result_bytes: int) -> None:
    """`n` succeeded jobs, each with a result of about `result_bytes`."""
    async with Store(path, synchronous="NORMAL") as store:
        for start in range(0, n, 5000):
            await store.submit([new_job() for _ in range(min(5000, n - start))], max_backlog=BIG)
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE jobs SET state = 'succeeded', finished_at = created_at + 1, result = ?",
            (json.dumps({"summary": "x" * result_bytes}),),
        )


def test_an_export_of_100k_jobs_runs_in_constant_memory(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The daemon's RSS, sampled through the export, grows by far less than the
    jobs' size (about 60 MB here): it reads, sends and forgets a page at a time."""
    n, size = 100_000, 500
    state = tmp_path / "d"
    state.mkdir()
    anyio.run(_fill, state / "vigil.db", n, size)
    daemon = start_daemon(sim_config(), name="d")
    proc = psutil.Process(daemon.proc.pid)
    before = proc.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak.append(proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_file = tmp_path / "all.jsonl"
    try:
        done = run_cli("export", "--jsonl", str(out_file), socket_path=daemon.socket_path)
    finally:
        stop.set()
        sampler.join(5)
    assert done.returncode == 0, done.stderr
    with out_file.open("rb") as f:
        assert sum(1 for _ in f) == n
    grew_mb = (max(peak) - before) / 2**20
    assert grew_mb < 30, f"RSS grew {grew_mb:.1f} MB exporting {n} jobs of {size} bytes"


def test_an_export_cut_off_leaves_no_file(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """The daemon killed mid-export: the command fails, and neither the file nor its
    partial copy is left looking like an export."""
    state = tmp_path / "d"
    state.mkdir()
    anyio.run(_fill, state / "vigil.db", 60_000, 200)
    daemon = start_daemon(sim_config(), name="d")
    out_file = tmp_path / "cut.jsonl"
    export = subprocess.Popen(
        [sys.executable, "-m", "daemon", "export", "--jsonl", str(out_file)],
        env={**os.environ, "VIGIL_SOCKET": str(daemon.socket_path)},
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = tmp_path / ".cut.jsonl.partial"
    wait_until(lambda: partial.exists() and partial.stat().st_size > 0, 60, "export under way")
    daemon.proc.kill()
    _, stderr = export.communicate(timeout=CLI_TIMEOUT_S)
    assert export.returncode != 0
    assert not out_file.exists() and not partial.exists()
    assert "closed the connection" in stderr, stderr


# -- the pieces ----------------------------------------------------------------------


class _Rt:
    def __init__(self, store: Store) -> None:
        self.store = store


@pytest.mark.anyio
async def test_an_expired_cursor_is_refused_as_such(tmp_path: Path) -> None:
    """Past what retention kept: `cursor_expired` (HTTP 410), saying how to start
    again; the beginning ("0") still reads what is kept (the newest is never pruned)."""
    from daemon.intake.http import ERROR_STATUS

    async with Store(tmp_path / "v.db", synchronous="NORMAL") as store:
        await store.submit([new_job(max_attempts=1) for _ in range(3)], max_backlog=BIG)
        for job in await store.claim(3):
            await store.finish(job, AttemptEnd(outcome="succeeded", result=1))
        rt = cast(Runtime, _Rt(store))
        page = await events(rt, EventsArgs(after="0", limit=1))
        assert await store.prune_events(time.time() + 1) == 2
        with pytest.raises(CommandError) as caught:
            await events(rt, EventsArgs(after=page["cursor"]))
        assert caught.value.code == "cursor_expired" and ERROR_STATUS["cursor_expired"] == 410
        assert "start again without a cursor" in caught.value.message
        [kept] = (await events(rt, EventsArgs(after="0")))["events"]
        assert kept["cursor"] == "3"


@pytest.mark.anyio
async def test_retention_prunes_old_events_and_ended_deliveries(tmp_path: Path) -> None:
    """Events and delivered deliveries older than EVENTS_KEEP_S go; dead ones stay
    as long as failed jobs; pending ones always stay."""
    async with Store(tmp_path / "v.db", synchronous="NORMAL") as store:
        await store.sync_webhooks([WebhookRoute("crm", ("job.succeeded",), ())])
        await store.submit([new_job(max_attempts=1) for _ in range(3)], max_backlog=BIG)
        for job in await store.claim(3):
            await store.finish(job, AttemptEnd(outcome="succeeded", result=1))
        ok, dead, _pending = await store.claim_deliveries("crm", 10, 0.0)
        await store.end_delivery(ok.id, DeliveryEnd(delivered=True, status=200))
        await store.end_delivery(dead.id, DeliveryEnd(delivered=False, error="gone"))
        config = Config()
        live = cast(Live, type("L", (), {"config": config})())
        retention = Retention(store, live)
        keep = keep_for(config)
        await retention.prune(keep, now=time.time() + EVENTS_KEEP_S + 1)
        assert retention.outbox_deleted == {"events": 2, "deliveries": 1}  # the newest stays
        counts = (await store.webhook_counts())["crm"]
        assert (counts.pending, counts.dead) == (1, 1)
        await retention.prune(keep, now=time.time() + keep["failed"] + 1)
        assert retention.outbox_deleted["deliveries"] == 2
        assert retention.status()["deliveries_deleted"] == 2
