"""Logging: structlog configured once, JSON lines on stdout (journald) or a readable
console format on a TTY; secrets are scrubbed from every event before rendering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from daemon.observe.ring import LogRing, encode_event

_SECRET_KEYS = frozenset({"authorization", "api_key", "apikey", "token", "password", "secret"})
REDACTED = "[redacted]"
_PLAIN = frozenset({int, float, bool, type(None)})  # nothing to scrub, and the most common
# One string field of a log line (a stack frame, an error message, a repr). Cut after
# the secrets are masked, so a cut never leaves a piece of a key the mask would miss.
MAX_FIELD_CHARS = 4000


def clip(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`value`, cut to `limit` characters with a note of how many were left out."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... [{len(value) - limit} more characters]"


class Redactor:
    """Drops values under secret-looking keys and masks known secret values anywhere
    in a string (an API key echoed back inside an error message, say), then cuts long
    strings (MAX_FIELD_CHARS). `text` is the backstop on the rendered line, for what
    the structure hid (an object's repr)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self._encoded: list[tuple[bytes, bytes]] = []
        self.learn(secrets)

    def learn(self, secrets: Iterable[str]) -> None:
        """Mask these too (a reload that names a new webhook key). The lists are
        replaced whole, never changed in place: another thread may be scrubbing."""
        known = {*self.secrets, *(s for s in secrets if len(s) >= 6)}
        ordered = sorted(known, key=len, reverse=True)
        self._encoded = [(s.encode(), REDACTED.encode()) for s in ordered]
        self.secrets = ordered

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def line(self, value: bytes) -> bytes:
        for secret, redacted in self._encoded:
            if secret in value:
                value = value.replace(secret, redacted)
        return value

    def field(self, value: str) -> str:
        return clip(self.text(value) if self.secrets else value)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.field(value)
        if isinstance(value, Mapping):
            return {
                self.scrub(k): REDACTED if str(k).lower() in _SECRET_KEYS else self.scrub(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self.scrub(v) for v in value]
        return value

    def __call__(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        # In place (structlog hands each processor chain its own dict), and numbers are
        # left alone: this runs for every line, one a job at least.
        for key, value in event.items():
            if key.lower() in _SECRET_KEYS:
                event[key] = REDACTED
            elif isinstance(value, str):
                event[key] = self.field(value)
            elif type(value) in _PLAIN or key == "exc_info":
                continue  # exc_info: an exception, rendered (and then scrubbed) elsewhere
            elif isinstance(value, Mapping | list | tuple | set | frozenset):
                try:
                    event[key] = self.scrub(value)
                except RecursionError:
                    event[key] = "[too deeply nested]"
        return event


class UtcStamper:
    """`timestamp` as `2026-12-05T22:40:46.470488Z`, always with microseconds (so the
    stamps sort as text, as the ring's `since` compares them). structlog's TimeStamper
    goes through a datetime for every line; the seconds' part is formatted here once a
    second: half the cost, on a line every attempt writes."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, name: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


class RingRenderer:
    """The last processor: encodes each event to JSON once, keeps it in the ring, and
    (JSON format) returns the same text for stdout, or hands the event on to the
    console renderer. An event that cannot be rendered becomes a `log.unrenderable`
    line: a log call never raises."""

    def __init__(self, ring: LogRing | None, console: Processor | None, redactor: Redactor) -> None:
        self._ring = ring
        self._console = console
        self._redactor = redactor

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        try:
            return self._render(logger, name, event)
        except Exception as exc:
            fallback = {
                "event": "log.unrenderable",
                "level": str(event.get("level", "error")),
                "timestamp": str(event.get("timestamp", "")),
                "original": clip(self._redactor.text(str(event.get("event", "?"))), 200),
                "error": type(exc).__name__,
            }
            return self._render(logger, name, fallback)

    def _render(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        line = self._redactor.line(encode_event(event))
        if self._ring is not None:
            self._ring.add(event, line)
        if self._console is not None:
            rendered: str = self._console(logger, name, event)  # type: ignore[assignment]
            return self._redactor.text(rendered)
        return line.decode()


MAX_WAITING_LINES = 10_000  # a stdout that stopped taking lines costs them, not memory


class LineWriter:
    """structlog's logger. Lines logged on the event loop's thread are written together
    at the end of the loop's iteration: a burst (attempts ending together) costs one
    write(2) instead of one each, buffered or not (PYTHONUNBUFFERED). A line from
    another thread (the watchdog's, start-up) is written at once, with any before it.

    No lock is held while writing: a finalizer that logs from inside a write (the
    garbage collector runs them anywhere) must not wait on its own thread, and the
    watchdog's thread must not wait on a loop stuck in a slow write. Whoever writes
    takes every line that waits, so a flush turned away loses nothing."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []  # one loop iteration's lines, or a stuck write's
        self._lines_lock = threading.RLock()  # held only to append and to swap
        self._writing = threading.Lock()  # one writer at a time, never waited on
        self._flush_pending = False  # a flush is queued on the loop
        self.failed_writes = 0  # stdout gone (EPIPE, closed): those lines are dropped
        self.dropped_lines = 0  # by failed writes, or past MAX_WAITING_LINES
        self.redactor: Redactor | None = None  # what scrubs the lines (a reload adds keys)

    def msg(self, message: str) -> None:
        with self._lines_lock:
            if len(self._lines) >= MAX_WAITING_LINES:
                self.dropped_lines += 1
                return
            self._lines.append(message)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what waits; the daemon calls it once more after its loop ends."""
        self._flush_pending = False  # also when a loop ended with the callback queued
        # Turned away when a write is under way, on another thread or on this one (a
        # line logged from inside our own write): that writer takes these lines too.
        while self._writing.acquire(blocking=False):
            try:
                self._write_waiting()
            finally:
                self._writing.release()
            with self._lines_lock:
                if not self._lines:  # else: appended by a flush turned away meanwhile
                    return

    def _write_waiting(self) -> None:
        """A stream that fails (a closed pipe, journald gone) costs those lines, never
        the daemon: counted and said once on stderr, not logged, which would only
        queue more lines for the same stream."""
        while True:
            with self._lines_lock:
                lines, self._lines = self._lines, []
            if not lines:
                return
            lines.append("")
            try:
                self._stream.write("\n".join(lines))
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self.failed_writes += 1
                self.dropped_lines += len(lines) - 1
                if self.failed_writes == 1:
                    _stderr(f"vigil: cannot write the log ({exc}); lines dropped")

    def status(self) -> dict[str, int]:
        return {"failed_writes": self.failed_writes, "dropped_lines": self.dropped_lines}

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _stderr(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr)


def _level_number(level: str) -> int:
    return logging.getLevelNamesMapping()[level.upper()]


def set_level(level: str) -> None:
    """Change the level live (reload): loggers are not cached, so this applies at once."""
    numeric = _level_number(level)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(numeric))
    logging.getLogger().setLevel(max(numeric, logging.INFO))


class _WriterHandler(logging.Handler):
    """The stdlib's records go through the same writer, in order with structlog's."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        """Without the stdlib's handler lock, which would be held through a write: the
        writer locks only to queue a line, so a record from another thread never holds
        up the loop's."""
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """The stdlib's own version prints the record's arguments (secrets, maybe)."""
        _stderr(f"vigil: a log record from {record.name!r} could not be formatted")


def _factory(writer: LineWriter) -> Callable[..., LineWriter]:
    """Every logger shares the one writer (structlog asks for a logger per event)."""
    return lambda *_: writer


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
    ring: LogRing | None = None,
) -> LineWriter:
    """Returns the writer: what it holds is written with `flush()` once the loop ends."""
    out = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        UtcStamper(),
    ]
    # Last before rendering: a traceback (its messages, its frames' locals) is
    # scrubbed too.
    redact = Redactor(secrets)
    writer = LineWriter(out)
    writer.redactor = redact
    renderer = RingRenderer(
        ring, structlog.dev.ConsoleRenderer(colors=False) if console else None, redact
    )
    # Tracebacks become text (console) or a dict (JSON) before the redactor sees them.
    # No frame locals: a local may hold a key, and they are cut short, so a partial key
    # would no longer match the known value the redactor looks for.
    tail: list[Processor] = [
        structlog.processors.format_exc_info
        if console
        else structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, redact, renderer],
        logger_factory=_factory(writer),
        cache_logger_on_first_use=False,
    )
    set_level(level)
    # Libraries (aiohttp, asyncio) log through the stdlib: same format, same stream.
    handler = _WriterHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, *tail, redact],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    return writer
