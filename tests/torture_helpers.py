"""Shared parts of the torture tests: configs against an OpenAI-compatible API, the
simulated API as its own process or on a thread, the job ledger's invariants, and a raw
HTTP exchange for requests no well-behaved client would send."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import msgspec
import pytest
from aiohttp import web

from daemon.config import SimulateConfig
from daemon.simulated.server import SimulatedAPI, serve_api
from tests.daemon_proc import START_TIMEOUT_S, DaemonProcess, db_rows


@contextmanager
def reachable(path: Path) -> Iterator[None]:
    """Let other users traverse the directories down to `path` (pytest makes its own
    0700), so only the socket's own mode and the daemon decide; restored after."""
    changed: list[tuple[Path, int]] = []
    for directory in [*reversed(path.parents)]:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
            changed.append((directory, mode))
    try:
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)


def python_for(uid: int) -> tuple[str, dict[str, str]] | None:
    """An interpreter `uid` may run with this checkout's packages importable (the venv's
    own may live under a private home), and the environment that makes them so."""
    env = {"PYTHONPATH": f"{sysconfig.get_paths()['purelib']}:{Path(__file__).parents[1]}"}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            probe = subprocess.run(
                [python, "-c", "import aiohttp, msgspec, uvloop, daemon.app"],
                env={**env, "PATH": "/usr/bin:/bin"},
                user=uid,
                group=uid,
                extra_groups=[],
                capture_output=True,
                timeout=60,
                check=False,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return python, env
    return None


def start_as(uid: int, state_dir: Path, config: str, *, ready: bool = True) -> DaemonProcess:
    """The daemon as another user (uid = gid, no supplementary groups), where file
    modes bind it as they bind a systemd DynamicUser; skips if no interpreter fits."""
    found = python_for(uid)
    if found is None:
        pytest.skip(f"no Python interpreter that uid {uid} may run with these packages")
    python, extra_env = found
    return DaemonProcess.start(
        state_dir, config, env=extra_env, python=python, uid=uid, ready=ready
    )


def need_root(why: str) -> None:
    """Skip unless root: `why` names what needs it."""
    if os.geteuid() != 0:
        pytest.skip(f"{why} needs root")


# -- configs ---------------------------------------------------------------------------


def openai_provider(
    name: str,
    base_url: str,
    *,
    timeout_s: float = 5.0,
    max_concurrency: int = 16,
    breaker_failures: int = 5,
    breaker_open_s: float = 30.0,
    api_key_env: str = "",
    requests_per_minute: int = 0,
) -> str:
    """A `kind = "openai"` provider section pointing at `base_url`."""
    return f"""
[providers.{name}]
kind = "openai"
base_url = "{base_url}"
api_key_env = "{api_key_env}"
requests_per_minute = {requests_per_minute}
max_concurrency = {max_concurrency}
timeout_s = {timeout_s}
breaker_failures = {breaker_failures}
breaker_open_s = {breaker_open_s}
"""


def simulated_provider(
    name: str = "sim",
    *,
    latency_ms: float = 5.0,
    error_rate: float = 0.0,
    max_concurrency: int = 16,
    timeout_s: float = 10.0,
) -> str:
    """A provider backed by the daemon's own simulated API."""
    return f"""
[providers.{name}]
kind = "simulated"
max_concurrency = {max_concurrency}
timeout_s = {timeout_s}

[providers.{name}.simulate]
latency_ms = {latency_ms}
latency_sigma = 0.2
error_rate = {error_rate}
seed = 1
"""


def analyzer(
    name: str,
    provider: str,
    *,
    output: str = "text",
    max_attempts: int = 5,
    timeout_s: float = 10.0,
    max_rate_limited: int | None = None,
) -> str:
    """An analyzer section whose prompt needs only `{text}`."""
    required = 'required_keys = ["sentiment"]\n' if output == "json" else ""
    if max_rate_limited is not None:
        required += f"max_rate_limited = {max_rate_limited}\n"
    return f"""
[analyzers."{name}"]
provider = "{provider}"
model = "sim-small"
prompt = "Analyse:\\n\\n{{text}}"
max_tokens = 60
output = "{output}"
{required}max_attempts = {max_attempts}
timeout_s = {timeout_s}
"""


# -- the simulated API -------------------------------------------------------------------


@dataclass
class SimApiProcess:
    """`python -m daemon simulate-api` as its own process: it outlives daemon restarts,
    so its `GET /stats` counts every request a whole run made."""

    proc: subprocess.Popen[bytes]
    url: str  # the base URL, ending in /v1
    log_path: Path

    @classmethod
    def start(cls, log_path: Path, *args: str) -> SimApiProcess:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "simulate-api", "--port", "0", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("simulate-api listening on "):
                    return cls(proc, line.rsplit(" ", 1)[1], log_path)
            if proc.poll() is not None:
                raise RuntimeError(f"simulate-api exited:\n{log_path.read_text()}")
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
        raise TimeoutError("simulate-api did not announce its URL")

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/stats", timeout=30) as response:
            stats: dict[str, Any] = msgspec.json.decode(response.read())
        return stats

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Seen:
    """One chat request as the API received it."""

    at: float  # the API's monotonic clock
    fault: str
    text: str  # the last user message: tells which job sent it


class RecordingAPI(SimulatedAPI):
    """The simulated API, noting each chat request (bounded by the test's own size)."""

    def __init__(self, settings: SimulateConfig, limit: int = 100_000) -> None:
        super().__init__(settings)
        self.seen: list[Seen] = []
        self._limit = limit

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        if len(self.seen) < self._limit:
            try:
                raw = await request.read()  # cached by aiohttp: the handler reads it again
                messages = msgspec.json.decode(raw).get("messages") or [{}]
                text = str(messages[-1].get("content", ""))
            except (web.HTTPException, msgspec.DecodeError, AttributeError, TypeError, KeyError):
                text = ""
            self.seen.append(Seen(time.monotonic(), request.match_info.get("fault", ""), text))
        return await super()._handle_chat(request)


@dataclass
class ThreadedApi:
    api: RecordingAPI
    url: str
    portal: anyio.from_thread.BlockingPortal

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = msgspec.to_builtins(self.portal.call(self.api.stats))
        return stats

    def seen(self) -> list[Seen]:
        return self.portal.call(lambda: list(self.api.seen))


@contextmanager
def threaded_api(settings: SimulateConfig | None = None) -> Iterator[ThreadedApi]:
    """A recording simulated API on 127.0.0.1 in its own event loop on a thread, so a
    test can stay synchronous while a daemon subprocess calls it."""
    api = RecordingAPI(settings or SimulateConfig(latency_ms=1.0, latency_sigma=0.1, seed=1))
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_api(api)) as url,
    ):
        yield ThreadedApi(api, url, portal)


