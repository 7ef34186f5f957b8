"""Budget windows: UTC calendar days and months, named by the period they cover."""

from __future__ import annotations

import datetime as dt
from typing import Literal

Window = Literal["day", "month"]
WINDOWS: tuple[Window, ...] = ("day", "month")


def period_of(window: Window, now: float) -> str:
    """The period `now` (unix time) falls in: "2026-12-05" for a day, "2026-12" for a month."""
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    return when.strftime("%Y-%m-%d" if window == "day" else "%Y-%m")


def resets_at(window: Window, now: float) -> float:
    """When the period holding `now` ends (unix time): the next UTC midnight or month."""
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    start = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        return (start + dt.timedelta(days=1)).timestamp()
    first = start.replace(day=1)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    return following.timestamp()
