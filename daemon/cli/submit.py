"""`vigil submit`: jobs from --input, files or JSONL (streamed, sent in batches), the
ids printed, and with --wait a progress line until all are done (--show: each result).
With --batch NAME, --wait follows the whole batch, jobs other submits sent included
(and with no input at all, only follows it).

A job the daemon refuses is named by where it came from (`batch.jsonl:601`,
`<stdin>:3`, a file name, `--input`), not by its place in a batch."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from daemon.cli import render
from daemon.cli.common import TERMINAL, UsageError
from daemon.control.client import ControlClient, RemoteError
from daemon.intake.metadata import resolve_not_before

SUBMIT_BATCH = 500
Sourced = tuple[str, Any]  # where a job came from ("batch.jsonl:601"), and the job


def shown_name(name: str) -> str:
    """A JSONL source as messages name it: `-` is standard input."""
    return "<stdin>" if name == "-" else name


def _inputs(args: argparse.Namespace) -> Iterator[Sourced]:
    """Inputs from --input, files, or --jsonl, lazily, so a huge JSONL file is
    streamed rather than read whole; each with where it came from."""
    if args.input is not None:
        try:
            yield "--input", msgspec.json.decode(args.input)
        except msgspec.DecodeError as exc:
            raise UsageError(f"--input is not valid JSON: {exc}") from None
    for name in args.files:
        path = Path(name)
        with _reading(name):
            text = path.read_text(encoding="utf-8")
        yield name, {"text": text, "filename": path.name}
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


def _jsonl(name: str) -> Iterator[Sourced]:
    """Standard input ("-") is decoded as strict UTF-8 too, whatever the locale says.
    Each object comes with its 1-based line number."""
    stdin = name == "-"
    source = sys.stdin.fileno() if stdin else name
    shown = shown_name(name)
    # A line that is not UTF-8 fails as it is read, so the whole loop is in _reading.
    with _reading(shown), open(source, encoding="utf-8", closefd=not stdin) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"{shown}:{lineno}", msgspec.json.decode(line)
            except msgspec.DecodeError as exc:
                raise UsageError(f"{shown}:{lineno}: not valid JSON: {exc}") from None


def _jobs(args: argparse.Namespace) -> Iterator[Sourced]:
    for where, item in _inputs(args):
        if args.analyzer is None:
            yield where, item
            continue
        job: dict[str, Any] = {"analyzer": args.analyzer, "input": item}
        if args.priority is not None:
            job["priority"] = args.priority
        if args.idempotency_key is not None:
            job["idempotency_key"] = args.idempotency_key
        if args.tag:
            job["tags"] = args.tag
        if args.batch is not None:
            job["batch"] = args.batch
        if args.not_before is not None:
            job["not_before"] = args.not_before
        yield where, job


def _batches(items: Iterable[Sourced], size: int) -> Iterator[list[Sourced]]:
    batch: list[Sourced] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _follow_only(args: argparse.Namespace) -> bool:
    """`submit --batch NAME --wait` with no input: follow the batch, submit nothing."""
    no_input = args.input is None and not args.files and args.jsonl is None
    return no_input and args.batch is not None and args.wait


def check(args: argparse.Namespace) -> None:
    if _follow_only(args):
        if args.analyzer is not None or args.show or args.tag or args.not_before is not None:
            raise UsageError(
                "submit --batch NAME --wait with no input follows the batch: -a, --tag, "
                "--not-before and --show need jobs to submit (see: vigil jobs --batch NAME)"
            )
        return
    if args.input is None and not args.files and args.jsonl is None:
        raise UsageError("submit needs --input JSON, files, or --jsonl FILE|-")
    if args.analyzer is None and (args.files or args.input is not None):
        raise UsageError("-a/--analyzer is required with --input and files")
    per_job = (args.priority, args.idempotency_key, args.batch, args.not_before, args.tag or None)
    if args.analyzer is None and any(flag is not None for flag in per_job):
        raise UsageError(
            "--priority, --idempotency-key, --tag, --batch and --not-before apply only "
            "with -a ANALYZER; without it each --jsonl line is a whole job object that "
            "sets its own"
        )
    several = args.jsonl is not None or (args.input is not None) + len(args.files) > 1
    if args.idempotency_key is not None and several:
        raise UsageError(
            "--idempotency-key applies to a single job (--input or one file); for "
            "--jsonl, leave out -a and give each line its own idempotency_key"
        )
    if args.show and not args.wait:
        raise UsageError("--show prints results when they are done: it needs --wait")


def _located(exc: RemoteError, batch: list[Sourced]) -> RemoteError:
    """The daemon's field errors, each named by where its job came from (the daemon
    numbers the jobs of one request from 0)."""
    if not isinstance(exc.details, list):
        return exc
    details = []
    for d in exc.details:
        index = d.get("index") if isinstance(d, dict) else None
        if isinstance(index, int) and 0 <= index < len(batch):
            where = batch[index][0]
            details.append({**d, "index": None, "field": f"{where}: {d['field']}", "at": where})
        else:
            details.append(d)
    first = details[0] if details and isinstance(details[0], dict) else None
    message = f"{first['field']}: {first['message']}" if first and "field" in first else exc.message
    return RemoteError(exc.code, message, details)


async def submit(client: ControlClient, args: argparse.Namespace) -> int:
    if _follow_only(args):
        return await _wait_and_report(client, args, [])
    ids: list[str] = []
    created = 0
    sent = 0
    # A big file blocks only this client, not a daemon; the reads go to a thread.
    chunks = _batches(_jobs(args), SUBMIT_BATCH)
    try:
        while (batch := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            try:
                data = await client.call("submit", jobs=[job for _, job in batch])
            except RemoteError as exc:
                raise _located(exc, batch) from None
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
        return 0
    if not args.json:
        for job_id in ids:
            print(job_id)
        sys.stdout.flush()
        known = len(ids) - created
        print(f"submitted {created} new job(s), {known} already known", file=sys.stderr)
    if not args.wait:
        return 0
    return await _wait_and_report(client, args, ids)


async def _wait_and_report(client: ControlClient, args: argparse.Namespace, ids: list[str]) -> int:
    """Wait for this submit's jobs (with --batch: the whole batch's), print the counts
    (and with --show each result); 0 if every job waited for succeeded."""
    counts, total = await wait_for(client, ids, batch=args.batch)
    if total == 0:
        raise RemoteError("not_found", f"batch {args.batch!r} has no jobs")
    unique = list(dict.fromkeys(ids))
    shown = [await _outcome(client, job_id) for job_id in unique] if args.show else None
    if args.json:
        batch = {"batch": args.batch, "total": total} if args.batch is not None else {}
        render.as_json(
            {"ids": ids, **batch, "counts": counts, **({"jobs": shown} if shown else {})}
        )
    else:
        render.table(list(TERMINAL), [[counts.get(s, 0) for s in TERMINAL]])
        for job in shown or ():
            _print_outcome(job)
    return 0 if counts.get("succeeded", 0) == total else 1


async def _outcome(client: ControlClient, job_id: str) -> dict[str, Any]:
    """A finished job's id, state, result and error (the job may have been purged)."""
    try:
        job = (await client.call("show", id=job_id))["job"]
    except RemoteError as exc:
        return {"id": job_id, "state": None, "result": None, "error": {"message": exc.message}}
    return {k: job[k] for k in ("id", "state", "result", "error")}