# -- a client that keeps submitting through kills ---------------------------------------


@dataclass
class Submitter:
    """Submits `total` keyed jobs in batches, each to a node picked at random, until
    each batch is acknowledged; a batch whose reply a kill swallowed is sent again
    (its idempotency keys make that safe)."""

    nodes: list[DaemonProcess]
    total: int
    deadline: float
    pause_s: float  # between batches: submissions go on while the kills come
    batch: int = 100
    rng: random.Random = field(default_factory=random.Random)
    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    resent: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, self.total, self.batch):
                keys = [f"job-{i}" for i in range(start, min(start + self.batch, self.total))]
                jobs = [
                    {"analyzer": "summarize", "input": {"text": f"doc {k}"}, "idempotency_key": k}
                    for k in keys
                ]
                self.acked.update(zip(keys, self._submit(jobs), strict=True))
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        while True:
            assert time.monotonic() < self.deadline, "submitter ran out of time"
            try:
                reply = self.rng.choice(self.nodes).request("submit", jobs=jobs)
            except (OSError, msgspec.DecodeError):  # killed mid-request, or down
                self.resent += 1
                time.sleep(0.05)
                continue
            assert reply["ok"], reply
            ids: list[str] = reply["data"]["ids"]
            return ids


# -- the ledger ---------------------------------------------------------------------------


# Attempt rows that do not count against max_attempts: cut short by our own shutdown,
# or given back before any request (provider paused, circuit open).
UNCOUNTED = "('interrupted', 'deferred', 'rate_limited')"


