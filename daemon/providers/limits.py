"""Per-provider throttling: a concurrency limiter (optionally adaptive, see
`adaptive`), the per-minute budgets (see `bucket`), and a cool-down every caller
shares after a 429, so one rate-limit answer pauses the provider instead of starting
a retry storm.

A provider has up to four budgets: requests, tokens (input plus the most the answer
may take, as OpenAI counts), and Anthropic's input and output tokens (the input
settled to what the answer says it took; the output charged from the answer, a call
waiting only while the budget is in debt, as Anthropic's own bucket admits). A budget
whose limit is 0 and that the server never reported is unlimited and costs nothing.

Callers take their place in time one at a time, in arrival order (the pacing lock):
the caller at the head books its cost and sleeps until it is paid for, and a 429 or a
lowered limit met on waking sends it back to book again, so a cool-down or a new
limit spaces out every caller still in line instead of releasing them together."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import anyio
import structlog

from daemon.providers.adaptive import AdaptiveConcurrency
from daemon.providers.base import ProviderError
from daemon.providers.bucket import Ticket, TokenBucket
from daemon.providers.phases import PhaseTimes
from daemon.providers.ratelimit_headers import RateLimitHeaders

log = structlog.get_logger("vigil.provider")
BUDGETS = ("requests", "tokens", "input_tokens", "output_tokens")
"""The budgets a provider may have, in the order tickets and units are kept."""


class SharedRates(Protocol):
    """Budgets kept where every node sees them (a cluster's database): one place in
    time per request for the whole cluster, so nodes together stay within a limit."""

    async def book(self, key: str, increment_s: float, slice_s: float) -> float:
        """Take `increment_s` of the budget `key` (one slice of burst); returns the
        seconds to wait before sending, below zero when there is room to spare."""
        ...

    async def hold(self, key: str, seconds: float, slice_s: float) -> None:
        """A 429: nothing goes out on `key` for `seconds`, from any node."""
        ...


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request may take: its input tokens (estimated before sending) and the
    most its answer may take (`max_tokens`)."""

    input_tokens: int
    output_tokens: int = 0

    def units(self) -> tuple[float, ...]:
        """What it books in each budget of BUDGETS before it is sent. Nothing of the
        output budget: that is charged from the answer (`settle`)."""
        tokens = self.input_tokens + self.output_tokens
        return (1.0, float(tokens), float(self.input_tokens), 0.0)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request holds: a ticket per budget (BUDGETS order), its cost and the
    AIMD epoch it started in."""

    tickets: tuple[Ticket, ...]
    cost: Cost
    epoch: int

    @property
    def requests(self) -> Ticket:
        return self.tickets[0]

    @property
    def tokens(self) -> Ticket:
        return self.tickets[1]


@dataclass(frozen=True, slots=True)
class LimitChange:
    budget: str
    old_per_minute: int
    per_minute: int
    server_limit: int


class ProviderLimits:
    def __init__(
        self,
        *,
        max_concurrency: int,
        requests_per_minute: int,
        tokens_per_minute: int,
        input_tokens_per_minute: int = 0,
        output_tokens_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
        margin_s: float = 0.0,
        slice_s: float = 1.0,
        adaptive: bool = False,
        successes_per_step: int = 20,
    ) -> None:
        self._clock = clock
        self.concurrency = anyio.CapacityLimiter(max_concurrency)
        self.adaptive = AdaptiveConcurrency(
            self.concurrency,
            maximum=max_concurrency,
            successes_per_step=successes_per_step,
            enabled=adaptive,
        )
        per_minute = (
            requests_per_minute,
            tokens_per_minute,
            input_tokens_per_minute,
            output_tokens_per_minute,
        )
        self.buckets = tuple(
            TokenBucket(limit, clock, margin_s=margin_s, slice_s=slice_s) for limit in per_minute
        )
        self.requests, self.tokens, self.input_tokens, self.output_tokens = self.buckets
        self.cooldown_until = 0.0
        self.cooldown_from = 0.0  # when the cool-down in force (or the last one) began
        self.cooldowns = 0
        self._pace = anyio.Lock()  # FIFO: callers take their place in time one at a time
        self.waiting = 0  # callers holding a concurrency slot, waiting for budget or cool-down
        # A cluster's shared budgets (the provider's name keys them), or None: local only.
        self.shared: SharedRates | None = None
        self.shared_key = ""
        self.shared_errors = 0

    def configure(
        self,
        *,
        max_concurrency: int,
        requests_per_minute: int,
        tokens_per_minute: int,
        input_tokens_per_minute: int = 0,
        output_tokens_per_minute: int = 0,
        margin_s: float | None = None,
        slice_s: float | None = None,
        adaptive: bool | None = None,
        successes_per_step: int | None = None,
    ) -> None:
        self.adaptive.configure(
            maximum=max_concurrency,
            successes_per_step=successes_per_step or self.adaptive.successes_per_step,
            enabled=self.adaptive.enabled if adaptive is None else adaptive,
        )
        per_minute = (
            requests_per_minute,
            tokens_per_minute,
            input_tokens_per_minute,
            output_tokens_per_minute,
        )
        for bucket, limit in zip(self.buckets, per_minute, strict=True):
            bucket.configure(limit, margin_s=margin_s, slice_s=slice_s)

    def cool_down(self, seconds: float) -> None:
        """Pause every caller of this provider for `seconds` (a 429 said so)."""
        now = self._clock()
        until = now + max(0.0, seconds)
        if until > self.cooldown_until:
            if self.cooldown_until <= now:  # a new cool-down, not an extension
                self.cooldown_from = now
            self.cooldown_until = until
            self.cooldowns += 1

    def rate_limited(self, seconds: float) -> None:
        """A 429: the server's buckets are empty now. Ours start again from zero and
        every caller waits `seconds`; those already in line book again after it."""
        for bucket in self.buckets:
            bucket.empty()
        self.cool_down(seconds)

    def cooldown_left(self) -> float:
        return max(0.0, self.cooldown_until - self._clock())

    async def _wait_cooldown(self) -> None:
        """Sleep out the cool-down, including extensions made while asleep."""
        while True:
            left = self.cooldown_left()
            if left <= 0:
                return
            await anyio.sleep(left)

    def _check_size(self, cost: Cost) -> None:
        """A request bigger than a whole minute's budget would wait forever: refused."""
        if not (self.tokens.per_minute or self.input_tokens.per_minute):
            return  # one request never passes a request budget; output is charged after
        for name, bucket, units in zip(BUDGETS, self.buckets, cost.units(), strict=True):
            if bucket.per_minute and units > bucket.per_minute:
                kind = name.replace("_", " ")
                raise ProviderError(
                    f"request needs ~{units:.0f} {kind}, more than the whole budget of "
                    f"{bucket.per_minute} {kind} per minute",
                    kind="TooLarge",
                    retryable=False,
                )

    @asynccontextmanager
    async def slot(self, cost: Cost, times: PhaseTimes | None = None) -> AsyncIterator[Reservation]:
        """Hold a concurrency slot and budget for one request; what the waits took is
        added to `times` (`_waited`), a wait cut short by cancellation included."""
        self._check_size(cost)
        clock = self._clock
        asked = clock()
        behind_budget = self.waiting > 0  # slot holders wait for budget: so does this one
        try:
            async with self.concurrency:
                got_slot = clock()
                self.waiting += 1
                try:
                    if (
                        self.requests.per_minute
                        or self.tokens.per_minute
                        or self.input_tokens.per_minute
                        or self.output_tokens.per_minute
                    ):
                        async with self._pace:
                            tickets = await self._take_place(cost)
                    else:  # no budget to take places in: only a cool-down to wait out
                        tickets = await self._take_place(cost)
                finally:
                    self.waiting -= 1
                    if times is not None:
                        ready = clock()
                        if behind_budget or self.cooldown_until > asked:
                            self._waited(times, asked, got_slot, ready, behind_budget)
                        else:  # the common case, kept cheap: no cool-down in the way
                            times.slot_s += got_slot - asked
                            times.budget_s += ready - got_slot
                        times = None
                yield Reservation(tickets, cost, self.adaptive.epoch)
        finally:
            if times is not None:  # cancelled while waiting for the slot
                now = clock()
                self._waited(times, asked, now, now, behind_budget)

    def _waited(
        self, times: PhaseTimes, asked: float, got_slot: float, ready: float, behind_budget: bool
    ) -> None:
        """Split one request's wait by cause. Time under a cool-down is the cool-down's,
        wherever it was spent (in line behind the caller sleeping it out, or for a slot
        such callers hold). The rest of the wait for a slot is the budget's when callers
        holding slots were waiting for budget as it began (a rate limit keeps the slots
        full, not the API), else the slot's; the rest after the slot, the budget's."""
        start, end = self.cooldown_from, self.cooldown_until
        cooled = max(0.0, min(got_slot, end) - max(asked, start))
        cooled_after = max(0.0, min(ready, end) - max(got_slot, start))
        times.cooldown_s += cooled + cooled_after
        if behind_budget:
            times.budget_s += got_slot - asked - cooled
        else:
            times.slot_s += got_slot - asked - cooled
        times.budget_s += ready - got_slot - cooled_after

    async def _book_shared(self, cost: Cost) -> float:
        """The cluster's place in time for this request (0 with no shared budgets). A
        database that cannot answer leaves the local budgets alone in charge."""
        if self.shared is None:
            return 0.0
        wait = 0.0
        try:
            for name, bucket, units in zip(BUDGETS, self.buckets, cost.units(), strict=True):
                if bucket.per_minute:
                    increment_s = bucket.cost(units) * 60 / bucket.per_minute
                    key = f"{self.shared_key}.{name}"
                    # The margin holds back refill, as locally: it delays a request only
                    # where the slice has less room than that to spare.
                    booked = await self.shared.book(key, increment_s, bucket.slice_s)
                    wait = max(wait, booked + bucket.margin_s)
        except Exception as exc:
            self.shared_errors += 1
            if self.shared_errors == 1 or self.shared_errors % 1000 == 0:
                log.warning("provider.shared_budget_failed", error=f"{type(exc).__name__}")
        return wait

    async def hold_shared(self, seconds: float) -> None:
        """Tell every node of a 429: the shared budgets wait `seconds` from now."""
        if self.shared is None:
            return
        try:
            for name, bucket in zip(BUDGETS, self.buckets, strict=True):
                if bucket.per_minute:
                    await self.shared.hold(f"{self.shared_key}.{name}", seconds, bucket.slice_s)
        except Exception as exc:
            self.shared_errors += 1
            log.warning("provider.shared_budget_failed", error=f"{type(exc).__name__}")

    def _refund(self, tickets: tuple[Ticket, ...], ceiling: float | None = None) -> None:
        for bucket, ticket in zip(self.buckets, tickets, strict=True):
            bucket.refund(ticket.units, ceiling=ceiling)

    def give_back(self, reservation: Reservation) -> None:
        """A reservation whose request was never sent returns to the callers behind."""
        self._refund(reservation.tickets)

    async def _take_place(self, cost: Cost) -> tuple[Ticket, ...]:
        """Book the budgets and sleep until they are paid for (the caller at the head
        of the line). A cool-down or a new limit that came while it slept means the
        booking was planned on a wrong picture: it is given back and made again."""
        buckets, units = self.buckets, cost.units()
        while True:
            if self.cooldown_until:
                await self._wait_cooldown()
            cooldowns = self.cooldowns
            tickets = tuple([bucket.book(n) for bucket, n in zip(buckets, units, strict=True)])
            try:
                wait = await self._book_shared(cost) if self.shared is not None else 0.0
                for ticket in tickets:
                    if ticket.wait_s > wait:
                        wait = ticket.wait_s
                if wait > 0:
                    await anyio.sleep(wait)
            except anyio.get_cancelled_exc_class():
                # Never sent: give the reservation back to the callers behind us (after
                # a 429 meanwhile, only up to the nothing the server had left).
                self._refund(tickets, None if cooldowns == self.cooldowns else 0.0)
                raise
            current = cooldowns == self.cooldowns
            for bucket, ticket in zip(buckets, tickets, strict=True):
                current = current and ticket.generation == bucket.generation
            if current:
                for bucket, ticket in zip(buckets, tickets, strict=True):
                    bucket.mark_sent(ticket)
                return tickets
            # After a 429 the server had nothing left: what we give back stops at zero.
            self._refund(tickets, None if cooldowns == self.cooldowns else 0.0)

    def settle(
        self, reservation: Reservation, headers: RateLimitHeaders, input_used: int, output_used: int
    ) -> None:
        """Correct the token budgets from what an answered request really took. For
        the combined budget, a server that reports what it has left keeps its own
        count (OpenAI charges max_tokens up front, never refunded): corrected only when
        it does not say, or when we booked too little. The input budget is settled to
        what was used and the output budget charged it, as Anthropic counts both."""
        cost = reservation.cost
        if not (input_used or output_used):
            return  # no usage reported: the estimate stands
        booked, used = cost.input_tokens + cost.output_tokens, input_used + output_used
        budget = headers.tokens
        if used > booked or budget is None or budget.remaining is None:
            self.tokens.refund(booked - used)
        self.input_tokens.refund(cost.input_tokens - input_used)
        self.output_tokens.refund(-output_used)

    async def charge_shared(self, output_used: int) -> None:
        """The cluster's output budget, charged from the answer as the local one is."""
        bucket = self.output_tokens
        if self.shared is None or not bucket.per_minute or not output_used:
            return
        try:
            increment_s = output_used * 60 / bucket.per_minute
            await self.shared.book(f"{self.shared_key}.output_tokens", increment_s, bucket.slice_s)
        except Exception as exc:
            self.shared_errors += 1
            log.warning("provider.shared_budget_failed", error=f"{type(exc).__name__}")

    def observe(self, headers: RateLimitHeaders, reservation: Reservation) -> list[LimitChange]:
        """Correct the budgets from an answer's rate-limit headers (each family to its
        own budget); returns the limits that changed."""
        changes: list[LimitChange] = []
        reported = (headers.requests, headers.tokens, headers.input_tokens, headers.output_tokens)
        for name, bucket, budget, ticket in zip(
            BUDGETS, self.buckets, reported, reservation.tickets, strict=True
        ):
            if budget is None:
                continue
            if budget.limit is not None:
                old = bucket.per_minute
                if bucket.learn(budget.limit, budget.remaining, ticket):
                    changes.append(LimitChange(name, old, bucket.per_minute, budget.limit))
            if budget.remaining is not None:
                bucket.sync(ticket, budget.remaining, budget.rounding)
        return changes

    def status(self) -> dict[str, dict[str, object]]:
        """Each budget's state, for `vigil status`."""
        return {name: bucket.status() for name, bucket in zip(BUDGETS, self.buckets, strict=True)}
