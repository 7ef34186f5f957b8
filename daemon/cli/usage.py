"""`vigil usage`: the spend report over the control socket, as a table or JSON."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from daemon.cli import render
from daemon.cli.client_commands import UsageError
from daemon.control.client import ControlClient
from daemon.spend.report import WHEN_FORMS, parse_when

GROUPS = ("day", "analyzer", "provider", "model")
COLUMNS = (
    ("jobs", "jobs"),
    ("attempts", "attempts"),
    ("calls", "calls"),
    ("input", "input_tokens"),
    ("cached", "cached_tokens"),
    ("cache write", "cache_write_tokens"),
    ("output", "output_tokens"),
)


def when_arg(now: float) -> Callable[[str], float]:
    """An argparse `type=` for --since and --until: a bad value is a usage error that
    argparse reports naming the flag (exit 2)."""

    def convert(text: str) -> float:
        try:
            return parse_when(text, now)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def check(args: argparse.Namespace) -> None:
    until = time.time() if args.until is None else args.until
    if args.since is not None and args.since > until:
        raise UsageError(f"--since is after {'--until' if args.until else 'now'}")


def cost(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def usage_table(data: Mapping[str, Any], out: TextIO = sys.stdout) -> None:
    """A line naming the window, then one row per key and the total."""
    print(
        f"{render.when(data['since'])} to {render.when(data['until'])} UTC, by {data['by']}",
        file=out,
    )
    rows = [*data["rows"], data["total"]]
    render.table(
        [data["by"], *(name for name, _ in COLUMNS), "cost"],
        [[r["key"], *(r[field] for _, field in COLUMNS), cost(r["cost_usd"])] for r in rows],
        out,
    )


async def usage(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("usage", since=args.since, until=args.until, by=args.by)
    if args.json:
        render.as_json(data)
    else:
        usage_table(data)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    when = when_arg(time.time())
    parser.add_argument(
        "--since",
        type=when,
        metavar="WHEN",
        help=f"calls answered from then on: {WHEN_FORMS} (default: 7 days before --until)",
    )
    parser.add_argument(
        "--until",
        type=when,
        metavar="WHEN",
        help="and before then, in the same forms (default: now)",
    )
    parser.add_argument("--by", choices=GROUPS, default="day", help="one row per (default: day)")