def ledger_problems(db_path: Path, *, all_terminal: bool = True) -> list[str]:
    """Every broken promise a SQLite database shows (see `ledger_problems_in`)."""
    return ledger_problems_in(lambda sql: db_rows(db_path, sql), all_terminal=all_terminal)


def ledger_problems_in(
    query: Callable[[str], Sequence[Any]], *, all_terminal: bool = True
) -> list[str]:
    """Every broken promise the database shows, through `query` (SQL both stores
    speak): jobs not finished, two recorded results, attempt counts that disagree with
    the attempt rows, results without success, failures without an error."""
    checks = {
        "not terminal": "SELECT id, state FROM jobs WHERE state NOT IN "
        "('succeeded', 'failed', 'canceled')",
        "two recorded results": "SELECT job_id, count(*) FROM attempts "
        "WHERE outcome = 'succeeded' GROUP BY job_id HAVING count(*) > 1",
        "succeeded without its attempt": "SELECT id FROM jobs j WHERE state = 'succeeded' "
        "AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id "
        "AND a.outcome = 'succeeded' AND a.n = j.attempts)",
        "a result on an unsucceeded job": "SELECT id, state FROM jobs "
        "WHERE state != 'succeeded' AND result IS NOT NULL",
        "succeeded without a result": "SELECT id FROM jobs "
        "WHERE state = 'succeeded' AND result IS NULL",
        "failed without an error": "SELECT id FROM jobs "
        "WHERE state = 'failed' AND error_type IS NULL",
        "attempts not counted": "SELECT * FROM (SELECT j.id, j.attempts, (SELECT count(*) "
        f"FROM attempts a WHERE a.job_id = j.id AND a.outcome NOT IN {UNCOUNTED}) AS n "
        "FROM jobs j) t WHERE t.attempts != t.n",
        "more attempts than allowed": "SELECT id, attempts, max_attempts FROM jobs "
        "WHERE attempts > max_attempts",
        "an attempt number used twice": "SELECT job_id, n FROM attempts "
        f"WHERE outcome NOT IN {UNCOUNTED} GROUP BY job_id, n HAVING count(*) > 1",
        "an attempt still running": "SELECT a.job_id, a.n FROM attempts a JOIN jobs j "
        "ON j.id = a.job_id WHERE a.outcome = 'running' AND j.state != 'running'",
    }
    if not all_terminal:
        del checks["not terminal"]
    problems = []
    for name, sql in checks.items():
        rows = query(sql)
        if rows:
            problems.append(f"{name}: {len(rows)} jobs, e.g. {rows[:3]}")
    return problems


# -- raw HTTP -----------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int | None  # None: no status line came back (connection closed or timed out)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    head: bytes = b""

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def raw_http(
    host: str,
    port: int,
    data: bytes,
    *,
    timeout_s: float = 10.0,
    half_close_after_s: float | None = None,
) -> RawResponse:
    """Send bytes as they are and read one answer until the server closes (the caller
    sends `Connection: close`) or the timeout; never raises on what comes back. With
    `half_close_after_s`, a server still silent by then is sent EOF: an unfinished
    request ends instead of waiting out the timeout (aiohttp drops a half-closed
    connection, so a well-formed request must not be half-closed)."""
    buf = b""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with contextlib.suppress(OSError):  # the server may answer and close early
                sock.sendall(data)
            if half_close_after_s is not None:
                sock.settimeout(half_close_after_s)
            while len(buf) < 64 * 1024 * 1024:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if half_close_after_s is None or buf or time.monotonic() > deadline:
                        raise
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    half_close_after_s = None
                    continue
                if not chunk:
                    break
                buf += chunk
                if _complete(buf):  # a kept-alive connection stays open: stop here
                    break
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        return RawResponse(None, head=head)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(status, headers, body, head)


def _complete(buf: bytes) -> bool:
    """Whether `buf` holds a whole answer with a Content-Length."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def http_request(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """A request as bytes, with Host, Content-Length and Connection: close added, and a
    body declared JSON unless the headers say otherwise (as the daemon asks)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    headers = dict(headers or {})
    if body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def host_port(url: str) -> tuple[str, int]:
    """("127.0.0.1", 8470) from "http://127.0.0.1:8470"."""
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    return host.strip("[]"), int(port)
