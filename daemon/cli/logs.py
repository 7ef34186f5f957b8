"""`vigil logs`: recent daemon events from its in-memory ring, or `-f` to follow them
live; following survives a daemon restart by reconnecting."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from typing import Any

import anyio
import msgspec

from daemon.config import NonNegInt
from daemon.control.client import ControlClient, DaemonUnavailable

RECONNECT_S = 1.0
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FIRST = ("timestamp", "level", "event")


def iso_utc(moment: dt.datetime) -> str:
    """The daemon's own timestamp format, so the ring can compare them as text."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_since(text: str, now: dt.datetime | None = None) -> str:
    """`30s`, `10m`, `2h`, `1d` ago, or an ISO 8601 time (UTC if no zone)."""
    now = now or dt.datetime.now(dt.UTC)
    match = _AGO.match(text.strip())
    if match:
        return iso_utc(now - dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)]))
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: expected e.g. 30s, 10m, 2h, 1d or an ISO time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return iso_utc(moment)


def human(event: dict[str, Any]) -> str:
    rest = " ".join(
        f"{k}={v if isinstance(v, str | int | float) else msgspec.json.encode(v).decode()}"
        for k, v in event.items()
        if k not in _FIRST
    )
    return (
        f"{event.get('timestamp', '-')} {event.get('level', '-')!s:<7} "
        f"{event.get('event', '-')} {rest}"
    ).rstrip()


def _print(event: dict[str, Any], as_json: bool) -> None:
    line = msgspec.json.encode(event).decode() if as_json else human(event)
    print(line, flush=True)


async def _show(path: Any, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"n": args.n, "level": args.level}
    if args.job:
        query["job"] = args.job
    if args.since:
        query["since"] = args.since
    if not args.follow:
        async with ControlClient(path) as client:
            data = await client.call("logs", **query)
        for event in data["events"]:
            _print(event, args.json)
        return 0
    announced = False
    while True:
        try:
            async with ControlClient(path) as client:
                if announced:
                    print("vigil logs: reconnected", file=sys.stderr, flush=True)
                    announced = False
                async for event in client.stream("logs", follow=True, **query):
                    _print(event, args.json)
                    if isinstance(event, dict) and "timestamp" in event:
                        # After a restart, pick up from here, not from the top again.
                        query["since"] = event["timestamp"]
                        query["n"] = 10_000
        except DaemonUnavailable as exc:
            if not announced:
                print(
                    f"vigil logs: {exc}; reconnecting every {RECONNECT_S:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                announced = True
            await anyio.sleep(RECONNECT_S)


def run(args: argparse.Namespace) -> int:
    from daemon.cli.main import run_async, socket_path

    path = socket_path(args)
    return run_async(lambda: _show(path, args))


def add_parser(sub: Any) -> None:
    from daemon.cli.main import add_common, constrained

    parser: argparse.ArgumentParser = sub.add_parser("logs", help="show the daemon's events")
    add_common(parser)
    parser.add_argument(
        "-n",
        type=constrained(NonNegInt),
        default=50,
        help="how many recent events (default 50; 0 with -f: only new ones)",
    )
    parser.add_argument("-f", "--follow", action="store_true", help="follow new events live")
    parser.add_argument(
        "--level",
        default="debug",
        choices=["debug", "info", "warning", "error", "critical"],
        help="at least this level",
    )
    parser.add_argument("--job", metavar="ID", help="only events about this job")
    parser.add_argument("--since", type=parse_since, help="30s, 10m, 2h, 1d, or an ISO time")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.set_defaults(func=run)
