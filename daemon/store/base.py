"""What every job store shares, whatever holds the jobs: the records and errors the
rest of the daemon sees, and the interface (`JobStore`) the dispatcher, the worker,
intake and the control commands use. SQLite (sqlite.py) is the embedded default;
PostgreSQL (postgres.py) lets several daemons share one queue."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import msgspec
from msgspec.structs import astuple

from daemon import __version__
from daemon.errors import StartupError
from daemon.jobs import Attempt, CallRecord, ErrorInfo, Job, Phases, State, Usage
from daemon.providers.limits import SharedRates
from daemon.providers.shared_state import SharedProviderState
from daemon.store.calls import SpendDay as SpendDay  # the protocol's records, re-exported
from daemon.store.calls import UsageQuery as UsageQuery
from daemon.store.calls import UsageRow as UsageRow
from daemon.store.filters import BulkAction, BulkRow, JobFilter
from daemon.store.outbox import (
    Cursor,
    Delivery,
    DeliveryEnd,
    EventPage,
    WebhookCounts,
    WebhookRoute,
)
from daemon.wakeup import Wakeup

PROCESS_DIED = ErrorInfo("ProcessDied", "process died during the attempt")
JOB_COLUMNS = (
    "id, analyzer, input, priority, idempotency_key, state, attempts, max_attempts, "
    "not_before, created_at, started_at, finished_at, result, error_type, error_message, "
    "prompt_tokens, completion_tokens, cost, source, rate_limited, cached_tokens, "
    "cache_write_tokens, tags, batch"
)


class StoreError(Exception):
    """The database refused a write (full, read-only, locked, corrupt)."""


class OpFailed(StoreError):
    """One operation failed on its own (a constraint, a value SQLite refuses): the
    database is fine and trying the same write again fails the same way."""


class StoreOpenError(StartupError):
    """The database cannot be opened, migrated or recovered (locked, read-only...)."""


class StoreRefused(StoreOpenError):
    """A store that will not work until a human changes something (a schema newer than
    this code, a node name another daemon holds, a refused password): exit 78, so
    systemd does not restart-loop on it."""

    exit_code = 78


class BacklogFull(Exception):
    """Intake would push the queued backlog past `queue.max_backlog`."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"backlog full: {queued} jobs queued, limit {limit}")
        self.queued = queued
        self.limit = limit


