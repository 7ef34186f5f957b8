"""One attempt of one job: analyzer -> provider -> outcome, and the retry decision."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from daemon.analyzers import Analyzer, Calls, Provider
from daemon.backoff import backoff_s
from daemon.jobs import ANSWER_MAX_CHARS, ErrorInfo, Job, Phases
from daemon.live import Live
from daemon.providers.base import OutputInvalid, ProviderError
from daemon.queue import CLAIMED, Claimed
from daemon.store.base import AttemptEnd

if TYPE_CHECKING:
    from daemon.spend.guard import SpendGuard

log = structlog.get_logger("vigil.worker")
# Refusals made before any request: they cost the job no attempt.
NOT_ATTEMPTED = frozenset({"CircuitOpen", "ProviderPaused", "BudgetExhausted"})
DEFER_S = 5.0
# Answers that say the request was not processed (a 429, an overloaded API's 529 or
# 503): no attempt spent; the job retries with backoff, bounded by max_rate_limited.
TURNED_AWAY = frozenset({"RateLimited", "Overloaded"})


class Worker:
    """Runs attempts against the live analyzers and providers (read on each call, so
    a reload applies to the next attempt)."""

    def __init__(
        self,
        live: Live,
        providers: Mapping[str, Provider],
        rng: random.Random | None = None,
        guard: SpendGuard | None = None,
    ) -> None:
        self._live = live
        self._providers = providers
        self._rng = rng or random.Random()
        self._guard = guard

    async def attempt(self, job: Job) -> AttemptEnd:
        """Never raises but for cancellation: every failure becomes an AttemptEnd, and
        every AttemptEnd carries the attempt's phases."""
        started = time.monotonic()
        claim = CLAIMED.get() or Claimed(time.time(), started)  # called outside a dispatcher
        analyzer = self._live.analyzers.get(job.analyzer)
        structlog.contextvars.bind_contextvars(
            job_id=job.id, analyzer=job.analyzer, attempt=job.attempts
        )
        calls = Calls(self._providers, self._live.prices(), job=job, guard=self._guard)
        try:
            if analyzer is None:
                return self._failed(
                    job,
                    claim,
                    started,
                    calls,
                    ErrorInfo(
                        "UnknownAnalyzer", f"analyzer {job.analyzer!r} is no longer configured"
                    ),
                    retryable=False,
                )
            # A bare deadline scope rather than `fail_after` (a generator context
            # manager): this runs once per attempt, on the hot path.
            deadline = anyio.CancelScope(deadline=anyio.current_time() + analyzer.config.timeout_s)
            try:
                with deadline:
                    out = await analyzer.run(job, calls)
                if deadline.cancelled_caught:
                    raise TimeoutError
            except TimeoutError:
                return self._failed(
                    job,
                    claim,
                    started,
                    calls,
                    ErrorInfo("Timeout", f"attempt exceeded {analyzer.config.timeout_s:g} s"),
                    retryable=True,
                    outcome="timeout",
                )
            except ProviderError as exc:
                if exc.kind in NOT_ATTEMPTED and not calls.records:
                    return self._deferred(job, claim, started, calls, analyzer, exc)
                if exc.kind in TURNED_AWAY:
                    return self._rate_limited(job, analyzer, claim, started, calls, exc)
                return self._failed(
                    job,
                    claim,
                    started,
                    calls,
                    ErrorInfo(exc.kind, str(exc)),
                    retryable=exc.retryable,
                    status=exc.status,
                    hint_s=exc.retry_after_s,
                )
            except OutputInvalid as exc:
                return self._failed(
                    job,
                    claim,
                    started,
                    calls,
                    ErrorInfo("OutputInvalid", str(exc)),
                    retryable=False,
                    status=calls.http_status,
                )
            except Exception as exc:  # a handler's bug must not kill the daemon
                log.warning("job.handler_error", exc_info=True)
                return self._failed(
                    job,
                    claim,
                    started,
                    calls,
                    ErrorInfo(type(exc).__name__, str(exc)[:1000]),
                    retryable=True,
                )
            try:
                # Encoded once here: the store writes these bytes as they are.
                result = msgspec.Raw(msgspec.json.encode(out.result))
            except (TypeError, msgspec.EncodeError) as exc:
                return self._failed(
                    job,
                    claim,
                    started,
                    calls,
                    ErrorInfo("BadResult", f"result is not JSON-encodable: {exc}"),
                    retryable=False,
                )
            now = time.monotonic()
            latency_ms = (now - started) * 1000
            log.info("job.attempt", outcome="succeeded", latency_ms=round(latency_ms, 1))
            return AttemptEnd(
                outcome="succeeded",
                result=result,
                usage=out.usage,
                http_status=out.http_status,
                latency_ms=latency_ms,
                stop_reason=calls.stop_reason,
                calls=tuple(calls.records),
                phases=phases_of(job, claim, started, calls, now),
            )
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "analyzer", "attempt")

    def held_analyzers(self) -> tuple[frozenset[str], bool]:
        """Prompt analyzers whose provider refuses calls now (paused, circuit open),
        and whether every analyzer is held. Handlers may call any provider: never held."""
        analyzers = self._live.analyzers
        held = frozenset(
            name
            for name, analyzer in analyzers.items()
            if analyzer.handler is None
            and (provider := self._providers.get(analyzer.config.provider)) is not None
            and (not provider.available() or self._over_budget(analyzer))
        )
        return held, bool(analyzers) and len(held) == len(analyzers)

    def _over_budget(self, analyzer: Analyzer) -> bool:
        """Whether not even the answer of a call (`max_tokens` of output) fits a budget."""
        if self._guard is None or not self._guard.has_limits:
            return False
        cfg = analyzer.config
        price = self._live.prices().get(cfg.provider)
        least = cfg.max_tokens * price.completion_per_mtok / 1e6 if price is not None else 0.0
        return self._guard.held(analyzer.name, cfg.provider, least)

    @staticmethod
    def _deferred(
        job: Job,
        claim: Claimed,
        started: float,
        calls: Calls,
        analyzer: Analyzer,
        exc: ProviderError,
    ) -> AttemptEnd:
        """No request was made: the provider is paused or its circuit open. The job
        waits it out without spending an attempt. A prompt analyzer's job is ready again
        at once: the dispatcher claims none of its jobs while the provider refuses
        calls, and all of them the moment it takes calls again. A handler's job (it may
        call any provider, so it is never held) waits for the hint."""
        wait_s = exc.retry_after_s if exc.retry_after_s is not None else DEFER_S
        if analyzer.handler is None and exc.kind != "BudgetExhausted":
            wait_s = 0.0  # held by the dispatcher (a budget holds only its smallest call)
        log.info("job.deferred", reason=str(exc), retry_in_s=round(wait_s, 2))
        return AttemptEnd(
            outcome="deferred",
            error=ErrorInfo(exc.kind, str(exc)),
            retry_at=time.time() + wait_s,
            phases=phases_of(job, claim, started, calls, time.monotonic()),
        )

    def _rate_limited(
        self,
        job: Job,
        analyzer: Analyzer,
        claim: Claimed,
        started: float,
        calls: Calls,
        exc: ProviderError,
    ) -> AttemptEnd:
        """A 429 or an overloaded API: the request was not processed, so no attempt is
        spent; the job's own count of them is bounded by `max_rate_limited` instead,
        after which it fails."""
        limit = analyzer.config.max_rate_limited
        count = job.rate_limited + 1
        if count >= limit:
            error = ErrorInfo(
                exc.kind,
                f"{exc} (turned away {count} times: analyzers.{job.analyzer}.max_rate_limited"
                f" is {limit})",
            )
            return self._failed(
                job, claim, started, calls, error, retryable=False, status=exc.status
            )
        queue = self._live.config.queue
        retry_in = backoff_s(
            count,
            base_s=queue.backoff_base_s,
            max_s=queue.backoff_max_s,
            hint_s=exc.retry_after_s,
            rng=self._rng,
        )
        now = time.monotonic()
        latency_ms = (now - started) * 1000
        log.info(
            "job.attempt",
            outcome="rate_limited",
            error=str(exc),
            http_status=exc.status,
            latency_ms=round(latency_ms, 1),
            retry_in_s=round(retry_in, 2),
            rate_limited=count,
        )
        return AttemptEnd(
            outcome="rate_limited",
            error=ErrorInfo(exc.kind, str(exc)),
            http_status=exc.status,
            latency_ms=latency_ms,
            retry_at=time.time() + retry_in,
            phases=phases_of(job, claim, started, calls, now),
            **_spent(calls),
        )

    def _failed(
        self,
        job: Job,
        claim: Claimed,
        started: float,
        calls: Calls,
        error: ErrorInfo,
        *,
        retryable: bool,
        status: int | None = None,
        hint_s: float | None = None,
        outcome: str = "error",
    ) -> AttemptEnd:
        now = time.monotonic()
        latency_ms = (now - started) * 1000
        retry_at = None
        retry_in = None
        if retryable and job.attempts < job.max_attempts:
            limits = self._live.config.queue
            retry_in = backoff_s(
                job.attempts,
                base_s=limits.backoff_base_s,
                max_s=limits.backoff_max_s,
                hint_s=hint_s,
                rng=self._rng,
            )
            retry_at = time.time() + retry_in
        log.info(
            "job.attempt",
            outcome=outcome,
            error_type=error.type,
            error=error.message,
            http_status=status,
            latency_ms=round(latency_ms, 1),
            retry_in_s=None if retry_in is None else round(retry_in, 2),
            final=retry_at is None,
        )
        return AttemptEnd(
            outcome="timeout" if outcome == "timeout" else "error",
            error=error,
            http_status=status,
            latency_ms=latency_ms,
            retry_at=retry_at,
            phases=phases_of(job, claim, started, calls, now),
            **_spent(calls),
        )


