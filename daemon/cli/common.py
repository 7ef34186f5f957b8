"""What the CLI's control commands share: the usage error, the runner that connects
to the socket, and how a command prints its answer."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.cli import render
from daemon.control.client import ControlClient

TERMINAL = ("succeeded", "failed", "canceled")


class UsageError(Exception):
    """The command line asks for something inconsistent (exit code 2)."""


Command = Callable[[ControlClient, argparse.Namespace], Awaitable[int]]


def runner(
    command: Command, check: Callable[[argparse.Namespace], None] | None
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from daemon.cli.main import run_async, socket_path

        if check is not None:
            check(args)  # usage errors before any connection attempt
        path = socket_path(args)

        async def go() -> int:
            async with ControlClient(path) as client:
                return await command(client, args)

        return run_async(go)

    return run


def done(args: argparse.Namespace, data: Any, text: str) -> None:
    """The answer as JSON with --json, else as `text`."""
    if args.json:
        render.as_json(data)
    else:
        print(text)
