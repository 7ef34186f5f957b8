"""Rate limits as the simulated API enforces them: per-minute budgets applied in
slices (`Bucket`), and OpenAI's two of them (`Limits`) with OpenAI's headers and 429
bodies; Anthropic's three live in `anthropic_limits`. Apart from the API itself, which
only asks them about each request (`admit`, `settle`) and for `/stats` (`levels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from daemon.config import SimulateConfig
from daemon.simulated.wire import ApiError


class Cost(msgspec.Struct, frozen=True):
    """What one request asks of the budgets before it is answered: OpenAI's TPM charge
    (prompt + max_tokens) or Anthropic's ITPM charge (uncached input + cache writes)."""

    tokens: int = 0
    input_tokens: int = 0


class Levels(msgspec.Struct, frozen=True):
    """What each budget's slice holds now, for `/stats` (None: no such limit)."""

    requests: int | None = None
    tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class RateLimits(Protocol):
    """One dialect's budgets, as the API core uses them."""

    def admit(self, cost: Cost) -> dict[str, str]:
        """Consume what `cost` needs, returning the rate-limit headers; raise a 429
        `ApiError` (consuming nothing) if a budget is short."""
        ...

    def settle(self, output_tokens: int, headers: dict[str, str]) -> dict[str, str]:
        """Charge an answer's output tokens; the headers the answer carries."""
        ...

    def levels(self) -> Levels: ...


def openai_duration(seconds: float) -> str:
    """Format like OpenAI's `x-ratelimit-reset-*` ("120ms", "1.5s", "6m0s"), rounded up
    so a client that waits that long is never early."""
    ms = math.ceil(round(seconds * 1000, 6)) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Bucket:
    """A per-minute limit enforced in slices, as the real APIs do ("60,000 a minute may
    be enforced as 1,000 a second"): admission is decided by a bucket that holds one
    slice (`limit` x `slice_s` / 60) and refills `limit`/60 per second, while the
    headers speak of the minute (`remaining` out of `limit`), as the real ones do. A
    request bigger than one slice is admitted when the slice is full. `take` may drive
    it below zero (an answer's output tokens, charged after the fact): a debt that
    refills like the rest."""

    __slots__ = ("_level", "_minute", "_rate_per_s", "_stamp", "capacity", "limit")

    def __init__(self, limit: int, now: float, slice_s: float) -> None:
        self.limit = limit
        self.capacity = limit * slice_s / 60
        self._rate_per_s = limit / 60.0
        self._level = self.capacity
        self._minute = float(limit)
        self._stamp = now

    def refill(self, now: float) -> None:
        gained = max(0.0, now - self._stamp) * self._rate_per_s
        self._level = min(self.capacity, self._level + gained)
        self._minute = min(float(self.limit), self._minute + gained)
        self._stamp = now

    def wait_s(self, cost: int) -> float:
        """Seconds until `cost` fits (after `refill`); 0 if it fits now."""
        return max(0.0, (min(cost, self.capacity) - self._level) / self._rate_per_s)

    def take(self, cost: int) -> None:
        self._level -= cost
        self._minute -= cost

    @property
    def level(self) -> float:
        """What the slice holds now (after `refill`): what `/stats` reports."""
        return self._level

    @property
    def remaining(self) -> int:
        """What the headers report: the minute's budget left."""
        return max(0, math.floor(self._minute))

    @property
    def reset_s(self) -> float:
        """Seconds until the minute's budget is whole again."""
        return (self.limit - self._minute) / self._rate_per_s


Need = tuple[str, Bucket, int]
"""A budget's name, its bucket, and what a request needs of it to be admitted."""


def shortage(needs: Sequence[Need], now: float) -> Need | None:
    """Refill every bucket, then the worst shortage among `needs`: one that can never
    fit first, then the longest wait; None when all fit now."""
    for _, bucket, _ in needs:
        bucket.refill(now)
    worst = max(needs, key=lambda n: (n[2] > n[1].limit, n[1].wait_s(n[2])), default=None)
    return worst if worst is not None and worst[1].wait_s(worst[2]) > 0 else None


def level(bucket: Bucket | None, now: float) -> int | None:
    """A bucket's whole units now, for `/stats` (None: no bucket)."""
    if bucket is None:
        return None
    bucket.refill(now)
    return max(0, math.floor(bucket.level))


def _openai_headers(kind: str, bucket: Bucket) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(bucket.limit),
        f"x-ratelimit-remaining-{kind}": str(bucket.remaining),
        f"x-ratelimit-reset-{kind}": openai_duration(bucket.reset_s),
    }


class Limits:
    """OpenAI's two budgets. A request is admitted only if both have room; a rejected
    request consumes nothing, so clients that honour retry-after get through."""

    def __init__(self, settings: SimulateConfig, clock: Callable[[], float]) -> None:
        now = clock()
        self._clock = clock
        rpm, tpm, slice_s = (
            settings.requests_per_minute,
            settings.tokens_per_minute,
            settings.slice_s,
        )
        self._requests = Bucket(rpm, now, slice_s) if rpm else None
        self._tokens = Bucket(tpm, now, slice_s) if tpm else None

    def levels(self) -> Levels:
        now = self._clock()
        return Levels(requests=level(self._requests, now), tokens=level(self._tokens, now))

    def admit(self, cost: Cost) -> dict[str, str]:
        """Consume one request and `cost.tokens`, returning the x-ratelimit-* headers;
        raise a 429 `ApiError` if either budget is short."""
        budgets: list[Need] = []
        if self._requests is not None:
            budgets.append(("requests", self._requests, 1))
        if self._tokens is not None:
            budgets.append(("tokens", self._tokens, cost.tokens))
        short = shortage(budgets, self._clock())
        headers: dict[str, str] = {}
        for kind, bucket, _ in budgets:
            headers.update(_openai_headers(kind, bucket))
        if short is not None:
            raise self._rejection(short, headers)
        for kind, bucket, need in budgets:
            bucket.take(need)
            headers.update(_openai_headers(kind, bucket))
        return headers

    def settle(self, output_tokens: int, headers: dict[str, str]) -> dict[str, str]:
        """Nothing to charge: OpenAI counted max_tokens up front."""
        return headers

    @staticmethod
    def _rejection(short: Need, headers: dict[str, str]) -> ApiError:
        kind, bucket, need = short
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        if need > bucket.limit:  # can never fit: OpenAI's "Request too large", no retry-after
            message = (
                f"Request too large for {unit}: Limit {bucket.limit}, Requested {need}. "
                "Reduce the size of your request."
            )
            return ApiError(429, message, kind, code="rate_limit_exceeded", headers=headers)
        wait_s = bucket.wait_s(need)
        used = bucket.limit - bucket.remaining
        message = (
            f"Rate limit reached for {unit}: Limit {bucket.limit}, Used {used}, "
            f"Requested {need}. Please try again in {openai_duration(wait_s)}."
        )
        retry = {
            "retry-after": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
        }
        return ApiError(
            429, message, kind, code="rate_limit_exceeded", headers={**headers, **retry}
        )
