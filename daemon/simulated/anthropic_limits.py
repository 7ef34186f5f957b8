"""Anthropic's rate limits as the simulated API enforces them: requests, input tokens
and output tokens per minute (`Bucket`s, so sliced like OpenAI's), with Anthropic's
`anthropic-ratelimit-*` headers and its 429 bodies.

Input tokens are charged at admission (uncached input + cache writes: cache reads are
free, as at Anthropic); output tokens once the answer is made, so admission only needs
the output budget not to be spent already.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable

from daemon.config import SimulateConfig
from daemon.simulated.limits import Bucket, Cost, Levels, Need, level, shortage
from daemon.simulated.wire import ApiError

TOKEN_ROUNDING = 1000
"""Anthropic reports remaining tokens to the nearest thousand."""
_UNITS = {"requests": "requests", "input-tokens": "input tokens", "output-tokens": "output tokens"}


def rfc3339(unix_s: float) -> str:
    """A UTC time the way Anthropic's resets write it ("2026-12-05T18:25:00Z"), rounded
    up to the second so a client that waits until then is never early."""
    when = dt.datetime.fromtimestamp(math.ceil(unix_s), dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rounded(tokens: int) -> int:
    return (tokens + TOKEN_ROUNDING // 2) // TOKEN_ROUNDING * TOKEN_ROUNDING


class AnthropicLimits:
    """Anthropic's three budgets. A request is admitted only if all have room; a
    rejected request consumes nothing."""

    def __init__(
        self,
        settings: SimulateConfig,
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        now = clock()
        self._clock = clock
        self._wall = wall
        slice_s = settings.slice_s
        rpm, itpm, otpm = (
            settings.requests_per_minute,
            settings.input_tokens_per_minute,
            settings.output_tokens_per_minute,
        )
        self._requests = Bucket(rpm, now, slice_s) if rpm else None
        self._input = Bucket(itpm, now, slice_s) if itpm else None
        self._output = Bucket(otpm, now, slice_s) if otpm else None

    def levels(self) -> Levels:
        now = self._clock()
        return Levels(
            requests=level(self._requests, now),
            input_tokens=level(self._input, now),
            output_tokens=level(self._output, now),
        )

    def admit(self, cost: Cost) -> dict[str, str]:
        """Consume one request and `cost.input_tokens`, returning the headers; raise a
        429 `ApiError` if a budget is short (the output one: already spent)."""
        needs: list[Need] = []
        if self._requests is not None:
            needs.append(("requests", self._requests, 1))
        if self._input is not None:
            needs.append(("input-tokens", self._input, cost.input_tokens))
        if self._output is not None:
            needs.append(("output-tokens", self._output, 1))
        short = shortage(needs, self._clock())
        if short is not None:
            raise self._rejection(short, self._headers())
        if self._requests is not None:
            self._requests.take(1)
        if self._input is not None:
            self._input.take(cost.input_tokens)
        return self._headers()

    def settle(self, output_tokens: int, headers: dict[str, str]) -> dict[str, str]:
        """Charge the answer's output tokens (possibly into debt): the headers after."""
        if self._output is None:
            return headers
        self._output.refill(self._clock())
        self._output.take(output_tokens)
        return self._headers()

    def _headers(self) -> dict[str, str]:
        """`anthropic-ratelimit-*` for each limit that is set, and `-tokens-*` as the
        token budget with the fewest remaining (as Anthropic reports it)."""
        wall = self._wall()
        headers: dict[str, str] = {}
        if self._requests is not None:
            headers.update(_family("requests", self._requests, self._requests.remaining, wall))
        tokens = [(k, b) for k, b in (("input", self._input), ("output", self._output)) if b]
        for kind, bucket in tokens:
            headers.update(_family(f"{kind}-tokens", bucket, _rounded(bucket.remaining), wall))
        if tokens:
            _, tightest = min(tokens, key=lambda kb: kb[1].remaining)
            headers.update(_family("tokens", tightest, _rounded(tightest.remaining), wall))
        return headers

    @staticmethod
    def _rejection(short: Need, headers: dict[str, str]) -> ApiError:
        kind, bucket, need = short
        unit = _UNITS[kind]
        rate = f"the rate limit of {bucket.limit:,} {unit} per minute"
        if need > bucket.limit:  # can never fit: no retry-after, waiting cannot help
            message = (
                f"This request would exceed {rate}: it needs {need:,}. "
                "Please reduce the prompt length."
            )
            return ApiError(429, message, kind, headers=headers)
        wait_s = bucket.wait_s(need)
        message = (
            f"This request would exceed {rate}. You can see the response headers for "
            "current usage. Please reduce the prompt length or the maximum tokens "
            "requested, or try again later."
        )
        retry = {"retry-after": str(max(1, math.ceil(wait_s)))}
        return ApiError(429, message, kind, headers={**headers, **retry})


def _family(kind: str, bucket: Bucket, remaining: int, wall: float) -> dict[str, str]:
    prefix = f"anthropic-ratelimit-{kind}"
    return {
        f"{prefix}-limit": str(bucket.limit),
        f"{prefix}-remaining": str(remaining),
        f"{prefix}-reset": rfc3339(wall + bucket.reset_s),
    }
