"""The SQLite store's watch on its disk: free space and a write probe, so readiness
follows the disk without waiting for traffic (a mixin: the store runs `_watch`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio
import structlog

from daemon.store.base import StoreError
from daemon.store.sqlite_batch import BatchWriter

log = structlog.get_logger("vigil.store")
WATCH_S = 1.0  # free space checked this often; a failed write re-probed this often
PROBE_S = 10.0  # a write probe this often while healthy: a fault shows without traffic


class DiskWatch(BatchWriter):
    path: Path
    low_space: str | None
    last_error: str | None
    _min_free_bytes: int

    async def _watch(self, scope: anyio.CancelScope) -> None:
        """Keeps `low_space` and `last_error` true to the disk without waiting for
        traffic: free space every WATCH_S, a write probe every PROBE_S, and every
        WATCH_S while writes fail, so readiness comes back once the fault clears."""
        with scope:
            next_probe = anyio.current_time() + PROBE_S
            while True:
                await anyio.sleep(WATCH_S)
                try:
                    low = await anyio.to_thread.run_sync(self._space_problem)
                    if low and not self.low_space:
                        log.warning("store.low_space", reason=low)
                    elif self.low_space and not low:
                        log.info("store.space_ok")
                    self.low_space = low
                    if self.last_error is not None or anyio.current_time() >= next_probe:
                        next_probe = anyio.current_time() + PROBE_S
                        with contextlib.suppress(StoreError):
                            await self.probe()
                except Exception:  # one bad round must not end the watch
                    log.exception("store.watch_failed")

    def _space_problem(self) -> str | None:
        """Why intake should stop for lack of disk space, or None (blocking: a thread)."""
        if not self._min_free_bytes:
            return None
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None  # the database's own errors will say more
        free = st.f_bavail * st.f_frsize
        if free >= self._min_free_bytes:
            return None
        return (
            f"disk nearly full: {free / 2**20:.1f} MiB free under {self.path.parent}, "
            f"below daemon.min_free_mb ({self._min_free_bytes // 2**20})"
        )
