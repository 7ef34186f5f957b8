"""`vigil debug tasks|stacks|memory`: look inside the running daemon."""

from __future__ import annotations

import argparse
from typing import Any

from daemon.cli import render
from daemon.cli.client_commands import _runner
from daemon.config import PositiveFloat
from daemon.control.client import ControlClient


def _stack(lines: list[str], indent: str = "    ") -> None:
    for line in lines:
        print(f"{indent}{line}")


async def tasks(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("debug_tasks", limit=args.limit)
    if args.json:
        render.as_json(data)
        return 0
    print(f"{data['count']} tasks, oldest first (showing {data['shown']})")
    for task in data["tasks"]:
        age = "-" if task["age_s"] is None else f"{task['age_s']:.1f} s"
        print(f"\n{task['name']}  [{task['state']}, {age}]  {task['coroutine']}")
        _stack(task["stack"])
    return 0


async def stacks(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("debug_stacks")
    if args.json:
        render.as_json(data)
        return 0
    for thread in data["threads"]:
        flags = ", daemon" if thread["daemon"] else ""
        print(f"\nThread {thread['name']} (native id {thread['native_id']}{flags})")
        _stack(thread["stack"])
    return 0


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value} MB"


async def memory(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("debug_memory", seconds=args.seconds, top=args.top)
    if args.json:
        render.as_json(data)
        return 0
    render.pairs(
        {
            "rss": _mb(data["rss_mb"]),
            "peak": _mb(data["peak_mb"]),
            "baseline": _mb(data["baseline_mb"]),
            "growth": _mb(data["growth_mb"]),
            "traced": f"{data['traced_s']} s",
        }
    )
    print()
    render.table(
        ["grew by", "blocks", "alive", "site"],
        [
            [
                f"{s['size_diff_bytes'] / 1024:.1f} KiB",
                f"{s['count_diff']:+d}",
                f"{s['size_bytes'] / 1024:.1f} KiB",
                f"{s['file']}:{s['line']}",
            ]
            for s in data["sites"]
        ],
    )
    return 0


def add_parser(sub: Any) -> None:
    from daemon.cli.main import add_common, constrained, positive_int

    debug = sub.add_parser("debug", help="look inside the running daemon")
    add_common(debug)
    what = debug.add_subparsers(dest="what", required=True, metavar="WHAT")

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = what.add_parser(name, help=help)
        add_common(parser)
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        parser.set_defaults(func=_runner(func, None))
        return parser

    p = command("tasks", tasks, "every asyncio task: name, state, age and stack")
    p.add_argument("--limit", type=positive_int, default=1000, help="show at most this many tasks")
    command("stacks", stacks, "every thread's stack")
    p = command("memory", memory, "RSS and the allocation sites that grow (tracemalloc)")
    p.add_argument(
        "--seconds",
        type=constrained(PositiveFloat),
        default=5.0,
        help="how long to trace allocations (default 5)",
    )
    p.add_argument("--top", type=positive_int, default=20, help="how many sites to show")
