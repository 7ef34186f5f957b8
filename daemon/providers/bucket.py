"""One budget of a per-minute limit, as our model of the server's own bucket.

Real APIs enforce a per-minute limit in short slices (60,000 a minute as 1,000 a
second), so a budget holds at most one slice (`slice_s`) of its limit: a full
minute's burst would be refused by the server however much of the minute is left.
The server's rate-limit headers correct that model: a lower limit than configured is
adopted (`learn`), and a server that has less left than we think lowers our level
(`sync`)."""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SEND_HISTORY = 4096
"""Sends remembered per bucket for `sync` (bounded; older ones fall back to a safe guess)."""


@dataclass(slots=True)
class Ticket:
    """What one request took from a bucket, and what the server should have left
    after admitting it (`expected`; None when the bucket was unlimited)."""

    units: float
    wait_s: float
    expected: float | None
    lowered_mark: float
    generation: int = 0
    sent_at: float | None = None
    sent_mark: float = 0.0


class TokenBucket:
    """A continuously refilled budget of `per_minute` units (0 = unlimited) that holds
    at most `slice_s` worth of refill (the server's own slice).

    `book` takes units at once, letting the level go negative, and says how long the
    caller must wait, so waiters leave at exactly the budget's rate. `margin_s` of
    refill is held back: a request arriving at the server slightly earlier than
    planned (network jitter) still finds room. Where the slice leaves more room than
    one request and the margin, that is a fixed offset costing no throughput; where it
    does not (60 a minute in one-second slices: room for exactly one), a request
    arriving a hair early would be refused, so such requests are spaced `margin_s`
    further apart instead (`cost`).

    The limit in force is the configured one, or the server's own when that is lower
    (`learn`); with no configured limit, a limit the server reports still applies.
    `generation` counts changes of the limit in force: a caller that booked under an
    older one books again."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        margin_s: float = 0.0,
        slice_s: float = 1.0,
    ) -> None:
        self._clock = clock
        self.configured = per_minute
        self.server_limit: int | None = None
        self.per_minute = per_minute
        self.slice_s = slice_s
        self.level = self.capacity
        self.margin_s = margin_s
        self.generation = 0
        self._stamp = clock()
        self.lowered = 0.0  # units taken off on the server's word (limits, remaining)
        self.corrections = 0
        self._sent = 0.0
        self._sends: deque[tuple[float, float]] = deque(maxlen=SEND_HISTORY)

    @property
    def margin(self) -> float:
        """The units held back (margin_s worth of refill)."""
        return self.margin_s * self.per_minute / 60

    @property
    def capacity(self) -> float:
        """The most the bucket holds: one slice of the limit in force."""
        return self.per_minute * self.slice_s / 60

    def cost(self, units: float) -> float:
        """What a request of `units` books: its units, plus the part of the margin the
        server's slice has no spare room for (see the class docstring). A slice
        smaller than the request still admits it when full, as servers do."""
        spare = max(self.capacity - units, 0.0)
        return units + max(0.0, self.margin - spare)

    def configure(
        self, per_minute: int, *, margin_s: float | None = None, slice_s: float | None = None
    ) -> None:
        if margin_s is not None:
            self.margin_s = margin_s
        if slice_s is not None and slice_s != self.slice_s:
            self._refill()
            self.slice_s = slice_s
            self.level = min(self.level, self.capacity)
            self.generation += 1
        self.configured = per_minute
        self._apply()

    def _apply(self) -> None:
        """Put the limit in force: the configured one, capped by the server's."""
        server = self.server_limit
        if server is None:
            new = self.configured
        else:
            new = min(self.configured, server) if self.configured else server
        if new == self.per_minute:
            return
        self._refill()
        was_unlimited = not self.per_minute
        self.per_minute = new
        self.generation += 1
        if was_unlimited:
            # Switched on from unlimited: nothing was spent from it, so it starts full.
            self.level = self.capacity
        elif new and self.level > self.capacity:
            self._lower(self.level - self.capacity)

    def _refill(self) -> None:
        now = self._clock()
        if self.per_minute:
            self.level = min(self.capacity, self.level + (now - self._stamp) * self.per_minute / 60)
        self._stamp = now

    def _lower(self, units: float) -> None:
        self.level -= units
        self.lowered += units
        self.corrections += 1

    def book(self, units: float) -> Ticket:
        """Take a request of `units`; the ticket says how long to wait before sending."""
        self._refill()
        if not self.per_minute:
            return Ticket(units, 0.0, None, self.lowered, self.generation)
        cost = self.cost(units)
        self.level -= cost
        margin = self.margin
        wait_s = max(0.0, margin - self.level) * 60 / self.per_minute
        return Ticket(cost, wait_s, max(self.level, margin), self.lowered, self.generation)

    def reserve(self, units: float) -> float:
        """Take `units`; returns the seconds to wait before using them."""
        return self.book(units).wait_s

    def refund(self, units: float, *, ceiling: float | None = None) -> None:
        """Give back (or, negative, take more) once the real cost is known; never past
        `ceiling` (after a 429: the server had nothing left)."""
        if self.per_minute:
            self._refill()
            top = self.capacity if ceiling is None else min(self.capacity, ceiling)
            self.level = min(top, self.level + units) if units > 0 else self.level + units

    def empty(self) -> None:
        """The server refused a request for this budget (a 429): it has nothing left
        now, whatever we thought, so the level starts again from zero."""
        if self.per_minute:
            self._refill()
            if self.level > 0:
                self._lower(self.level)

    def mark_sent(self, ticket: Ticket) -> None:
        """The request holding `ticket` leaves now (for `sync`'s reordering allowance)."""
        now = self._clock()
        self._sent += ticket.units
        ticket.sent_at, ticket.sent_mark = now, self._sent
        if self.per_minute:  # only a limited budget is ever synced against
            self._sends.append((now, self._sent))

    def _sent_soon_after(self, ticket: Ticket) -> float:
        """Units sent within `margin_s` after `ticket`'s request: they may have reached
        the server first, so its `remaining` may already count them."""
        assert ticket.sent_at is not None
        sends = self._sends
        if not sends or sends[0][0] > ticket.sent_at:
            return self._sent - ticket.sent_mark  # history gone: assume all of them
        index = bisect.bisect_right(sends, ticket.sent_at + self.margin_s, key=lambda s: s[0])
        return max(0.0, sends[index - 1][1] - ticket.sent_mark)

    def sync(self, ticket: Ticket, remaining: float, rounding: float = 1.0) -> float:
        """The server said `remaining` right after admitting `ticket`'s request: if that
        is less than we expected, lower our level by the difference (what someone else
        spent, or a bucket that started lower); returns the units taken off.

        Corrections made since the ticket was booked are deducted, so the responses of
        many requests in flight do not correct the same gap many times over. Only
        lowered, never raised: an answer is always a little stale."""
        if not self.per_minute or ticket.expected is None or ticket.sent_at is None:
            return 0.0
        already = self.lowered - ticket.lowered_mark
        shortfall = ticket.expected - remaining - self._sent_soon_after(ticket) - already - rounding
        if shortfall <= 0:
            return 0.0
        self._refill()
        self._lower(shortfall)
        return shortfall

    def learn(self, limit: int, remaining: float | None, ticket: Ticket) -> bool:
        """The server reported its limit; adopt it when lower than ours. True when the
        limit in force changed (the caller logs it)."""
        if limit == self.server_limit:
            return False
        was_unlimited = not self.per_minute
        old = self.per_minute
        self.server_limit = limit
        self._apply()
        if was_unlimited and self.per_minute and remaining is not None:
            # Nothing was counted while unlimited: start from what the server has left.
            in_flight = self._sent - ticket.sent_mark if ticket.sent_at is not None else 0.0
            self.level = min(self.level, remaining - in_flight)
        return self.per_minute != old

    def status(self) -> dict[str, Any]:
        self._refill()
        return {
            "per_minute": self.per_minute,
            "configured": self.configured,
            "server_limit": self.server_limit,
            "slice_s": self.slice_s,
            "capacity": round(self.capacity, 1) if self.per_minute else None,
            "level": round(self.level, 1) if self.per_minute else None,
            # What a request could take now: the level net of requests booked ahead
            # and of the margin held back; never below zero.
            "left": max(0, math.floor(self.level - self.margin)) if self.per_minute else None,
            "lowered": round(self.lowered, 1),
            "corrections": self.corrections,
        }
