"""Human output for the CLI: plain-text tables and a one-line progress bar."""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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
    """Rewrites one terminal line in place. Elsewhere (a pipe, a log file) it prints
    the first line, then at most one every `every_s` seconds, and the last one on
    close, so a long wait does not fill a log with a line a tick."""

    def __init__(
        self,
        out: TextIO = sys.stderr,
        *,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._tty = out.isatty()
        self._every_s = every_s
        self._clock = clock
        self._last = ""
        self._printed_at: float | None = None
        self._pending = False  # the latest text has not been printed

    def update(self, text: str) -> None:
        self._last = text
        if self._tty:
            self._out.write("\r\x1b[2K" + text)
            self._out.flush()
            return
        now = self._clock()
        if self._printed_at is None or now - self._printed_at >= self._every_s:
            self._out.write(text + "\n")
            self._out.flush()
            self._printed_at, self._pending = now, False
        else:
            self._pending = True

    def close(self) -> None:
        if self._tty and self._last:
            self._out.write("\n")
        elif self._pending:
            self._out.write(self._last + "\n")
            self._pending = False
        self._out.flush()


def reload_lines(data: Mapping[str, Any]) -> list[str]:
    """`vigil reload` for a human: one line a changed key (`queue.max_concurrency 16 →
    4`, `http.listen (needs a restart)`, `analyzers.x (added)`), or that nothing changed.
    A daemon from before `changes` gets the section lists it sent."""
    changes = data.get("changes")
    if changes is None:
        lines = ["reloaded: " + (", ".join(data.get("applied") or []) or "no changes")]
        if data.get("needs_restart"):
            lines.append("needs a restart to apply: " + ", ".join(data["needs_restart"]))
        return lines
    if not changes:
        return ["reloaded: no changes"]
    return [_change_line(change) for change in changes]


def _change_line(change: Mapping[str, Any]) -> str:
    key, before, after = change["key"], change.get("from"), change.get("to")
    restart = bool(change.get("needs_restart"))
    if isinstance(before, Mapping) or isinstance(after, Mapping):  # a table comes or goes
        what = "added" if before is None else "removed" if after is None else "changed"
        return f"{key} ({what}{'; needs a restart' if restart else ''})"
    if restart:
        return f"{key} (needs a restart)"
    return f"{key} {_config_value(before)} → {_config_value(after)}"


def _config_value(value: Any) -> str:
    """A config value as TOML writes it (16, true, "info", ["a"]); unset as `unset`."""
    return "unset" if value is None else msgspec.json.encode(value).decode()


def circuit_state(provider: Mapping[str, Any]) -> str:
    circuit = provider.get("circuit")
    return str(circuit.get("state", "-")) if isinstance(circuit, Mapping) else "-"


def providers_table(
    providers: Mapping[str, Mapping[str, Any]],
    out: TextIO = sys.stdout,
    request_rates: Mapping[str, str] | None = None,
) -> None:
    """One row per provider: load, answers, budgets, and why it may be held back."""
    headers = [
        "provider",
        "in flight",
        "conc",
        "requests",
        "429s",
        "p50 ms",
        "p99 ms",
        "rpm",
        "tpm",
        "waiting",
        "cooldown",
        "circuit",
        "paused",
    ]
    if request_rates is not None:
        headers.insert(4, "req/s")
    rows = []
    for name, p in providers.items():
        limit, most = p.get("concurrency_limit", p.get("max_concurrency")), p.get("max_concurrency")
        row = [
            name,
            p.get("in_flight", "-"),
            f"{limit}/{most}",
            p.get("requests", "-"),
            p.get("rate_limited", "-"),
            _number(p.get("p50_latency_ms")),
            _number(p.get("p99_latency_ms")),
            p.get("requests_per_minute") or "-",
            p.get("tokens_per_minute") or p.get("input_tokens_per_minute") or "-",
            p.get("waiting_for_budget", "-"),
            f"{p.get('cooldown_s', 0):.1f}s",
            circuit_state(p),
            p.get("paused") or "no",
        ]
        if request_rates is not None:
            row.insert(4, request_rates.get(name, "-"))
        rows.append(row)
    table(headers, rows, out)


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}" if isinstance(value, float) else str(value)


