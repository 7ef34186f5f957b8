"""The machinery of `vigil bench throttle`: the simulated API and the daemon as separate
processes, jobs fed over the control socket, the API's own counters sampled while
they run, and what the daemon wrote (its log's events, its attempt rows). What the
numbers mean is throttle_figures.py's and outage.py's business; this
module only runs and records."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import aiohttp
import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from daemon.control.client import ControlClient, DaemonUnavailable

T = TypeVar("T")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.2
READY_POLL_S = 0.02  # fine enough to time a restart to the socket answering
SUBMIT_BATCH = 500
LOG_POLL_S = 0.01  # how often a watched log is read: the moment of an event, to ~10 ms
_ENV_DROP = ("RUNTIME_DIRECTORY", "VIGIL_SOCKET", "VIGIL_CONFIG", "STATE_DIRECTORY")


class BenchError(Exception):
    """A benchmark could not run (a process failed to start, a deadline passed)."""


class ApiSample(msgspec.Struct, frozen=True):
    """The simulated API's GET /stats, the part the benchmark reads (the anthropic
    dialect's input and output token budgets after OpenAI's combined one)."""

    requests: int
    by_status: dict[str, int]
    admitted: int
    tokens_charged: int
    remaining_requests: int | None
    remaining_tokens: int | None
    uptime_s: float
    dialect: str = "openai"
    input_tokens_charged: int = 0
    output_tokens_charged: int = 0
    remaining_input_tokens: int | None = None
    remaining_output_tokens: int | None = None

    @property
    def rate_limited(self) -> int:
        return self.by_status.get("429", 0)

    @property
    def overloaded(self) -> int:
        return self.by_status.get("529", 0)

    def used(self, bound: str | None) -> int:
        """What the API has counted against the `bound` budget (requests when None)."""
        if bound == "tokens":
            return self.tokens_charged
        return self.input_tokens_charged if bound == "input_tokens" else self.admitted

    def left(self, bound: str | None) -> int | None:
        """What the API's `bound` budget holds now (None: no such limit)."""
        if bound == "tokens":
            return self.remaining_tokens
        return self.remaining_input_tokens if bound == "input_tokens" else self.remaining_requests


_sample_decoder = msgspec.json.Decoder(ApiSample)


class AttemptRow(NamedTuple):
    """One row of the daemon's attempts table, the part the benchmark reads."""

    outcome: str
    started_at: float
    finished_at: float | None


class LogMark(msgspec.Struct, frozen=True):
    """The first time the daemon logged an event, and the API's counters sampled the
    moment the bench read that line."""

    event: dict[str, Any]
    at: float  # the event's own timestamp (wall clock)
    sample: ApiSample
    sampled_at: float  # wall clock when that sample's answer came back


class Run(msgspec.Struct, kw_only=True):
    """What one run recorded: API samples at the window's edges and the run's ends,
    and the daemon's view at the end."""

    submitted: int = 0
    first: ApiSample | None = None  # first sample after a request arrived
    window_start: ApiSample | None = None
    window_end: ApiSample | None = None
    all_admitted: ApiSample | None = None  # first sample with a request admitted per job
    last: ApiSample | None = None
    learned: LogMark | None = None  # the first provider.limit_learned, when watched
    db_attempts: list[AttemptRow] = []  # the daemon's attempt rows, when read
    jobs: dict[str, int] = {}
    provider: dict[str, Any] = {}
    attempts: dict[str, int] = {}
    wall_s: float = 0.0


