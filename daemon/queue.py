"""The dispatcher: moves ready jobs from the store into running attempts.

Jobs wait in SQLite, not in memory: the dispatcher claims only as many as there are
free slots (`queue.max_concurrency`), so what is held in memory is bounded by that
number however large the backlog grows. Each claimed job runs in a task of the
dispatcher's own task group, under a cancel scope that `cancel` and shutdown use.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.jobs import ErrorInfo, Job, State
from daemon.store.base import AttemptEnd, Canceled, JobStore, OpFailed, StoreError

log = structlog.get_logger("vigil.queue")
POLL_S = 1.0
CANCEL_POLL_S = 1.0
RECORD_RETRY_MIN_S = 0.05
RECORD_RETRY_MAX_S = 1.0  # also how long a stop may wait for a retrying record
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claimed:
    """When the dispatcher got a batch of jobs from the store, on both clocks: the
    attempts start there (the store stamps `started_at` in the claim), so their phases
    are measured from it. `at` is unix time, as the store's stamps; `mono` monotonic."""

    at: float
    mono: float


# The claim of the attempt a task runs, set by the dispatcher in that task (each task
# has its own context): `execute` takes only the job, and so may any other caller's.
CLAIMED: ContextVar[Claimed | None] = ContextVar("vigil_claimed", default=None)


