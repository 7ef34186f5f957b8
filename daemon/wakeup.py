"""A level-free wake-up signal: `notify()` wakes everyone waiting now."""

from __future__ import annotations

import anyio


class Wakeup:
    """An anyio.Event that re-arms itself, so waiters need no reset protocol.

    The event is made only when somebody waits: `notify` runs once per finished
    attempt, waits are rarer, and an Event costs more than the check."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the next notify; False when the timeout came first."""
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        with anyio.move_on_after(timeout_s):
            await event.wait()
            return True
        return False
