"""OpenAI's rate limits as the simulated API enforces them: per-minute request and
token budgets, applied in slices, with OpenAI's headers and 429 bodies. Apart from the
API itself, which only asks them about each request (`admit`) and for `/stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from daemon.config import SimulateConfig
from daemon.simulated.wire import ApiError


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


class _Bucket:
    """A per-minute limit enforced in slices, as OpenAI does ("60,000 a minute may be
    enforced as 1,000 a second"): admission is decided by a bucket that holds one
    slice (`limit` x `slice_s` / 60) and refills `limit`/60 per second, while the
    headers speak of the minute (`remaining` out of `limit`), as the real ones do. A
    request bigger than one slice is admitted when the slice is full."""

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

    def headers(self, kind: str) -> dict[str, str]:
        reset_s = (self.limit - self._minute) / self._rate_per_s
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(self.remaining),
            f"x-ratelimit-reset-{kind}": openai_duration(reset_s),
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
        self._requests = _Bucket(rpm, now, slice_s) if rpm else None
        self._tokens = _Bucket(tpm, now, slice_s) if tpm else None

    def remaining(self) -> tuple[int | None, int | None]:
        """The requests and tokens the slice holds now (None: that budget is unlimited)."""
        now = self._clock()
        levels: list[int | None] = []
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
            levels.append(None if bucket is None else max(0, math.floor(bucket.level)))
        return levels[0], levels[1]

    def admit(self, cost: int) -> dict[str, str]:
        """Consume one request and `cost` tokens, returning the x-ratelimit-* headers;
        raise a 429 `ApiError` if either budget is short."""
        now = self._clock()
        budgets: list[tuple[str, _Bucket, int]] = []
        if self._requests is not None:
            budgets.append(("requests", self._requests, 1))
        if self._tokens is not None:
            budgets.append(("tokens", self._tokens, cost))
        headers: dict[str, str] = {}
        for kind, bucket, _ in budgets:
            bucket.refill(now)
            headers.update(bucket.headers(kind))
        # The worst shortage is reported: one that can never fit first, then the longest wait.
        worst = max(budgets, key=lambda b: (b[2] > b[1].limit, b[1].wait_s(b[2])), default=None)
        if worst is not None and worst[1].wait_s(worst[2]) > 0:
            raise self._rejection(worst, headers)
        for kind, bucket, need in budgets:
            bucket.take(need)
            headers.update(bucket.headers(kind))
        return headers

    @staticmethod
    def _rejection(short: tuple[str, _Bucket, int], headers: dict[str, str]) -> ApiError:
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
