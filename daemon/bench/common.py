"""What the performance benchmarks share: the machine and versions they report, the
config the daemon runs with, a running pair of processes (`vigil simulate-api` and
`vigil run`, each separate, the daemon on a fresh state directory), the raw loopback
yardstick, and readings of the daemon's process and database.

Every wait is bounded; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency

from daemon import __version__
from daemon.bench.run import BenchError, daemon, simulated_api
from daemon.bench.throttle import cpu_model
from daemon.control.client import ControlClient

_LIBRARIES = ("aiohttp", "aiosqlite", "anyio", "msgspec", "structlog", "uvloop")
ANALYZER = "bench"
MAX_TOKENS = 16
SUBMIT_BATCH = 1000
POLL_S = 0.05
READY_TIMEOUT_S = 30.0


def versions() -> dict[str, str]:
    found = {"vigil": __version__, "python": platform.python_version()}
    found["sqlite"] = sqlite3.sqlite_version
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def machine() -> dict[str, Any]:
    """CPU count and model, memory, the load when the run began (others' work on a
    shared box shows here), and the versions that ran."""
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "system": f"{platform.system()} {platform.release()}",
        "versions": versions(),
    }


@dataclass(frozen=True)
class Setup:
    """The daemon's side of a run: the default config, with no rate limits (the
    overhead is what is measured) and the provider pointed at the simulated API."""

    queue_concurrency: int = 64  # the defaults of queue.max_concurrency
    provider_concurrency: int = 16  # and providers.NAME.max_concurrency
    watchdog: bool = True
    http: bool = True
    latency_ms: float = 0.0
    synchronous: str = "FULL"  # the default: every commit survives power loss
    extra: str = ""  # more config sections (`vigil bench webhook`: a webhook)


def daemon_config(url: str, setup: Setup) -> str:
    return f"""
[daemon]
synchronous = "{setup.synchronous}"
shutdown_grace_s = 10

[http]
listen = "{"127.0.0.1:0" if setup.http else ""}"

[queue]
max_concurrency = {setup.queue_concurrency}

[log]
format = "json"

[watchdog]
enabled = {"true" if setup.watchdog else "false"}

[providers.api]
kind = "openai"
base_url = "{url}"
max_concurrency = {setup.provider_concurrency}
timeout_s = 30

[analyzers.{ANALYZER}]
provider = "api"
model = "bench-model"
prompt = "{{text}}"
max_tokens = {MAX_TOKENS}
max_attempts = 3
{setup.extra}"""


def job_input(i: int) -> dict[str, Any]:
    return {"text": f"Document {i}: the launch of the new service went well."}


def job(i: int) -> dict[str, Any]:
    return {"analyzer": ANALYZER, "input": job_input(i)}


def request_body(i: int) -> bytes:
    """What the daemon sends for job `i`: the raw client sends the same bytes."""
    return msgspec.json.encode(
        {
            "model": "bench-model",
            "messages": [{"role": "user", "content": job_input(i)["text"]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
        }
    )


class MachineCpu:
    """The whole machine's CPU split over a stretch, from /proc/stat: on a shared or
    virtual machine, `steal` (time the hypervisor gave to others) and `idle` say
    whether a figure was limited by this run or by its neighbours."""

    _FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

    def __init__(self) -> None:
        self._start = self._read()

    @classmethod
    def _read(cls) -> list[int]:
        try:
            with open("/proc/stat") as stat:
                return [int(v) for v in stat.readline().split()[1 : 1 + len(cls._FIELDS)]]
        except (OSError, ValueError):
            return []

    def split(self) -> dict[str, float] | None:
        end = self._read()
        if not end or len(end) != len(self._start):
            return None
        delta = [b - a for a, b in zip(self._start, end, strict=True)]
        total = sum(delta) or 1
        return {
            name: round(100 * d / total, 1) for name, d in zip(self._FIELDS, delta, strict=True)
        }


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max (nearest rank), in the values' unit."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": round(ordered[-1], 3), "n": len(ordered)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


@dataclass
class Env:
    """A running simulated API and daemon, and ways to reach and watch them."""

    root: Path
    api_url: str
    socket: Path
    client: ControlClient
    http: aiohttp.ClientSession
    daemon: psutil.Process
    api: psutil.Process | None
    http_url: str | None
    ready_s: float  # from spawning `vigil run` to its socket answering
    config: Path

    @property
    def db_path(self) -> Path:
        return self.root / "state" / "vigil.db"

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.client.call("status")
        return data

    async def counts(self) -> dict[str, int]:
        jobs: dict[str, int] = (await self.status())["jobs"]
        return jobs

    async def submit(self, start: int, n: int, batch: int = SUBMIT_BATCH) -> None:
        """Jobs start..start+n over the socket, in batches."""
        for first in range(start, start + n, batch):
            jobs = [job(i) for i in range(first, min(start + n, first + batch))]
            await self.client.call("submit", jobs=jobs)

    async def wait_finished(self, total: int, deadline_s: float) -> dict[str, int]:
        """Until `total` jobs are final; BenchError past the deadline."""
        try:
            with anyio.fail_after(deadline_s):
                while True:
                    counts = await self.counts()
                    if counts["succeeded"] + counts["failed"] + counts["canceled"] >= total:
                        return counts
                    await anyio.sleep(POLL_S)
        except TimeoutError:
            raise BenchError(f"jobs not finished within {deadline_s:g} s") from None


def _api_process(pid_hint: int) -> psutil.Process | None:
    """The simulated API among this process's children (for its CPU time)."""
    for child in psutil.Process(pid_hint).children():
        try:
            if "simulate-api" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


