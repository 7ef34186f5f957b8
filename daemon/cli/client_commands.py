"""The control commands of the CLI: each sends requests over the socket and prints
a human table, or the raw data with --json."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from daemon.cli import render
from daemon.config import NonNegFloat
from daemon.control.client import ControlClient, RemoteError

SUBMIT_BATCH = 500
TERMINAL = ("succeeded", "failed", "canceled")


class UsageError(Exception):
    """The command line asks for something inconsistent (exit code 2)."""


Command = Callable[[ControlClient, argparse.Namespace], Awaitable[int]]


def _runner(
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


async def status(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("status")
    if args.json:
        render.as_json(data)
    else:
        render.status_report(data)
    return 0


def _inputs(args: argparse.Namespace) -> Iterator[Any]:
    """Job objects from --input, files, or --jsonl, lazily, so a huge JSONL file is
    streamed rather than read whole."""
    if args.input is not None:
        try:
            yield msgspec.json.decode(args.input)
        except msgspec.DecodeError as exc:
            raise UsageError(f"--input is not valid JSON: {exc}") from None
    for name in args.files:
        path = Path(name)
        with _reading(name):
            text = path.read_text(encoding="utf-8")
        yield {"text": text, "filename": path.name}
    if args.jsonl is not None:
        yield from _jsonl(args.jsonl)


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """A file that cannot be read (missing, unreadable, a directory, not UTF-8) is the
    user's to fix: a usage error naming it, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {name}: not UTF-8 text ({exc.reason})") from None


def _jsonl(name: str) -> Iterator[Any]:
    """Standard input ("-") is decoded as strict UTF-8 too, whatever the locale says."""
    stdin = name == "-"
    source = sys.stdin.fileno() if stdin else name
    # A line that is not UTF-8 fails as it is read, so the whole loop is in _reading.
    with _reading(name), open(source, encoding="utf-8", closefd=not stdin) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield msgspec.json.decode(line)
            except msgspec.DecodeError as exc:
                raise UsageError(f"{name}:{lineno}: not valid JSON: {exc}") from None


def _jobs(args: argparse.Namespace) -> Iterator[Any]:
    for item in _inputs(args):
        if args.analyzer is None:
            yield item
            continue
        job: dict[str, Any] = {"analyzer": args.analyzer, "input": item}
        if args.priority is not None:
            job["priority"] = args.priority
        if args.idempotency_key is not None:
            job["idempotency_key"] = args.idempotency_key
        yield job


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_submit(args: argparse.Namespace) -> None:
    if args.input is None and not args.files and args.jsonl is None:
        raise UsageError("submit needs --input JSON, files, or --jsonl FILE|-")
    if args.analyzer is None and (args.files or args.input is not None):
        raise UsageError("-a/--analyzer is required with --input and files")
    if args.analyzer is None and (args.priority is not None or args.idempotency_key is not None):
        raise UsageError(
            "--priority and --idempotency-key apply only with -a ANALYZER; without it "
            "each --jsonl line is a whole job object that sets its own"
        )
    several = args.jsonl is not None or (args.input is not None) + len(args.files) > 1
    if args.idempotency_key is not None and several:
        raise UsageError(
            "--idempotency-key applies to a single job (--input or one file); for "
            "--jsonl, leave out -a and give each line its own idempotency_key"
        )


