"""Turning what a client sent into committed jobs, the same way for every intake.

Validation happens before anything is written, and a batch is inserted in one
transaction: a request is accepted whole or refused whole, never half written."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import msgspec

from daemon.intake.metadata import resolve_not_before, tag_set
from daemon.jobs import NAME_PATTERN, JobIds, JobSubmit
from daemon.live import Live
from daemon.store.base import JobStore, NewJob, Submitted

MAX_JOBS_PER_REQUEST = 10_000
VALIDATE_INLINE_MAX = 100  # longer lists are validated in a worker thread
MAX_INPUT_DEPTH = 64
"""Nesting levels an input may have: deeper ones could be taken in yet never be encoded
again (the JSON codec's own depth limit sits near 1000, less the caller's stack)."""
PRIORITY_RANGE = range(-(2**63), 2**63)  # what SQLite's INTEGER holds


class FieldError(msgspec.Struct, frozen=True):
    index: int | None
    field: str
    message: str


class SubmitError(Exception):
    """The submission is invalid; `errors` names each field at fault."""

    def __init__(self, errors: list[FieldError]) -> None:
        first = errors[0]
        where = f"job {first.index}: " if first.index is not None else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{where}{first.field}: {first.message}{more}")
        self.errors = errors


class IntakeClosed(Exception):
    """The daemon is draining or stopping and takes no new work."""


_NAME_MISMATCH = f"Expected `str` matching regex '{NAME_PATTERN}'"  # tags, batch
# msgspec names these fields in the message, not the path (the path is their object's).
_OBJECT_FAULTS = (
    ("Object missing required field", "required"),
    ("Object contains unknown field", "unknown field"),
)


def field_error(exc: msgspec.ValidationError, index: int | None, whole: str) -> FieldError:
    """msgspec's "<message> - at `$.<path>`" as the field error every surface shows
    (`{"index", "field", "message"}`); `whole` names the value itself (a job, a
    command's arguments) when no field is at fault."""
    message, _, path = str(exc).partition(" - at `$")
    field = path.rstrip("`").lstrip(".")
    for prefix, short in _OBJECT_FAULTS:
        if message.startswith(prefix):
            name = message.split("`")[1]
            field, message = f"{field}.{name}" if field else name, short
    message = message.replace(_NAME_MISMATCH, "only letters, digits and _ . : - are allowed")
    return FieldError(index, field or whole, message)


def _convert(raw: Any, index: int | None) -> JobSubmit | FieldError:
    try:
        return msgspec.convert(raw, JobSubmit)
    except msgspec.ValidationError as exc:
        return field_error(exc, index, "job")


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        if level <= MAX_INPUT_DEPTH:  # past the limit the answer is known
            stack.extend((child, level + 1) for child in item)
    return deepest


class Intake:
    """Validates and submits jobs; reads the live analyzers and limits on each call,
    so a reload applies to the next request."""

    def __init__(self, store: JobStore, live: Live) -> None:
        self._store = store
        self._live = live
        self._ids = JobIds()
        self.closed_reason: str | None = None
        # Jobs committed, by analyzer (names validated against the config, so the
        # metrics' label set stays bounded); repeats of an idempotency key not counted.
        self.accepted_by_analyzer: Counter[str] = Counter()

    @property
    def accepted(self) -> int:
        return self.accepted_by_analyzer.total()

    def validate(self, raw: Any, source: str) -> list[NewJob]:
        items, single = (raw, False) if isinstance(raw, list) else ([raw], True)
        if not items:
            raise SubmitError([FieldError(None, "jobs", "empty list")])
        if len(items) > MAX_JOBS_PER_REQUEST:
            raise SubmitError(
                [
                    FieldError(
                        None,
                        "jobs",
                        f"{len(items)} jobs; at most {MAX_JOBS_PER_REQUEST} per request",
                    )
                ]
            )
        analyzers = self._live.analyzers
        limits = self._live.config.queue
        jobs: list[NewJob] = []
        errors: list[FieldError] = []
        now = time.time()  # one `now` for every relative not_before of the request
        for i, item in enumerate(items):
            index = None if single else i
            converted = _convert(item, index)
            if isinstance(converted, FieldError):
                errors.append(converted)
                continue
            analyzer = analyzers.get(converted.analyzer)
            if analyzer is None:
                known = ", ".join(sorted(analyzers)) or "none configured"
                errors.append(
                    FieldError(
                        index,
                        "analyzer",
                        f"unknown analyzer {converted.analyzer!r} (known: {known})",
                    )
                )
                continue
            if _depth(converted.input) > MAX_INPUT_DEPTH:
                message = f"nested deeper than {MAX_INPUT_DEPTH} levels"
                errors.append(FieldError(index, "input", message))
                continue
            size = len(msgspec.json.encode(converted.input))
            if size > limits.max_input_bytes:
                errors.append(
                    FieldError(
                        index,
                        "input",
                        f"{size} bytes; the limit is {limits.max_input_bytes} "
                        "(queue.max_input_bytes)",
                    )
                )
                continue
            if converted.priority not in PRIORITY_RANGE:
                errors.append(FieldError(index, "priority", "out of range (a 64-bit integer)"))
                continue
            try:
                not_before = resolve_not_before(converted.not_before, now)
            except ValueError as exc:
                errors.append(FieldError(index, "not_before", str(exc)))
                continue
            errors.extend(FieldError(index, f, m) for f, m in analyzer.problems(converted.input))
            jobs.append(
                NewJob(
                    id=self._ids.new(),
                    analyzer=converted.analyzer,
                    input=converted.input,
                    priority=converted.priority,
                    idempotency_key=converted.idempotency_key,
                    max_attempts=analyzer.config.max_attempts,
                    source=source,
                    tags=tag_set(converted.tags),
                    batch=converted.batch,
                    not_before=not_before,
                )
            )
        if errors:
            raise SubmitError(errors)
        return jobs

    async def submit(self, raw: Any, source: str) -> list[Submitted]:
        """Validate, then commit; returns only once the jobs are durable."""
        if self.closed_reason:
            raise IntakeClosed(f"not accepting jobs: {self.closed_reason}")
        if isinstance(raw, list) and len(raw) > VALIDATE_INLINE_MAX:
            # Thousands of jobs are tens of milliseconds of CPU: in a thread, the loop
            # gets the GIL back every switch interval and running attempts, status and
            # other clients are not held up for the whole batch.
            jobs = await anyio.to_thread.run_sync(self.validate, raw, source)
        else:
            jobs = self.validate(raw, source)
        submitted = await self._store.submit(jobs, max_backlog=self._live.config.queue.max_backlog)
        self.accepted_by_analyzer.update(
            job.analyzer for job, s in zip(jobs, submitted, strict=True) if s.created
        )
        return submitted
