"""Per-provider throttling: a concurrency limiter, request and token budgets, and a
cool-down every caller shares after a 429, so one rate-limit answer pauses the
provider instead of starting a retry storm."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from daemon.providers.base import ProviderError


class TokenBucket:
    """A continuously refilled budget of `per_minute` units (0 = unlimited).

    `reserve` takes units at once, letting the level go negative, and says how long
    the caller must wait: callers queue up in time instead of polling, so a burst of
    waiters leaves at exactly the budget's rate."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.per_minute = per_minute
        self.level = float(per_minute)
        self._stamp = clock()

    def configure(self, per_minute: int) -> None:
        self._refill()
        # Switched on from unlimited: nothing was spent from it, so it starts full.
        self.level = float(per_minute) if not self.per_minute else min(self.level, per_minute)
        self.per_minute = per_minute

    def _refill(self) -> None:
        now = self._clock()
        if self.per_minute:
            self.level = min(
                float(self.per_minute), self.level + (now - self._stamp) * self.per_minute / 60
            )
        self._stamp = now

    def reserve(self, units: float) -> float:
        """Take `units`; returns the seconds to wait before using them."""
        if not self.per_minute:
            return 0.0
        self._refill()
        self.level -= units
        return 0.0 if self.level >= 0 else -self.level * 60 / self.per_minute

    def refund(self, units: float) -> None:
        """Give back (or, negative, take more) once the real cost is known."""
        if self.per_minute:
            self._refill()
            self.level = min(float(self.per_minute), self.level + units)


class ProviderLimits:
    def __init__(
        self,
        *,
        max_concurrency: int,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.concurrency = anyio.CapacityLimiter(max_concurrency)
        self.requests = TokenBucket(requests_per_minute, clock)
        self.tokens = TokenBucket(tokens_per_minute, clock)
        self.cooldown_until = 0.0
        self.cooldowns = 0

    def configure(
        self, *, max_concurrency: int, requests_per_minute: int, tokens_per_minute: int
    ) -> None:
        self.concurrency.total_tokens = max_concurrency
        self.requests.configure(requests_per_minute)
        self.tokens.configure(tokens_per_minute)

    def cool_down(self, seconds: float) -> None:
        """Pause every caller of this provider for `seconds` (a 429 said so)."""
        until = self._clock() + max(0.0, seconds)
        if until > self.cooldown_until:
            self.cooldown_until = until
            self.cooldowns += 1

    def cooldown_left(self) -> float:
        return max(0.0, self.cooldown_until - self._clock())

    async def _wait_cooldown(self) -> None:
        """Sleep out the cool-down, including extensions made while asleep."""
        while True:
            left = self.cooldown_left()
            if left <= 0:
                return
            await anyio.sleep(left)

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[None]:
        """Hold a concurrency slot and budget for one request."""
        per_minute = self.tokens.per_minute
        if per_minute and estimated_tokens > per_minute:
            raise ProviderError(
                f"request needs ~{estimated_tokens} tokens, more than the whole budget of "
                f"{per_minute} tokens per minute",
                kind="TooLarge",
                retryable=False,
            )
        async with self.concurrency:
            await self._wait_cooldown()
            wait = max(self.requests.reserve(1), self.tokens.reserve(estimated_tokens))
            if wait > 0:
                try:
                    await anyio.sleep(wait)
                except anyio.get_cancelled_exc_class():
                    # Never sent: give the reservation back to the callers behind us.
                    self.requests.refund(1)
                    self.tokens.refund(estimated_tokens)
                    raise
            # A 429 that arrived while we waited still applies.
            await self._wait_cooldown()
            yield
