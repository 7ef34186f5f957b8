"""Prometheus metrics (prefix `vigil_`), one registry per daemon.

Most figures already live in the runtime's state (store counts, provider stats,
health, the watchdog's status section), so they are read at scrape time by a
custom collector rather than mirrored into counters all over the code. Only what
must be seen at the moment it happens (attempt durations and phases, queue waits,
finished totals) is observed, through the dispatcher's `on_claim`/`on_finish` hooks.

A scrape reads the runtime on the event loop (one consistent snapshot, no locks);
the psutil sample and the text rendering run in a worker thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

from daemon import __version__
from daemon.jobs import STATES, TERMINAL, Job, Phases, State
from daemon.observe.section_metrics import (
    budget_metrics,
    lag_bounds_ms,
    lag_histogram,
    lookup,
    retention_metrics,
    watchdog_metrics,
    webhook_metrics,
)
from daemon.providers.limits import BUDGETS
from daemon.runtime import Runtime, provider_status
from daemon.store.base import AttemptEnd, Canceled

if TYPE_CHECKING:
    from daemon.watchdog.tasks import TaskRegistry

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# An attempt's phases run from microseconds (a slot free at once) to minutes (a budget).
PHASE_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
PHASES = ("slot", "budget", "cooldown", "api", "record")
"""The phases within an attempt (the queue wait before it has its own histogram)."""
CIRCUIT_STATES = ("closed", "half_open", "open")


@dataclass(frozen=True)
class ProcessSample:
    rss_bytes: float
    open_fds: float
    threads: float
    cpu_seconds: float


def sample_process(proc: psutil.Process) -> ProcessSample:
    """psutil reads /proc: call it in a worker thread, never on the loop."""
    with proc.oneshot():
        cpu = proc.cpu_times()
        return ProcessSample(
            rss_bytes=float(proc.memory_info().rss),
            open_fds=float(proc.num_fds()),
            threads=float(proc.num_threads()),
            cpu_seconds=cpu.user + cpu.system,
        )


def count_tasks(registry: TaskRegistry | None) -> int:
    """Live asyncio tasks: the watchdog's count (a weak dict's size: tasks not yet
    collected) while its factory is the loop's, else a walk of every pending task
    (tens of ms at 100 k tasks; only with `watchdog.enabled = false`)."""
    loop = asyncio.get_running_loop()
    if registry is not None and loop.get_task_factory() is registry:
        return registry.alive
    return len(asyncio.all_tasks(loop))


def circuit_state(status: Mapping[str, Any]) -> str | None:
    """The breaker state from provider_status, a string or {"state": ...}, if offered."""
    circuit = status.get("circuit", status.get("breaker"))
    if isinstance(circuit, Mapping):
        circuit = circuit.get("state")
    return circuit.replace("-", "_") if isinstance(circuit, str) else None


class RuntimeCollector:
    """Reads the runtime's state at scrape time; call `collect` on the event loop."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self.process: ProcessSample | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._daemon()
        yield from self._jobs()
        yield from self._providers()
        yield from self._provider_controls()
        yield from self._store()
        yield from self._budgets()
        yield from self._retention()
        yield from self._webhooks()
        yield from self._watchdog()
        yield from self._process()

    def _daemon(self) -> Iterator[Metric]:
        rt = self._rt
        info = GaugeMetricFamily("vigil_info", "Daemon version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "vigil_start_time_seconds", "When the daemon started (unix time).", rt.started_at
        )
        report = rt.health.report()
        yield GaugeMetricFamily("vigil_live", "1 while every liveness check passes.", report.live)
        yield GaugeMetricFamily(
            "vigil_ready", "1 while the daemon accepts work (see /readyz).", report.ready
        )
        checks = GaugeMetricFamily(
            "vigil_health_check", "1 per passing health check, 0 per failing.", labels=["check"]
        )
        for check in report.checks:
            checks.add_metric([check.name], check.ok)
        yield checks
        if rt.log_writer is not None:
            yield CounterMetricFamily(
                "vigil_log_lines_dropped",
                "Log lines lost: stdout refused them, or a stuck write held too many.",
                rt.log_writer.dropped_lines,
            )
            yield CounterMetricFamily(
                "vigil_log_write_errors",
                "Writes to stdout that failed.",
                rt.log_writer.failed_writes,
            )

    def _jobs(self) -> Iterator[Metric]:
        rt = self._rt
        jobs = GaugeMetricFamily("vigil_jobs", "Jobs in the store by state.", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], rt.store.counts[state])
        yield jobs
        submitted = CounterMetricFamily(
            "vigil_jobs_submitted",
            "Jobs accepted by any intake (idempotency-key repeats not counted).",
            labels=["analyzer"],
        )
        accepted = rt.intake.accepted_by_analyzer
        for analyzer in sorted(accepted.keys() | rt.live.analyzers.keys()):  # zeros included
            submitted.add_metric([analyzer], accepted[analyzer])
        yield submitted
        dispatcher = rt.dispatcher
        yield GaugeMetricFamily(
            "vigil_queue_max_backlog", "queue.max_backlog.", rt.config.queue.max_backlog
        )
        yield GaugeMetricFamily(
            "vigil_queue_max_concurrency", "queue.max_concurrency.", dispatcher.max_concurrency
        )
        yield GaugeMetricFamily(
            "vigil_queue_active", "Attempts running now.", len(dispatcher.active)
        )
        yield GaugeMetricFamily(
            "vigil_queue_paused", "1 while `vigil pause` holds new attempts.", dispatcher.paused
        )

    def _providers(self) -> Iterator[Metric]:
        """What each provider counted: requests, answers, tokens, in flight."""
        requests = CounterMetricFamily(
            "vigil_api_requests",
            "API requests by provider and HTTP status (or timeout, connection_error).",
            labels=["provider", "status"],
        )
        latency = SummaryMetricFamily(
            "vigil_api_request_duration_seconds",
            "Time to an API answer (requests that got one).",
            labels=["provider"],
        )
        rate_limited = CounterMetricFamily(
            "vigil_api_rate_limited", "API answers with HTTP 429.", labels=["provider"]
        )
        tokens = CounterMetricFamily(
            "vigil_api_tokens", "Tokens used, by kind.", labels=["provider", "kind"]
        )
        in_flight = GaugeMetricFamily(
            "vigil_api_in_flight", "API requests in flight.", labels=["provider"]
        )
        max_concurrency = GaugeMetricFamily(
            "vigil_api_max_concurrency", "providers.NAME.max_concurrency.", labels=["provider"]
        )
        for name, provider in self._rt.providers.items():
            stats = provider.stats
            for code, n in stats.by_status.items():
                requests.add_metric([name, code], n)
            latency.add_metric([name], stats.answered, stats.latency_ms_total / 1000)
            rate_limited.add_metric([name], stats.rate_limited)
            tokens.add_metric([name, "prompt"], stats.prompt_tokens)
            tokens.add_metric([name, "completion"], stats.completion_tokens)
            tokens.add_metric([name, "cached"], stats.cached_tokens)
            tokens.add_metric([name, "cache_write"], stats.cache_write_tokens)
            in_flight.add_metric([name], stats.in_flight)
            max_concurrency.add_metric([name], provider.config.max_concurrency)
        yield from (requests, latency, rate_limited, tokens, in_flight, max_concurrency)

    def _provider_controls(self) -> Iterator[Metric]:
        """What holds each provider back, as provider_status reports it (read
        defensively: a figure it does not offer gives no sample)."""
        paused = GaugeMetricFamily(
            "vigil_api_paused",
            "1 while the provider is paused (key refused, quota exhausted).",
            labels=["provider"],
        )
        cooldown = GaugeMetricFamily(
            "vigil_api_cooldown_seconds", "Shared 429 cool-down left.", labels=["provider"]
        )
        circuit = GaugeMetricFamily(
            "vigil_api_circuit_state",
            "1 for the circuit breaker's current state.",
            labels=["provider", "state"],
        )
        circuit_open = GaugeMetricFamily(
            "vigil_api_circuit_open", "1 while the circuit breaker is open.", labels=["provider"]
        )
        opened = CounterMetricFamily(
            "vigil_api_circuit_opened", "Times the circuit breaker opened.", labels=["provider"]
        )
        rejected = CounterMetricFamily(
            "vigil_api_circuit_rejected",
            "Calls the open circuit breaker refused.",
            labels=["provider"],
        )
        limit = GaugeMetricFamily(
            "vigil_api_concurrency_limit",
            "Requests allowed in flight now (adaptive: lowered on 429s and timeouts).",
            labels=["provider"],
        )
        budget = GaugeMetricFamily(
            "vigil_api_budget_per_minute",
            "Per-minute budget in force (configured, or lowered to the server's).",
            labels=["provider", "budget"],
        )
        level = GaugeMetricFamily(
            "vigil_api_budget_level",
            "What is left of the budget now.",
            labels=["provider", "budget"],
        )
        for name, provider in self._rt.providers.items():
            status = provider_status(provider)
            paused.add_metric([name], bool(status.get("paused")))
            for family, path in (
                (cooldown, ("cooldown_s",)),
                (opened, ("circuit", "opened")),
                (rejected, ("circuit", "rejected")),
                (limit, ("concurrency_limit",)),
            ):
                value = lookup(status, path)
                if value is not None:
                    family.add_metric([name], value)
            state = circuit_state(status)
            if state is not None:
                for known in sorted({*CIRCUIT_STATES, state}):
                    circuit.add_metric([name, known], known == state)
                circuit_open.add_metric([name], state == "open")
            for kind in BUDGETS:
                for family, key in ((budget, "per_minute"), (level, "level")):
                    value = lookup(status, ("budgets", kind, key))
                    if value:  # 0 or None: no budget of that kind
                        family.add_metric([name, kind], value)
        yield from (paused, cooldown, circuit, circuit_open, opened, rejected, limit, budget, level)

    def _store(self) -> Iterator[Metric]:
        store = self._rt.store
        yield SummaryMetricFamily(
            "vigil_db_commit_duration_seconds",
            "SQLite group commits (one transaction each) and their time.",
            count_value=store.commits,
            sum_value=store.commit_seconds,
        )
        yield CounterMetricFamily(
            "vigil_db_commit_errors", "Group commits the database refused.", store.commit_errors
        )
        yield GaugeMetricFamily(
            "vigil_db_writable", "0 while the last commit failed.", store.last_error is None
        )
        yield CounterMetricFamily(
            "vigil_db_finishes_refused",
            "Attempt ends not recorded: the job had been taken over (its node presumed dead).",
            store.refused_finishes,
        )
        tables = store.table_stats()
        if tables:  # PostgreSQL: keep the hot tables small (purge) and vacuumed
            size = GaugeMetricFamily(
                "vigil_db_table_bytes",
                "A table's size on disk, indexes included.",
                labels=["table"],
            )
            dead = GaugeMetricFamily(
                "vigil_db_dead_tuples", "A table's dead rows not yet vacuumed.", labels=["table"]
            )
            for table, stats in sorted(tables.items()):
                size.add_metric([table], stats.bytes)
                dead.add_metric([table], stats.dead_tuples)
            yield from (size, dead)
        nodes = store.nodes()
        alive = GaugeMetricFamily(
            "vigil_cluster_nodes", "Daemons sharing the store, by liveness.", labels=["alive"]
        )
        for flag in (True, False):
            alive.add_metric([str(flag).lower()], sum(1 for n in nodes if n.alive is flag))
        yield alive

    def _budgets(self) -> Iterator[Metric]:
        """Each budget's figures as `status["budgets"]` reports them, and the calls the
        budgets refused (none of it without a spend guard)."""
        section = self._rt.status_sections.get("budgets")
        refused = getattr(self._rt.spend, "refused", None)
        if section is not None or refused is not None:
            yield from budget_metrics(section() if section is not None else None, refused)

    def _retention(self) -> Iterator[Metric]:
        section = self._rt.status_sections.get("retention")
        if section is not None:
            yield from retention_metrics(section())

    def _webhooks(self) -> Iterator[Metric]:
        section = self._rt.status_sections.get("webhooks")
        if section is not None:
            yield from webhook_metrics(section())

    def _watchdog(self) -> Iterator[Metric]:
        section = self._rt.status_sections.get("watchdog")
        if section is not None:
            yield from watchdog_metrics(section())
        lag = getattr(getattr(getattr(self._rt, "watchdog", None), "loop", None), "lag", None)
        bounds = lag_bounds_ms() if lag is not None else None
        histogram = lag_histogram(lag, bounds) if bounds is not None else None
        if histogram is not None:
            yield histogram

    def _process(self) -> Iterator[Metric]:
        watchdog = self._rt.watchdog
        tasks = count_tasks(watchdog.registry if watchdog is not None else None)
        yield GaugeMetricFamily("vigil_tasks", "asyncio tasks alive.", tasks)
        sample = self.process
        if sample is None:
            return
        yield GaugeMetricFamily("vigil_process_rss_bytes", "Resident memory.", sample.rss_bytes)
        yield GaugeMetricFamily("vigil_process_open_fds", "Open file descriptors.", sample.open_fds)
        yield GaugeMetricFamily("vigil_process_threads", "OS threads.", sample.threads)
        yield CounterMetricFamily(
            "vigil_process_cpu_seconds", "CPU time, user and system.", sample.cpu_seconds
        )


