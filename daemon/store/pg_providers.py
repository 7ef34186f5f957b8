"""The providers' breaker and pause state a cluster shares (providers/shared_state.py),
one row per provider, times on the database's clock."""

from __future__ import annotations

from typing import Any

from daemon.providers.shared_state import ProviderRow

_NOW = "extract(epoch FROM clock_timestamp())::float8"
_UNTIL = f"CASE WHEN $2::float8 > 0 THEN {_NOW} + $2 ELSE 0 END"  # 0: closed


class PgProviderState:
    def __init__(self, pool: Any, node: str) -> None:
        self._pool = pool
        self._node = node

    async def provider_states(self) -> dict[str, ProviderRow]:
        rows = await self._pool.fetch(
            f"SELECT provider, circuit_seq, greatest(0, open_until - {_NOW}) AS open_for_s, "
            "circuit_by, pause_seq, paused, paused_by FROM provider_states"
        )
        return {
            r["provider"]: ProviderRow(
                circuit_seq=r["circuit_seq"],
                open_for_s=r["open_for_s"],
                circuit_by=r["circuit_by"],
                pause_seq=r["pause_seq"],
                paused=r["paused"],
                paused_by=r["paused_by"],
            )
            for r in rows
        }

    async def share_circuit(self, provider: str, open_for_s: float) -> int:
        seq: int = await self._pool.fetchval(
            "INSERT INTO provider_states AS p (provider, circuit_seq, open_until, circuit_by) "
            f"VALUES ($1, nextval('provider_state_seq'), {_UNTIL}, $3) "
            "ON CONFLICT (provider) DO UPDATE SET circuit_seq = nextval('provider_state_seq'), "
            f"open_until = {_UNTIL}, circuit_by = $3 RETURNING p.circuit_seq",
            provider,
            open_for_s,
            self._node,
        )
        return seq

    async def share_pause(self, provider: str, reason: str | None) -> int:
        seq: int = await self._pool.fetchval(
            "INSERT INTO provider_states AS p (provider, pause_seq, paused, paused_by) "
            "VALUES ($1, nextval('provider_state_seq'), $2, $3) "
            "ON CONFLICT (provider) DO UPDATE SET pause_seq = nextval('provider_state_seq'), "
            "paused = $2, paused_by = $3 RETURNING p.pause_seq",
            provider,
            reason,
            self._node,
        )
        return seq
