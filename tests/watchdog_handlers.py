"""Python handler analyzers that inject real faults for the watchdog tests (the
daemon subprocess imports them). Lines the tests look for carry a `# MARK:` tag."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import anyio

from daemon.analyzers import HandlerContext

_LEAK: list[bytes] = []


async def blocks(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Blocks the event loop with a synchronous sleep."""
    time.sleep(float(input.get("seconds", 1.0)))  # noqa: ASYNC251  # MARK: blocks
    return "slept"


async def hogs_gil(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Holds the GIL in one C call (a sum over a range) for about `seconds`: the side
    thread starves until it returns, faulthandler's C thread does not."""
    items = int(float(input.get("seconds", 3.0)) / _sum_s_per_item())
    sum(range(items))  # MARK: hogs_gil
    return "hogged"


def _sum_s_per_item() -> float:
    """What sum() over a range takes per item on this machine: the fastest of a few
    short runs, so the long one lasts at least as long as asked."""
    items = 100_000
    best_s = math.inf
    for _ in range(5):
        start = time.perf_counter()
        sum(range(items))
        best_s = min(best_s, time.perf_counter() - start)
    return best_s / items


async def leaks(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Keeps a fresh block of memory alive on every call."""
    _LEAK.append(b"v" * int(input.get("bytes", 262_144)))  # MARK: leaks
    return "leaked"


async def forever(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Awaits forever; the analyzer's timeout cancels it."""
    await anyio.sleep_forever()  # MARK: forever
    return "unreachable"


async def shielded(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Shields itself from cancellation: the timeout cannot end it; the watchdog's
    stuck detector is the backstop."""
    with anyio.CancelScope(shield=True):
        await anyio.sleep(float(input.get("hold_s", 60.0)))  # MARK: shielded
    return "finished late"


async def _fails_later() -> None:
    await asyncio.sleep(0)
    raise ValueError("nobody awaits me")  # MARK: fails_later


async def _never_awaited() -> None:
    pass


async def sloppy(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Drops a coroutine without awaiting it and fires a task that fails unseen."""
    dropped = _never_awaited()
    del dropped  # MARK: dropped
    # Deliberately unowned: its exception is never retrieved.
    asyncio.get_running_loop().create_task(_fails_later())
    await asyncio.sleep(0.05)
    return "sloppy"


def marked_line(tag: str) -> int:
    """The line number carrying `# MARK: tag` in this file."""
    with open(__file__, encoding="utf-8") as source:
        for number, line in enumerate(source, 1):
            if line.rstrip().endswith(f"# MARK: {tag}"):
                return number
    raise LookupError(tag)