class PhaseHistograms:
    """`vigil_attempt_phase_seconds`: a histogram per provider and phase within an
    attempt. Five observations an attempt, on the hot path: kept as plain counts (a
    bisect and two additions each, on the loop, which is also where scrapes collect)
    rather than prometheus_client's locked children, which cost four times as much."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        # provider -> per phase (PHASES order): counts per bucket (the last: +Inf), sum
        self._counts: dict[str, tuple[list[int], ...]] = {}
        self._sums: dict[str, list[float]] = {}

    def observe(self, provider: str, phases: Phases) -> None:
        counts = self._counts.get(provider)
        if counts is None:
            counts = tuple([0] * (len(self._bounds) + 1) for _ in PHASES)
            self._counts[provider] = counts
            self._sums[provider] = [0.0] * len(PHASES)
        sums, bounds = self._sums[provider], self._bounds
        for i, ms in enumerate(
            (phases.slot_ms, phases.budget_ms, phases.cooldown_ms, phases.api_ms, phases.record_ms)
        ):
            seconds = ms / 1000
            counts[i][bisect_left(bounds, seconds)] += 1
            sums[i] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "vigil_attempt_phase_seconds",
            "Where attempts' time went, by provider (the analyzer's; a handler's calls to "
            "others count under it) and phase: waiting for a concurrency slot, for the "
            "request/token budget, for a 429 cool-down or the breaker's probe, the API "
            "requests, and the rest (parsing, checking, recording); they add up to the "
            "attempt's run time.",
            labels=["provider", "phase"],
        )
        names = [*map(floatToGoString, self._bounds), "+Inf"]
        for provider, counts in sorted(self._counts.items()):
            for phase, row, total in zip(PHASES, counts, self._sums[provider], strict=True):
                buckets = list(zip(names, map(float, itertools.accumulate(row)), strict=True))
                family.add_metric([provider, phase], buckets, total)
        yield family


class _Snapshot:
    """Families already collected, so the text can be rendered off the loop."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Metrics:
    """The daemon's metrics: event metrics observed through the dispatcher's hooks,
    plus the runtime read at scrape time. Not global: each daemon has its own."""

    def __init__(self, rt: Runtime) -> None:
        self.registry = CollectorRegistry()
        self._runtime = RuntimeCollector(rt)
        self._psutil: psutil.Process | None = None
        self.registry.register(self._runtime)
        self.attempts = Counter(
            "vigil_attempts",
            "Attempt ends by analyzer and outcome (succeeded, error, timeout, canceled).",
            ["analyzer", "outcome"],
            registry=self.registry,
        )
        self.finished = Counter(
            "vigil_jobs_finished",
            "Jobs that reached a final state, by analyzer and outcome (succeeded, failed, "
            "canceled).",
            ["analyzer", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "vigil_job_duration_seconds",
            "One attempt's run time, by analyzer.",
            ["analyzer"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "vigil_job_queue_wait_seconds",
            "Time from ready (submitted, or retry due) to claimed, by analyzer.",
            ["analyzer"],
            buckets=WAIT_BUCKETS_S,
            registry=self.registry,
        )
        self.phases = PhaseHistograms(PHASE_BUCKETS_S)
        self.registry.register(self.phases)
        self._live = rt.live
        self.http_requests = Counter(
            "vigil_http_requests",
            "HTTP API requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        rt.dispatcher.on_claim.append(self.claimed)
        rt.dispatcher.on_finish.append(self.finished_attempt)
        rt.dispatcher.on_cancel.append(self.canceled)

    def claimed(self, job: Job) -> None:
        ready_at = max(job.created_at, job.not_before)
        self.queue_wait.labels(job.analyzer).observe(max(0.0, time.time() - ready_at))

    def finished_attempt(self, job: Job, end: AttemptEnd, new: State | None) -> None:
        self.attempts.labels(job.analyzer, end.outcome).inc()
        if end.latency_ms is not None:
            self.duration.labels(job.analyzer).observe(end.latency_ms / 1000)
        if end.phases is not None:
            self._observe_phases(job, end, end.phases)
        if new is not None and new in TERMINAL:
            self.finished.labels(job.analyzer, new).inc()

    def _observe_phases(self, job: Job, end: AttemptEnd, phases: Phases) -> None:
        """One attempt's phases, under its analyzer's provider: a prompt analyzer's
        calls all go there, and a handler's `ctx.complete` goes there unless told
        otherwise. A handler with no provider of its own: that of its first answered
        call ("none" when it made none)."""
        analyzer = self._live.analyzers.get(job.analyzer)
        provider = analyzer.config.provider if analyzer is not None else ""
        if not provider:
            provider = end.calls[0].provider if end.calls else "none"
        self.phases.observe(provider, phases)

    def canceled(self, canceled: Canceled) -> None:
        self.finished.labels(canceled.analyzer, "canceled").inc()
        if canceled.was == "running":  # its attempt ends here, not in the dispatcher
            self.attempts.labels(canceled.analyzer, "canceled").inc()

    async def render(self) -> bytes:
        """The exposition text (Prometheus format 0.0.4)."""
        if self._psutil is None:
            self._psutil = await anyio.to_thread.run_sync(psutil.Process)
        self._runtime.process = await anyio.to_thread.run_sync(sample_process, self._psutil)
        families = list(self.registry.collect())  # on the loop: the runtime is not thread-safe
        return await anyio.to_thread.run_sync(generate_latest, _Snapshot(families))