def child_env(state_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    if state_dir is not None:
        env["STATE_DIRECTORY"] = str(state_dir)
    return env


async def _stop(process: Process, name: str) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
    if process.returncode is None:
        print(f"vigil bench: {name} did not stop in {STOP_TIMEOUT_S:g} s; killed", file=sys.stderr)
        process.kill()
        await process.wait()


@asynccontextmanager
async def _child(
    command: list[str], name: str, *, env: dict[str, str], stdout: int | IO[Any], log: IO[Any]
) -> AsyncIterator[Process]:
    """A subprocess that is stopped (shielded, bounded) however the block ends."""
    process = await anyio.open_process(
        command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=log
    )
    async with process:
        try:
            yield process
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(process, name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for an API that must come
    back on the same address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def simulated_api(args: list[str], log_path: Path, *, port: int = 0) -> AsyncIterator[str]:
    """`python -m daemon simulate-api ARGS` on 127.0.0.1 (a free port unless `port`);
    yields its base URL once it has printed its "listening on" line."""
    command = [sys.executable, "-m", "daemon", "simulate-api", "--host", "127.0.0.1"]
    command += ["--port", str(port), *args]
    with log_path.open("ab") as log:
        async with _child(
            command, "simulate-api", env=child_env(), stdout=subprocess.PIPE, log=log
        ) as process:
            assert process.stdout is not None
            reader = BufferedByteReceiveStream(process.stdout)
            try:
                with anyio.fail_after(START_TIMEOUT_S):
                    line = (await reader.receive_until(b"\n", 4096)).decode()
            except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead) as exc:
                raise BenchError(
                    f"simulate-api did not start ({type(exc).__name__}); see {log_path}"
                ) from None
            marker = "listening on "
            if marker not in line:
                raise BenchError(f"simulate-api said {line!r}, not where it listens")
            yield line.split(marker, 1)[1].strip()


@asynccontextmanager
async def daemon(config_path: Path, state_dir: Path, log_path: Path) -> AsyncIterator[Path]:
    """`python -m daemon run` with a fresh STATE_DIRECTORY; yields its socket once it
    answers a ping."""
    await anyio.Path(state_dir).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "daemon", "run", "--config", str(config_path)]
    socket = state_dir / "vigil.sock"
    with log_path.open("ab") as log:
        async with _child(
            command, "the daemon", env=child_env(state_dir), stdout=log, log=log
        ) as process:
            with anyio.fail_after(START_TIMEOUT_S):
                while True:
                    if process.returncode is not None:
                        raise BenchError(
                            f"the daemon exited with {process.returncode}; see {log_path}"
                        )
                    try:
                        async with ControlClient(socket) as client:
                            await client.call("ping")
                        break
                    except DaemonUnavailable:
                        await anyio.sleep(READY_POLL_S)
            yield socket


async def api_sample(http: aiohttp.ClientSession, stats_url: str) -> ApiSample:
    async with http.get(stats_url) as response:
        return _sample_decoder.decode(await response.read())


async def poll_until(
    check: Callable[[], Awaitable[T | None]], *, every_s: float, timeout_s: float, what: str
) -> T:
    """`check()` every `every_s` until it returns something; BenchError after `timeout_s`."""
    with anyio.move_on_after(timeout_s):
        while True:
            found = await check()
            if found is not None:
                return found
            await anyio.sleep(every_s)
    raise BenchError(f"{what} did not happen within {timeout_s:g} s")


async def beside(
    main: Callable[[], Awaitable[T]], side: Callable[[], Coroutine[Any, Any, None]]
) -> T:
    """`main()` with `side()` running alongside, cancelled when `main` ends. An error
    of `main` comes out as itself, not wrapped in a task group's ExceptionGroup."""
    results: list[T] = []
    errors: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(side)
        try:
            results.append(await main())
        except Exception as exc:
            errors.append(exc)
        tg.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return results[0]


def event_time(event: dict[str, Any]) -> float:
    """A JSON log line's ISO timestamp as seconds since the epoch (0 if it has none)."""
    stamp = event.get("timestamp")
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0


