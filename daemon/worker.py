"""One attempt of one job: analyzer -> provider -> outcome, and the retry decision."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

import anyio
import msgspec
import structlog

from daemon.analyzers import Calls, Provider
from daemon.backoff import backoff_s
from daemon.jobs import ErrorInfo, Job
from daemon.live import Live
from daemon.providers.base import OutputInvalid, ProviderError
from daemon.store.store import AttemptEnd

log = structlog.get_logger("vigil.worker")
# Refusals made before any request: they cost the job no attempt.
NOT_ATTEMPTED = frozenset({"CircuitOpen", "ProviderPaused"})
DEFER_S = 5.0


class Worker:
    """Runs attempts against the live analyzers and providers (read on each call, so
    a reload applies to the next attempt)."""

    def __init__(
        self, live: Live, providers: Mapping[str, Provider], rng: random.Random | None = None
    ) -> None:
        self._live = live
        self._providers = providers
        self._rng = rng or random.Random()

    async def attempt(self, job: Job) -> AttemptEnd:
        """Never raises but for cancellation: every failure becomes an AttemptEnd."""
        started = time.monotonic()
        analyzer = self._live.analyzers.get(job.analyzer)
        structlog.contextvars.bind_contextvars(
            job_id=job.id, analyzer=job.analyzer, attempt=job.attempts
        )
        try:
            if analyzer is None:
                return self._failed(
                    job,
                    started,
                    ErrorInfo(
                        "UnknownAnalyzer", f"analyzer {job.analyzer!r} is no longer configured"
                    ),
                    retryable=False,
                )
            calls = Calls(self._providers, self._live.prices())
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
                    started,
                    ErrorInfo("Timeout", f"attempt exceeded {analyzer.config.timeout_s:g} s"),
                    retryable=True,
                    outcome="timeout",
                )
            except ProviderError as exc:
                if exc.kind in NOT_ATTEMPTED:
                    return self._deferred(job, exc)
                return self._failed(
                    job,
                    started,
                    ErrorInfo(exc.kind, str(exc)),
                    retryable=exc.retryable,
                    status=exc.status,
                    hint_s=exc.retry_after_s,
                )
            except OutputInvalid as exc:
                return self._failed(
                    job,
                    started,
                    ErrorInfo("OutputInvalid", str(exc)),
                    retryable=False,
                    status=calls.http_status,
                )
            except Exception as exc:  # a handler's bug must not kill the daemon
                log.warning("job.handler_error", exc_info=True)
                return self._failed(
                    job, started, ErrorInfo(type(exc).__name__, str(exc)[:1000]), retryable=True
                )
            try:
                # Encoded once here: the store writes these bytes as they are.
                result = msgspec.Raw(msgspec.json.encode(out.result))
            except (TypeError, msgspec.EncodeError) as exc:
                return self._failed(
                    job,
                    started,
                    ErrorInfo("BadResult", f"result is not JSON-encodable: {exc}"),
                    retryable=False,
                )
            latency_ms = (time.monotonic() - started) * 1000
            log.info("job.attempt", outcome="succeeded", latency_ms=round(latency_ms, 1))
            return AttemptEnd(
                outcome="succeeded",
                result=result,
                usage=out.usage,
                http_status=out.http_status,
                latency_ms=latency_ms,
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
            and not provider.available()
        )
        return held, bool(analyzers) and len(held) == len(analyzers)

    @staticmethod
    def _deferred(job: Job, exc: ProviderError) -> AttemptEnd:
        """No request was made: the provider is paused or its circuit open. The job
        waits it out without spending an attempt."""
        wait_s = exc.retry_after_s if exc.retry_after_s is not None else DEFER_S
        log.info("job.deferred", reason=str(exc), retry_in_s=round(wait_s, 2))
        return AttemptEnd(
            outcome="deferred",
            error=ErrorInfo(exc.kind, str(exc)),
            retry_at=time.time() + wait_s,
        )

    def _failed(
        self,
        job: Job,
        started: float,
        error: ErrorInfo,
        *,
        retryable: bool,
        status: int | None = None,
        hint_s: float | None = None,
        outcome: str = "error",
    ) -> AttemptEnd:
        latency_ms = (time.monotonic() - started) * 1000
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
        )