async def submit(client: ControlClient, args: argparse.Namespace) -> int:
    ids: list[str] = []
    created = 0
    sent = 0
    # A big file blocks only this client, not a daemon; the reads go to a thread.
    chunks = _batches(_jobs(args), SUBMIT_BATCH)
    try:
        while (batch := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            try:
                data = await client.call("submit", jobs=batch)
            except RemoteError as exc:
                if isinstance(exc.details, list):
                    exc.details = [
                        {**d, "index": sent + d["index"]} if d.get("index") is not None else d
                        for d in exc.details
                    ]
                raise
            ids.extend(data["ids"])
            created += data["created"]
            sent += len(batch)
    except (RemoteError, UsageError):
        # A daemon's refusal or a bad line further on: what went before is committed,
        # and resubmitting it all would duplicate it.
        if sent:
            print(f"vigil: {sent} jobs were accepted before this error", file=sys.stderr)
        raise
    if args.json and not args.wait:
        render.as_json({"ids": ids, "created": created, "existing": len(ids) - created})
    elif not args.wait:
        for job_id in ids:
            print(job_id)
        print(
            f"submitted {created} new job(s), {len(ids) - created} already known", file=sys.stderr
        )
    if not args.wait:
        return 0
    counts = await wait_for(client, ids)
    if args.json:
        render.as_json({"ids": ids, "counts": counts})
    else:
        render.table(list(TERMINAL), [[counts.get(s, 0) for s in TERMINAL]])
    return 0 if counts.get("succeeded", 0) == len(set(ids)) else 1


async def poll_counts(
    client: ControlClient, ids: list[str], interval_s: float = 0.5
) -> AsyncIterator[dict[str, int]]:
    """Counts by state of the given jobs, every `interval_s`, until all are final."""
    unique = list(dict.fromkeys(ids))
    while True:
        data = await client.call("progress", ids=unique)
        counts: dict[str, int] = data["counts"]
        yield counts
        if sum(counts.get(s, 0) for s in TERMINAL) + data["unknown"] >= len(unique):
            return
        await anyio.sleep(interval_s)


async def wait_for(client: ControlClient, ids: list[str]) -> dict[str, int]:
    line = render.ProgressLine()
    total = len(set(ids))
    started = time.monotonic()
    counts: dict[str, int] = {}
    try:
        async for counts in poll_counts(client, ids):
            done = sum(counts.get(s, 0) for s in TERMINAL)
            elapsed = time.monotonic() - started
            line.update(
                f"{render.bar(done, total)} {done}/{total} done  "
                f"ok {counts.get('succeeded', 0)}  failed {counts.get('failed', 0)}  "
                f"running {counts.get('running', 0)}  {elapsed:.0f} s"
            )
    finally:
        line.close()
    return counts


async def jobs(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call(
        "jobs", state=args.state, analyzer=args.analyzer, limit=args.limit, before=args.before
    )
    if args.json:
        render.as_json(data)
        return 0
    render.table(
        ["id", "analyzer", "state", "attempts", "created", "error"],
        [
            [
                j["id"],
                j["analyzer"],
                j["state"],
                f"{j['attempts']}/{j['max_attempts']}",
                render.when(j["created_at"]),
                render.short(j["error"]["message"] if j["error"] else "", 50),
            ]
            for j in data["jobs"]
        ],
    )
    return 0


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


def _check_retry(args: argparse.Namespace) -> None:
    if (args.id is None) == (not args.failed):
        raise UsageError("retry needs a job ID or --failed")


async def retry(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("retry", **({"failed": True} if args.failed else {"id": args.id}))
    _done(args, data, f"requeued {data['requeued']} job(s)")
    return 0


async def cancel(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("cancel", id=args.id)
    _done(args, data, f"canceled {data['id']} (was {data['was']})")
    return 0


async def purge(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("purge", older_than_s=args.older_than)
    _done(args, data, f"deleted {data['deleted']} finished job(s)")
    return 0


async def pause(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("pause", cluster=args.cluster)
    _done(args, data, "paused: no new attempts start; intake goes on" + _everywhere(data))
    return 0


async def resume(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("resume", cluster=args.cluster)
    lifted = ", ".join(data["providers_resumed"])
    text = "resumed" + _everywhere(data) + (f" (providers lifted: {lifted})" if lifted else "")
    for name, reason in data.get("providers_still_paused", {}).items():
        text += f"\nprovider {name} stays paused: {reason}"
    _done(args, data, text)
    return 0


async def drain(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("drain", cluster=args.cluster)
    _done(
        args,
        data,
        f"draining: intake closed, {data['running']} attempt(s) still running here; "
        f"`vigil resume` reopens{_everywhere(data)}",
    )
    return 0


async def reload(client: ControlClient, args: argparse.Namespace) -> int:
    data = await client.call("reload")
    text = "reloaded: " + (", ".join(data["applied"]) or "no changes")
    if data["needs_restart"]:
        text += "\nneeds a restart to apply: " + ", ".join(data["needs_restart"])
    _done(args, data, text)
    return 0


def _done(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        render.as_json(data)
    else:
        print(text)


def add_parsers(sub: Any) -> None:
    from daemon.cli import usage  # it imports this module (UsageError)
    from daemon.cli.main import add_common, constrained, positive_int

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
    p = command("submit", submit, "submit jobs", _check_submit)
    p.add_argument("-a", "--analyzer", help="analyzer for --input, files and --jsonl lines")
    p.add_argument("--input", help="one input object as JSON")
    p.add_argument("--jsonl", metavar="FILE|-", help="one input (or, without -a, job) a line")
    p.add_argument("files", nargs="*", help="text files: each becomes {text, filename}")
    p.add_argument("--priority", type=int, help="for every job given with -a (default 0)")
    p.add_argument("--idempotency-key", help="for the one job of -a with --input or a file")
    p.add_argument("--wait", action="store_true", help="show progress until all are done")
    p = command("jobs", jobs, "list jobs, newest first")
    p.add_argument("--state", choices=["queued", "running", *TERMINAL])
    p.add_argument("--analyzer")
    p.add_argument("--limit", type=positive_int, default=50)
    p.add_argument("--before", metavar="ID", help="page: jobs older than this id")
    p = command("show", show, "show a job, its attempts and result")
    p.add_argument("id")
    p = command("retry", retry, "requeue a failed or canceled job, or all failed", _check_retry)
    p.add_argument("id", nargs="?")
    p.add_argument("--failed", action="store_true")
    p = command("cancel", cancel, "cancel a queued or running job")
    p.add_argument("id")
    p = command("purge", purge, "delete finished jobs")
    p.add_argument("--older-than", type=constrained(NonNegFloat), default=0.0, metavar="SECONDS")
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