def phases_of(job: Job, claim: Claimed, started: float, calls: Calls, now: float) -> Phases:
    """Where the attempt's time went, from its claim (when the store stamped its
    `started_at`) to `now`, its end handed to the store. The wait between the claim and
    the worker's start is the slot's (a batch's tasks start one after another); what
    neither a wait nor a request took (parsing, checking, a handler's own code) is the
    record's, so the five add up to the attempt's duration. `queue_ms` came before:
    ready (created, or its retry due) to claimed. In ms to 10 µs; the differences of
    two clocks read a hair apart are kept from going below zero."""
    times = calls.times
    slot_s = started - claim.mono + times.slot_s
    record_s = now - claim.mono - slot_s - times.budget_s - times.cooldown_s - times.api_s
    queue_s = claim.at - max(job.created_at, job.not_before)
    return Phases(
        queue_ms=_ms(queue_s) if queue_s > 0 else 0.0,
        slot_ms=_ms(slot_s),  # a monotonic difference: never negative
        budget_ms=_ms(times.budget_s),
        cooldown_ms=_ms(times.cooldown_s),
        api_ms=_ms(times.api_s),
        record_ms=_ms(record_s) if record_s > 0 else 0.0,
    )


def _ms(seconds: float) -> float:
    """Milliseconds to 10 µs (a non-negative time; round() costs twice as much)."""
    return int(seconds * 100_000 + 0.5) / 100


def _spent(calls: Calls) -> dict[str, Any]:
    """What a failed attempt's answers were billed, and the last one's text (bounded),
    so a prompt whose answers fail the analyzer's check can be debugged."""
    usage = calls.usage
    billed = usage if usage.prompt_tokens or usage.completion_tokens else None
    answer = None if calls.answer is None else calls.answer[:ANSWER_MAX_CHARS]
    return {
        "usage": billed,
        "answer": answer,
        "stop_reason": calls.stop_reason,
        "calls": tuple(calls.records),
    }
