"""What an API says about its own rate limits, read from the headers of every answer.

OpenAI (and vLLM, LiteLLM, Groq...) send `x-ratelimit-{limit,remaining,reset}-{requests,
tokens}` with resets as durations ("1s", "6m0s", "120ms"); Anthropic sends
`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
with resets as RFC 3339 times. Both become one `RateLimitHeaders` snapshot, which the
limits use to correct their local budgets (the server knows best what is left), and
which gives a 429 its wait hint when `retry-after` is missing.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
import time
from collections.abc import Mapping

import msgspec

MAX_HINT_S = 300.0
"""Longest wait we take from a server's hint, so a bogus value cannot stall a provider."""
ANTHROPIC_TOKEN_ROUNDING = 1000.0
"""Anthropic rounds remaining tokens to the nearest thousand: smaller gaps are noise."""

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_OPENAI_KINDS = ("requests", "tokens")
_ANTHROPIC_KINDS = ("requests", "tokens", "input-tokens", "output-tokens")


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """One server budget as reported: its limit, what is left, and when it is full again.
    `rounding` is how coarse `remaining` is (1 for exact counts)."""

    limit: int | None = None
    remaining: float | None = None
    reset_s: float | None = None
    rounding: float = 1.0

    def seconds_until(self, units: float) -> float | None:
        """How long until `units` fit, assuming a linear refill from `remaining` to
        `limit` over `reset_s`; None when the headers do not say enough."""
        if self.reset_s is None:
            return None
        if self.limit is None or self.remaining is None or self.remaining >= self.limit:
            return self.reset_s
        if self.remaining >= units:
            return 0.0
        per_s = (self.limit - self.remaining) / self.reset_s if self.reset_s > 0 else math.inf
        return min(self.reset_s, (units - self.remaining) / per_s)


class RateLimitHeaders(msgspec.Struct, frozen=True, kw_only=True):
    """The budgets one answer reported (None: not reported)."""

    requests: Budget | None = None
    tokens: Budget | None = None
    input_tokens: Budget | None = None
    output_tokens: Budget | None = None

    @property
    def empty(self) -> bool:
        return all(
            b is None for b in (self.requests, self.tokens, self.input_tokens, self.output_tokens)
        )


def parse_duration_s(text: str) -> float | None:
    """OpenAI's reset durations: "120ms", "1.5s", "6m0s", "1h2m3s"; a bare number is
    seconds."""
    text = text.strip()
    number = _number(text)
    if number is not None:
        return number
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_rfc3339_s(text: str, now: float) -> float | None:
    """Seconds from `now` (unix time) until an RFC 3339 time such as Anthropic's
    "2024-04-10T18:25:00Z"; never negative. None if it does not parse."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _budget(
    limit: str | None, remaining: str | None, reset_s: float | None, rounding: float
) -> Budget | None:
    lim = _number(limit)
    rem = _number(remaining)
    if lim is None and rem is None and reset_s is None:
        return None
    return Budget(
        limit=int(lim) if lim is not None and lim >= 1 else None,
        remaining=rem,
        reset_s=_bounded(reset_s) if reset_s is not None else None,
        rounding=rounding,
    )


def parse_anthropic_headers(
    headers: Mapping[str, str], *, now: float | None = None
) -> RateLimitHeaders:
    """Anthropic's family; `now` is the unix time its RFC 3339 resets count from."""
    found: dict[str, Budget] = {}
    for kind in _ANTHROPIC_KINDS:
        prefix = f"anthropic-ratelimit-{kind}"
        reset = headers.get(f"{prefix}-reset")
        budget = _budget(
            headers.get(f"{prefix}-limit"),
            headers.get(f"{prefix}-remaining"),
            parse_rfc3339_s(reset, time.time() if now is None else now) if reset else None,
            1.0 if kind == "requests" else ANTHROPIC_TOKEN_ROUNDING,
        )
        if budget is not None:
            found[kind.replace("-", "_")] = budget
    return RateLimitHeaders(**found)


def parse_openai_headers(headers: Mapping[str, str], *, requests: bool = True) -> RateLimitHeaders:
    """OpenAI's family. `requests=False` leaves out the request budget (Groq's counts
    per day, not per minute). Negative values (Azure's -1) are not budgets."""
    found: dict[str, Budget] = {}
    for kind in _OPENAI_KINDS if requests else ("tokens",):
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        budget = _budget(
            headers.get(f"x-ratelimit-limit-{kind}"),
            headers.get(f"x-ratelimit-remaining-{kind}"),
            parse_duration_s(reset) if reset else None,
            1.0,
        )
        if budget is not None:
            found[kind] = budget
    return RateLimitHeaders(**found)


def parse_rate_limit_headers(
    headers: Mapping[str, str], *, now: float | None = None
) -> RateLimitHeaders:
    """Both families; where a server sends both, OpenAI's wins (exact counts)."""
    anthropic = parse_anthropic_headers(headers, now=now)
    openai = parse_openai_headers(headers)
    return RateLimitHeaders(
        requests=openai.requests or anthropic.requests,
        tokens=openai.tokens or anthropic.tokens,
        input_tokens=anthropic.input_tokens,
        output_tokens=anthropic.output_tokens,
    )


def _bounded(value: float) -> float | None:
    """A hint we can act on: finite, and capped, so `inf` cannot stall a provider."""
    return min(max(0.0, value), MAX_HINT_S) if math.isfinite(value) else None


def _retry_after_header(value: str, now: float) -> float | None:
    """`retry-after` is seconds or an HTTP date (RFC 9110)."""
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


def retry_after_s(
    headers: Mapping[str, str],
    *,
    tokens_needed: float = 1.0,
    input_tokens_needed: float | None = None,
    now: float | None = None,
    snapshot: RateLimitHeaders | None = None,
) -> float | None:
    """The server's wait hint for a 429: `retry-after-ms`, then `retry-after`, then the
    rate-limit headers (`snapshot`, else both families read from `headers`: the time
    until one request and `tokens_needed` tokens fit, or, when the headers do not say
    how much is left, the longest reset)."""
    now = time.time() if now is None else now
    ms = headers.get("retry-after-ms")
    if ms is not None and (value := _number(ms)) is not None:
        return _bounded(value / 1000)
    after = headers.get("retry-after")
    if after is not None and (value := _retry_after_header(after, now)) is not None:
        return _bounded(value)
    if snapshot is None:
        snapshot = parse_rate_limit_headers(headers, now=now)
    waits = [
        budget.seconds_until(need)
        for budget, need in (
            (snapshot.requests, 1.0),
            (snapshot.tokens, tokens_needed),
            (
                snapshot.input_tokens,
                tokens_needed if input_tokens_needed is None else input_tokens_needed,
            ),
            (snapshot.output_tokens, 1.0),
        )
        if budget is not None
    ]
    known = [w for w in waits if w is not None]
    return _bounded(max(known)) if known else None
