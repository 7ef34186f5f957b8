"""A provider's counters for `vigil status` and metrics: requests by status, 429s,
tokens, in-flight, and latency (totals, plus percentiles over the recent requests)."""

from __future__ import annotations

import math
from collections import Counter, deque

import msgspec

LATENCY_WINDOW = 1000
"""Recent latencies kept for percentiles: bounded, and recent is what an operator asks about."""


class ProviderStats(msgspec.Struct, kw_only=True):
    requests: int = 0
    by_status: dict[str, int] = {}
    rate_limited: int = 0
    overloaded: int = 0  # 529s and the like: the API busy, nobody's limit
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    answered: int = 0  # requests that got an HTTP answer (those latency covers)
    latency_ms_total: float = 0.0


class LatencyWindow:
    """The last `size` latencies; percentiles by nearest rank."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self._values.append(ms)

    def __len__(self) -> int:
        return len(self._values)

    def percentile(self, p: float) -> float | None:
        if not self._values:
            return None
        ordered = sorted(self._values)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]


class StatusCounter:
    """Counts answers by status ("200", "429", "timeout"...), mirrored into the stats."""

    def __init__(self, stats: ProviderStats) -> None:
        self._stats = stats
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        self._counts[key] += 1
        self._stats.by_status = dict(self._counts)