class JobNotFound(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")


class IdempotencyConflict(Exception):
    """An idempotency key already names a job with another analyzer, input, tags or
    batch."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} already names job {job_id} with a different "
            "analyzer, input, tags or batch; use a new key for a new job"
        )
        self.key = key
        self.job_id = job_id


# What `same_job` reads of the job that holds an idempotency key.
KEYED_COLUMNS = "id, analyzer, input, tags, batch"


def same_job(
    job: NewJob,
    existing_id: str,
    analyzer: str,
    input_json: str | bytes,
    tags_json: str | None,
    batch: str | None,
) -> Submitted:
    """The first job of `job`'s idempotency key (its KEYED_COLUMNS), if it is the same
    job: analyzer, input (whatever the order of keys), tags and batch. `not_before`
    is not compared: a delay (`+30m`) resent later names another time, and the first
    job's start stands. Else IdempotencyConflict."""
    if (
        analyzer != job.analyzer
        or batch != job.batch
        or decode_tags(tags_json) != job.tags
        or msgspec.json.decode(input_json) != job.input
    ):
        raise IdempotencyConflict(job.idempotency_key or "", existing_id)
    return Submitted(existing_id, False)


def job_row(job: NewJob, now: float) -> tuple[Any, ...]:
    """A new job's values in the order both stores insert them: id, analyzer, input,
    priority, idempotency_key, max_attempts, created_at, source, tags, batch, not_before."""
    return (
        job.id,
        job.analyzer,
        msgspec.json.encode(job.input).decode(),
        job.priority,
        job.idempotency_key,
        job.max_attempts,
        now,
        job.source,
        encode_tags(job.tags),
        job.batch,
        job.not_before,
    )


def encode_tags(tags: Sequence[str]) -> str | None:
    """Tags as the jobs table keeps them: a JSON list, NULL for none."""
    return msgspec.json.encode(list(tags)).decode() if tags else None


def decode_tags(text: str | None) -> tuple[str, ...]:
    return tuple(msgspec.json.decode(text)) if text else ()


class InvalidTransition(Exception):
    """The job is not in a state that allows the asked-for change."""


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    """A validated job ready to be inserted."""

    id: str
    analyzer: str
    input: dict[str, Any]
    priority: int
    idempotency_key: str | None
    max_attempts: int
    source: str
    tags: tuple[str, ...] = ()  # sorted, each once (intake.metadata.tag_set)
    batch: str | None = None
    not_before: float = 0.0  # a delayed start (unix time); 0: none


class Submitted(msgspec.Struct, frozen=True):
    id: str
    created: bool


class AttemptEnd(msgspec.Struct, frozen=True, kw_only=True):
    """How an attempt ended; the worker decides, the store records it atomically."""

    # deferred: refused before any request (provider paused, circuit open): the
    # dispatcher gives the attempt back instead of recording it (see `requeue`).
    # rate_limited: a 429 (the request was not processed): recorded, the attempt given
    # back, the job's own 429 count raised; it waits queued until `retry_at`.
    outcome: Literal["succeeded", "error", "timeout", "canceled", "deferred", "rate_limited"]
    result: Any = None
    usage: Usage | None = None
    http_status: int | None = None
    error: ErrorInfo | None = None
    latency_ms: float | None = None
    retry_at: float | None = None  # set: requeue for then; unset on failure: dead letter
    answer: str | None = None  # a failed attempt's model answer (bounded by the worker)
    calls: tuple[CallRecord, ...] = ()  # the API calls it made that were answered
    stop_reason: str | None = None  # why the last answer ended ("max_tokens": cut there)
    phases: Phases | None = None  # where the attempt's time went


class Canceled(msgspec.Struct, frozen=True):
    """A job `cancel` ended: the state it was in, and its analyzer (for the metrics)."""

    was: State
    analyzer: str


def row_to_job(row: Sequence[Any]) -> Job:
    """A job from its JOB_COLUMNS, as either backend returns them."""
    (
        jid,
        analyzer,
        inp,
        priority,
        key,
        state,
        attempts,
        max_attempts,
        not_before,
        created,
        started,
        finished,
        result,
        etype,
        emsg,
        ptok,
        ctok,
        cost,
        source,
        rate_limited,
        cached,
        written,
        tags,
        batch,
    ) = row
    return Job(
        id=jid,
        analyzer=analyzer,
        input=msgspec.json.decode(inp),
        priority=priority,
        idempotency_key=key,
        state=state,
        attempts=attempts,
        max_attempts=max_attempts,
        not_before=not_before,
        created_at=created,
        started_at=started,
        finished_at=finished,
        result=msgspec.json.decode(result) if result is not None else None,
        error=ErrorInfo(etype, emsg or "") if etype else None,
        usage=usage_of(ptok, ctok, cost, cached, written),
        source=source,
        rate_limited=rate_limited,
        tags=decode_tags(tags),
        batch=batch,
    )


def usage_of(
    ptok: int | None,
    ctok: int | None,
    cost: float | None,
    cached: int | None = None,
    written: int | None = None,
) -> Usage | None:
    if ptok is None and ctok is None:
        return None
    return Usage(
        prompt_tokens=ptok or 0,
        completion_tokens=ctok or 0,
        cached_tokens=cached or 0,
        cache_write_tokens=written or 0,
        cost=cost,
    )


class EndValues(NamedTuple):
    """What both stores write for an attempt's end, worked out once."""

    result_json: str | None  # encoded before any write: unencodable fails the op cleanly
    error_type: str | None
    error_message: str | None
    given_back: int  # 1 for a 429: the request was not processed, the attempt returns
    prompt_tokens: int  # added to the job's totals
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cost: float | None
    attempt_prompt_tokens: int | None  # the attempt's own, None without an answer
    attempt_completion_tokens: int | None
    attempt_cached_tokens: int | None
    attempt_cache_write_tokens: int | None
    phases_json: str | None

    @classmethod
    def of(cls, end: AttemptEnd) -> EndValues:
        error, usage = end.error, end.usage
        return cls(
            None if end.result is None else msgspec.json.encode(end.result).decode(),
            error.type if error else None,
            error.message if error else None,
            1 if end.outcome == "rate_limited" else 0,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            usage.cached_tokens if usage else 0,
            usage.cache_write_tokens if usage else 0,
            usage.cost if usage else None,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
            usage.cached_tokens if usage else None,
            usage.cache_write_tokens if usage else None,
            None if end.phases is None else _encode_phases(astuple(end.phases)).decode(),
        )


def next_state(job: Job, end: AttemptEnd) -> State:
    """Where an attempt's end takes its job: succeeded; queued again (a retry with an
    attempt left, or a 429, which spends none); else failed."""
    if end.outcome == "succeeded":
        return "succeeded"
    if end.outcome == "rate_limited":
        return "queued"
    if end.retry_at is not None and job.attempts < job.max_attempts:
        return "queued"
    return "failed"


ATTEMPT_COLUMNS = (
    "n, started_at, finished_at, outcome, http_status, error_type, error_message, "
    "latency_ms, prompt_tokens, completion_tokens, cost, answer, cached_tokens, "
    "cache_write_tokens, stop_reason, phases"
)
# Phases are stored as a bare list, [queue, slot, budget, cooldown, api, record] in ms:
# a third of the object's bytes, on every attempt's row.
_encode_phases = msgspec.json.Encoder().encode
# (An object: a row written by an earlier build.)
_Stored = tuple[float, float, float, float, float, float] | Phases
_decode_phases = msgspec.json.Decoder(_Stored).decode
PHASES = Phases.__struct_fields__


def row_to_attempt(row: Sequence[Any]) -> Attempt:
    """An attempt from its ATTEMPT_COLUMNS, as either backend returns them."""
    (
        n,
        started,
        finished,
        outcome,
        status,
        etype,
        emsg,
        latency,
        ptok,
        ctok,
        cost,
        answer,
        cached,
        written,
        stop_reason,
        phases,
    ) = row
    return Attempt(
        n=n,
        started_at=started,
        finished_at=finished,
        outcome=outcome,
        http_status=status,
        error=ErrorInfo(etype, emsg or "") if etype else None,
        latency_ms=latency,
        usage=usage_of(ptok, ctok, cost, cached, written),
        answer=answer,
        stop_reason=stop_reason,
        phases=None if phases is None else _phases_of(phases),
    )


def _phases_of(text: str) -> Phases:
    stored = _decode_phases(text)
    if isinstance(stored, Phases):
        return stored
    return Phases(**dict(zip(PHASES, stored, strict=True)))


class TableStats(msgspec.Struct, frozen=True):
    bytes: int
    dead_tuples: int


class Node(msgspec.Struct, frozen=True, kw_only=True):
    """One daemon sharing the store (`vigil status` lists them)."""

    name: str
    host: str
    pid: int
    version: str
    alive: bool
    heartbeat_age_s: float
    running: int

    @classmethod
    def this_daemon(cls, running: int) -> Node:
        """This process, alive (what a store nobody shares reports)."""
        host = socket.gethostname()
        return cls(
            name=host,
            host=host,
            pid=os.getpid(),
            version=__version__,
            alive=True,
            heartbeat_age_s=0.0,
            running=running,
        )


ClusterCommand = Literal["pause", "resume", "drain"]


class Cluster(Protocol):
    """Commands given to every daemon sharing the store (`--cluster`)."""

    on_command: Callable[[ClusterCommand], Awaitable[None]] | None  # how this node obeys

    async def broadcast(self, cmd: ClusterCommand) -> None:
        """Every node, this one included, applies `cmd` within about a second."""
        ...


class JobStore(Protocol):
    """The store as the rest of the daemon uses it. Writes return once committed: an
    acknowledgement to a client is a promise."""

    counts: Counter[str]  # jobs by state (the whole cluster's, on a shared store)
    recovered: dict[str, int]  # what start-up recovery requeued and failed
    wakeup: Wakeup  # a commit made jobs ready (others may poke it too)
    commits: int
    commit_errors: int
    commit_seconds: float
    last_error: str | None  # set while writes fail
    refused_finishes: int  # finishes fenced out: the attempt no longer owned its job

    @property
    def cut_off(self) -> str | None:
        """Why this daemon must give up its running attempts now (a shared store it has
        not reached for a lease: another node may have taken them over), or None."""
        ...

    low_space: str | None  # set while the disk is nearly full
    rates: SharedRates | None  # budgets the cluster's nodes share; None: one daemon
    provider_state: SharedProviderState | None  # breakers and pauses, likewise
    cluster: Cluster | None  # commands for every node; None: one daemon

    @property
    def location(self) -> str:
        """Where the jobs live, for status and logs (a path, or a URL without password)."""
        ...

    async def submit(self, jobs: Sequence[NewJob], *, max_backlog: int) -> list[Submitted]: ...

    async def claim(self, limit: int, skip_analyzers: Collection[str] = ()) -> list[Job]: ...

    async def finish(self, job: Job, end: AttemptEnd) -> State | None: ...

    async def requeue(
        self,
        jobs: Iterable[Job],
        reason: str,
        *,
        outcome: Literal["interrupted", "deferred"] = "interrupted",
        not_before: float = 0.0,
    ) -> int: ...

    async def cancel(self, job_id: str) -> Canceled: ...

    async def retry(self, job_ids: Sequence[str] | None, *, max_backlog: int) -> int: ...

    async def purge(self, older_than_s: float) -> int: ...

    async def bulk_step(
        self, action: BulkAction, flt: JobFilter, *, limit: int, max_backlog: int
    ) -> list[BulkRow]:
        """One batch of a bulk action: up to `limit` jobs matching `flt` changed in one
        transaction, with what they were (`store.bulk.run_bulk` drives the batches)."""
        ...

    async def count_jobs(self, flt: JobFilter) -> dict[str, int]:
        """Jobs matching `flt`, by state (states with none left out)."""
        ...

    async def find_ids(self, flt: JobFilter, limit: int) -> list[str]:
        """The first `limit` ids matching `flt`, oldest first."""
        ...

    async def spend_since(self, day: str) -> list[SpendDay]:
        """Spend per provider and analyzer per UTC day from `day` (YYYY-MM-DD) on."""
        ...

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        """The stored calls, summed by the query's grouping (`vigil usage`)."""
        ...

    async def probe(self) -> None: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def get_by_idempotency_key(self, key: str) -> Job | None: ...

    async def attempts(self, job_id: str) -> list[Attempt]: ...

    async def list_jobs(
        self, flt: JobFilter | None = None, *, limit: int = 50, walk: bool = False
    ) -> list[Job]:
        """The jobs `flt` matches (None: all), newest first, at most `limit`; `walk`:
        read along the ids (a reader paging through every match: an export)."""
        ...

    async def states_of(self, job_ids: Sequence[str]) -> dict[str, State]: ...

    async def next_wake(self, after: float = 0.0) -> float | None:
        """When the earliest queued job waiting past `after` becomes ready (unix time)."""
        ...

    async def queued_of(self, analyzers: Sequence[str]) -> dict[str, int]:
        """Queued jobs of each of these analyzers (those a reached budget holds)."""
        ...

    async def events_after(self, after: Cursor, limit: int) -> EventPage:
        """Up to `limit` job ends after `after`, in order; CursorExpired if retention
        pruned some after it."""
        ...

    async def events_head(self) -> Cursor:
        """The newest event's cursor (a watch from now on starts there)."""
        ...

    async def prune_events(self, before: float) -> int:
        """One batch of the oldest events that ended before `before`, deleted."""
        ...

    async def prune_deliveries(self, state: str, before: float) -> int:
        """One batch of `state` (delivered, dead) deliveries ended before `before`."""
        ...

    async def sync_webhooks(self, routes: Sequence[WebhookRoute]) -> None:
        """The configured webhooks, which the store matches each job's end against."""
        ...

    async def claim_deliveries(self, webhook: str, limit: int, lease_s: float) -> list[Delivery]:
        """Up to `limit` due deliveries of `webhook`, each attempt counted and held
        for `lease_s` (unended by then, it is due again: at-least-once)."""
        ...

    async def end_delivery(self, delivery_id: str, end: DeliveryEnd) -> None: ...

    async def next_delivery_at(self, webhook: str) -> float | None: ...

    async def webhook_counts(self) -> dict[str, WebhookCounts]: ...

    async def retry_dead(self, webhook: str) -> int: ...

    def nodes(self) -> list[Node]:
        """The daemons sharing this store, as last seen (no I/O: status is synchronous)."""
        ...

    def table_stats(self) -> dict[str, TableStats]:
        """Size and dead rows of the hot tables, as last read (PostgreSQL; {} on SQLite)."""
        ...
