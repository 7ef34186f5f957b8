"""Finished jobs kept for `queue.retain_finished_s`, then deleted with their attempts,
so the tables stay small however long the daemon runs (0 keeps them all, as before)."""

from __future__ import annotations

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.live import Live
from daemon.store.base import JobStore, StoreError

log = structlog.get_logger("vigil.retention")
MAX_EVERY_S = 60.0


class Retention:
    def __init__(self, store: JobStore, live: Live) -> None:
        self._store = store
        self._live = live
        self.deleted = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Purge every tenth of the retention (1 s to MAX_EVERY_S), reading the live
        config each round so a reload applies; a failed round is logged, not fatal."""
        task_status.started()
        while True:
            keep_s = self._live.config.queue.retain_finished_s
            if keep_s:
                try:
                    deleted = await self._store.purge(keep_s)
                except StoreError as exc:
                    log.warning("retention.failed", error=str(exc))
                else:
                    self.deleted += deleted
                    if deleted:
                        log.info("retention.purged", deleted=deleted, older_than_s=keep_s)
            await anyio.sleep(min(MAX_EVERY_S, max(1.0, keep_s / 10)) if keep_s else MAX_EVERY_S)