def _events_in(lines: list[bytes], name: str) -> list[dict[str, Any]]:
    needle = f'"{name}"'.encode()
    found = []
    for line in lines:
        if needle not in line:
            continue
        try:
            event = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def log_events(log_path: Path, name: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines for event `name`, in order (none if no log)."""
    try:
        return _events_in(log_path.read_bytes().splitlines(), name)
    except OSError:
        return []


class _LogTail:
    """The lines appended to a log since the last read (a partial last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._partial = path, 0, b""

    def new_lines(self) -> list[bytes]:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return lines


async def first_log_event(
    log_path: Path, name: str, http: aiohttp.ClientSession, stats_url: str, *, timeout_s: float
) -> LogMark | None:
    """Watch the daemon's log (every LOG_POLL_S) for the first `name` event and sample
    the API as soon as it shows; None if none came within `timeout_s`."""
    tail = _LogTail(log_path)

    async def check() -> LogMark | None:
        events = _events_in(tail.new_lines(), name)
        if not events:
            return None
        sample = await api_sample(http, stats_url)
        return LogMark(events[0], event_time(events[0]), sample, time.time())

    try:
        return await poll_until(check, every_s=LOG_POLL_S, timeout_s=timeout_s, what=name)
    except BenchError:
        return None


def attempt_rows(db_path: Path) -> list[AttemptRow]:
    """Every attempt row (outcome, started_at, finished_at; the daemon's wall clock)
    from its database, read after it stopped (read-only)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        query = "SELECT outcome, started_at, finished_at FROM attempts ORDER BY id"
        return [AttemptRow(str(o), float(s), f) for o, s, f in db.execute(query).fetchall()]
    finally:
        db.close()


async def submit_jobs(
    client: ControlClient, make_job: Callable[[int], dict[str, Any]], start: int, n: int
) -> int:
    """Submit jobs `start`..`start + n - 1` in batches; returns how many were submitted."""
    done = 0
    while done < n:
        batch = [make_job(start + done + i) for i in range(min(n - done, SUBMIT_BATCH))]
        await client.call("submit", jobs=batch)
        done += len(batch)
    return done


async def drive(
    client: ControlClient,
    http: aiohttp.ClientSession,
    stats_url: str,
    *,
    make_job: Callable[[int], dict[str, Any]],
    jobs: int,
    warmed_up: Callable[[ApiSample, dict[str, Any]], bool] | None,
    max_warm_up: int,
    top_up_below: int,
    deadline_s: float,
) -> Run:
    """Feed jobs and sample the API until every job is done.

    With `warmed_up`, jobs are topped up to `top_up_below` unfinished (queued or
    running: the daemon claims more than its provider sends at once) until it says
    the warm-up is over, judging the API's sample and the provider's status (the API's
    initial burst used up: with one-second slices there is none to spend, the first
    sample opens the window; or the daemon's limits learned); then the measuring
    window opens and `jobs` more are submitted; it closes when no job is left
    waiting (everything after that is the tail, not the throttle). Without it, `jobs`
    are submitted at once and there is no window. Either way `all_admitted` is the
    first sample at which the API had admitted as many requests as jobs were
    submitted."""
    run = Run()
    started = time.monotonic()

    async def submit(n: int) -> None:
        run.submitted += await submit_jobs(client, make_job, run.submitted, n)

    target: int | None = None
    if warmed_up is None:
        await submit(jobs)
        target = run.submitted
    with anyio.fail_after(deadline_s):
        while True:
            sample = await api_sample(http, stats_url)
            status = await client.call("status")
            counts: dict[str, int] = status["jobs"]
            provider: dict[str, Any] = next(iter(status["providers"].values()), {})
            if run.first is None and sample.requests:
                run.first = sample
            if target is None and warmed_up is not None:
                if warmed_up(sample, provider):
                    run.window_start = sample
                    await submit(jobs)
                    target = run.submitted
                    # The counts above predate these jobs (with one-second slices the
                    # window opens before any job waits): judge the window's end on
                    # the next sample.
                    await anyio.sleep(POLL_S)
                    continue
                if run.submitted >= max_warm_up:
                    target = run.submitted  # the burst outlasts any sane warm-up: no window
                elif (unfinished := counts["queued"] + counts["running"]) < top_up_below:
                    await submit(top_up_below - unfinished)
            if (
                run.window_start is not None
                and run.window_end is None
                and run.submitted == target
                and counts["queued"] == 0
            ):
                run.window_end = sample
            if target is not None and run.all_admitted is None and sample.admitted >= target:
                run.all_admitted = sample
            done = counts["succeeded"] + counts["failed"] + counts["canceled"]
            if target is not None and done >= target:
                run.last = sample
                run.jobs = counts
                run.provider = provider
                run.attempts = status.get("attempts", {})
                break
            await anyio.sleep(POLL_S)
    run.wall_s = time.monotonic() - started
    return run
