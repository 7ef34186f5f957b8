"""Memory: the RSS trend, and where it grows.

RSS is sampled (psutil, in a thread) every `sample_s`. After `warmup_s` the first
sample is the baseline; RSS that stays more than `memory_growth_mb` above it for a
few samples in a row logs `memory.growth` and turns tracemalloc on for
`memory_trace_s`. Comparing a snapshot from the start of that window with one from
its end names the allocation sites that grew (`memory.sites`); then tracemalloc is
turned off again, since left on it slows allocation-heavy code several times over,
and the baseline moves up to where RSS is now. Above `max_rss_mb` the watchdog asks
for a graceful restart."""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency
import structlog

from daemon.config import WatchdogConfig
from daemon.wakeup import Wakeup

log = structlog.get_logger("vigil.watchdog")

MB = 1024 * 1024
SUSTAIN_SAMPLES = 3  # growth must hold this many samples in a row: a spike is not a trend
TOP_SITES = 10
TRACE_FRAMES = 1  # sites are grouped by file:line; more frames cost more per allocation
_NOISE = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


class ProcessSample(msgspec.Struct, frozen=True):
    rss_bytes: int
    fds: int
    threads: int


def read_process(proc: psutil.Process) -> ProcessSample:
    """psutil reads /proc: call it in a worker thread, never on the loop."""
    with proc.oneshot():
        return ProcessSample(
            rss_bytes=int(proc.memory_info().rss),
            fds=int(proc.num_fds()),
            threads=int(proc.num_threads()),
        )


class Site(msgspec.Struct, frozen=True):
    """An allocation site and how much memory allocated there is alive."""

    file: str
    line: int
    size_diff_bytes: int
    count_diff: int
    size_bytes: int
    count: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(_NOISE)


def _growing_sites(
    after: tracemalloc.Snapshot, before: tracemalloc.Snapshot, top: int
) -> list[Site]:
    diffs = [d for d in after.compare_to(before, "lineno") if d.size_diff > 0]
    diffs.sort(key=lambda d: d.size_diff, reverse=True)
    return [
        Site(
            file=d.traceback[0].filename,
            line=d.traceback[0].lineno,
            size_diff_bytes=d.size_diff,
            count_diff=d.count_diff,
            size_bytes=d.size,
            count=d.count,
        )
        for d in diffs[:top]
    ]


