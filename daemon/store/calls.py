"""The stored calls: every answered API call (the `calls` table) and the day's spend
per provider and analyzer (the `spend` table); the rows both stores write, and the
usage report's query over them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from daemon.jobs import CallRecord


class SpendDay(msgspec.Struct, frozen=True):
    """What the calls of one provider or analyzer cost on one UTC day."""

    scope: str  # "provider" | "analyzer"
    name: str
    day: str  # YYYY-MM-DD
    usd: float


CALL_COLUMNS = (
    "at, job_id, attempt, analyzer, provider, model, prompt_tokens, cached_tokens, "
    "cache_write_tokens, completion_tokens, cost"
)


def call_rows(calls: Iterable[CallRecord]) -> list[tuple[Any, ...]]:
    """Calls as CALL_COLUMNS rows."""
    return [
        (
            c.at,
            c.job_id,
            c.attempt,
            c.analyzer,
            c.provider,
            c.model,
            c.prompt_tokens,
            c.cached_tokens,
            c.cache_write_tokens,
            c.completion_tokens,
            c.cost,
        )
        for c in calls
    ]


def spend_rows(calls: Iterable[CallRecord]) -> list[tuple[str, str, str, float]]:
    """What the calls add to the spend table: per provider and per analyzer, per day."""
    rows: dict[tuple[str, str, str], float] = {}
    for c in calls:
        if c.cost:
            day = time.strftime("%Y-%m-%d", time.gmtime(c.at))
            for key in (("provider", c.provider, day), ("analyzer", c.analyzer, day)):
                rows[key] = rows.get(key, 0.0) + c.cost
    return [(*key, usd) for key, usd in rows.items()]


class UsageQuery(msgspec.Struct, frozen=True, kw_only=True):
    """`vigil usage`: calls answered in [since, until) (unix times), grouped by one
    of day, analyzer, provider, model."""

    since: float
    until: float
    by: Literal["day", "analyzer", "provider", "model"] = "day"


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    jobs: int
    attempts: int
    calls: int
    input_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int
    cost_usd: float | None


USAGE_GROUPS = {
    "day": "strftime('%Y-%m-%d', at, 'unixepoch')",
    "analyzer": "analyzer",
    "provider": "provider",
    "model": "model",
}
"""SQLite's grouping expressions (PostgreSQL's day is to_char(to_timestamp(at)))."""


def usage_sql(group: str, placeholders: tuple[str, str]) -> str:
    """The usage report's query over `calls`, for either store."""
    since, until = placeholders
    return (
        f"SELECT {group} AS key, count(DISTINCT job_id), count(DISTINCT job_id || ':' || attempt), "
        "count(*), sum(prompt_tokens), sum(cached_tokens), sum(cache_write_tokens), "
        f"sum(completion_tokens), sum(cost) FROM calls WHERE at >= {since} AND at < {until} "
        "GROUP BY key ORDER BY key"
    )


def row_to_usage(row: Sequence[Any]) -> UsageRow:
    key, jobs, attempts, calls, inp, cached, written, out, cost = row
    return UsageRow(
        key=str(key),
        jobs=jobs,
        attempts=attempts,
        calls=calls,
        input_tokens=inp or 0,
        cached_tokens=cached or 0,
        cache_write_tokens=written or 0,
        output_tokens=out or 0,
        cost_usd=None if cost is None else float(cost),
    )
