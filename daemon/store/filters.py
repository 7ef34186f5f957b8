"""Which jobs a listing, a count or a bulk action (cancel, retry, purge, retention)
applies to: one `JobFilter`, turned into the same WHERE clause for both backends (only
the placeholders differ: SQLite's `?`, PostgreSQL's `$n`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import msgspec

from daemon.jobs import State

BulkAction = Literal["cancel", "retry", "purge"]
# The states each bulk action can ever touch, whatever the filter says.
ACTS_ON: dict[BulkAction, tuple[State, ...]] = {
    "cancel": ("queued", "running"),
    "retry": ("failed", "canceled"),
    "purge": ("succeeded", "failed", "canceled"),
}

# Where each bulk action takes the jobs it changes (None: deleted).
MOVES_TO: dict[BulkAction, State | None] = {"cancel": "canceled", "retry": "queued", "purge": None}


class JobFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Jobs matching every field that is set (unset: any)."""

    states: tuple[State, ...] | None = None
    analyzer: str | None = None
    error_type: str | None = None
    since: float | None = None  # created_at >= since (unix time)
    until: float | None = None  # created_at < until
    before: str | None = None  # id < before (ids are time-ordered)
    ids: tuple[str, ...] | None = None
    finished_before: float | None = None  # finished_at <= this (purge --older-than, retention)
    tag: str | None = None  # carries this tag (the job_tags table)
    batch: str | None = None
    id_contains: str | None = None  # text in the id, any case (a scan: listings only)

    def within(self, states: Sequence[State]) -> JobFilter:
        """The filter narrowed to `states` (those it asked for that are among them)."""
        mine = states if self.states is None else [s for s in self.states if s in states]
        return msgspec.structs.replace(self, states=tuple(mine))

    def settled_by(self, at: float) -> JobFilter:
        """The filter narrowed to jobs created before `at` and, if finished, finished by
        then: a bulk action leaves alone the jobs submitted while it runs, and those
        that come back (a retried job that fails again) are not met twice."""
        until = at if self.until is None else min(self.until, at)
        done = self.finished_before
        if self.states and all(s in ("succeeded", "failed", "canceled") for s in self.states):
            done = at if done is None else min(done, at)
        return msgspec.structs.replace(self, until=until, finished_before=done)


class BulkRow(NamedTuple):
    """A job a bulk step changed: its id, the state it was in, its analyzer."""

    id: str
    was: State
    analyzer: str


class Params:
    """Query parameters collected in order, each given its backend's placeholder."""

    def __init__(self, style: Literal["qmark", "numeric"]) -> None:
        self.style = style
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return "?" if self.style == "qmark" else f"${len(self.values)}"

    def one_of(self, column: str, values: Sequence[Any]) -> str:
        """`column` equal to any of `values` (none: nothing matches)."""
        if not values:
            return "FALSE" if self.style == "numeric" else "0"
        if self.style == "numeric":
            return f"{column} = ANY({self.add(list(values))})"
        return f"{column} IN ({', '.join(self.add(v) for v in values)})"

    def contains(self, column: str, text: str) -> str:
        """`column`, lowercased, contains `text`, lowercased (no LIKE: no wildcards)."""
        find = "strpos" if self.style == "numeric" else "instr"
        return f"{find}(lower({column}), {self.add(text.lower())}) > 0"


def where(flt: JobFilter, params: Params, *, walk: bool = False) -> str:
    """The filter as a WHERE clause ("" when it matches everything). `walk`: SQLite
    reads along the ids, checking the rest (`+column` keeps it off their indexes)."""
    clauses: list[str] = []
    plus = "+" if walk else ""
    if flt.states is not None:
        clauses.append(params.one_of(f"{plus}state", flt.states))
    if flt.ids is not None:
        clauses.append(params.one_of("id", flt.ids))
    if flt.tag is not None:
        clauses.append(f"id IN (SELECT job_id FROM job_tags WHERE tag = {params.add(flt.tag)})")
    if flt.id_contains is not None:
        clauses.append(params.contains("id", flt.id_contains))
    for column, op, value in (
        (f"{plus}analyzer", "=", flt.analyzer),
        (f"{plus}batch", "=", flt.batch),
        (f"{plus}error_type", "=", flt.error_type),
        (f"{plus}created_at", ">=", flt.since),
        (f"{plus}created_at", "<", flt.until),
        ("id", "<", flt.before),
        (f"{plus}finished_at", "<=", flt.finished_before),
    ):
        if value is not None:
            clauses.append(f"{column} {op} {params.add(value)}")
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


def pick_sql(flt: JobFilter, params: Params, *, limit: int) -> str:
    """A bulk action's next batch (id, state, analyzer), in no order: what a batch
    changes no longer matches (bulk.run_bulk bounds the filter in time so that jobs
    coming back meanwhile stay out), so the next batch looks from the start again,
    and the indexes (state and finished_at; analyzer and state) serve it unsorted."""
    return f"SELECT id, state, analyzer FROM jobs {where(flt, params)} LIMIT {params.add(limit)}"


def count_sql(flt: JobFilter, params: Params) -> str:
    """Jobs matching `flt`, by state."""
    return f"SELECT state, count(*) FROM jobs {where(flt, params)} GROUP BY state"


def list_sql(
    columns: str, flt: JobFilter, params: Params, limit: int, *, walk: bool = False
) -> str:
    """`columns` of the first `limit` matching jobs, newest first (the listings).
    `walk`: along the ids (see `where`), for a reader that pages through all of them:
    each page then costs what it skips, where an index on the filter would read (and
    sort) every match older than the page again, page after page."""
    return (
        f"SELECT {columns} FROM jobs {where(flt, params, walk=walk)} ORDER BY id DESC "
        f"LIMIT {params.add(limit)}"
    )


def ids_sql(flt: JobFilter, params: Params, limit: int) -> str:
    """The first `limit` matching ids, oldest first."""
    return f"SELECT id FROM jobs {where(flt, params)} ORDER BY id LIMIT {params.add(limit)}"
