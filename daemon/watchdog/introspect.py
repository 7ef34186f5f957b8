"""Where the process is: the stacks of its threads and asyncio tasks.

Every stack here lists the innermost frame first (the call that is running or
waiting), then its callers. A task's stack follows its coroutine's await chain:
asyncio's own `Task.get_stack()` stops at the outermost coroutine, which says only
that a job is running, not where it waits."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from types import FrameType
from typing import Any

import anyio
import msgspec
import structlog

log = structlog.get_logger("vigil.watchdog")

MAX_FRAMES = 40
MAX_LOGGED_GROUPS = 50  # SIGUSR1: distinct task stacks written to the log


class Frame(msgspec.Struct, frozen=True):
    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


UNKNOWN = Frame("<unknown>", 0, "<unknown>")

_STDLIB = os.path.join(os.path.dirname(os.__file__), "")
_ANYIO = os.path.join(os.path.dirname(anyio.__file__), "")


def _plumbing(file: str) -> bool:
    """The standard library (not site-packages below it) and anyio."""
    if file.startswith(("<frozen ", _ANYIO)):
        return True
    if not file.startswith(_STDLIB):
        return False
    rest = file[len(_STDLIB) :]
    return not rest.startswith(("site-packages", "dist-packages"))


def headline(stack: list[Frame]) -> Frame:
    """The frame to name first: the innermost outside the standard library and
    anyio (a timed-out attempt always waits inside asyncio; its caller is the news),
    or the innermost when all are."""
    for frame in stack:
        if not _plumbing(frame.file):
            return frame
    return stack[0] if stack else UNKNOWN


def _frame(frame: FrameType) -> Frame:
    code = frame.f_code
    return Frame(code.co_filename, frame.f_lineno or 0, code.co_qualname)


def frame_stack(frame: FrameType | None, limit: int = MAX_FRAMES) -> list[Frame]:
    """A thread's stack from its current frame outwards."""
    frames: list[Frame] = []
    while frame is not None and len(frames) < limit:
        frames.append(_frame(frame))
        frame = frame.f_back
    return frames


def coro_stack(coro: object, limit: int = MAX_FRAMES) -> list[Frame]:
    """A coroutine's await chain, innermost first (generator-based and async
    generator links included; a plain Future ends the chain)."""
    frames: list[Frame] = []
    link: object = coro
    while link is not None and len(frames) < limit:
        frame = (
            getattr(link, "cr_frame", None)
            or getattr(link, "gi_frame", None)
            or getattr(link, "ag_frame", None)
        )
        if not isinstance(frame, FrameType):
            break
        frames.append(_frame(frame))
        link = (
            getattr(link, "cr_await", None)
            or getattr(link, "gi_yieldfrom", None)
            or getattr(link, "ag_await", None)
        )
    frames.reverse()
    return frames


def _task_state(task: asyncio.Task[Any], current: asyncio.Task[Any] | None) -> str:
    if task is current:
        return "running"
    if task.done():
        return "done"
    return "cancelling" if task.cancelling() else "waiting"


def coroutine_name(coro: object) -> str:
    """What a task runs: anyio wraps each task's coroutine in its own
    (`TaskHandle._run_coro`); the name worth showing is the one it awaits."""
    link = coro
    for _ in range(4):
        code = getattr(link, "cr_code", None)
        following = getattr(link, "cr_await", None)
        if code is None or following is None or not code.co_filename.startswith(_ANYIO):
            break
        link = following
    return str(getattr(link, "__qualname__", type(link).__name__))


def task_report(created: Mapping[asyncio.Future[Any], float] | None, limit: int) -> dict[str, Any]:
    """Every asyncio task: name, state, age (when the watchdog's task factory saw
    it created), coroutine and stack; oldest first, at most `limit` of them (only
    those have their stacks walked)."""
    now = time.monotonic()
    current = asyncio.current_task()
    aged: list[tuple[float | None, asyncio.Task[Any]]] = []
    for task in asyncio.all_tasks():
        born = created.get(task) if created is not None else None
        aged.append((None if born is None else now - born, task))
    aged.sort(key=lambda pair: -1.0 if pair[0] is None else pair[0], reverse=True)
    return {
        "count": len(aged),
        "shown": min(limit, len(aged)),
        "tasks": [
            {
                "name": task.get_name(),
                "state": _task_state(task, current),
                "age_s": None if age is None else round(age, 3),
                "coroutine": coroutine_name(task.get_coro()),
                "stack": [str(f) for f in coro_stack(task.get_coro())],
            }
            for age, task in aged[:limit]
        ],
    }


def thread_report() -> dict[str, Any]:
    """Every Python thread's stack at this moment."""
    frames = sys._current_frames()
    names = {t.ident: t for t in threading.enumerate()}
    threads = []
    for ident, frame in frames.items():
        thread = names.get(ident)
        threads.append(
            {
                "name": thread.name if thread else f"thread {ident}",
                "ident": ident,
                "native_id": thread.native_id if thread else None,
                "daemon": thread.daemon if thread else None,
                "stack": [str(f) for f in frame_stack(frame)],
            }
        )
    threads.sort(key=lambda t: (t["name"] != "MainThread", str(t["name"])))
    return {"count": len(threads), "threads": threads}


def log_stacks(reason: str) -> None:
    """Write every thread's stack, and the tasks grouped by identical stacks, to the
    log (SIGUSR1): 100 k tasks waiting at one place make one line, not 100 k."""
    for thread in thread_report()["threads"]:
        log.warning("stacks.thread", reason=reason, **thread)
    groups: Counter[tuple[str, ...]] = Counter()
    names: dict[tuple[str, ...], list[str]] = {}
    for task in asyncio.all_tasks():
        key = tuple(str(f) for f in coro_stack(task.get_coro()))
        groups[key] += 1
        sample = names.setdefault(key, [])
        if len(sample) < 5:
            sample.append(task.get_name())
    for key, count in groups.most_common(MAX_LOGGED_GROUPS):
        log.warning("stacks.tasks", reason=reason, count=count, names=names[key], stack=list(key))
    if len(groups) > MAX_LOGGED_GROUPS:
        log.warning("stacks.tasks_truncated", reason=reason, groups=len(groups))
