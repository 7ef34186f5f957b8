"""The control commands of the CLI: each sends requests over the socket and prints
a human table, or the raw data with --json."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from daemon.cli import bulk, render
from daemon.cli import submit as submit_cmd
from daemon.cli.common import TERMINAL, Command, UsageError, done
from daemon.cli.common import runner as _runner
from daemon.cli.submit import SUBMIT_BATCH, poll_counts, wait_for
from daemon.control.client import ControlClient

__all__ = [
    "SUBMIT_BATCH",
    "TERMINAL",
    "Command",
    "UsageError",
    "_runner",
    "add_parsers",
    "poll_counts",
    "wait_for",
]


async def status(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("status")
    if args.json:
        render.as_json(data)
    else:
        render.status_report(data)
    return 0


async def jobs(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call(
        "jobs",
        state=args.state,
        analyzer=args.analyzer,
        tag=args.tag,
        batch=args.batch,
        limit=args.limit,
        before=args.before,
    )
    if args.json:
        render.as_json(data)
        return 0
    # Batch and tags get columns when a job shown has them.
    meta = any(j.get("batch") or j.get("tags") for j in data["jobs"])
    render.table(
        ["id", "analyzer", "state", "attempts", "created", *(_META if meta else ()), "error"],
        [
            [
                j["id"],
                j["analyzer"],
                j["state"],
                f"{j['attempts']}/{j['max_attempts']}",
                render.when(j["created_at"]),
                *((j.get("batch") or "-", ",".join(j.get("tags", ())) or "-") if meta else ()),
                render.short(j["error"]["message"] if j["error"] else "", 50),
            ]
            for j in data["jobs"]
        ],
    )
    print(_more(args, data), file=sys.stderr)
    return 0


_META = ("batch", "tags")


def _more(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """How many of how many were shown, and the command for the next page if any."""
    total, shown = data.get("total"), len(data["jobs"])
    text = f"{shown} job(s) shown" + (f" of {total} matching" if total is not None else "")
    if data["next_before"]:
        flags = [
            f"--{name} {getattr(args, name)}"
            for name in ("state", "analyzer", "tag", "batch")
            if getattr(args, name)
        ]
        flags += [f"--limit {args.limit}"] if args.limit != 50 else []
        flags.append(f"--before {data['next_before']}")
        text += f"; more: vigil jobs {' '.join(flags)}"
    return text


async def show(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("show", id=args.id)
    if args.json:
        render.as_json(data)
        return 0
    job = data["job"]
    usage = job["usage"] or {}
    render.pairs(
        {
            "id": job["id"],
            "analyzer": job["analyzer"],
            "state": job["state"],
            "attempts": f"{job['attempts']} of {job['max_attempts']}",
            "rate limited": (
                f"{job.get('rate_limited', 0)} time(s) (429s and 529s spend no attempt)"
            ),
            "priority": job["priority"],
            "tags": ", ".join(job.get("tags") or ()) or "-",
            "batch": job.get("batch") or "-",
            "not before": render.when(job.get("not_before") or None),
            "source": job["source"],
            "created": render.when(job["created_at"]),
            "started": render.when(job["started_at"]),
            "finished": render.when(job["finished_at"]),
            "tokens": _tokens(usage),
            "error": f"{job['error']['type']}: {job['error']['message']}" if job["error"] else "-",
        }
    )
    print("\nattempts:")
    render.table(
        ["n", "started", "outcome", "http", "ms", "tokens", "stop", "error"],
        [
            [
                a["n"],
                render.when(a["started_at"]),
                a["outcome"],
                a["http_status"] or "-",
                f"{a['latency_ms']:.0f}" if a["latency_ms"] is not None else "-",
                _tokens(a.get("usage")) if a.get("usage") else "-",
                a.get("stop_reason") or "-",
                render.short(a["error"]["message"] if a["error"] else "", 60),
            ]
            for a in data["attempts"]
        ],
    )
    render.phases_table(data["attempts"])
    for a in data["attempts"]:
        if a.get("answer") is not None:
            print(f"\nattempt {a['n']} answered:\n{a['answer']}")
    print("\nresult:")
    result = job["result"]
    if isinstance(result, str):
        print(result)
    else:
        render.as_json(result)
    return 0


def _everywhere(data: dict[str, Any]) -> str:
    return " (every node: the others follow within about a second)" if data.get("cluster") else ""


def _tokens(usage: dict[str, Any] | None) -> str:
    usage = usage or {}
    cost = usage.get("cost")
    text = f"{usage.get('prompt_tokens', 0)} in, {usage.get('completion_tokens', 0)} out"
    cached, written = usage.get("cached_tokens", 0), usage.get("cache_write_tokens", 0)
    if cached or written:
        text += f" ({cached} cached, {written} cache-written)"
    return text if cost is None else f"{text}, ${cost:.6f}"


async def pause(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("pause", cluster=args.cluster)
    done(args, data, "paused: no new attempts start; intake goes on" + _everywhere(data))
    return 0


async def resume(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("resume", cluster=args.cluster)
    lifted = ", ".join(data["providers_resumed"])
    text = "resumed" + _everywhere(data) + (f" (providers lifted: {lifted})" if lifted else "")
    for name, reason in data.get("providers_still_paused", {}).items():
        text += f"\nprovider {name} stays paused: {reason}"
    done(args, data, text)
    return 0


async def drain(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("drain", cluster=args.cluster)
    done(
        args,
        data,
        f"draining: intake closed, {data['running']} attempt(s) still running here; "
        f"`vigil resume` reopens{_everywhere(data)}",
    )
    return 0


async def reload(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("reload")
    done(args, data, "\n".join(render.reload_lines(data)))
    return 0


def add_parsers(sub: Any) -> None:
    from daemon.cli import usage  # it imports this module (UsageError)
    from daemon.cli.main import add_common, positive_int

    def command(
        name: str,
        func: Command,
        help: str,
        check: Callable[[argparse.Namespace], None] | None = None,
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
        add_common(parser)
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        parser.set_defaults(func=_runner(func, check))
        return parser

    command("status", status, "show the daemon's state and figures")
    p = command("submit", submit_cmd.submit, "submit jobs", submit_cmd.check)
    submit_cmd.add_arguments(p)
    p = command("jobs", jobs, "list jobs, newest first")
    p.add_argument("--state", choices=["queued", "running", *TERMINAL])
    p.add_argument("--analyzer")
    p.add_argument("--tag", help="jobs carrying this tag")
    p.add_argument("--batch", help="jobs of this batch")
    p.add_argument("--limit", type=positive_int, default=50)
    p.add_argument("--before", metavar="ID", help="page: jobs older than this id")
    p = command("show", show, "show a job, its attempts and result")
    p.add_argument("id")
    bulk.add_parsers(command)
    for name, func, text in (
        ("pause", pause, "stop starting new attempts (intake goes on)"),
        ("resume", resume, "start attempts again; reopen intake; lift paused providers"),
        ("drain", drain, "stop intake and new attempts; running ones finish"),
    ):
        p = command(name, func, text)
        p.add_argument(
            "--cluster", action="store_true", help="every daemon sharing the store, not only this"
        )
    command("reload", reload, "re-read the config and apply what can change live")
    p = command("usage", usage.usage, "what the API calls used and cost", usage.check)
    usage.add_arguments(p)
