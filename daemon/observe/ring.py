"""A bounded in-memory ring of recent log events, for `vigil logs` and `logs -f`.

Each event is encoded to JSON once, when it is logged, and kept with the few fields
the filters need. Events may be logged from threads (the watchdog's side thread):
appending to a deque is thread-safe, and followers that are not woken by a thread's
event see it at their next poll, a fraction of a second later.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from daemon.wakeup import Wakeup

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
MAX_EVENT_BYTES = 64 * 1024
FOLLOW_POLL_S = 0.5


class Entry(msgspec.Struct, frozen=True):
    seq: int
    level: int
    timestamp: str
    job_id: str | None
    line: bytes


class LogFilter(msgspec.Struct, frozen=True, kw_only=True):
    level: int = 0
    job_id: str | None = None
    since: str | None = None  # ISO 8601 UTC, compared as text (same format throughout)

    def matches(self, entry: Entry) -> bool:
        return (
            entry.level >= self.level
            and (self.job_id is None or entry.job_id == self.job_id)
            and (self.since is None or entry.timestamp >= self.since)
        )


def encode_event(event: Mapping[str, Any]) -> bytes:
    """JSON for one event; anything msgspec cannot encode is written as its repr."""
    return msgspec.json.encode(event, enc_hook=repr)


class LogRing:
    def __init__(self, size: int = 10_000) -> None:
        self._entries: deque[Entry] = deque(maxlen=size)
        self._seq = 0
        self._lock = threading.Lock()
        self._main = threading.main_thread()
        self.appended = Wakeup()

    def add(self, event: Mapping[str, Any], line: bytes) -> None:
        if len(line) > MAX_EVENT_BYTES:
            line = encode_event(
                {k: event[k] for k in ("timestamp", "level", "event") if k in event}
                | {"truncated_bytes": len(line)}
            )
        job_id = event.get("job_id")
        with self._lock:
            self._seq += 1
            self._entries.append(
                Entry(
                    seq=self._seq,
                    level=LEVELS.get(str(event.get("level", "info")), 20),
                    timestamp=str(event.get("timestamp", "")),
                    job_id=job_id if isinstance(job_id, str) else None,
                    line=line,
                )
            )
        if threading.current_thread() is self._main:
            self.appended.notify()

    def recent(self, flt: LogFilter, n: int, after_seq: int = 0) -> tuple[list[Entry], int]:
        """The last `n` matching entries newer than `after_seq`, oldest first, and the
        newest sequence number looked at (where the next call should resume)."""
        with self._lock:
            snapshot = list(self._entries)
            top = self._seq
        out: list[Entry] = []
        for entry in reversed(snapshot):
            if entry.seq <= after_seq or len(out) >= n:
                break
            if flt.matches(entry):
                out.append(entry)
        out.reverse()
        return out, top

    async def follow(self, flt: LogFilter, n: int) -> AsyncIterator[Entry]:
        """The last `n` matching entries, then every new one, until cancelled."""
        entries, last = self.recent(flt, n)
        while True:
            for entry in entries:
                yield entry
            await self.appended.wait(FOLLOW_POLL_S)
            entries, last = self.recent(flt, self._entries.maxlen or 1, after_seq=last)
