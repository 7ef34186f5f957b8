"""`vigil watch` (job ends as they happen, resumable from a cursor, across daemon
restarts) and `vigil export` (every matching job with its result, as JSON lines, in
constant memory; a file appears only once the export is complete)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec

from daemon.cli import render
from daemon.cli.usage import when_arg
from daemon.control.client import ControlClient, DaemonUnavailable
from daemon.jobs import STATES
from daemon.spend.report import WHEN_FORMS

RECONNECT_S = 1.0
ENDED = ("succeeded", "failed", "canceled")
_encode = msgspec.json.Encoder().encode


def event_line(event: dict[str, Any]) -> str:
    """cursor, when, event, job, analyzer, and the result or error in brief."""
    job = event.get("job") or {}
    error = job.get("error")
    outcome = (
        f"{error['type']}: {error['message']}"
        if error
        else _encode(job.get("result")).decode()
        if job
        else "(purged)"
    )
    return (
        f"{event['cursor']:<10} {render.when(event['at'])} {event['event']:<14} "
        f"{event['job_id']} {event['analyzer']:<12} {render.short(outcome, 60)}"
    )


def _show(event: dict[str, Any], jsonl: bool) -> None:
    print(_encode(event).decode() if jsonl else event_line(event), flush=True)


async def _watch(path: Path, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"analyzer": args.analyzer, "state": args.state}
    after = args.after
    announced = False
    while True:
        try:
            async with ControlClient(path) as client:
                if after is None:  # from now on: fix "now" once, so a reconnect misses nothing
                    first = await client.call("events", **query)  # ends since "now" included
                    for event in first["events"]:
                        _show(event, args.jsonl)
                    after = first["cursor"]
                if announced:
                    print(f"vigil watch: reconnected, from {after}", file=sys.stderr, flush=True)
                    announced = False
                async for event in client.stream("watch", after=after, **query):
                    _show(event, args.jsonl)
                    after = event["cursor"]
        except DaemonUnavailable as exc:
            if not announced:
                print(
                    f"vigil watch: {exc}; reconnecting every {RECONNECT_S:g} s "
                    f"(resumes from {after})",
                    file=sys.stderr,
                    flush=True,
                )
                announced = True
            await anyio.sleep(RECONNECT_S)


async def _export(path: Path, args: argparse.Namespace) -> int:
    """Lines go to a temporary file beside FILE, renamed into place once the daemon
    says the export is complete: a cut-off export leaves no file that looks whole."""
    query = {k: getattr(args, k) for k in ("state", "analyzer", "since", "until", "tag", "batch")}
    target = None if args.jsonl == "-" else Path(args.jsonl)
    partial = None if target is None else target.with_name(f".{target.name}.partial")
    out: IO[bytes] = sys.stdout.buffer if partial is None else _private(partial)
    done: dict[str, Any] | None = None
    try:
        async with ControlClient(path) as client:
            async for item in client.stream("export", **query):
                if "done" in item:
                    done = item
                    break
                out.write(_encode(item["job"]) + b"\n")
        out.flush()
        if partial is not None:
            os.fsync(out.fileno())
    finally:
        if partial is not None:
            out.close()
            if done is None:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
    if partial is not None and target is not None:
        partial.replace(target)
    assert done is not None
    where = "stdout" if target is None else str(target)
    print(f"vigil export: {done['jobs']} jobs to {where}", file=sys.stderr)
    return 0


def _private(path: Path) -> IO[bytes]:
    """A new file only its owner can read (an export holds every input and result),
    never through a link planted where it goes: a partial file left by an earlier
    run is removed (unlink does not follow links) and the file made anew."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


def run_watch(args: argparse.Namespace) -> int:
    from daemon.cli.main import run_async, socket_path

    path = socket_path(args)
    return run_async(lambda: _watch(path, args))


def run_export(args: argparse.Namespace) -> int:
    from daemon.cli.main import run_async, socket_path

    path = socket_path(args)
    return run_async(lambda: _export(path, args))


def add_parsers(sub: Any) -> None:
    from daemon.cli.main import add_common

    watch = sub.add_parser("watch", help="print job ends as they happen (resumable)")
    add_common(watch)
    watch.add_argument("--analyzer", help="only this analyzer's jobs")
    watch.add_argument("--state", choices=ENDED, help="only jobs that ended so")
    watch.add_argument(
        "--after",
        metavar="CURSOR",
        help="resume after this cursor (each event carries one; 0: every end still kept; "
        "default: from now on)",
    )
    watch.add_argument("--jsonl", action="store_true", help="one JSON object a line")
    watch.set_defaults(func=run_watch)

    export = sub.add_parser("export", help="write matching jobs with their results as JSONL")
    add_common(export)
    when = when_arg(time.time())
    export.add_argument("--state", choices=STATES, help="only jobs in this state")
    export.add_argument("--analyzer", help="only this analyzer's jobs")
    export.add_argument("--since", type=when, metavar="WHEN", help=f"created from: {WHEN_FORMS}")
    export.add_argument("--until", type=when, metavar="WHEN", help="created before")
    export.add_argument("--tag", help="only jobs with this tag")
    export.add_argument("--batch", help="only jobs of this batch")
    export.add_argument(
        "--jsonl", required=True, metavar="FILE", help="where to write (- for stdout)"
    )
    export.set_defaults(func=run_export)