@asynccontextmanager
async def api_only(root: Path, latency_ms: float = 0.0) -> AsyncIterator[str]:
    args = ["--latency-ms", str(latency_ms), "--latency-sigma", "0.2", "--seed", "1"]
    async with simulated_api(args, root / "simulate-api.log") as url:
        yield url


@asynccontextmanager
async def running(root: Path, setup: Setup, api_url: str | None = None) -> AsyncIterator[Env]:
    """The simulated API (unless `api_url` is one already running) and a daemon on
    a fresh state directory under `root`; both stopped on exit."""
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    async with _maybe_api(root, setup, api_url) as url:
        config = root / "vigil.toml"
        await anyio.Path(config).write_text(daemon_config(url, setup))
        async with run_daemon(root, config, url, http=setup.http) as env:
            yield env


@asynccontextmanager
async def _maybe_api(root: Path, setup: Setup, api_url: str | None) -> AsyncIterator[str]:
    if api_url is not None:
        yield api_url
        return
    async with api_only(root, setup.latency_ms) as url:
        yield url


@asynccontextmanager
async def run_daemon(
    root: Path, config: Path, api_url: str, *, http: bool = True
) -> AsyncIterator[Env]:
    """`vigil run` on `root/state` (kept across calls: a second call is a restart)."""
    started = time.perf_counter()
    async with daemon(config, root / "state", root / "daemon.log") as socket:
        ready_s = time.perf_counter() - started
        async with ControlClient(socket) as client, aiohttp.ClientSession() as session:
            pid = (await client.call("ping"))["pid"]
            http_url = await _http_url(client) if http else None
            yield Env(
                root=root,
                api_url=api_url,
                socket=socket,
                client=client,
                http=session,
                daemon=psutil.Process(pid),
                api=_api_process(os.getpid()),
                http_url=http_url,
                ready_s=ready_s,
                config=config,
            )


async def _http_url(client: ControlClient) -> str:
    """The HTTP API's URL from `status` (the socket answers before HTTP is bound)."""
    with anyio.move_on_after(READY_TIMEOUT_S):
        while True:
            status = await client.call("status")
            if "http" in status:
                url: str = status["http"]["url"]
                return url
            await anyio.sleep(0.02)
    raise BenchError("the daemon's HTTP API did not come up")


@dataclass
class RssPeak:
    mb: float


@asynccontextmanager
async def rss_peak(process: psutil.Process, every_s: float) -> AsyncIterator[RssPeak]:
    """The process's RSS sampled every `every_s` while the block runs; `mb` is the
    most seen, on entry and on exit included."""
    peak = RssPeak(process.memory_info().rss / 2**20)

    async def sample() -> None:
        while True:
            peak.mb = max(peak.mb, process.memory_info().rss / 2**20)
            await anyio.sleep(every_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        try:
            yield peak
        finally:
            tg.cancel_scope.cancel()
    peak.mb = max(peak.mb, process.memory_info().rss / 2**20)


async def raw_rate(api_url: str, requests: int, concurrency: int) -> dict[str, Any]:
    """The yardstick: an aiohttp client sending the daemon's own request bodies to
    the same simulated API as fast as `concurrency` connections allow."""
    bodies = [request_body(i) for i in range(min(requests, 1000))]
    api = _api_process(os.getpid())
    me = psutil.Process()
    todo = iter(range(requests))
    failures = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def sender() -> None:
            nonlocal failures
            for i in todo:
                async with session.post(
                    f"{api_url}/chat/completions",
                    data=bodies[i % len(bodies)],
                    headers={"Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    failures += response.status != 200

        api_cpu, my_cpu = cpu_s(api) if api else 0.0, cpu_s(me)
        machine_cpu = MachineCpu()
        started = time.perf_counter()
        with anyio.fail_after(max(60.0, requests / 100)):
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(sender)
        elapsed = time.perf_counter() - started
    if failures:
        raise BenchError(f"the raw client got {failures} non-200 answers")
    return {
        "requests": requests,
        "per_s": round(requests / elapsed, 1),
        "api_cpu_us_per_request": round((cpu_s(api) - api_cpu) / requests * 1e6) if api else None,
        "client_cpu_us_per_request": round((cpu_s(me) - my_cpu) / requests * 1e6),
        "machine_cpu_pct": machine_cpu.split(),
    }


def db_window(db_path: Path) -> tuple[float, float, int]:
    """(first attempt started, last job finished, jobs finished) from the daemon's own
    stamps: "dispatch starts" to "last result committed". Read-only, beside WAL."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        (first,) = db.execute("SELECT min(started_at) FROM attempts").fetchone()
        last, done = db.execute(
            "SELECT max(finished_at), count(*) FROM jobs WHERE finished_at IS NOT NULL"
        ).fetchone()
    finally:
        db.close()
    if first is None or last is None:
        raise BenchError("no finished attempt in the database")
    return float(first), float(last), int(done)


def jsonl_lines(n: int, start: int = 0, chunk: int = 10_000) -> Iterator[bytes]:
    """JSONL input objects (one a line, for `submit -a`), made a chunk at a time."""
    encode = msgspec.json.Encoder().encode
    for first in range(start, start + n, chunk):
        last = min(start + n, first + chunk)
        yield b"".join(encode(job_input(i)) + b"\n" for i in range(first, last))


def write_jsonl(path: Path, n: int, start: int = 0) -> int:
    """Streamed to disk (never all in memory); returns the bytes written. Blocking:
    call it in a thread."""
    size = 0
    with path.open("wb") as out:
        for block in jsonl_lines(n, start):
            out.write(block)
            size += len(block)
    return size
