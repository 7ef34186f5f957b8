"""Spool intake: files dropped into a directory become jobs, and end in `done/` or
`failed/` with their outcome beside them in `out/`.

Detection polls every `poll_s` (portable and bounded; inotify is not a dependency).
A file is taken once settled, claimed by an atomic rename into `processing/`, and
submitted with an idempotency key made from its identity (inode, size, mtime, name).
`processing/` is the durable bookkeeping: after a crash (SIGKILL at any moment) each
file there is resumed by its key, which finds the job if its submit had committed and
makes it if not, so every file becomes exactly one job. The outcome of a job is
learnt by polling the store for the ids in flight (at most `max_in_flight`).

Backpressure: nothing is claimed while the backlog is full, `max_in_flight` files are
out, or intake is closed (draining, shutdown); files wait in the inbox meanwhile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from daemon.config import SpoolConfig
from daemon.intake.spool_files import (
    Changed,
    Finish,
    Found,
    Gone,
    Layout,
    Reject,
    Sig,
    Text,
    claim,
    finish,
    identity_key,
    read_text,
    scan,
    shown,
    tag_of,
    unclaim,
)
from daemon.intake.submit import Intake, IntakeClosed, SubmitError
from daemon.jobs import TERMINAL, Job
from daemon.live import Live
from daemon.observe.health import Check
from daemon.store.base import BacklogFull, JobStore

log = structlog.get_logger("vigil.spool")

MAX_SCAN = 10_000  # inbox entries stat'ed per poll (all are counted)
MAX_CLAIM_PER_POLL = 500
SUBMIT_BATCH = 64  # files per intake transaction
SUBMIT_BATCH_BYTES = 8 << 20  # file text held in memory for one batch
_KIND_REASON = {
    "symlink": "symbolic link (not followed)",
    "dir": "not a regular file (a directory)",
    "other": "not a regular file",
}


@dataclass
class _Entry:
    """A file in processing/ that this run tracks."""

    name: str
    sig: Sig  # the version claimed; its key is derived from it
    key: str
    resumed: bool  # found in processing/ (a restart): it may already have a job
    job_id: str | None = None
    outcome: Finish | None = None  # decided, waiting to be moved


class SpoolIntake:
    """Owns one spool directory for the daemon's lifetime (one daemon per directory,
    enforced with a lock file). Reads its settings and the queue limits live, so a
    reload applies to the next poll; only the directory needs a restart."""

    def __init__(self, intake: Intake, store: JobStore, live: Live) -> None:
        self._intake = intake
        self._store = store
        self._live = live
        self._layout = Layout(Path(self.config.dir))
        self._entries: dict[str, _Entry] = {}
        self._seen: dict[str, tuple[Sig, float]] = {}  # inbox name -> (version, since)
        self._lock_fd: int | None = None
        self._errors: list[str] = []
        self.error: str | None = None
        self.held: str | None = None
        self.waiting = 0
        self.claimed = self.resumed = self.done = self.failed = 0

    @property
    def config(self) -> SpoolConfig:
        spool = self._live.config.intake.spool
        assert spool is not None, "a spool is added or removed only by a restart"
        return spool

    def status(self) -> dict[str, Any]:
        """The spool's part of `vigil status`; counts are since the daemon started."""
        return {
            "dir": self.config.dir,
            "analyzer": self.config.analyzer,
            "glob": self.config.glob,
            "waiting": self.waiting,
            "in_flight": len(self._entries),
            "claimed": self.claimed,
            "resumed": self.resumed,
            "done": self.done,
            "failed": self.failed,
            "held": self.held,
            "error": self.error,
        }

    def check(self) -> Check:
        """Shown, not acted on: the daemon still takes work by its other intakes."""
        return Check(
            name="spool",
            ok=self.error is None,
            affects="none",
            reason=f"{self.config.dir}: {self.error}",
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            next_at = anyio.current_time()
            while True:
                polled_with = self._live.config
                await self._poll_once()
                now = anyio.current_time()
                next_at = max(next_at + self.config.poll_s, now)
                # A reload (also one during that poll) means a poll now: a shorter
                # poll_s applies at once, not a long poll later.
                reloaded = self._live.config is not polled_with
                if reloaded or await self._live.reloaded.wait(next_at - now):
                    next_at = anyio.current_time()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    async def _poll_once(self) -> None:
        """One iteration; a failure is reported (status, one log line per change)
        and the next poll tries again."""
        self._errors = []
        try:
            await self._poll()
        except Exception as exc:
            self._errors.append(f"{type(exc).__name__}: {exc}")
        error = "; ".join(self._errors[:3]) or None
        if error is not None and error != self.error:
            log.error("spool.error", dir=self.config.dir, error=error)
        elif error is None and self.error is not None:
            log.info("spool.recovered", dir=self.config.dir)
        self.error = error
        self.held = self._held()

    async def _poll(self) -> None:
        if self._lock_fd is None:
            self._lock_fd = await anyio.to_thread.run_sync(self._layout.prepare)
            log.info(
                "spool.started",
                dir=self.config.dir,
                analyzer=self.config.analyzer,
                glob=self.config.glob,
            )
        await self._collect_finished()
        await self._adopt()
        await self._submit_pending()
        await self._take_new()
        await self._submit_pending()
        await self._flush()

    # -- limits -----------------------------------------------------------------

    def _backlog_room(self) -> int:
        queued = self._store.counts["queued"]
        pending = sum(1 for e in self._entries.values() if e.job_id is None)
        return self._live.config.queue.max_backlog - queued - pending

    def _held(self) -> str | None:
        """Why new files are not being claimed now, if they are not."""
        if self._intake.closed_reason:
            return f"intake closed: {self._intake.closed_reason}"
        if len(self._entries) >= self.config.max_in_flight:
            return f"{len(self._entries)} files in flight (intake.spool.max_in_flight)"
        if self._backlog_room() <= 0:
            return f"backlog full (queue.max_backlog = {self._live.config.queue.max_backlog})"
        return None

    # -- the steps of a poll ----------------------------------------------------

    async def _collect_finished(self) -> None:
        """Decide the outcome of files whose jobs reached a final state."""
        waiting = {e.job_id: e for e in self._entries.values() if e.job_id and e.outcome is None}
        if not waiting:
            return
        states = await self._store.states_of(list(waiting))
        for job_id, entry in waiting.items():
            state = states.get(job_id)
            if state is not None and state not in TERMINAL:
                continue
            job = await self._store.get(job_id) if state is not None else None
            if job is None:
                entry.outcome = self._reject(
                    entry, f"job {job_id} is no longer in the database (purged)"
                )
            else:
                entry.outcome = _job_outcome(entry, job)

    async def _adopt(self) -> None:
        """Track files in processing/ this run does not know: those a previous run
        claimed (resumed by key), up to `max_in_flight`; forget tracked ones that
        someone removed."""
        limit = self.config.max_in_flight + MAX_CLAIM_PER_POLL
        found, total = await anyio.to_thread.run_sync(
            scan, self._layout.sub("processing"), None, limit
        )
        if total == len(found):
            present = {f.name for f in found}
            for name in [n for n in self._entries if n not in present]:
                entry = self._entries.pop(name)
                log.warning("spool.file_vanished", file=shown(name), job_id=entry.job_id)
        for f in found:
            if f.name in self._entries:
                continue
            if len(self._entries) >= self.config.max_in_flight:
                break
            entry = _Entry(f.name, f.sig, identity_key(f.name, f.sig), resumed=True)
            if f.kind != "file":
                entry.outcome = self._reject(entry, _KIND_REASON[f.kind])
            self._entries[f.name] = entry
            self.resumed += 1

    async def _submit_pending(self) -> None:
        """Submit claimed files that have no job yet, in batches (one transaction
        each), never more than the backlog has room for."""
        if self._intake.closed_reason:
            return
        room = self._live.config.queue.max_backlog - self._store.counts["queued"]
        batch: list[tuple[_Entry, str]] = []
        size = 0
        pending = [e for e in self._entries.values() if e.job_id is None and e.outcome is None]
        for entry in pending:
            if entry.resumed:
                entry.resumed = False
                job = await self._store.get_by_idempotency_key(entry.key)
                if job is not None:
                    entry.job_id = job.id
                    continue
            if room <= len(batch):
                continue  # no room: only look up resumed files this time
            path = self._layout.sub("processing") / entry.name
            read = await anyio.to_thread.run_sync(
                read_text, path, entry.sig, self.config.max_file_bytes
            )
            match read:
                case Text(text):
                    batch.append((entry, text))
                    size += len(text)
                case Reject(reason):
                    entry.outcome = self._reject(entry, reason)
                case Changed():
                    # Still being written: back to the inbox to settle (or, if a new
                    # file took its name there, adopted again once it is quiet).
                    del self._entries[entry.name]
                    await anyio.to_thread.run_sync(unclaim, self._layout, entry.name)
                    log.info("spool.file_changed", file=shown(entry.name))
                case Gone():
                    del self._entries[entry.name]
                    log.warning("spool.file_vanished", file=shown(entry.name))
            if len(batch) >= SUBMIT_BATCH or size >= SUBMIT_BATCH_BYTES:
                room -= len(batch)
                if not await self._submit(batch):
                    return
                batch, size = [], 0
        if batch:
            await self._submit(batch)

    async def _submit(self, batch: list[tuple[_Entry, str]]) -> bool:
        """False when intake said no for now (backlog full, closed): stop for this poll.
        The jobs are built here, from one read of the settings, with no await before
        the submit: a reload meanwhile cannot give one batch two analyzers."""
        spool = self.config
        jobs = [_job(spool, entry, text) for entry, text in batch]
        try:
            submitted = await self._intake.submit(jobs, source="spool")
        except SubmitError as exc:
            # Refused files fail with intake's words; the rest go again.
            refused: dict[int | None, list[str]] = {}
            for err in exc.errors:
                refused.setdefault(err.index, []).append(f"{err.field}: {err.message}")
            rest = []
            for index, (entry, text) in enumerate(batch):
                problems = refused.get(index, []) + refused.get(None, [])
                if problems:
                    entry.outcome = self._reject(entry, "refused: " + "; ".join(problems))
                else:
                    rest.append((entry, text))
            return await self._submit(rest) if rest else True
        except (BacklogFull, IntakeClosed):
            return False
        for (entry, _), done in zip(batch, submitted, strict=True):
            entry.job_id = done.id
            log.debug("spool.submitted", file=shown(entry.name), job_id=done.id)
        return True

    async def _take_new(self) -> None:
        """Scan the inbox; fail what is not a regular file; claim settled files, oldest
        first, as far as the limits allow."""
        found, total = await anyio.to_thread.run_sync(
            scan, self._layout.inbox, self.config.glob, MAX_SCAN
        )
        self.waiting = total
        settled = self._settled(found)
        if self._held() is not None:
            return
        odd = [f for f in found if f.kind != "file"]
        if odd:
            await self._finish(
                [
                    Finish(
                        f.name,
                        "inbox",
                        ok=False,
                        tag=tag_of(identity_key(f.name, f.sig)),
                        reason=_KIND_REASON[f.kind],
                    )
                    for f in odd
                ]
            )
            self.waiting -= len(odd)
        room = min(
            MAX_CLAIM_PER_POLL,
            self.config.max_in_flight - len(self._entries),
            self._backlog_room(),
        )
        take = sorted(
            (f for f in settled if f.name not in self._entries),
            key=lambda f: (f.sig.mtime_ns, f.name),
        )[: max(room, 0)]
        if not take:
            return
        claimed, errors = await anyio.to_thread.run_sync(
            claim, self._layout, [f.name for f in take]
        )
        self._errors.extend(errors)
        sigs = {f.name: f.sig for f in take}
        for name in claimed:
            self._entries[name] = _Entry(
                name, sigs[name], identity_key(name, sigs[name]), resumed=False
            )
        self.claimed += len(claimed)
        self.waiting -= len(claimed)

    def _settled(self, found: list[Found]) -> list[Found]:
        """Regular files unchanged for `settle_s`, or last written that long ago (a
        file written elsewhere and renamed in is taken at first sight)."""
        now, wall = time.monotonic(), time.time()
        settle_s = self.config.settle_s
        seen: dict[str, tuple[Sig, float]] = {}
        settled: list[Found] = []
        for f in found:
            if f.kind != "file":
                continue
            previous = self._seen.get(f.name)
            since = previous[1] if previous is not None and previous[0] == f.sig else now
            seen[f.name] = (f.sig, since)
            if now - since >= settle_s or wall - f.sig.mtime_ns / 1e9 >= settle_s:
                settled.append(f)
        self._seen = seen
        return settled

    async def _flush(self) -> None:
        items = [e.outcome for e in self._entries.values() if e.outcome is not None]
        if items:
            await self._finish(items)

    async def _finish(self, items: list[Finish]) -> None:
        """Move files to done/ or failed/; one that cannot be moved stays where it
        is and is tried again next poll."""
        results = await anyio.to_thread.run_sync(finish, self._layout, items)
        for item, result in zip(items, results, strict=True):
            if isinstance(result, OSError):
                self._errors.append(f"cannot finish {shown(item.name)!r}: {result}")
                continue
            entry = self._entries.pop(item.name, None) if item.source == "processing" else None
            job_id = entry.job_id if entry is not None else None
            if item.ok:
                self.done += 1
                log.info(
                    "spool.file_done", file=shown(item.name), job_id=job_id, moved_to=shown(result)
                )
            else:
                self.failed += 1
                log.warning(
                    "spool.file_failed",
                    file=shown(item.name),
                    job_id=job_id,
                    moved_to=shown(result),
                    reason=item.reason,
                )

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    def _reject(entry: _Entry, reason: str) -> Finish:
        return Finish(entry.name, "processing", ok=False, tag=tag_of(entry.key), reason=reason)


def _job(spool: SpoolConfig, entry: _Entry, text: str) -> dict[str, Any]:
    return {
        "analyzer": spool.analyzer,
        "input": {spool.field: text, "filename": shown(entry.name)},
        "idempotency_key": entry.key,
    }


def _job_outcome(entry: _Entry, job: Job) -> Finish:
    """out/<name>.json: what the job came to, for the file's owner to pick up."""
    out = {
        "file": shown(entry.name),
        "job_id": job.id,
        "analyzer": job.analyzer,
        "state": job.state,
        "attempts": job.attempts,
        "result": job.result,
        "error": job.error,
        "usage": job.usage,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }
    ok = job.state == "succeeded"
    reason = None
    if not ok:
        why = f": {job.error.type}: {job.error.message}" if job.error else ""
        reason = f"job {job.id} {job.state}{why}"
    return Finish(
        entry.name,
        "processing",
        ok=ok,
        tag=tag_of(entry.key),
        out_json=msgspec.json.format(msgspec.json.encode(out), indent=2) + b"\n",
        reason=reason,
    )
