"""A level-free wake-up signal: `notify()` wakes everyone waiting now."""

from __future__ import annotations

import anyio


class Wakeup:
    """An anyio.Event that re-arms itself, so waiters need no reset protocol."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the next notify; False when the timeout came first."""
        event = self._event
        with anyio.move_on_after(timeout_s):
            await event.wait()
            return True
        return False
