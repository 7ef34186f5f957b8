"""The SQL of a job's way through a shared store: submit (one statement for jobs with
no key), the claim (SKIP LOCKED, counting the attempt), the fenced record of attempts'
ends (many in one statement), cancel and retry."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import msgspec

from daemon.jobs import CallRecord, Job, State
from daemon.store.base import (
    JOB_COLUMNS,
    KEYED_COLUMNS,
    AttemptEnd,
    BacklogFull,
    Canceled,
    EndValues,
    InvalidTransition,
    JobNotFound,
    NewJob,
    Submitted,
    encode_tags,
    job_row,
    row_to_job,
    same_job,
)
from daemon.store.calls import (
    CALL_COLUMNS,
    call_rows,
    spend_rows,
)
from daemon.store.pg_nodes import CHANNEL
from daemon.store.pg_outbox import ends_sql

_INSERT_KEYED = (
    "INSERT INTO jobs (id, analyzer, input, priority, idempotency_key, state, max_attempts, "
    "created_at, source, tags, batch, not_before) "
    "VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, $9, $10, $11) "
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


async def submit(conn: Any, jobs: Sequence[NewJob]) -> list[Submitted]:
    """Insert jobs (in the caller's transaction) with their tags; a repeated
    idempotency key, from any node, returns the first job (IdempotencyConflict,
    undoing it all, if it is another job: `same_job`). NOTIFYs the nodes when any job
    was created."""
    now = time.time()
    out: list[Submitted] = []
    plain = [job for job in jobs if job.idempotency_key is None]
    created = list(plain)
    if plain:  # nothing to collide on: one statement for all of them
        await conn.execute(
            "INSERT INTO jobs (id, analyzer, input, priority, state, max_attempts, "
            "created_at, source, tags, batch, not_before) "
            "SELECT i, a, inp, p, 'queued', m, $7, s, tg, b, nb FROM unnest("
            "$1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::text[], "
            "$8::text[], $9::text[], $10::float8[]) AS t(i, a, inp, p, m, s, tg, b, nb)",
            [job.id for job in plain],
            [job.analyzer for job in plain],
            [msgspec.json.encode(job.input).decode() for job in plain],
            [job.priority for job in plain],
            [job.max_attempts for job in plain],
            [job.source for job in plain],
            now,
            [encode_tags(job.tags) for job in plain],
            [job.batch for job in plain],
            [job.not_before for job in plain],
        )
    for job in jobs:
        if job.idempotency_key is None:
            out.append(Submitted(job.id, True))
            continue
        new_id = await conn.fetchval(_INSERT_KEYED, *job_row(job, now))
        if new_id is not None:
            created.append(job)
            out.append(Submitted(job.id, True))
            continue
        first = await conn.fetchrow(
            f"SELECT {KEYED_COLUMNS} FROM jobs WHERE idempotency_key = $1", job.idempotency_key
        )
        out.append(same_job(job, *first))
    tagged = [(tag, job.id) for job in created for tag in job.tags]
    if tagged:
        await conn.execute(
            "INSERT INTO job_tags (tag, job_id) SELECT * FROM unnest($1::text[], $2::text[])",
            [tag for tag, _ in tagged],
            [job_id for _, job_id in tagged],
        )
    if created:
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return out


async def record_ends(
    conn: Any, ends: Sequence[tuple[Job, AttemptEnd, State]]
) -> list[tuple[bool, str | None]]:
    """Move each job to its new state and record its attempt's end, many in one
    statement (group commit), each only where its job is still `running` under that
    attempt's number (the fence). Returns, in order, whether each was recorded and its
    job's state otherwise."""
    now = time.time()
    cols: list[list[Any]] = [[] for _ in range(24)]
    for job, end, new in ends:
        v = EndValues.of(end)
        values = (
            job.id,
            job.attempts,
            new,
            end.retry_at or 0.0,
            None if new == "queued" else now,
            v.result_json,
            v.error_type,
            v.error_message,
            v.given_back,
            v.prompt_tokens,
            v.completion_tokens,
            v.cost,
            end.outcome,
            end.http_status,
            end.latency_ms,
            end.answer,
            v.attempt_prompt_tokens,
            v.attempt_completion_tokens,
            v.cached_tokens,
            v.cache_write_tokens,
            v.attempt_cached_tokens,
            v.attempt_cache_write_tokens,
            end.stop_reason,
            v.phases_json,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    rows = await conn.fetch(
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::float8[], "
        "$5::float8[], $6::text[], $7::text[], $8::text[], $9::int[], $10::int8[], "
        "$11::int8[], $12::float8[], $13::text[], $14::int[], $15::float8[], $16::text[], "
        "$17::int8[], $18::int8[], $19::int8[], $20::int8[], $21::int8[], $22::int8[], "
        "$23::text[], $24::text[]) WITH ORDINALITY AS u(id, n, to_state, not_before, "
        "finished, result, etype, emsg, back, ptok, ctok, cost, outcome, http, latency, "
        "answer, aptok, actok, cached, written, acached, awritten, stop, phases, i)), "
        "m AS (UPDATE jobs j SET state = u.to_state, not_before = u.not_before, "
        "finished_at = u.finished, result = u.result, error_type = u.etype, "
        "error_message = u.emsg, attempts = j.attempts - u.back, "
        "rate_limited = j.rate_limited + u.back, node = NULL, "
        "prompt_tokens = coalesce(j.prompt_tokens, 0) + u.ptok, "
        "completion_tokens = coalesce(j.completion_tokens, 0) + u.ctok, "
        "cached_tokens = coalesce(j.cached_tokens, 0) + u.cached, "
        "cache_write_tokens = coalesce(j.cache_write_tokens, 0) + u.written, "
        "cost = CASE WHEN u.cost IS NULL THEN j.cost ELSE coalesce(j.cost, 0) + u.cost END "
        "FROM u WHERE j.id = u.id AND j.state = 'running' AND j.attempts = u.n "
        "RETURNING j.id, u.n, u.to_state, j.analyzer, u.finished), "
        "ended AS (SELECT id, analyzer, to_state AS state, finished AS at FROM m "
        "WHERE to_state <> 'queued'), " + ends_sql("ended") + ", "
        "a AS (UPDATE attempts t SET finished_at = $25, outcome = u.outcome, "
        "http_status = u.http, error_type = u.etype, error_message = u.emsg, "
        "latency_ms = u.latency, prompt_tokens = u.aptok, completion_tokens = u.actok, "
        "cost = u.cost, answer = u.answer, cached_tokens = u.acached, "
        "cache_write_tokens = u.awritten, stop_reason = u.stop, phases = u.phases "
        "FROM u JOIN m ON m.id = u.id AND m.n = u.n "
        "WHERE t.job_id = u.id AND t.n = u.n AND t.outcome = 'running' RETURNING 1), "
        "w AS (SELECT pg_notify($26, '') WHERE EXISTS (SELECT 1 FROM m WHERE to_state = 'queued')) "
        "SELECT u.i, m.id IS NOT NULL AS moved, "
        "(SELECT state FROM jobs s WHERE s.id = u.id) AS state, "
        "(SELECT count(*) FROM a) AS recorded, (SELECT count(*) FROM w) AS woke "
        "FROM u LEFT JOIN m ON m.id = u.id AND m.n = u.n ORDER BY u.i",
        *cols,
        now,
        CHANNEL,
    )
    return [(bool(row["moved"]), row["state"]) for row in rows]


async def requeue(
    conn: Any, rows: Sequence[tuple[str, int]], reason: str, outcome: str, not_before: float
) -> int:
    """Give back the attempts (job id, attempt number) still running (in the caller's
    transaction), each marked with `outcome`; how many were given back."""
    now = time.time()
    moved = 0
    for job_id, n in rows:
        done = await conn.fetchval(
            "WITH m AS (UPDATE jobs SET state = 'queued', attempts = attempts - 1, "
            "not_before = $1, node = NULL WHERE id = $2 AND state = 'running' "
            "AND attempts = $3 RETURNING 1) SELECT count(*) FROM m",
            not_before,
            job_id,
            n,
        )
        if done:
            moved += 1
            await conn.execute(
                "UPDATE attempts SET outcome = $1, finished_at = $2, error_type = $3, "
                "error_message = $4 WHERE job_id = $5 AND n = $6 AND outcome = 'running'",
                outcome,
                now,
                outcome.capitalize(),
                reason,
                job_id,
                n,
            )
    if moved:
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return moved


async def cancel(conn: Any, job_id: str) -> Canceled:
    """Cancel a queued or running job (in the caller's transaction); its running
    attempt, on whichever node, is marked canceled (that node stops it)."""
    now = time.time()
    row = await conn.fetchrow("SELECT state, analyzer FROM jobs WHERE id = $1 FOR UPDATE", job_id)
    if row is None:
        raise JobNotFound(job_id)
    state, analyzer = row["state"], row["analyzer"]
    if state not in ("queued", "running"):
        raise InvalidTransition(
            f"job {job_id} is {state}; only queued or running jobs can be canceled"
        )
    await conn.execute(
        "WITH ended AS (UPDATE jobs SET state = 'canceled', finished_at = $1, node = NULL "
        "WHERE id = $2 RETURNING id, analyzer, state, finished_at AS at), "
        + ends_sql("ended")
        + "SELECT 1",
        now,
        job_id,
    )
    await conn.execute(
        "UPDATE attempts SET outcome = 'canceled', finished_at = $1 "
        "WHERE job_id = $2 AND outcome = 'running'",
        now,
        job_id,
    )
    return Canceled(state, analyzer)


async def retry(
    conn: Any, job_ids: Sequence[str] | None, queued: int, max_backlog: int
) -> Counter[str]:
    """Failed (or named failed and canceled) jobs back in the queue with a fresh
    budget of attempts and 429s, in the caller's transaction; how many from each state."""
    if job_ids is None:
        rows = await conn.fetch("SELECT id, state FROM jobs WHERE state = 'failed' FOR UPDATE")
    else:
        rows = await conn.fetch(
            "SELECT id, state FROM jobs WHERE id = ANY($1) FOR UPDATE", list(job_ids)
        )
        found = {r["id"]: r["state"] for r in rows}
        for job_id in job_ids:
            if job_id not in found:
                raise JobNotFound(job_id)
            if found[job_id] not in ("failed", "canceled"):
                raise InvalidTransition(
                    f"job {job_id} is {found[job_id]}; only failed or canceled jobs retry"
                )
    if queued + len(rows) > max_backlog:
        raise BacklogFull(queued, max_backlog)
    await conn.execute(
        "UPDATE jobs SET state = 'queued', max_attempts = attempts + max_attempts, "
        "rate_limited = 0, not_before = 0, finished_at = NULL WHERE id = ANY($1)",
        [r["id"] for r in rows],
    )
    if rows:
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return Counter(r["state"] for r in rows)


async def write_calls(conn: Any, calls: Sequence[CallRecord]) -> None:
    """Store answered calls and add their cost to the day's spend (in the caller's
    transaction, with the ends of their attempts)."""
    if not calls:
        return
    await conn.executemany(
        f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        call_rows(calls),
    )
    if spent := spend_rows(calls):
        await conn.executemany(
            "INSERT INTO spend (scope, name, day, usd) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (scope, name, day) DO UPDATE SET usd = spend.usd + excluded.usd",
            spent,
        )