def _print_outcome(job: dict[str, Any]) -> None:
    print(f"\n{job['id']} {job['state'] or 'gone'}")
    if job["error"] and job["state"] != "succeeded":
        error = job["error"]
        print(f"{error.get('type', 'error')}: {error['message']}")
    elif isinstance(job["result"], str):
        print(job["result"])
    else:
        render.as_json(job["result"])


async def _poll(
    client: ControlClient, query: dict[str, Any], interval_s: float
) -> AsyncIterator[tuple[dict[str, int], int]]:
    """Counts by state of the jobs `query` names (`ids`, or a `batch`) and how many
    they are, every `interval_s`, until all are final (a job gone counts as final)."""
    while True:
        data = await client.call("progress", **query)
        counts: dict[str, int] = data["counts"]
        total: int = data["total"]
        yield counts, total
        if sum(counts.get(s, 0) for s in TERMINAL) + data["unknown"] >= total:
            return
        await anyio.sleep(interval_s)


async def poll_counts(
    client: ControlClient, ids: list[str], interval_s: float = 0.5
) -> AsyncIterator[dict[str, int]]:
    """Counts by state of the given jobs, every `interval_s`, until all are final."""
    async for counts, _ in _poll(client, {"ids": list(dict.fromkeys(ids))}, interval_s):
        yield counts


async def wait_for(
    client: ControlClient, ids: list[str], *, batch: str | None = None
) -> tuple[dict[str, int], int]:
    """A progress line until the jobs (or every job of `batch`, however many it
    grows to meanwhile) are done; their last counts by state, and how many."""
    line = render.ProgressLine()
    query: dict[str, Any] = {"batch": batch} if batch is not None else {"ids": list(set(ids))}
    label = f"batch {batch}: " if batch is not None else ""
    started = time.monotonic()
    counts: dict[str, int] = {}
    total = 0
    try:
        async for counts, total in _poll(client, query, 0.5):
            done = sum(counts.get(s, 0) for s in TERMINAL)
            elapsed = time.monotonic() - started
            line.update(
                f"{label}{render.bar(done, total)} {done}/{total} done  "
                f"ok {counts.get('succeeded', 0)}  failed {counts.get('failed', 0)}  "
                f"running {counts.get('running', 0)}  {elapsed:.0f} s"
            )
    finally:
        line.close()
    return counts, total


def _when_after(text: str) -> float:
    """--not-before as a unix time (0: now); a bad value is a usage error naming it."""
    try:
        return resolve_not_before(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--analyzer", help="analyzer for --input, files and --jsonl lines")
    p.add_argument("--input", help="one input object as JSON")
    p.add_argument("--jsonl", metavar="FILE|-", help="one input (or, without -a, job) a line")
    p.add_argument("files", nargs="*", help="text files: each becomes {text, filename}")
    p.add_argument("--priority", type=int, help="for every job given with -a (default 0)")
    p.add_argument("--idempotency-key", help="for the one job of -a with --input or a file")
    p.add_argument(
        "--tag", action="append", default=[], help="for every job given with -a (repeatable)"
    )
    p.add_argument("--batch", metavar="NAME", help="for every job given with -a; --wait: all")
    p.add_argument(
        "--not-before",
        type=_when_after,
        metavar="WHEN",
        help="start no earlier: +30m, +2h, an ISO 8601 time or a unix time",
    )
    p.add_argument("--wait", action="store_true", help="show progress until all are done")
    p.add_argument("--show", action="store_true", help="with --wait: print each result")
