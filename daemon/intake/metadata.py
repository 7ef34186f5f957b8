"""Per-job metadata as intake reads it: when a delayed job may start (`not_before`),
given as a unix time, an ISO 8601 time or a delay from now (`+30m`); and the tags,
kept as a set. Stdlib and the job records only: the CLI parses `--not-before` here too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from daemon.jobs import LATEST_TIME
from daemon.spend.report import duration_s, parse_when

NOT_BEFORE_FORMS = (
    "a unix time, an ISO 8601 time (UTC unless it has an offset, e.g. "
    "2026-11-23T18:00:00Z) or a delay from now (+30m, +2h; units s, m, h, d, w)"
)


def resolve_not_before(value: float | str | None, now: float) -> float:
    """The unix time before which a job does not start: 0.0 (none) when no time is
    given or the time is already past. ValueError, naming the accepted forms, for
    anything else."""
    if value is None:
        return 0.0
    stamp = _stamp(value, now) if isinstance(value, str) else float(value)
    if not math.isfinite(stamp) or stamp > LATEST_TIME:
        raise ValueError(f"{value!r} lies after the year 9999")
    return stamp if stamp > now else 0.0


def _stamp(value: str, now: float) -> float:
    text = value.strip()
    if text.startswith("+"):
        span = duration_s(text[1:])
        if span is None:
            raise ValueError(f"expected {NOT_BEFORE_FORMS}, got {value!r}")
        return now + span
    if duration_s(text) is not None:
        raise ValueError(f"{value!r} is ambiguous: a delay from now takes a plus sign (+{text})")
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_when(text, now)
    except ValueError:
        raise ValueError(f"expected {NOT_BEFORE_FORMS}, got {value!r}") from None


def tag_set(tags: Iterable[str]) -> tuple[str, ...]:
    """Tags as stored and compared: sorted, each once."""
    return tuple(sorted(set(tags)))
