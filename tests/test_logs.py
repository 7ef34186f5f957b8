"""The log ring and `vigil logs`: bounded, filtered, followed across a restart."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
import structlog

from daemon.cli.logs import parse_since
from daemon.observe.logs import MAX_FIELD_CHARS, MAX_WAITING_LINES, configure_logging
from daemon.observe.ring import MAX_EVENT_BYTES, LogFilter, LogRing, encode_event
from tests.daemon_proc import DaemonProcess, run_cli, sim_config

StartDaemon = Callable[..., DaemonProcess]


def _add(ring: LogRing, event: str, **fields: Any) -> None:
    record = {"event": event, "level": "info", "timestamp": "2026-01-01T00:00:00.000000Z"}
    record.update(fields)
    ring.add(record, encode_event(record))


def _events(entries: list[Any]) -> list[str]:
    return [msgspec.json.decode(e.line)["event"] for e in entries]


def test_ring_is_bounded_and_filters() -> None:
    """Old events fall off; level, job and since filters select what they say."""
    ring = LogRing(size=100)
    for i in range(250):
        _add(
            ring,
            f"e{i}",
            level="warning" if i % 10 == 0 else "info",
            job_id="j1" if i % 2 else None,
            timestamp=f"2026-01-01T00:00:{i % 60:02d}.000000Z",
        )
    everything, top = ring.recent(LogFilter(), 1000)
    assert len(everything) == 100 and top == 250
    assert _events(everything)[-1] == "e249"
    warnings, _ = ring.recent(LogFilter(level=30), 1000)
    assert _events(warnings) == [f"e{i}" for i in range(150, 250, 10)]
    jobs, _ = ring.recent(LogFilter(job_id="j1"), 3)
    assert _events(jobs) == ["e245", "e247", "e249"]
    late, _ = ring.recent(LogFilter(since="2026-01-01T00:00:55.000000Z"), 1000)
    assert {int(e[1:]) % 60 for e in _events(late)} <= set(range(55, 60))


def test_oversize_event_is_truncated() -> None:
    """An event larger than the per-event cap is kept as a stub naming its size."""
    ring = LogRing(size=10)
    _add(ring, "huge", blob="x" * (MAX_EVENT_BYTES + 10))
    [entry], _ = ring.recent(LogFilter(), 10)
    stub = msgspec.json.decode(entry.line)
    assert stub["event"] == "huge" and stub["truncated_bytes"] > MAX_EVENT_BYTES
    assert len(entry.line) < 1000


@pytest.mark.anyio
async def test_follow_yields_backlog_then_new_events_from_any_thread() -> None:
    """follow() gives the last n, then new events, including ones logged by threads."""
    ring = LogRing(size=100)
    for i in range(5):
        _add(ring, f"old{i}")
    seen: list[str] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                async for entry in ring.follow(LogFilter(), 2):
                    seen.append(msgspec.json.decode(entry.line)["event"])
                    if len(seen) == 4:
                        tg.cancel_scope.cancel()

            tg.start_soon(reader)
            await anyio.sleep(0.05)
            _add(ring, "new-loop")
            thread = threading.Thread(target=_add, args=(ring, "new-thread"))
            thread.start()
            thread.join()
    assert seen == ["old3", "old4", "new-loop", "new-thread"]


class CountingStream(io.StringIO):
    """Counts writes: the log writer's promise is one per loop iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in stream.getvalue().splitlines()]


@pytest.mark.anyio
async def test_loop_lines_are_written_once_per_iteration_in_order() -> None:
    """A burst of structlog and stdlib lines in one loop iteration is one write, in
    the order logged; a line from another thread is written at once."""
    stream = CountingStream()
    writer = configure_logging("info", "json", stream=stream)
    log = structlog.get_logger("t")
    for i in range(50):
        log.info("burst", i=i)
    logging.getLogger("aiohttp.test").warning("from the stdlib")
    assert stream.writes == 0
    await anyio.lowlevel.checkpoint()  # the loop's next iteration
    assert stream.writes == 1
    assert [e.get("i", "stdlib") for e in _lines(stream)] == [*range(50), "stdlib"]

    log.info("before the thread")
    thread = threading.Thread(target=lambda: log.info("from a thread"), daemon=True)
    thread.start()
    thread.join(10)  # within this loop iteration: the line before it is still waiting
    assert not thread.is_alive(), "deadlocked"
    assert stream.writes == 2  # the thread's line carried the one waiting before it
    assert [e["event"] for e in _lines(stream)][-2:] == ["before the thread", "from a thread"]
    log.info("at the end")
    writer.flush()  # what the daemon does once its loop has ended
    assert _lines(stream)[-1]["event"] == "at the end"


