"""The SQL of a job's way through a shared store: submit (one statement for jobs with
no key), the claim (SKIP LOCKED, counting the attempt) and the fenced record of an
attempt's end."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

import msgspec

from daemon.jobs import Job, State
from daemon.store.base import JOB_COLUMNS, AttemptEnd, NewJob, Submitted, row_to_job
from daemon.store.pg_nodes import CHANNEL

_INSERT_KEYED = (
    "INSERT INTO jobs (id, analyzer, input, priority, idempotency_key, state, max_attempts, "
    "created_at, source) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8) "
    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)
_RETURNING = ", ".join(f"j.{column.strip()}" for column in JOB_COLUMNS.split(","))


async def claim(conn: Any, node: str, limit: int, skip_analyzers: Collection[str]) -> list[Job]:
    """Up to `limit` ready jobs, highest priority then oldest, moved to `running` on
    `node` with their attempt counted and recorded, in one statement; nodes claiming
    together skip each other's rows instead of waiting on them."""
    now = time.time()
    rows = await conn.fetch(
        "WITH picked AS MATERIALIZED (SELECT id FROM jobs WHERE state = 'queued' "
        "AND not_before <= $1 AND NOT (analyzer = ANY($2)) "
        "ORDER BY priority DESC, id LIMIT $3 FOR UPDATE SKIP LOCKED), "
        "claimed AS (UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, "
        "started_at = coalesce(j.started_at, $1), node = $4 FROM picked "
        f"WHERE j.id = picked.id RETURNING {_RETURNING}), "
        "recorded AS (INSERT INTO attempts (job_id, n, node, started_at) "
        "SELECT id, attempts, $4, $1 FROM claimed) "
        "SELECT * FROM claimed",
        now,
        list(skip_analyzers),
        limit,
        node,
    )
    return [row_to_job(row) for row in rows]


async def record_end(conn: Any, job: Job, end: AttemptEnd, new: State) -> tuple[bool, str | None]:
    """Move the job to `new` and record its attempt's end, in one statement, only where
    the job is still `running` under this attempt's number (the fence). Returns whether
    it was, and the job's state as it is otherwise."""
    now = time.time()
    result_json = None if end.result is None else msgspec.json.encode(end.result).decode()
    given_back = 1 if end.outcome == "rate_limited" else 0  # a 429 spends no attempt
    error, usage = end.error, end.usage
    row = await conn.fetchrow(
        "WITH m AS (UPDATE jobs SET state = $1, not_before = $2, finished_at = $3, "
        "result = $4, error_type = $5, error_message = $6, attempts = attempts - $7, "
        "rate_limited = rate_limited + $7, node = NULL, "
        "prompt_tokens = coalesce(prompt_tokens, 0) + $8, "
        "completion_tokens = coalesce(completion_tokens, 0) + $9, "
        "cost = CASE WHEN $10::float8 IS NULL THEN cost ELSE coalesce(cost, 0) + $10 END "
        "WHERE id = $11 AND state = 'running' AND attempts = $12 RETURNING id), "
        "a AS (UPDATE attempts SET finished_at = $13, outcome = $14, http_status = $15, "
        "error_type = $5, error_message = $6, latency_ms = $16, prompt_tokens = $17, "
        "completion_tokens = $18, cost = $10, answer = $19 "
        "WHERE job_id IN (SELECT id FROM m) AND n = $12 AND outcome = 'running' RETURNING 1), "
        "w AS (SELECT pg_notify($20, '') FROM m WHERE $1 = 'queued') "
        "SELECT (SELECT count(*) FROM m) AS moved, (SELECT count(*) FROM a) AS recorded, "
        "(SELECT count(*) FROM w) AS woke, (SELECT state FROM jobs WHERE id = $11) AS state",
        new,
        end.retry_at or 0.0,
        None if new == "queued" else now,
        result_json,
        error.type if error else None,
        error.message if error else None,
        given_back,
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        usage.cost if usage else None,
        job.id,
        job.attempts,
        now,
        end.outcome,
        end.http_status,
        end.latency_ms,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
        end.answer,
        CHANNEL,
    )
    return bool(row["moved"]), row["state"]


async def submit(conn: Any, jobs: Sequence[NewJob]) -> list[Submitted]:
    """Insert jobs (in the caller's transaction); a repeated idempotency key, from any
    node, returns the first job. NOTIFYs the nodes when any job was created."""
    now = time.time()
    out: list[Submitted] = []
    created = 0
    plain = [job for job in jobs if job.idempotency_key is None]
    if plain:  # nothing to collide on: one statement for all of them
        await conn.execute(
            "INSERT INTO jobs (id, analyzer, input, priority, state, max_attempts, "
            "created_at, source) SELECT i, a, inp, p, 'queued', m, $7, s FROM unnest("
            "$1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::text[]) "
            "AS t(i, a, inp, p, m, s)",
            [job.id for job in plain],
            [job.analyzer for job in plain],
            [msgspec.json.encode(job.input).decode() for job in plain],
            [job.priority for job in plain],
            [job.max_attempts for job in plain],
            [job.source for job in plain],
            now,
        )
        created += len(plain)
    for job in jobs:
        if job.idempotency_key is None:
            out.append(Submitted(job.id, True))
            continue
        new_id = await conn.fetchval(
            _INSERT_KEYED,
            job.id,
            job.analyzer,
            msgspec.json.encode(job.input).decode(),
            job.priority,
            job.idempotency_key,
            job.max_attempts,
            now,
            job.source,
        )
        if new_id is not None:
            created += 1
            out.append(Submitted(job.id, True))
            continue
        first = await conn.fetchval(
            "SELECT id FROM jobs WHERE idempotency_key = $1", job.idempotency_key
        )
        out.append(Submitted(first, False))
    if created:
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return out