def watchdog_line(wd: Mapping[str, Any]) -> str:
    """The watchdog figures an operator looks at first."""
    loop, memory, leaks = wd.get("loop") or {}, wd.get("memory") or {}, wd.get("leaks") or {}
    lag = loop.get("lag_ms") or {}
    stuck = wd.get("stuck") or {}
    return (
        f"loop lag p50/p99/max {_brief(lag.get('p50'))}/{_brief(lag.get('p99'))}/"
        f"{_brief(lag.get('max'))} ms  blocked {loop.get('blocked_count', '-')}x "
        f"{_brief(loop.get('blocked_seconds', '-'))} s"
        f"{'  BLOCKED NOW' if loop.get('blocked_now') else ''}  "
        f"rss {_brief(memory.get('rss_mb'))} MB  tasks {leaks.get('tasks', '-')}  "
        f"fds {leaks.get('fds', '-')}  threads {leaks.get('threads', '-')}  "
        f"stuck cancelled {stuck.get('abandoned', '-')}"
    )


def sections(data: Mapping[str, Any], out: TextIO = sys.stdout) -> None:
    """One line each for the parts components add to status (watchdog, spool, http, logs)."""
    watchdog = data.get("watchdog")
    if isinstance(watchdog, Mapping) and watchdog.get("enabled", True):
        print(f"\nwatchdog: {watchdog_line(watchdog)}", file=out)
    for section in ("spool", "http", "logs"):
        value = data.get(section)
        if isinstance(value, Mapping) and value:
            line = "  ".join(
                f"{k} {_brief(v)}" for k, v in value.items() if not isinstance(v, list)
            )
            print(f"\n{section}: {line}", file=out)
    webhooks = data.get("webhooks")
    if isinstance(webhooks, Mapping) and webhooks:
        print(file=out)
        for name, hook in webhooks.items():
            if isinstance(hook, Mapping):
                print(f"webhook {name}: {webhook_line(hook)}", file=out)


def webhook_line(hook: Mapping[str, Any]) -> str:
    """`3 pending (oldest 12 s), 0 dead, 1,204 delivered, last 204`."""
    age = hook.get("oldest_pending_age_s")
    oldest = f" (oldest {_brief(age)} s)" if hook.get("pending") and age is not None else ""
    last = hook.get("last_status")
    error = hook.get("last_error")
    tail = f", last {last}" if last is not None else ""
    if error and hook.get("pending"):
        tail += f": {short(error, 60)}"
    return (
        f"{hook.get('pending', 0)} pending{oldest}, {hook.get('dead', 0)} dead, "
        f"{hook.get('delivered', 0):,} delivered{tail}"
    )


