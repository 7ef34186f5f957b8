"""Exponential backoff with full jitter: retries spread out instead of arriving in
waves, and a server's own hint (`retry-after`) is never undercut."""

from __future__ import annotations

import random


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    hint_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before the retry that follows failed attempt number `attempt` (1-based)."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    delay = (rng or random).uniform(0.0, ceiling)
    if hint_s is not None:
        delay = max(delay, min(hint_s, max_s))
    return delay