class MemoryWatch:
    def __init__(self, config: WatchdogConfig, request_restart: Callable[[str], None]) -> None:
        self._config = config
        self._request_restart = request_restart
        self._warm_until = 0.0
        self.rss_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes: int | None = None
        self.growth_events = 0
        self.over_limit = False
        self.last_sites: list[Site] = []
        self._above = 0
        self._growth_pending = False
        self._trigger = Wakeup()
        self._proc = psutil.Process()
        self._tracing_users = 0
        self._tracing_ours = False
        self._window: tuple[tracemalloc.Snapshot, float] | None = None

    def start(self, now: float) -> None:
        self._warm_until = now + self._config.warmup_s

    def observe(self, sample: ProcessSample, now: float) -> None:
        """One RSS sample (from the watchdog's sampler)."""
        cfg = self._config
        rss = self.rss_bytes = sample.rss_bytes
        self.peak_bytes = max(self.peak_bytes, rss)
        limit = cfg.max_rss_mb * MB
        if limit and rss > limit and not self.over_limit:
            self.over_limit = True
            log.error(
                "memory.max_rss_exceeded",
                rss_mb=round(rss / MB, 1),
                max_rss_mb=cfg.max_rss_mb,
                action="graceful restart: drain, then exit 75",
            )
            self._request_restart(f"RSS {rss / MB:.0f} MB over watchdog.max_rss_mb")
        if now < self._warm_until:
            return
        if self.baseline_bytes is None:
            self.baseline_bytes = rss
            return
        grown = rss - self.baseline_bytes
        self._above = self._above + 1 if grown > cfg.memory_growth_mb * MB else 0
        if self._above >= SUSTAIN_SAMPLES and not self._growth_pending:
            self._growth_pending = True
            self.growth_events += 1
            log.warning(
                "memory.growth",
                rss_mb=round(rss / MB, 1),
                baseline_mb=round(self.baseline_bytes / MB, 1),
                growth_mb=round(grown / MB, 1),
                threshold_mb=cfg.memory_growth_mb,
                tracing_s=cfg.memory_trace_s,
            )
            self._trigger.notify()

    async def run(self) -> None:
        """Trace windows, one at a time, when `observe` saw sustained growth."""
        while True:
            while not self._growth_pending:
                await self._trigger.wait(self._config.sample_s)
            try:
                await self._report_growth()
            except Exception:  # e.g. someone else stopped tracemalloc mid-window
                log.exception("watchdog.memory_trace_failed")
            # The next report needs another `memory_growth_mb` on top of today's RSS.
            self.baseline_bytes = self.rss_bytes
            self._above = 0
            self._growth_pending = False

    async def _report_growth(self) -> None:
        started_rss = self.rss_bytes
        sites = await self._trace_window(self._config.memory_trace_s, TOP_SITES)
        self.last_sites = sites
        top = sites[0] if sites else None
        log.warning(
            "memory.sites",
            window_s=self._config.memory_trace_s,
            rss_mb=round(self.rss_bytes / MB, 1),
            rss_growth_mb=round((self.rss_bytes - started_rss) / MB, 1),
            file=top.file if top else None,
            line=top.line if top else None,
            top=[
                {"site": s.where, "size_diff_bytes": s.size_diff_bytes, "count_diff": s.count_diff}
                for s in sites
            ],
        )

    @contextlib.asynccontextmanager
    async def _tracing(self) -> AsyncIterator[None]:
        """tracemalloc on while anyone here needs it; off after the last one, unless
        it was on before we came (PYTHONTRACEMALLOC)."""
        if self._tracing_users == 0 and not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
            self._tracing_ours = True
        self._tracing_users += 1
        try:
            yield
        finally:
            self._tracing_users -= 1
            if self._tracing_users == 0 and self._tracing_ours:
                tracemalloc.stop()
                self._tracing_ours = False

    async def _trace_window(self, seconds: float, top: int) -> list[Site]:
        async with self._tracing():
            before = await anyio.to_thread.run_sync(_snapshot)
            self._window = (before, time.monotonic())
            try:
                await anyio.sleep(seconds)
                after = await anyio.to_thread.run_sync(_snapshot)
            finally:
                self._window = None
        return await anyio.to_thread.run_sync(_growing_sites, after, before, top)

    async def report(self, seconds: float, top: int) -> dict[str, Any]:
        """`vigil debug memory`: the sites that grew over the window open now (a
        growth window, compared at once), or else over `seconds` of tracing."""
        window = self._window
        if window is not None:
            before, opened = window
            async with self._tracing():
                after = await anyio.to_thread.run_sync(_snapshot)
            sites = await anyio.to_thread.run_sync(_growing_sites, after, before, top)
            traced_s = time.monotonic() - opened
        else:
            sites = await self._trace_window(seconds, top)
            traced_s = seconds
        rss = (await anyio.to_thread.run_sync(read_process, self._proc)).rss_bytes
        baseline = self.baseline_bytes
        return {
            "rss_mb": round(rss / MB, 1),
            "peak_mb": round(max(rss, self.peak_bytes) / MB, 1),
            "baseline_mb": None if baseline is None else round(baseline / MB, 1),
            "growth_mb": None if baseline is None else round((rss - baseline) / MB, 1),
            "traced_s": round(traced_s, 2),
            "sites": [msgspec.to_builtins(s) for s in sites],
        }

    def status(self) -> dict[str, Any]:
        baseline = self.baseline_bytes
        return {
            "rss_mb": round(self.rss_bytes / MB, 1),
            "peak_mb": round(self.peak_bytes / MB, 1),
            "baseline_mb": None if baseline is None else round(baseline / MB, 1),
            "max_rss_mb": self._config.max_rss_mb,
            "growth_events": self.growth_events,
            "tracing": self._window is not None,
            "last_sites": [s.where for s in self.last_sites[:5]],
        }
