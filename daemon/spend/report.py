"""The spend report (`vigil usage`, `GET /v1/usage`): the one parser of its time
bounds, which the CLI and the HTTP API share, and the report's total row.

Stdlib and the store's row type only: the CLI imports it without the HTTP server."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from daemon.store.calls import UsageRow

DEFAULT_SPAN_S = 7 * 86_400.0
"""Without `since`, the report covers the 7 days before `until`."""

WHEN_FORMS = (
    "a duration back from now (30m, 24h, 7d; also s and w), a date YYYY-MM-DD "
    "(UTC midnight) or an ISO 8601 date-time (UTC unless it has an offset, "
    "e.g. 2026-11-23T18:00:00Z)"
)
_DURATION = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 7 * 86_400}


def parse_when(text: str, now: float) -> float:
    """A time bound as a unix time: `7d` (7 days before `now`), `2026-11-23` (that
    UTC midnight), `2026-11-23T18:00` (UTC) or with an offset. ValueError, whose
    message gives the accepted forms, for anything else."""
    value = text.strip()
    span = duration_s(value)
    stamp = now - span if span is not None else _iso(value)
    if stamp < 0:
        raise ValueError(f"{text!r} lies before 1970-01-01 (unix time 0)")
    return stamp


def duration_s(text: str) -> float | None:
    """`30m` in seconds (units s, m, h, d, w); None if `text` is not a duration."""
    match = _DURATION.fullmatch(text.strip())
    return None if match is None else float(match[1]) * _UNIT_S[match[2]]


def _iso(value: str) -> float:
    if not value[:1].isdigit() or len(value) < len("YYYY-MM-DD"):
        # fromisoformat also takes compact forms ("20261123"): a bare number is more
        # likely a duration without its unit, so it is refused, naming the forms.
        raise ValueError(f"expected {WHEN_FORMS}, got {value!r}")
    try:
        when = dt.datetime.fromisoformat(value)  # a date alone is its midnight
    except ValueError:
        raise ValueError(f"expected {WHEN_FORMS}, got {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def total_of(rows: Sequence[UsageRow]) -> UsageRow:
    """The rows summed, keyed "total". Jobs and attempts are the rows' sum too, so a
    job whose calls fall into two rows (two days, say) counts once in each. The cost
    is null only when calls were made and none had a price; no calls cost 0."""
    costs = [r.cost_usd for r in rows if r.cost_usd is not None]
    return UsageRow(
        key="total",
        jobs=sum(r.jobs for r in rows),
        attempts=sum(r.attempts for r in rows),
        calls=sum(r.calls for r in rows),
        input_tokens=sum(r.input_tokens for r in rows),
        cached_tokens=sum(r.cached_tokens for r in rows),
        cache_write_tokens=sum(r.cache_write_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        cost_usd=sum(costs, 0.0) if costs or not rows else None,
    )
