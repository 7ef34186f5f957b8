"""Faults Python reports on stderr or not at all, sent to the structured log with
their origin: warnings ("coroutine ... was never awaited", named at the line that
dropped it), exceptions no one retrieved from a task or raised in a loop callback
(with the task, its coroutine and where it raised), and faulthandler for fatal
signals (a watchdog SIGABRT leaves every thread's stack in the journal)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import structlog

log = structlog.get_logger("vigil.watchdog")


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    previous = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        log.warning(
            "python.warning",
            category=category.__name__,
            message=str(message),
            file=filename,
            line=lineno,
        )

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _origin(context: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"message": context.get("message")}
    future = context.get("future") or context.get("task")
    if isinstance(future, asyncio.Task):
        fields["task"] = future.get_name()
        coro = future.get_coro()
        fields["coroutine"] = getattr(coro, "__qualname__", repr(coro))
        code = getattr(coro, "cr_code", None)
        if code is not None:
            fields["defined_at"] = f"{code.co_filename}:{code.co_firstlineno}"
    elif future is not None:
        fields["future"] = repr(future)
    if context.get("handle") is not None:
        fields["handle"] = repr(context["handle"])
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        fields["error"] = f"{type(exc).__name__}: {exc}"
        raised = traceback.extract_tb(exc.__traceback__)
        if raised:
            fields.update(file=raised[-1].filename, line=raised[-1].lineno)
            fields["function"] = raised[-1].name
    created = context.get("source_traceback")  # only in asyncio debug mode
    if created:
        fields["created_at"] = f"{created[-1].filename}:{created[-1].lineno}"
    return fields


@contextlib.contextmanager
def loop_exceptions_to_log(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    previous = loop.get_exception_handler()

    def handle(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.warning(
            "loop.exception",
            exc_info=exc if isinstance(exc, BaseException) else None,
            **_origin(context),
        )

    loop.set_exception_handler(handle)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


@contextlib.contextmanager
def faulthandler_enabled() -> Iterator[None]:
    """On unless it already was (pytest's own, `python -X faulthandler`)."""
    if faulthandler.is_enabled():
        yield
        return
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError) as exc:  # no usable stderr
        log.warning("watchdog.faulthandler_unavailable", error=str(exc))
        yield
        return
    try:
        yield
    finally:
        faulthandler.disable()
