"""What goes out of the store to other systems: job ends as events (read in order from
a cursor: `GET /v1/events`, `vigil watch`) and webhook deliveries (an outbox the
webhook sender claims from). Both are written by the store in the transaction, and
on PostgreSQL the very statement, that ends the job (`sqlite_outbox.write_ends`,
`pg_outbox.ends_sql`): whatever ends a job writes them.

A cursor is opaque to clients. SQLite's is the event's sequence number (commit
order: one writer). PostgreSQL's is `<xid>-<seq>`: events are read in the order of
their transactions' ids, and only below the oldest transaction still running, since a
sequence number is taken before its transaction commits and a reader going by it
alone could pass an event that commits later."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from daemon.jobs import Job

EVENT_KINDS = ("job.succeeded", "job.failed", "job.canceled")
EVENTS_KEEP_S = 7 * 86_400.0  # older events (but the newest) and delivered deliveries go
PRUNE_BATCH = 500
DELIVERY_COLUMNS = "id, webhook, job_id, event, attempts, created_at"


class CursorError(ValueError):
    """A cursor that is not one Vigil gave out."""


class CursorExpired(Exception):
    """Retention pruned events after this cursor: reading on would skip them."""

    def __init__(self, cursor: str, pruned: str) -> None:
        super().__init__(
            f"cursor {cursor} is older than the events kept (retention pruned up to "
            f"{pruned}); start again without a cursor (and `vigil export` what ended before)"
        )


class Cursor(msgspec.Struct, frozen=True, order=True):
    """A position in the event stream: (transaction id, sequence); xid 0 on SQLite."""

    xid: int = 0
    seq: int = 0

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """ "" or None: the beginning (every event kept)."""
        if not text:
            return cls()
        head, sep, tail = text.partition("-")
        try:
            xid, seq = (int(head), int(tail)) if sep else (0, int(head))
        except ValueError:
            raise CursorError(f"not a cursor: {text[:40]!r}") from None
        if xid < 0 or seq < 0:
            raise CursorError(f"not a cursor: {text[:40]!r}")
        return cls(xid, seq)

    def __str__(self) -> str:
        return f"{self.xid}-{self.seq}" if self.xid else str(self.seq)


class JobEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One job end, with the job as it is now (None: purged since)."""

    cursor: str
    event: str  # job.succeeded | job.failed | job.canceled
    job_id: str
    analyzer: str
    at: float
    job: Job | None


class EventPage(msgspec.Struct, frozen=True):
    events: list[JobEvent]
    cursor: str  # where the next read starts (past every event read, filtered out or not)


class WebhookRoute(msgspec.Struct, frozen=True):
    """A configured webhook, as the store matches job ends against it."""

    name: str
    events: tuple[str, ...]
    analyzers: tuple[str, ...]  # empty: all


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed delivery: `attempts` counts this one."""

    id: str
    webhook: str
    job_id: str
    event: str
    attempts: int
    created_at: float


class DeliveryEnd(msgspec.Struct, frozen=True, kw_only=True):
    """How a delivery attempt ended: delivered, or retry at `retry_at`, or (neither)
    dead-lettered."""

    delivered: bool
    status: int | None = None
    error: str | None = None
    retry_at: float | None = None


class WebhookCounts(msgspec.Struct, frozen=True, kw_only=True):
    pending: int = 0
    dead: int = 0
    oldest_pending_at: float | None = None  # created_at of the oldest pending delivery


def route_lists(route: WebhookRoute) -> tuple[str, str]:
    """SQLite's form of a route's lists: ",a,b," (analyzers "" for all)."""
    events = "," + ",".join(route.events) + ","
    analyzers = "," + ",".join(route.analyzers) + "," if route.analyzers else ""
    return events, analyzers


def route_of(name: str, events: str, analyzers: str) -> WebhookRoute:
    """A route from its SQLite row (`route_lists`' form)."""
    return WebhookRoute(
        name, tuple(e for e in events.split(",") if e), tuple(a for a in analyzers.split(",") if a)
    )


def event_of(
    cursor: Cursor, job_id: str, analyzer: str, state: str, at: float, job: Job | None
) -> JobEvent:
    return JobEvent(
        cursor=str(cursor), event=f"job.{state}", job_id=job_id, analyzer=analyzer, at=at, job=job
    )


def delivery_of(row: Sequence[Any]) -> Delivery:
    """A delivery from its DELIVERY_COLUMNS."""
    did, webhook, job_id, event, attempts, created_at = row
    return Delivery(
        id=did,
        webhook=webhook,
        job_id=job_id,
        event=event,
        attempts=attempts,
        created_at=created_at,
    )


def counts_of(rows: Sequence[Sequence[Any]]) -> dict[str, WebhookCounts]:
    """(webhook, state, count, oldest created_at) rows as counts per webhook."""
    out: dict[str, WebhookCounts] = {}
    for webhook, state, n, oldest in rows:
        was = out.get(webhook, WebhookCounts())
        if state == "pending":
            out[webhook] = WebhookCounts(pending=n, dead=was.dead, oldest_pending_at=oldest)
        else:
            out[webhook] = WebhookCounts(
                pending=was.pending, dead=n, oldest_pending_at=was.oldest_pending_at
            )
    return out
