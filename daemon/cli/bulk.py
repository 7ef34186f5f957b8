"""`vigil cancel`, `retry` and `purge`: one job by id, or every job a filter matches
(--state, --analyzer, --error-type, --since/--until, --before, --tag, --batch), with
--dry-run to see how many and which first. With no filter at all they refuse (exit 2),
saying what they would touch, unless --all (or --yes) is given."""

from __future__ import annotations

import argparse
import time
from typing import Any

from daemon.cli.common import Command, UsageError, done
from daemon.control.client import ControlClient, RemoteError

DONE = {"cancel": "canceled", "retry": "requeued", "purge": "deleted"}
WOULD = {"cancel": "cancel", "retry": "retry", "purge": "delete"}
FILTERS = ("state", "analyzer", "error_type", "since", "until", "before", "tag", "batch")
FILTER_FLAGS = "--state, --analyzer, --error-type, --since, --until, --before, --tag, --batch"


def _filter(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}


def check(args: argparse.Namespace) -> None:
    """An id and a filter together are ambiguous; --since after --until matches nothing."""
    others = _filter(args) or args.dry_run or args.all or getattr(args, "failed", False)
    if getattr(args, "id", None) is not None and others:
        raise UsageError(f"{args.bulk_action}: give either a job ID or filters, not both")
    if args.since is not None and args.until is not None and args.since > args.until:
        raise UsageError("--since is after --until")


def summary(action: str, data: dict[str, Any]) -> str:
    """ "canceled 12 job(s): queued 10, running 2" (a dry run: "would cancel ...", and
    the sample of ids)."""
    parts = ", ".join(f"{state} {n}" for state, n in data["by_state"].items() if n)
    if data.get("dry_run"):
        text = f"would {WOULD[action]} {data['matched']} job(s)" + (f": {parts}" if parts else "")
        if data["sample"]:
            more = " ..." if data["matched"] > len(data["sample"]) else ""
            text += "\nfirst: " + " ".join(data["sample"]) + more
        return text
    return f"{DONE[action]} {data['changed']} job(s)" + (f": {parts}" if parts else "")


async def _call(client: ControlClient, args: argparse.Namespace, **more: Any) -> Any:
    """The bulk command with the filter; the daemon's refusal of an unfiltered one is a
    usage error naming what it would touch."""
    action = args.bulk_action
    try:
        return await client.call(
            action, **_filter(args), dry_run=args.dry_run, all=args.all, **more
        )
    except RemoteError as exc:
        if exc.code != "filter_required" or not isinstance(exc.details, dict):
            raise
        would = summary(action, {**exc.details, "dry_run": True, "sample": []})
        raise UsageError(
            f"{action} without a filter {would}; add --all (or "
            f"--yes) to do that, or narrow it with {FILTER_FLAGS}"
            + (" or --older-than" if action == "purge" else "")
        ) from None


async def cancel(client: ControlClient, args: argparse.Namespace) -> int:
    if args.id is not None:
        data = await client.call("cancel", id=args.id)
        done(args, data, f"canceled {data['id']} (was {data['was']})")
        return 0
    data = await _call(client, args)
    done(args, data, summary("cancel", data))
    return 0


async def retry(client: ControlClient, args: argparse.Namespace) -> int:
    if args.id is not None:
        data = await client.call("retry", id=args.id)
        done(args, data, f"requeued {data['requeued']} job(s)")
        return 0
    data = await _call(client, args, **({"failed": True} if args.failed else {}))
    done(args, data, summary("retry", data))
    return 0


async def purge(client: ControlClient, args: argparse.Namespace) -> int:
    more = {} if args.older_than is None else {"older_than_s": args.older_than}
    data = await _call(client, args, **more)
    done(args, data, summary("purge", data))
    return 0


def add_parsers(command: Any) -> None:
    """The three commands, through client_commands' `command` (common flags, --json)."""
    from daemon.cli.main import constrained
    from daemon.cli.usage import when_arg
    from daemon.config import NonNegFloat

    when = when_arg(time.time())

    def filters(p: argparse.ArgumentParser, states: tuple[str, ...]) -> None:
        p.add_argument("--state", choices=states)
        p.add_argument("--analyzer")
        p.add_argument("--error-type", metavar="TYPE", help="the last error's type")
        p.add_argument("--since", type=when, metavar="WHEN", help="created then or later")
        p.add_argument("--until", type=when, metavar="WHEN", help="created before then")
        p.add_argument("--before", metavar="ID", help="jobs older than this id")
        p.add_argument("--tag", help="jobs carrying this tag")
        p.add_argument("--batch", help="jobs of this batch")
        p.add_argument(
            "--dry-run", action="store_true", help="say how many and which; change nothing"
        )
        p.add_argument(
            "--all", "--yes", dest="all", action="store_true", help="with no filter: every job"
        )

    def parser(name: str, func: Command, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = command(name, func, text, check)
        p.set_defaults(bulk_action=name)
        return p

    p = parser("cancel", cancel, "cancel a queued or running job, or those a filter matches")
    p.add_argument("id", nargs="?")
    filters(p, ("queued", "running"))
    p = parser("retry", retry, "requeue a failed or canceled job, or those a filter matches")
    p.add_argument("id", nargs="?")
    p.add_argument("--failed", action="store_true", help="every failed job (--state failed)")
    filters(p, ("failed", "canceled"))
    p = parser("purge", purge, "delete finished jobs a filter matches")
    p.add_argument(
        "--older-than",
        type=constrained(NonNegFloat),
        metavar="SECONDS",
        help="finished at least this long ago",
    )
    filters(p, ("succeeded", "failed", "canceled"))
