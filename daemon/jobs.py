"""Job records: what a client submits, what the store keeps, and their ids."""

from __future__ import annotations

import os
import threading
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

State = Literal["queued", "running", "succeeded", "failed", "canceled"]
STATES: tuple[State, ...] = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


# Per-job metadata (README "Jobs"): tags and a batch id, names from one alphabet.
NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"
MAX_TAGS = 8
Tag = Annotated[str, Meta(min_length=1, max_length=40, pattern=NAME_PATTERN)]
BatchId = Annotated[str, Meta(min_length=1, max_length=100, pattern=NAME_PATTERN)]
LATEST_TIME = 253_402_300_800.0  # 10000-01-01: later unix times are refused
UnixTime = Annotated[float, Meta(ge=0, le=LATEST_TIME)]


class JobSubmit(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A job as a client sends it; only `analyzer` and `input` are required.
    `not_before` is a unix time or text (`+30m`, ISO 8601) that intake resolves."""

    analyzer: str
    input: dict[str, Any]
    priority: int = 0
    idempotency_key: str | None = None
    tags: Annotated[tuple[Tag, ...], Meta(max_length=MAX_TAGS)] = ()
    batch: BatchId | None = None
    not_before: float | str | None = None


class ErrorInfo(msgspec.Struct, frozen=True):
    type: str
    message: str


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens billed and their cost. `prompt_tokens` counts every input token; of
    them, `cached_tokens` were read from a prompt cache and `cache_write_tokens`
    written to one (Anthropic), each priced apart when prices say so."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost: float | None = None

    def __add__(self, other: Usage) -> Usage:
        cost = (
            None
            if self.cost is None and other.cost is None
            else ((self.cost or 0.0) + (other.cost or 0.0))
        )
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            cost=cost,
        )


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One answered API call: what it used and cost, and for whom. Stored with its
    attempt's end; spend and `vigil usage` are drawn from these."""

    at: float  # unix time of the answer
    job_id: str
    attempt: int
    analyzer: str
    provider: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: int
    cost: float | None  # None: the provider has no prices


class Phases(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where an attempt's time went, in milliseconds. `queue_ms` came before the attempt
    (ready, the later of created and not_before, to claimed); the others add up to its
    duration (claimed to its end): a concurrency slot (the worker's start included), the
    provider's request/token budget (a slot held by callers waiting for it included), a
    429 cool-down or the breaker's probe, the API calls themselves, and the rest
    (parsing, checking, a handler's own code, recording). Measured by daemon/worker.py
    and the provider (daemon/providers/phases.py)."""

    queue_ms: float = 0.0
    slot_ms: float = 0.0
    budget_ms: float = 0.0
    cooldown_ms: float = 0.0
    api_ms: float = 0.0
    record_ms: float = 0.0


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    n: int
    started_at: float
    finished_at: float | None = None
    outcome: str = "running"
    http_status: int | None = None
    error: ErrorInfo | None = None
    latency_ms: float | None = None
    usage: Usage | None = None  # what the attempt's answers were billed, failed ones too
    answer: str | None = None  # a failed attempt's last model answer, cut to ANSWER_MAX_CHARS
    stop_reason: str | None = None  # why the last answer ended ("max_tokens": cut there)
    phases: Phases | None = None  # None: an attempt recorded before phases were


ANSWER_MAX_CHARS = 4096


class Job(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    analyzer: str
    input: dict[str, Any]
    priority: int
    idempotency_key: str | None
    state: State
    attempts: int
    max_attempts: int
    not_before: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: Any
    error: ErrorInfo | None
    usage: Usage | None
    source: str
    rate_limited: int = 0  # 429s met, which spend no attempt (bounded apart)
    tags: tuple[str, ...] = ()  # sorted, no repeats
    batch: str | None = None


class JobIds:
    """UUIDv7 ids: time-ordered, so `ORDER BY id` is submission order, and unique
    across restarts without coordination. Monotonic within one process: in the same
    millisecond (or after a clock step back) the 74 random bits count up instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms = 0
        self._rand = 0

    def new(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._ms:
                self._ms, self._rand = ms, int.from_bytes(os.urandom(10), "big") >> 8
            else:
                self._rand += 1
            ms, rand = self._ms, self._rand
        rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
        value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0x2 << 62) | rand_b
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
