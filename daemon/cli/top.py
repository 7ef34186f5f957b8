"""`vigil top`: a live view of the daemon, redrawn every second from `status`.

Rates come from the difference between two status snapshots, so the daemon keeps no
extra state for them. Sections a daemon does not report (no watchdog, no spool) are
simply left out."""

from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Annotated, Any

import anyio
import msgspec

from daemon.cli import render
from daemon.control.client import ControlClient

CLEAR = "\x1b[H\x1b[2J"


def _rate(now: dict[str, Any], before: dict[str, Any] | None, dt_s: float, *path: str) -> str:
    if before is None or dt_s <= 0:
        return "-"
    a: Any = now
    b: Any = before
    for key in path:
        a, b = a.get(key, 0), b.get(key, 0)
    return f"{(a - b) / dt_s:.1f}/s"


def frame(status: dict[str, Any], before: dict[str, Any] | None, dt_s: float) -> str:
    """One screen of text for a status snapshot (and the previous one, for rates)."""
    out = io.StringIO()
    verdict, problems = render.health_line(status["health"])
    print(
        f"vigil {status['version']}  pid {status['pid']}  {status['state']}  "
        f"up {status['uptime_s']:.0f} s  health: {verdict}"
        + "".join(f"\n  - {p}" for p in problems),
        file=out,
    )
    queue = status["queue"]
    print(
        f"running {queue['active']}/{queue['max_concurrency']}  "
        f"backlog limit {queue['max_backlog']}  "
        f"accepted {_rate(status, before, dt_s, 'queue', 'accepted')}  "
        f"attempts ended {_rate(status, before, dt_s, 'queue', 'finished')}\n",
        file=out,
    )
    render.table(list(status["jobs"]), [list(status["jobs"].values())], out)
    render.nodes_table(status, out)
    providers = status.get("providers") or {}
    if providers:
        print(file=out)
        rates = {
            name: _rate(status, before, dt_s, "providers", name, "requests") for name in providers
        }
        render.providers_table(providers, out, rates)
    render.budgets_table(status, out)
    render.sections(status, out)
    return out.getvalue()


async def _loop(path: Any, args: argparse.Namespace) -> int:
    before: dict[str, Any] | None = None
    before_at = 0.0
    async with ControlClient(path) as client:
        if args.once:  # two samples, `--interval` apart, so the one frame has rates
            before, before_at = await client.call("status"), time.monotonic()
            await anyio.sleep(args.interval)
        while True:
            status = await client.call("status")
            now = time.monotonic()
            text = frame(status, before, now - before_at)
            if args.once:
                sys.stdout.write(text)
                return 0
            if sys.stdout.isatty():
                sys.stdout.write(CLEAR + text + "\n(Ctrl+C to quit)\n")
            else:  # a pipe or a file: frames one after the other, no screen-control codes
                sys.stdout.write(text + "\n")
            sys.stdout.flush()
            before, before_at = status, now
            await anyio.sleep(args.interval)


def run(args: argparse.Namespace) -> int:
    from daemon.cli.main import run_async, socket_path

    path = socket_path(args)
    try:
        return run_async(lambda: _loop(path, args))
    except KeyboardInterrupt:
        return 0


def add_parser(sub: Any) -> None:
    from daemon.cli.main import add_common, constrained

    parser: argparse.ArgumentParser = sub.add_parser("top", help="a live view of the daemon")
    add_common(parser)
    parser.add_argument(
        "--interval",
        type=constrained(Annotated[float, msgspec.Meta(gt=0, le=3600)]),
        default=1.0,
        help="seconds between frames (and between --once's two samples)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit (from two samples, --interval apart, for the rates)",
    )
    parser.set_defaults(func=run)
