"""Logging: structlog configured once, JSON lines on stdout (journald) or a readable
console format on a TTY; secrets are scrubbed from every event before rendering."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from daemon.observe.ring import LogRing, encode_event

_SECRET_KEYS = frozenset({"authorization", "api_key", "apikey", "token", "password", "secret"})
REDACTED = "[redacted]"


class Redactor:
    """Drops values under secret-looking keys and masks known secret values anywhere
    in a string (an API key echoed back inside an error message, say)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {
                k: REDACTED if str(k).lower() in _SECRET_KEYS else self.scrub(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def __call__(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        return {
            key: REDACTED if key.lower() in _SECRET_KEYS else self.scrub(value)
            for key, value in event.items()
        }


class RingRenderer:
    """The last processor: encodes each event to JSON once, keeps it in the ring, and
    (JSON format) returns the same text for stdout, or hands the event on to the
    console renderer."""

    def __init__(self, ring: LogRing | None, console: Processor | None) -> None:
        self._ring = ring
        self._console = console

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        line = encode_event(event)
        if self._ring is not None:
            self._ring.add(event, line)
        if self._console is not None:
            rendered: str = self._console(logger, name, event)  # type: ignore[assignment]
            return rendered
        return line.decode()


def _level_number(level: str) -> int:
    return logging.getLevelNamesMapping()[level.upper()]


def set_level(level: str) -> None:
    """Change the level live (reload): loggers are not cached, so this applies at once."""
    numeric = _level_number(level)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(numeric))
    logging.getLogger().setLevel(max(numeric, logging.INFO))


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
    ring: LogRing | None = None,
) -> None:
    out = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        Redactor(secrets),
    ]
    renderer = RingRenderer(ring, structlog.dev.ConsoleRenderer(colors=False) if console else None)
    tail: list[Processor] = [] if console else [structlog.processors.dict_tracebacks]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    set_level(level)
    # Libraries (aiohttp, asyncio) log through the stdlib: same format, same stream.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, *tail],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