def test_secrets_are_scrubbed_from_fields_and_tracebacks() -> None:
    """A known secret is masked in fields, nested values and a logged traceback;
    secret-looking keys are dropped whatever their value."""
    secret = "sk-canary-0123456789"
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, secrets=[secret])
    log = structlog.get_logger("t")
    try:
        raise RuntimeError(f"server echoed {secret}")
    except RuntimeError:
        log.exception("call.failed", note=f"key {secret}", nested={"list": [secret]}, n=3)
    log.info("headers", authorization="Bearer whatever", api_key="short")
    text = stream.getvalue()
    assert secret not in text
    failed, headers = _lines(stream)
    assert failed["note"] == "key [redacted]" and failed["nested"] == {"list": ["[redacted]"]}
    assert failed["n"] == 3
    assert "server echoed [redacted]" in msgspec.json.encode(failed["exception"]).decode()
    assert headers["authorization"] == headers["api_key"] == "[redacted]"


def test_long_fields_are_cut_after_their_secrets_are_masked() -> None:
    """A huge string field is cut to MAX_FIELD_CHARS with a note, and a key that
    straddles the cut is masked whole first: no piece of it is left at the end."""
    secret = "sk-canary-0123456789abcdef"
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, secrets=[secret])
    straddling = "x" * (MAX_FIELD_CHARS - 10) + secret + "y" * 100
    structlog.get_logger("t").error("big", error=straddling, nested={"e": [straddling]})
    (line,) = _lines(stream)
    for value in (line["error"], line["nested"]["e"][0]):
        assert value.startswith("x" * (MAX_FIELD_CHARS - 10) + "[redacte")
        assert value.endswith(" more characters]") and "sk-canary" not in value
        assert len(value) < MAX_FIELD_CHARS + 40


class BrokenStream(CountingStream):
    """stdout after journald went away."""

    def write(self, text: str) -> int:
        super().write(text)
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.anyio
async def test_a_broken_stream_drops_lines_without_spinning() -> None:
    """A failing stdout costs its lines: counted, not logged again (no loop of error
    lines about error lines), and the loop runs on."""
    stream = BrokenStream()
    writer = configure_logging("info", "json", stream=stream)
    structlog.get_logger("t").info("lost")
    for _ in range(20):  # 20 loop iterations and more
        await anyio.sleep(0.01)
    assert stream.writes == 1 and writer.status() == {"failed_writes": 1, "dropped_lines": 1}
    writer.flush()  # the daemon's last call after its loop: nothing waits, nothing raises
    assert stream.writes == 1


def test_console_format_scrubs_tracebacks_and_keeps_stdlib_ones() -> None:
    """On a TTY (console format) an exception's text is scrubbed too, and a stdlib
    record's traceback (asyncio, aiohttp) is shown, not dropped."""
    secret = "sk-canary-0123456789"
    stream = io.StringIO()
    ring = LogRing(10)
    configure_logging("info", "console", stream=stream, secrets=[secret], ring=ring)
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError as exc:
        structlog.get_logger("t").exception("structlog.failed")
        logging.getLogger("asyncio").error("stdlib.failed", exc_info=exc)
    text = stream.getvalue()
    assert secret not in text
    assert text.count("ValueError: bad key [redacted]") == 2
    entries, _ = ring.recent(LogFilter(), 10)
    assert len(entries) == 2 and all(secret.encode() not in e.line for e in entries)


class ReentrantStream(CountingStream):
    """A stream whose write logs, as a finalizer run by the garbage collector in the
    middle of a write may (aiohttp's unclosed-session warning, say)."""

    def write(self, text: str) -> int:
        if self.writes == 0:
            structlog.get_logger("t").warning("logged from inside a write")
        return super().write(text)


