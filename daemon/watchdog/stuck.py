"""Attempts that run too long: where they wait, and the backstop for the ones that
will not stop.

An analyzer's `timeout_s` is enforced by the worker (a cancel scope), which unwinds
the attempt's stack before anyone sees it. So just before an attempt's timeout this
watch samples its task's stack, and if the attempt then ends as a timeout, logs
`job.timeout` with that stack: where it was waiting. An attempt still running
`stuck_margin_s` after its timeout shields itself or swallows cancellation; it is
logged as `job.stuck` with its stack, recorded as a failed attempt (retried, or
failed at max_attempts) and cancelled, and its slot is freed even if its task
lingers on (`Dispatcher.abandon`)."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import anyio
import structlog

from daemon.backoff import backoff_s
from daemon.jobs import ErrorInfo, Job, State
from daemon.live import Live
from daemon.queue import ActiveAttempt, Dispatcher
from daemon.store.base import AttemptEnd, StoreError
from daemon.wakeup import Wakeup
from daemon.watchdog.introspect import Frame, coro_stack, headline

log = structlog.get_logger("vigil.watchdog")

CHECK_S = 1.0
MAX_LEAD_S = 0.25  # sample this long before the timeout (or a quarter of it, if shorter)


def _lead_s(timeout_s: float) -> float:
    return min(MAX_LEAD_S, timeout_s / 4)


class StuckWatch:
    def __init__(
        self,
        dispatcher: Dispatcher,
        live: Live,
        margin_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._live = live
        self._margin_s = margin_s
        self._rng = rng or random.Random()
        self._samples: dict[tuple[str, int], list[Frame]] = {}  # bounded by `active`
        self._next_wake = math.inf
        self._replan = Wakeup()
        self.abandoned = 0
        self.timeouts_logged = 0

    def attach(self) -> None:
        """Hear of claims (to wake for an earlier deadline) and attempt ends. A claim
        is heard once its attempt's task runs: a pass before that could not sample it,
        and would next look only CHECK_S later, past a short timeout."""
        self._dispatcher.on_claim.append(self._claimed)
        self._dispatcher.on_finish.append(self._finished)

    def _timeout_s(self, job: Job) -> float | None:
        analyzer = self._live.analyzers.get(job.analyzer)
        return None if analyzer is None else analyzer.config.timeout_s

    def _claimed(self, job: Job) -> None:
        timeout = self._timeout_s(job)
        if timeout is not None:
            sample_at = anyio.current_time() + timeout - _lead_s(timeout)
            if sample_at < self._next_wake:
                self._next_wake = sample_at  # kept if heard during a pass (no one waits)
                self._replan.notify()

    def _finished(self, job: Job, end: AttemptEnd, new: State | None) -> None:
        stack = self._samples.pop((job.id, job.attempts), None)
        if stack is None or end.outcome != "timeout":
            return
        self.timeouts_logged += 1
        top = headline(stack)
        log.warning(
            "job.timeout",
            job_id=job.id,
            analyzer=job.analyzer,
            attempt=job.attempts,
            timeout_s=self._timeout_s(job),
            next_state=new,
            file=top.file,
            line=top.line,
            function=top.function,
            stack=[str(f) for f in stack],
        )

    async def run(self) -> None:
        while True:
            self._next_wake = math.inf  # a claim heard while the pass awaits lowers it
            try:
                wake = await self._check()
            except Exception:  # a failed pass must not end the watch (or the daemon)
                log.exception("watchdog.stuck_check_failed")
                wake = anyio.current_time() + CHECK_S
            self._next_wake = wake = min(wake, self._next_wake)
            await self._replan.wait(max(0.0, wake - anyio.current_time()))

    async def _check(self) -> float:
        """One pass over the running attempts; returns when the next is due."""
        now = anyio.current_time()  # the loop's clock, as ActiveAttempt.started and deadlines
        wake = now + CHECK_S
        seen: set[tuple[str, int]] = set()
        for entry in list(self._dispatcher.active.values()):
            timeout = self._timeout_s(entry.job)
            if timeout is None or entry.task is None:
                continue  # not started yet: its start is heard as its claim
            key = (entry.job.id, entry.job.attempts)
            seen.add(key)
            stuck_at = entry.started + timeout + self._margin_s
            if now >= stuck_at:
                await self._abandon(entry, timeout)
                continue
            wake = min(wake, stuck_at)
            if key not in self._samples:
                sample_at = entry.started + timeout - _lead_s(timeout)
                if now < sample_at:
                    wake = min(wake, sample_at)
                elif now < entry.started + timeout:
                    # Not once the deadline passed (a late wake on a busy loop): by
                    # then the stack may have moved on from where the attempt waited.
                    self._samples[key] = coro_stack(entry.task.get_coro())
        for key in self._samples.keys() - seen:
            del self._samples[key]  # ended without a timeout, or requeued
        return wake

    async def _abandon(self, entry: ActiveAttempt, timeout_s: float) -> None:
        job = entry.job
        self._samples.pop((job.id, job.attempts), None)
        stack = coro_stack(entry.task.get_coro()) if entry.task is not None else []
        top = headline(stack)
        age_s = anyio.current_time() - entry.started
        retry_in = None
        if job.attempts < job.max_attempts:
            queue = self._live.config.queue
            retry_in = backoff_s(
                job.attempts, base_s=queue.backoff_base_s, max_s=queue.backoff_max_s, rng=self._rng
            )
        log.error(
            "job.stuck",
            job_id=job.id,
            analyzer=job.analyzer,
            attempt=job.attempts,
            age_s=round(age_s, 2),
            timeout_s=timeout_s,
            margin_s=self._margin_s,
            task=entry.task.get_name() if entry.task is not None else None,
            file=top.file,
            line=top.line,
            function=top.function,
            stack=[str(f) for f in stack],
            action="recorded as a failed attempt and cancelled; its slot is freed",
            retry_in_s=None if retry_in is None else round(retry_in, 2),
            final=retry_in is None,
        )
        end = AttemptEnd(
            outcome="timeout",
            error=ErrorInfo(
                "Stuck",
                f"still running {age_s:.1f} s after it started, past its {timeout_s:g} s "
                "timeout; abandoned",
            ),
            latency_ms=age_s * 1000,
            retry_at=None if retry_in is None else time.time() + retry_in,
        )
        self.abandoned += 1
        try:
            await self._dispatcher.abandon(entry, end)
        except StoreError as exc:  # the job stays `running`; recovery retries it
            log.error("job.record_failed", job_id=job.id, error=str(exc))

    def status(self) -> dict[str, Any]:
        return {
            "margin_s": self._margin_s,
            "abandoned": self.abandoned,
            "lingering": self._dispatcher.lingering,
            "timeouts_with_stack": self.timeouts_logged,
        }
