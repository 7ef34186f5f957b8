"""One circuit breaker and one pause state per provider across a cluster: each node's
breaker and pause stay where they are decided (on the request path, no I/O), and this
service shares them through the store every SYNC_S: what this node decided since the
last round is written, what another node decided later is followed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from daemon.providers.client import ApiProvider

log = structlog.get_logger("vigil.provider")
SYNC_S = 1.0


class ProviderRow(msgspec.Struct, frozen=True, kw_only=True):
    circuit_seq: int
    open_for_s: float  # left open, on the database's clock; 0: closed
    circuit_by: str
    pause_seq: int
    paused: str | None
    paused_by: str


class SharedProviderState(Protocol):
    async def provider_states(self) -> dict[str, ProviderRow]: ...

    async def share_circuit(self, provider: str, open_for_s: float) -> int:
        """This node opened (for `open_for_s`) or closed (0) the circuit; the row's new seq."""
        ...

    async def share_pause(self, provider: str, reason: str | None) -> int:
        """This node paused the provider (or lifted its pause: None); the row's new seq."""
        ...


class ProviderSync:
    def __init__(
        self, providers: Mapping[str, ApiProvider], shared: SharedProviderState, node: str
    ) -> None:
        self._providers = providers
        self._shared = shared
        self._node = node
        self._decided = {
            name: (p.breaker.changes, p.pause_changes) for name, p in providers.items()
        }
        self._seen = dict.fromkeys(providers, (0, 0))  # row seqs already followed or written
        self.failures = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.sync()
            except Exception as exc:  # the database away: the next round tries again
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("provider.sync_failed", error=type(exc).__name__)
            await anyio.sleep(SYNC_S)

    async def sync(self) -> None:
        rows = await self._shared.provider_states()
        for name, provider in self._providers.items():
            breaker, row = provider.breaker, rows.get(name)
            circuit_seen, pause_seen = self._seen[name]
            circuit_decided, pause_decided = self._decided[name]
            if breaker.changes != circuit_decided:
                circuit_decided = breaker.changes
                circuit_seen = await self._shared.share_circuit(name, breaker.open_left_s())
            elif row is not None and row.circuit_seq > circuit_seen:
                circuit_seen = row.circuit_seq
                if row.circuit_by != self._node:
                    breaker.adopt(row.open_for_s, row.circuit_by)
            if provider.pause_changes != pause_decided:
                pause_decided = provider.pause_changes
                pause_seen = await self._shared.share_pause(name, provider.paused_reason)
            elif row is not None and row.pause_seq > pause_seen:
                pause_seen = row.pause_seq
                if row.paused_by != self._node:
                    reason = (
                        None if row.paused is None else f"{row.paused} (on node {row.paused_by})"
                    )
                    provider.adopt_pause(reason)
            self._seen[name] = (circuit_seen, pause_seen)
            self._decided[name] = (circuit_decided, pause_decided)