def test_a_line_logged_from_inside_a_write_neither_deadlocks_nor_is_lost() -> None:
    """The writer holds no lock while writing; the line logged meanwhile follows."""
    stream = ReentrantStream()
    configure_logging("info", "json", stream=stream)
    worker = threading.Thread(target=lambda: structlog.get_logger("t").info("first"), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "deadlocked"
    assert [e["event"] for e in _lines(stream)] == ["first", "logged from inside a write"]


def test_a_stuck_write_bounds_the_lines_waiting_behind_it() -> None:
    """While a write hangs (stdout not read), lines logged meanwhile wait, up to a
    bound; past it they are counted and dropped; once the write returns, the waiting
    ones follow."""
    release, entered = threading.Event(), threading.Event()

    class StuckStream(io.StringIO):
        def write(self, text: str) -> int:
            entered.set()
            release.wait(10)
            return super().write(text)

    stream = StuckStream()
    writer = configure_logging("info", "json", stream=stream)
    log = structlog.get_logger("t")
    first = threading.Thread(target=lambda: log.info("first"), daemon=True)
    first.start()
    assert entered.wait(10)
    for i in range(MAX_WAITING_LINES + 5):
        log.info("waiting", i=i)
    assert writer.dropped_lines == 5 and writer.failed_writes == 0
    release.set()
    first.join(10)
    assert len(_lines(stream)) == 1 + MAX_WAITING_LINES


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class Holder:
    """An object whose repr carries a secret (a headers mapping, say)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return f"Holder(key={self.secret})"


def test_odd_values_are_scrubbed_and_never_make_a_log_call_raise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sets, objects whose repr holds a secret, values that cannot be rendered and
    stdlib records that cannot be formatted: no secret out, no exception raised."""
    secret = "sk-canary-0123456789"
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, secrets=[secret])
    log = structlog.get_logger("t")
    log.info("odd", tags={secret}, holder=Holder(secret), keyed={secret: 1})
    log.info("broken", value=Unprintable())
    logging.getLogger("lib").warning("%d items", secret)  # a bad format argument
    odd, broken = _lines(stream)
    assert secret not in stream.getvalue()
    assert odd["tags"] == ["[redacted]"] and odd["holder"] == "Holder(key=[redacted])"
    assert broken["event"] == "log.unrenderable" and broken["original"] == "broken"
    err = capsys.readouterr().err
    assert "could not be formatted" in err and secret not in err


def test_parse_since() -> None:
    """Relative and absolute --since values become the daemon's timestamp format."""
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert parse_since("90s", now) == "2026-01-02T03:02:35.000000Z"
    assert parse_since("2h", now) == "2026-01-02T01:04:05.000000Z"
    assert parse_since("2026-01-01T00:00:00Z") == "2026-01-01T00:00:00.000000Z"
    assert parse_since("2026-01-01T01:00:00+01:00") == "2026-01-01T00:00:00.000000Z"


def _read_until(
    stream: IO[str], predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30
) -> list[dict[str, Any]]:
    """Read JSON lines from a follower until one matches (bounded by a deadline)."""
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []

    def pump() -> None:
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us
            for raw in stream:
                event = msgspec.json.decode(raw)
                lines.append(event)
                if predicate(event):
                    result.append(event)
                    return

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    assert result, f"no matching event; saw {[e.get('event') for e in lines]}"
    return lines


def test_logs_by_job_and_follow_across_restart(start_daemon: StartDaemon) -> None:
    """`logs --job` shows only that job; `logs -f` follows live and across a restart."""
    daemon = start_daemon(sim_config())
    first = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "a"}})
    other = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "b"}})
    daemon.wait_all_terminal(timeout_s=60)
    out = run_cli("logs", "--job", first["ids"][0], "--json", socket_path=daemon.socket_path)
    assert out.returncode == 0, out.stderr
    events = [msgspec.json.decode(line) for line in out.stdout.splitlines()]
    assert events and all(e["job_id"] == first["ids"][0] for e in events)
    assert other["ids"][0] not in out.stdout

    env = {**os.environ, "VIGIL_SOCKET": str(daemon.socket_path)}
    with subprocess.Popen(
        [sys.executable, "-m", "daemon", "logs", "-f", "--json", "-n", "1", "--level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as follower:
        assert follower.stdout is not None and follower.stderr is not None
        try:
            # The last event, sent once the follower is connected: only then submit.
            _read_until(follower.stdout, lambda e: True)
            live = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "c"}})
            _read_until(follower.stdout, lambda e: e.get("job_id") == live["ids"][0])
            assert daemon.terminate() == 0
            daemon.restart()
            after = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "d"}})
            _read_until(follower.stdout, lambda e: e.get("job_id") == after["ids"][0])
        finally:
            follower.kill()
            follower.wait(10)
        errors = follower.stderr.read()
    assert "reconnecting" in errors and "reconnected" in errors