def _brief(value: Any) -> str:
    """A status figure for a human: no Python reprs (None, True) on screen."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} {_brief(v)}" for k, v in list(value.items())[:6]) + "}"
    return str(value)


def health_line(health: Mapping[str, Any]) -> tuple[str, list[str]]:
    problems = [f"{c['name']}: {c['reason']}" for c in health["checks"] if not c["ok"]]
    verdict = (
        "NOT live"
        if not health["live"]
        else "live, ready"
        if health["ready"]
        else ("live, NOT ready")
    )
    return verdict, problems


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
    verdict, problems = health_line(data["health"])
    print(f"\nhealth: {verdict}", file=out)
    for problem in problems:
        print(f"  - {problem}", file=out)
    print(file=out)
    table(list(jobs), [list(jobs.values())], out)
    nodes_table(data, out)
    providers = data.get("providers") or {}
    if providers:
        print(file=out)
        providers_table(providers, out)
    budgets_table(data, out)
    sections(data, out)


def usd(value: Any) -> str:
    """An amount in dollars: to the cent, or four decimals below one cent."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"${value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"${value:.4f}"


def span(seconds: float) -> str:
    """A time to come, roughly: "2d 5h", "3h 12m", "4m 30s", "12s"."""
    left = max(0, int(seconds))
    days, hours, minutes = left // 86400, left // 3600 % 24, left // 60 % 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {left % 60}s" if minutes else f"{left}s"


def budget_cells(b: Mapping[str, Any], now: float) -> list[str]:
    """One budget row of `status["budgets"]` as a human reads it."""
    limit, spent = b.get("limit_usd"), b.get("spent_usd")
    reserved = b.get("reserved_usd") or 0
    used = (
        f"{100 * (spent + reserved) / limit:.0f}%"
        if isinstance(limit, int | float) and limit > 0 and isinstance(spent, int | float)
        else "-"
    )
    resets = b.get("resets_at")
    return [
        f"{b.get('scope', '-')}/{b.get('name', '-')}",
        str(b.get("window", "-")),
        f"{usd(spent)} / {usd(limit)}",
        used,
        usd(reserved),
        usd(b.get("remaining_usd")),
        span(resets - now) if isinstance(resets, int | float) else "-",
        f"HELD ({b.get('held_jobs', 0)} jobs)" if b.get("held") else "no",
    ]


def budgets_table(data: Mapping[str, Any], out: TextIO, now: float | None = None) -> None:
    """The spend budgets (`status["budgets"]`); nothing when none are configured."""
    rows = [b for b in data.get("budgets") or [] if isinstance(b, Mapping)]
    if not rows:
        return
    at = time.time() if now is None else now
    print(file=out)
    table(
        ["budget", "window", "spent / limit", "used", "reserved", "remaining", "resets in", "held"],
        [budget_cells(b, at) for b in rows],
        out,
    )


def nodes_table(data: Mapping[str, Any], out: TextIO) -> None:
    """The daemons sharing the store (a cluster); nothing for a daemon alone."""
    store = data.get("store") or {}
    nodes = data.get("nodes") or []
    if store.get("backend") != "postgresql" or not nodes:
        return
    print(file=out)
    table(
        ["node", "host", "pid", "version", "alive", "heartbeat", "running"],
        [
            [
                n["name"],
                n["host"],
                n["pid"],
                n["version"],
                "yes" if n["alive"] else "NO",
                f"{n['heartbeat_age_s']:.1f} s ago",
                n["running"],
            ]
            for n in nodes
        ],
        out,
    )


PHASE_KEYS = ("queue_ms", "slot_ms", "budget_ms", "cooldown_ms", "api_ms", "record_ms")
# The timeline's letter per phase within an attempt (the queue came before it).
PHASE_MARKS = (
    ("slot_ms", "s"),
    ("budget_ms", "b"),
    ("cooldown_ms", "c"),
    ("api_ms", "a"),
    ("record_ms", "r"),
)
TIMELINE_WIDTH = 20


def millis(ms: float) -> str:
    """A duration short enough for a narrow column: "0", "0.4ms", "812ms", "3.4s",
    "12m03s", "5h07m"."""
    if ms < 0.05:
        return "0"
    if ms < 10:
        return f"{ms:.1f}ms"
    if ms < 999.5:
        return f"{ms:.0f}ms"
    if ms < 59_950:
        return f"{ms / 1000:.1f}s"
    seconds = round(ms / 1000)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def timeline(phases: Mapping[str, Any], width: int = TIMELINE_WIDTH) -> str:
    """The attempt's duration as `width` letters, each phase's share of it (largest
    remainders round, so the letters always fill the width): "bbbbbbbbbbbbbbbbaaar"."""
    shares = [(mark, float(phases.get(key) or 0.0)) for key, mark in PHASE_MARKS]
    total = sum(ms for _, ms in shares)
    if total <= 0:
        return ""
    exact = [(mark, ms * width / total) for mark, ms in shares]
    cells = [int(n) for _, n in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i][1] - cells[i], reverse=True)
    for i in by_remainder[: width - sum(cells)]:
        cells[i] += 1
    return "".join(mark * n for (mark, _), n in zip(exact, cells, strict=True))


def phase_cells(n: Any, phases: Mapping[str, Any]) -> list[Any]:
    """One attempt's row of `phases_table`."""
    return [n, *(millis(float(phases.get(key) or 0.0)) for key in PHASE_KEYS), timeline(phases)]


def phases_table(attempts: Sequence[Mapping[str, Any]], out: TextIO = sys.stdout) -> None:
    """Where each attempt's time went (`vigil show`); nothing when no attempt has
    phases (recorded before they were, or still running)."""
    rows = [
        phase_cells(a["n"], a["phases"]) for a in attempts if isinstance(a.get("phases"), Mapping)
    ]
    if not rows:
        return
    # The queue came before the attempt; the timeline is the attempt's own duration.
    print(
        "\nwhere the time went (timeline: s slot, b budget, c cool-down, a API, r record):",
        file=out,
    )
    table(["n", "queue", "slot", "budget", "cooldown", "api", "record", "timeline"], rows, out)