@dataclass(eq=False)
class ActiveAttempt:
    """One running attempt, as observers (cancel, drain, the watchdog's stuck
    detector) need it: its job, its cancel scope, when it started (the loop's clock, the
    one attempt deadlines are set in: with `time.monotonic` a deadline could fire before
    the stuck watch thought it due, and its sample show the stack past the wait)
    and its task once that runs (asyncio's: the daemon runs on asyncio, and
    `anyio.get_current_task()` costs 20 times more per attempt)."""

    job: Job
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    started: float = field(default_factory=anyio.current_time)
    task: asyncio.Task[Any] | None = None
    abandoned: bool = False  # its end was recorded by `abandon`; the task may linger
    claimed: Claimed | None = None  # when its batch came from the store (its phases)
    interrupted: str | None = None  # stopped to be given back uncounted, for this reason


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        execute: Callable[[Job], Awaitable[AttemptEnd]],
        *,
        max_concurrency: int,
        held_analyzers: Callable[[], tuple[frozenset[str], bool]] = lambda: (frozenset(), False),
        shared: bool = False,
    ) -> None:
        self._store = store
        self._execute = execute
        # Analyzers whose provider refuses calls now, and whether that is all of them:
        # their jobs are not claimed, so they wait without spending attempts.
        self._held_analyzers = held_analyzers
        # A store other daemons share: a job running here may be canceled from there.
        self._shared = shared
        self.max_concurrency = max_concurrency
        self.paused = False
        self.active: dict[str, ActiveAttempt] = {}
        self.lingering = 0  # abandoned attempts whose tasks have not ended yet
        self._stopping = False
        self._idle = anyio.Event()
        self.finished = 0
        self.outcomes: Counter[str] = Counter()  # attempt ends: succeeded, retried, failed
        # Observers (metrics) told at the event; quick, and a failing one is only logged.
        # A claim is told once its attempt's task runs: observers (the stuck watch) can
        # then see that task in `active`.
        self.on_claim: list[Callable[[Job], None]] = []
        self.on_finish: list[Callable[[Job, AttemptEnd, State | None], None]] = []
        self.on_cancel: list[Callable[[Canceled], None]] = []

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._store.wakeup.notify()

    def set_max_concurrency(self, value: int) -> None:
        self.max_concurrency = value
        self._store.wakeup.notify()

    def job_canceled(self, job_id: str, canceled: Canceled) -> None:
        """The store has marked the job canceled: stop its attempt if one runs (its
        end is not recorded again), and tell the observers."""
        entry = self.active.get(job_id)
        if canceled.was == "running" and entry is not None:
            entry.scope.cancel()
        _observe(self.on_cancel, canceled)

    async def abandon(self, entry: ActiveAttempt, end: AttemptEnd) -> State | None:
        """Give up on an attempt that did not end when it should have (it shields
        itself or swallows cancellation): record `end` for it now, free its slot,
        and cancel it. Whatever its task does later is ignored; the store's guard on
        (running, attempt number) keeps the job's record exact."""
        if entry.abandoned or self.active.get(entry.job.id) is not entry:
            return None
        entry.abandoned = True
        del self.active[entry.job.id]
        self.lingering += 1
        entry.scope.cancel()
        self.finished += 1
        try:
            with anyio.CancelScope(shield=True):
                new = await self._store.finish(entry.job, end)
        finally:
            self._store.wakeup.notify()
            if self._stopping and not self.active:
                self._idle.set()
        self._ended(entry.job, end, new)
        return new

    def _ended(self, job: Job, end: AttemptEnd, new: State | None) -> None:
        """An attempt's end is recorded: count it, say a job's final failure loudly
        (once, at warning: journald priority filters and `logs --level warning` show
        it), and tell the observers."""
        if end.outcome == "rate_limited":
            self.outcomes["rate_limited"] += 1
        else:
            self.outcomes["retried" if new == "queued" else str(new)] += 1
        if new == "failed":
            error = end.error
            log.warning(
                "job.failed",
                job_id=job.id,
                analyzer=job.analyzer,
                attempt=job.attempts,
                attempts=job.attempts,
                error_type=error.type if error else None,
                error=error.message if error else None,
            )
        _observe(self.on_finish, job, end, new)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            follow = anyio.CancelScope()
            if self._shared:
                tg.start_soon(self._follow_cancels, follow, name="queue.cancels")
            while not self._stopping:
                free = self.max_concurrency - len(self.active)
                if self.paused or free <= 0:
                    await self._store.wakeup.wait(POLL_S)
                    continue
                held, everything = self._held_analyzers()
                if everything:
                    await self._store.wakeup.wait(POLL_S)
                    continue
                try:
                    jobs = await self._store.claim(free, held)
                except StoreError as exc:
                    log.error("queue.claim_failed", error=str(exc))
                    await anyio.sleep(POLL_S)
                    continue
                claimed = Claimed(time.time(), time.monotonic()) if jobs else None
                for job in jobs:
                    entry = ActiveAttempt(job, claimed=claimed)
                    self.active[job.id] = entry
                    tg.start_soon(self._run_one, entry, name=f"job {job.id}")
                if not jobs:
                    await self._store.wakeup.wait(await self._until_next_retry())
            follow.cancel()
            # Stopping: running attempts belong to drain(); wait for them here.
            if self.active:
                await self._idle.wait()

    async def _follow_cancels(self, scope: anyio.CancelScope) -> None:
        """On a shared store `cancel` may come from another node: the job is marked
        canceled there, and its attempt here is stopped at the next look (each
        CANCEL_POLL_S), its end not recorded again. And a node cut off from the store
        for a lease gives its running attempts up: others may be running them now."""
        with scope:
            while True:
                await anyio.sleep(CANCEL_POLL_S)
                if not self.active:
                    continue
                cut_off = self._store.cut_off
                if cut_off is not None:
                    self._interrupt_all(cut_off)
                    continue
                try:
                    states = await self._store.states_of(list(self.active))
                except StoreError:
                    continue  # the store's own health says why
                for job_id, state in states.items():
                    entry = self.active.get(job_id)
                    if state == "canceled" and entry is not None:
                        log.info("job.canceled_elsewhere", job_id=job_id)
                        entry.scope.cancel()

    def _interrupt_all(self, reason: str) -> None:
        """Stop every running attempt and give it back uncounted once the store takes
        the write (the record retries until then): another node may be running them."""
        running = [e for e in self.active.values() if e.interrupted is None and not e.abandoned]
        if running:
            log.warning("queue.cut_off", reason=reason, attempts=len(running))
        for entry in running:
            entry.interrupted = f"given up: {reason}"
            entry.scope.cancel()

    async def _until_next_retry(self) -> float:
        """How long to sleep when nothing could be claimed: until the next job waiting
        for its retry time, at most POLL_S. Jobs already due yet not claimed belong to
        held analyzers (their provider refuses calls): no reason to wake early; the
        provider's recovery wakes the loop itself."""
        now = time.time()
        try:
            wake = await self._store.next_wake(after=now)
        except StoreError:  # a shared store away for a moment: the claim says so
            return POLL_S
        return POLL_S if wake is None else min(POLL_S, max(0.01, wake - now))

    async def _run_one(self, entry: ActiveAttempt) -> None:
        job, scope = entry.job, entry.scope
        entry.task = asyncio.current_task()
        CLAIMED.set(entry.claimed)
        _observe(self.on_claim, job)
        try:
            with scope:
                end = await self._execute(job)
            if entry.abandoned:
                return  # `abandon` recorded this attempt's end already
            with anyio.CancelScope(shield=True):
                if scope.cancelled_caught:
                    if entry.interrupted is not None:
                        reason = entry.interrupted
                        await self._until_written(job, lambda: self._store.requeue([job], reason))
                    elif self._stopping:
                        await self._store.requeue([job], "daemon shutting down")
                    # else: `cancel` already marked it canceled in the store.
                elif end.outcome == "deferred":
                    reason = end.error.message if end.error else "deferred"
                    await self._until_written(
                        job,
                        lambda: self._store.requeue(
                            [job], reason, outcome="deferred", not_before=end.retry_at or 0.0
                        ),
                    )
                    self.outcomes["deferred"] += 1
                else:
                    end, new = await self._record(job, end)
                    self._ended(job, end, new)
        except anyio.get_cancelled_exc_class():
            # Cancelled from outside (forced stop): give the attempt back. A store that
            # cannot take it now leaves the job `running`: recovery counts it later.
            with anyio.CancelScope(shield=True):
                try:
                    await self._store.requeue([job], "daemon stopped")
                except StoreError as exc:
                    log.error("job.record_failed", job_id=job.id, error=str(exc))
            raise
        except Exception as exc:  # a store fault or an unencodable result
            # The job stays `running` in the database; recovery retries it.
            log.error("job.record_failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
        finally:
            if entry.abandoned:
                self.lingering -= 1
            else:
                if self.active.get(job.id) is entry:
                    del self.active[job.id]
                self.finished += 1
            self._store.wakeup.notify()
            if self._stopping and not self.active:
                self._idle.set()

    async def _record(self, job: Job, end: AttemptEnd) -> tuple[AttemptEnd, State | None]:
        """Write the attempt's end. When the store refuses this very record (a value
        SQLite will not take), the attempt is recorded as failed for that reason, so
        the job ends instead of staying `running` until a restart."""
        try:
            return end, await self._until_written(job, lambda: self._store.finish(job, end))
        except OpFailed as exc:
            log.error("job.record_refused", job_id=job.id, error=str(exc))
            failed = AttemptEnd(
                outcome="error",
                error=ErrorInfo("RecordFailed", f"the outcome could not be stored: {exc}"[:1000]),
                http_status=end.http_status,
                latency_ms=end.latency_ms,
                phases=end.phases,
            )
            return failed, await self._until_written(job, lambda: self._store.finish(job, failed))

    async def _until_written(self, job: Job, write: Callable[[], Awaitable[T]]) -> T:
        """The record of an attempt that has ended, retried while the store refuses
        writes (locked, disk full, read-only) until it takes them or the daemon stops:
        the outcome is in hand, and giving up would leave the job `running` until the
        next restart. The attempt keeps its slot meanwhile: no new claims pile up.
        A write refused for itself (OpFailed) would fail the same way again: raised."""
        delay_s = RECORD_RETRY_MIN_S
        while True:
            try:
                return await write()
            except StoreError as exc:
                if self._stopping or isinstance(exc, OpFailed):
                    raise
                if delay_s == RECORD_RETRY_MIN_S:  # once per job: a fault may last a while
                    log.warning("job.record_retry", job_id=job.id, error=str(exc))
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECORD_RETRY_MAX_S)

    async def drain(self, grace_s: float) -> int:
        """Stop claiming, let running attempts finish for up to `grace_s`, then cancel
        and requeue the rest; returns how many were cut short."""
        self._stopping = True
        self._store.wakeup.notify()
        if not self.active:
            self._idle.set()
        with anyio.move_on_after(grace_s):
            await self._idle.wait()
        cut = len(self.active)
        if cut:
            log.warning("queue.drain_timeout", grace_s=grace_s, requeued=cut)
            for entry in list(self.active.values()):
                entry.scope.cancel()
            await self._idle.wait()
        return cut


def _observe(hooks: Iterable[Callable[..., None]], *args: object) -> None:
    for hook in hooks:
        try:
            hook(*args)
        except Exception:  # an observer's bug must not touch the job
            log.exception("queue.observer_failed", observer=getattr(hook, "__qualname__", "?"))
