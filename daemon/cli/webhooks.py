"""`vigil webhooks`: each configured webhook with its pending and dead deliveries and
this daemon's figures since start; `vigil webhooks retry NAME` sends its dead-lettered
deliveries again."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from daemon.cli import render
from daemon.cli.common import done, runner
from daemon.control.client import ControlClient


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _row(hook: Mapping[str, Any]) -> list[Any]:
    return [
        hook["name"],
        render.short(hook["url"], 40),
        hook["pending"],
        hook["dead"],
        hook["in_flight"],
        hook["delivered"],
        hook["failed"],
        _age(hook["oldest_pending_age_s"]),
        hook["last_status"] or "-",
        render.short(hook["last_error"], 50),
    ]


async def show(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("webhooks")
    if args.json:
        render.as_json(data)
        return 0
    if not data["webhooks"]:
        print("no webhooks configured ([webhooks.NAME] in the config)")
        return 0
    render.table(
        [
            "name",
            "url",
            "pending",
            "dead",
            "sending",
            "delivered",
            "failed",
            "oldest",
            "last",
            "error",
        ],
        [_row(hook) for hook in data["webhooks"]],
    )
    if any(hook["dead"] for hook in data["webhooks"]):
        print("dead deliveries: `vigil webhooks retry NAME` sends them again")
    return 0


async def retry(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("webhooks_retry", name=args.name)
    done(args, data, f"{data['webhook']}: {data['requeued']} dead delivery(ies) requeued")
    return 0


def add_parser(sub: Any) -> None:
    from daemon.cli.main import add_common

    parser = sub.add_parser(
        "webhooks", help="list webhooks with pending and dead deliveries; retry dead ones"
    )
    add_common(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(func=runner(show, None))
    action = parser.add_subparsers(dest="action", metavar="ACTION")
    again = action.add_parser("retry", help="send a webhook's dead-lettered deliveries again")
    add_common(again)
    again.add_argument("--json", action="store_true", help="print JSON for scripts")
    again.add_argument("name", metavar="NAME", help="the webhook ([webhooks.NAME])")
    again.set_defaults(func=runner(retry, None))
