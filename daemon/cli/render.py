"""Human output for the CLI: plain-text tables and a one-line progress bar."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import msgspec


def when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def short(text: Any, width: int) -> str:
    value = "-" if text is None else str(text).replace("\n", " ")
    return value if len(value) <= width else value[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO = sys.stdout) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def pairs(items: Mapping[str, Any], out: TextIO = sys.stdout) -> None:
    width = max((len(k) for k in items), default=0)
    for key, value in items.items():
        print(f"{key.ljust(width)}  {value}", file=out)


def as_json(data: Any, out: TextIO = sys.stdout) -> None:
    out.write(msgspec.json.format(msgspec.json.encode(data), indent=2).decode() + "\n")


def bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total <= 0 else min(width, width * done // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class ProgressLine:
    """Rewrites one terminal line in place; prints plain lines when not a TTY."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = ""

    def update(self, text: str) -> None:
        if self._tty:
            self._out.write("\r\x1b[2K" + text)
            self._out.flush()
        elif text != self._last:
            self._out.write(text + "\n")
        self._last = text

    def close(self) -> None:
        if self._tty and self._last:
            self._out.write("\n")
            self._out.flush()


def status_report(data: Mapping[str, Any], out: TextIO = sys.stdout) -> None:
    jobs = data["jobs"]
    queue = data["queue"]
    pairs(
        {
            "state": data["state"],
            "pid": data["pid"],
            "version": data["version"],
            "uptime": f"{data['uptime_s']:.0f} s",
            "socket": data["socket"],
            "database": data["store"]["path"],
            "running": f"{queue['active']} of {queue['max_concurrency']}",
        },
        out,
    )
    health = data["health"]
    problems = [f"{c['name']}: {c['reason']}" for c in health["checks"] if not c["ok"]]
    verdict = (
        "live, ready" if health["ready"] else ("live, NOT ready" if health["live"] else "NOT live")
    )
    print(f"\nhealth: {verdict}", file=out)
    for problem in problems:
        print(f"  - {problem}", file=out)
    print(file=out)
    table(["queued", "running", "succeeded", "failed", "canceled"], [list(jobs.values())], out)
    providers = data.get("providers") or {}
    if providers:
        print(file=out)
        table(
            [
                "provider",
                "kind",
                "in flight",
                "requests",
                "429s",
                "avg ms",
                "tokens in/out",
                "paused",
            ],
            [
                [
                    name,
                    p["kind"],
                    p["in_flight"],
                    p["requests"],
                    p["rate_limited"],
                    p["avg_latency_ms"] if p["avg_latency_ms"] is not None else "-",
                    f"{p['tokens_in']}/{p['tokens_out']}",
                    p["paused"] or "no",
                ]
                for name, p in providers.items()
            ],
            out,
        )
