"""A provider's adaptive concurrency: AIMD on its concurrency limit, as TCP does on
its window. Apart from the budgets and cool-downs (`limits`): it shares nothing with
them but the limiter it resizes."""

from __future__ import annotations

import anyio


class AdaptiveConcurrency:
    """AIMD on the concurrency limit: halve on a 429 or a timeout, add one after every
    `successes_per_step` successes, between 1 and `maximum`.

    Requests carry the epoch in which they started; a congestion signal from a request
    that started before the last decrease is not acted on again, so a burst of 429s
    from one window halves the limit once, not once per request (TCP's rule)."""

    def __init__(
        self,
        limiter: anyio.CapacityLimiter,
        *,
        maximum: int,
        successes_per_step: int,
        enabled: bool,
    ) -> None:
        self._limiter = limiter
        self.maximum = maximum
        self.successes_per_step = successes_per_step
        self.enabled = enabled
        self.limit = maximum
        self.epoch = 0
        self.decreases = 0
        self._successes = 0
        self._set(maximum)

    def _set(self, limit: int) -> None:
        self.limit = limit
        self._limiter.total_tokens = limit

    def configure(self, *, maximum: int, successes_per_step: int, enabled: bool) -> None:
        self.successes_per_step = successes_per_step
        if not enabled or not self.enabled:
            self._set(maximum)  # off, or newly on: start from the top
        else:
            self._set(min(self.limit, maximum))
        self.maximum, self.enabled = maximum, enabled

    def succeeded(self) -> None:
        if not self.enabled or self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.successes_per_step:
            self._successes = 0
            self._set(self.limit + 1)

    def congested(self, epoch: int) -> bool:
        """A 429 or timeout from a request started in `epoch`; True if the limit fell."""
        if not self.enabled or epoch != self.epoch:
            return False
        self.epoch += 1
        self.decreases += 1
        self._successes = 0
        self._set(max(1, self.limit // 2))
        return True
