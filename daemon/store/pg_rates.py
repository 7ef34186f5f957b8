"""A cluster's shared rate budgets (daemon/providers/limits.py `SharedRates`): one
GCRA row per provider budget on the database's clock, booked in one statement right
before each request, so nodes together stay within a provider's limit."""

from __future__ import annotations

from typing import Any

_NOW = "WITH c AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) "


class PgRates:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def book(self, key: str, increment_s: float, slice_s: float) -> float:
        """The budget's theoretical arrival time moves on by `increment_s`; a request
        may go once that is within one slice of now. Returns the seconds to wait, below
        zero when the slice has room to spare (the caller's margin comes off that)."""
        wait: float = await self._pool.fetchval(
            _NOW + "INSERT INTO rate_budgets AS b (key, tat) SELECT $1, c.now + $2 FROM c "
            "ON CONFLICT (key) DO UPDATE SET tat = greatest(b.tat, (SELECT now FROM c)) + $2 "
            "RETURNING b.tat - $3 - (SELECT now FROM c)",
            key,
            increment_s,
            slice_s,
        )
        return wait

    async def hold(self, key: str, seconds: float, slice_s: float) -> None:
        """A 429 on any node: the next request on `key` goes `seconds` from now."""
        await self._pool.execute(
            _NOW + "INSERT INTO rate_budgets AS b (key, tat) SELECT $1, c.now + $2 + $3 FROM c "
            "ON CONFLICT (key) DO UPDATE SET tat = greatest(b.tat, (SELECT now FROM c) + $2 + $3)",
            key,
            seconds,
            slice_s,
        )
