"""Per-job metadata (issue #17): tags, a batch id and a delayed start (`not_before`):
the store's contract on both backends, the filters, the schema migration, and the
socket and CLI against a real daemon."""

# The `store` fixture (both backends) is test_store's, imported: its uses shadow it.

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest

from daemon.intake.metadata import resolve_not_before
from daemon.jobs import JobIds
from daemon.store.base import IdempotencyConflict, NewJob, Submitted
from daemon.store.bulk import run_bulk
from daemon.store.filters import JobFilter
from daemon.store.schema import MIGRATIONS, migrate
from daemon.store.sqlite import Store
from tests.daemon_proc import DaemonProcess, db_rows, run_cli, sim_config
from tests.test_store import BIG, TIMEOUT_S, claim_one, counts, get

IDS = JobIds()
StartDaemon = Callable[..., DaemonProcess]
TEXT: dict[str, Any] = {"analyzer": "summarize", "input": {"text": "hello"}}


def job(
    *,
    tags: tuple[str, ...] = (),
    batch: str | None = None,
    not_before: float = 0.0,
    key: str | None = None,
) -> NewJob:
    """A valid job with that metadata and a fresh time-ordered id."""
    return NewJob(
        id=IDS.new(),
        analyzer="summarize",
        input={"text": "hi"},
        priority=0,
        idempotency_key=key,
        max_attempts=1,
        source="test",
        tags=tags,
        batch=batch,
        not_before=not_before,
    )


async def submit(store: Any, jobs: list[NewJob]) -> list[str]:
    """Submit jobs that must all be created; their ids."""
    out = await store.submit(jobs, max_backlog=BIG)
    assert all(s.created for s in out)
    return [s.id for s in out]


# -- the store, both backends -----------------------------------------------------------


@pytest.mark.anyio
async def test_metadata_is_stored_and_shown(store: Any) -> None:
    """Tags, batch and not_before come back from get and list_jobs as submitted; a job
    without them shows none."""
    with anyio.fail_after(TIMEOUT_S):
        later = time.time() + 3600
        tagged, plain = await submit(
            store, [job(tags=("a", "b:1"), batch="nightly-1", not_before=later), job()]
        )
        got = await get(store, tagged)
        assert (got.tags, got.batch, got.not_before) == (("a", "b:1"), "nightly-1", later)
        bare = await get(store, plain)
        assert (bare.tags, bare.batch, bare.not_before) == ((), None, 0.0)
        listed = {j.id: j for j in await store.list_jobs()}
        assert listed[tagged] == got and listed[plain] == bare


@pytest.mark.anyio
async def test_filters_by_tag_batch_text_in_id_and_ids(store: Any) -> None:
    """list_jobs and count_jobs filter by tag, batch, text in the id (any case) and an
    id list, alone or with the older filters; newest first."""
    with anyio.fail_after(TIMEOUT_S):
        a1, a2, b1, none = await submit(
            store,
            [
                job(tags=("red", "blue"), batch="A"),
                job(tags=("red",), batch="A"),
                job(tags=("blue",), batch="B"),
                job(),
            ],
        )

        async def listed(flt: JobFilter) -> list[str]:
            return [j.id for j in await store.list_jobs(flt, limit=10)]

        assert await listed(JobFilter(tag="red")) == [a2, a1]
        assert await listed(JobFilter(tag="blue", batch="A")) == [a1]
        assert await listed(JobFilter(batch="B")) == [b1]
        assert await listed(JobFilter(tag="green")) == []
        assert await listed(JobFilter(id_contains=none[-12:].upper())) == [none]
        assert await listed(JobFilter(ids=(a1, b1))) == [b1, a1]
        assert await store.count_jobs(JobFilter(batch="A")) == {"queued": 2}
        assert await store.count_jobs(JobFilter(tag="blue", states=("queued",))) == {"queued": 2}
        assert await listed(JobFilter(tag="red", before=a2)) == [a1]


@pytest.mark.anyio
async def test_a_delayed_job_is_not_claimed_before_its_time(store: Any) -> None:
    """A job whose not_before is ahead stays queued (and is the next wake-up); one whose
    time has come is claimed."""
    with anyio.fail_after(TIMEOUT_S):
        at = time.time() + 0.5
        [delayed] = await submit(store, [job(not_before=at)])
        assert await store.claim(10) == []
        assert await store.next_wake(after=time.time()) == at
        await anyio.sleep(max(0.0, at - time.time()) + 0.05)
        claimed = await claim_one(store)
        assert claimed.id == delayed and claimed.started_at is not None
        assert claimed.started_at >= at


@pytest.mark.anyio
async def test_idempotency_compares_tags_and_batch_not_not_before(store: Any) -> None:
    """The same key with other tags or another batch is a conflict; with another
    not_before (a resent `+30m`) it is the same job, whose first start stands."""
    with anyio.fail_after(TIMEOUT_S):
        first = job(tags=("x",), batch="b", key="k", not_before=time.time() + 60)
        [sub] = await store.submit([first], max_backlog=BIG)
        again = job(tags=("x",), batch="b", key="k", not_before=time.time() + 120)
        assert await store.submit([again], max_backlog=BIG) == [Submitted(sub.id, False)]
        for other in (job(tags=("y",), batch="b", key="k"), job(tags=("x",), key="k")):
            with pytest.raises(IdempotencyConflict) as caught:
                await store.submit([job(tags=("z",)), other], max_backlog=BIG)
            assert caught.value.job_id == sub.id
        assert await store.count_jobs(JobFilter(tag="z")) == {}
        assert (await get(store, sub.id)).not_before == first.not_before


@pytest.mark.anyio
async def test_bulk_actions_by_tag_batch_and_ids_and_purge_drops_tags(store: Any) -> None:
    """Cancel by tag, retry by batch and by an id list, purge: each touches only what
    its filter names; a purged job's tags go with it."""
    with anyio.fail_after(TIMEOUT_S):
        red = await submit(store, [job(tags=("red",), batch="n1") for _ in range(3)])
        rest = await submit(store, [job(batch="n2") for _ in range(2)])
        canceled = await run_bulk(store, "cancel", JobFilter(tag="red"), max_backlog=BIG, batch=2)
        assert (canceled.changed, sorted(canceled.sample)) == (3, sorted(red))
        one = await run_bulk(store, "retry", JobFilter(ids=(red[0],)), max_backlog=BIG)
        assert one.changed == 1 and (await get(store, red[0])).state == "queued"
        batch = await run_bulk(store, "retry", JobFilter(batch="n1"), max_backlog=BIG)
        assert batch.by_state == {"failed": 0, "canceled": 2}
        await run_bulk(store, "cancel", JobFilter(batch="n1"), max_backlog=BIG)
        purged = await run_bulk(store, "purge", JobFilter(tag="red"), max_backlog=BIG)
        assert purged.changed == 3
        assert await store.count_jobs(JobFilter(tag="red")) == {}
        assert counts(store)["queued"] == 2
        assert {(await get(store, i)).state for i in rest} == {"queued"}


# -- SQLite: the migration and the plan ------------------------------------------------


@pytest.mark.anyio
async def test_migration_6_keeps_old_jobs_and_indexes_the_filters(tmp_path: Path) -> None:
    """A version-5 database with a job opens at the new version: the old job has no
    tags and no batch; counting a batch is served by its index, a tag by job_tags."""
    path = tmp_path / "vigil.db"
    with anyio.fail_after(TIMEOUT_S):
        async with aiosqlite.connect(path, isolation_level=None) as db:
            for version, script in enumerate(MIGRATIONS[:5], 1):
                await db.executescript(f"BEGIN; {script}; PRAGMA user_version = {version}; COMMIT;")
            await db.execute(
                "INSERT INTO jobs (id, analyzer, input, state, max_attempts, created_at, "
                "source) VALUES ('old', 'summarize', '{}', 'queued', 1, 1.0, 'test')"
            )
            assert await migrate(db) == 5
        async with Store(path, synchronous="NORMAL") as opened:
            old = await get(opened, "old")
            assert (old.tags, old.batch) == ((), None)
            assert await opened.count_jobs(JobFilter(batch="x")) == {}
        with sqlite3.connect(path) as plain:
            plan = " ".join(
                str(row[3])
                for row in plain.execute(
                    "EXPLAIN QUERY PLAN SELECT state, count(*) FROM jobs WHERE batch = ? "
                    "GROUP BY state",
                    ("x",),
                )
            )
            assert "jobs_batch" in plan and "COVERING" in plan, plan
            tag_plan = " ".join(
                str(row[3])
                for row in plain.execute(
                    "EXPLAIN QUERY PLAN SELECT job_id FROM job_tags WHERE tag = ?", ("x",)
                )
            )
            assert "SEARCH" in tag_plan, tag_plan


# -- not_before's forms ----------------------------------------------------------------


def test_not_before_forms() -> None:
    """A unix time, an ISO 8601 time or a +delay; the past (and none) is 0: start now;
    a bare duration or nonsense is refused, naming the forms."""
    now = 1_800_000_000.0
    assert resolve_not_before(None, now) == 0.0
    assert resolve_not_before(now + 5, now) == now + 5
    assert resolve_not_before(str(now + 5), now) == now + 5
    assert resolve_not_before("+30m", now) == now + 1800
    assert resolve_not_before(" +2h ", now) == now + 7200
    assert resolve_not_before("2027-01-15T09:00:00Z", now) == now + 3600  # now: 08:00
    assert resolve_not_before("2020-01-01", now) == 0.0
    assert resolve_not_before(now - 1, now) == 0.0
    for bad, says in (
        ("30m", "plus sign"),
        ("+soon", "a delay from now"),
        ("tomorrow", "ISO 8601"),
        ("inf", "9999"),
        ("99999999999999", "9999"),
    ):
        with pytest.raises(ValueError, match=says):
            resolve_not_before(bad, now)


# -- the socket and the CLI against a daemon --------------------------------------------


@pytest.fixture
def paused(start_daemon: StartDaemon) -> DaemonProcess:
    """One daemon for a test, paused so submitted jobs stay queued."""
    proc = start_daemon(sim_config())
    proc.call("pause")
    return proc


def test_socket_submit_validates_each_field(paused: DaemonProcess) -> None:
    """Bad tags, batch or not_before are refused as invalid_job naming the field, the
    whole list with them; nothing is written."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tags": ["ok", "has space"]}, "tags[1]"),
        ({"tags": ["x" * 41]}, "tags[0]"),
        ({"tags": [f"t{i}" for i in range(9)]}, "tags"),
        ({"tags": [""]}, "tags[0]"),
        ({"tags": "solo"}, "tags"),
        ({"batch": "a/b"}, "batch"),
        ({"batch": "b" * 101}, "batch"),
        ({"not_before": "30m"}, "not_before"),
        ({"not_before": 1e20}, "not_before"),
        ({"not_before": True}, "not_before"),
        ({"not_before": "whenever"}, "not_before"),
    ]
    for extra, field in cases:
        reply = paused.request("submit", jobs=[TEXT, {**TEXT, **extra}])
        assert reply["ok"] is False, extra
        error = reply["error"]
        assert error["code"] == "invalid_job", error
        assert [(d["index"], d["field"]) for d in error["details"]] == [(1, field)], error
        assert field in error["message"]
    reply = paused.request("submit", jobs={**TEXT, "tags": ["a b"]})
    assert reply["error"]["message"] == "tags[0]: only letters, digits and _ . : - are allowed"
    assert paused.call("status")["jobs"]["queued"] == 0
    [now] = paused.call("submit", jobs={**TEXT, "not_before": -5})["ids"]
    assert paused.call("show", id=now)["job"]["not_before"] == 0  # the past: start now


def test_socket_metadata_in_views_filters_and_bulk(paused: DaemonProcess) -> None:
    """Submitted metadata shows in `show` and `jobs`; `jobs` filters by tag, batch and
    text in the id (no total for that scan); `progress` counts a batch; bulk actions
    take tag, batch and an id list, which counts as a filter."""
    later = time.time() + 3600
    jobs = [
        {**TEXT, "tags": ["b", "a", "b"], "batch": "n1", "not_before": later},
        {**TEXT, "batch": "n1"},
        {**TEXT, "tags": ["a"]},
    ]
    ids = paused.call("submit", jobs=jobs)["ids"]
    shown = paused.call("show", id=ids[0])["job"]
    assert (shown["tags"], shown["batch"], shown["not_before"]) == (["a", "b"], "n1", later)
    listed = paused.call("jobs", tag="a")
    assert ([j["id"] for j in listed["jobs"]], listed["total"]) == ([ids[2], ids[0]], 2)
    assert paused.call("jobs", batch="n1", tag="a")["total"] == 1
    found = paused.call("jobs", q=ids[1][-10:].upper())
    assert ([j["id"] for j in found["jobs"]], found["total"]) == ([ids[1]], None)
    assert paused.call("progress", batch="n1") == {
        "counts": {"queued": 2},
        "unknown": 0,
        "total": 2,
    }
    bad = paused.request("jobs", tag="no spaces")
    assert bad["error"]["code"] == "bad_args" and bad["error"]["details"][0]["field"] == "tag"
    dry = paused.call("cancel", batch="n1", dry_run=True)
    assert dry["matched"] == 2 and dry["changed"] == 0
    assert paused.call("cancel", ids=[ids[2]])["by_state"] == {"queued": 1, "running": 0}
    assert paused.call("retry", ids=[ids[2]])["changed"] == 1
    assert paused.call("cancel", tag="b")["changed"] == 1
    too_many = paused.request("cancel", ids=[f"x{i}" for i in range(1001)])
    assert too_many["error"]["code"] == "bad_args"
    assert too_many["error"]["details"][0]["field"] == "ids"


def test_cli_submit_flags_show_and_jobs(paused: DaemonProcess) -> None:
    """`vigil submit --tag --batch --not-before` sets them; `vigil show` prints them;
    `vigil jobs --tag/--batch` filters; bad flags are usage errors naming them."""
    sock = paused.socket_path
    result = run_cli(
        "submit", "-a", "summarize", "--input", '{"text": "x"}', "--tag", "t1",
        "--tag", "t0", "--batch", "cli-1", "--not-before", "+2h", socket_path=sock,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    job = paused.call("show", id=job_id)["job"]
    assert (job["tags"], job["batch"]) == (["t0", "t1"], "cli-1")
    assert 7100 < job["not_before"] - time.time() <= 7200
    shown = run_cli("show", job_id, socket_path=sock)
    assert "t0, t1" in shown.stdout and "cli-1" in shown.stdout
    assert "not before" in shown.stdout
    listed = run_cli("jobs", "--tag", "t1", "--batch", "cli-1", socket_path=sock)
    assert job_id in listed.stdout and "1 job(s) shown of 1 matching" in listed.stderr
    assert "cli-1" in listed.stdout
    assert job_id not in run_cli("jobs", "--batch", "other", socket_path=sock).stdout
    dry = run_cli("cancel", "--tag", "t1", "--dry-run", socket_path=sock)
    assert "would cancel 1 job(s)" in dry.stdout, dry.stderr
    for args, says in (
        (("--input", "{}", "--not-before", "30m"), "--not-before"),
        (("--jsonl", "-", "--tag", "x"), "apply only with -a"),
        (("--batch", "b", "--wait", "--show"), "follows the batch"),
    ):
        bad = run_cli("submit", *args, socket_path=sock, input="")
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_submit_batch_wait_follows_the_whole_batch(start_daemon: StartDaemon) -> None:
    """`vigil submit --batch B --wait` waits for every job of B, one submitted earlier
    with a delayed start included, and that job does not start before its time."""
    daemon = start_daemon(sim_config())
    start_at = time.time() + 2.0
    early = {**TEXT, "batch": "B", "not_before": start_at}
    [delayed] = daemon.call("submit", jobs=early)["ids"]
    result = run_cli(
        "submit", "-a", "summarize", "--input", '{"text": "y"}', "--batch", "B", "--wait",
        "--json", socket_path=daemon.socket_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["batch"], report["total"]) == ("B", 2)
    assert report["counts"]["succeeded"] == 2
    assert time.time() >= start_at
    [(started,)] = db_rows(
        daemon.state_dir / "vigil.db", "SELECT started_at FROM jobs WHERE id = ?", (delayed,)
    )
    assert started >= start_at
    followed = run_cli("submit", "--batch", "B", "--wait", socket_path=daemon.socket_path)
    assert followed.returncode == 0, followed.stderr
    missing = run_cli("submit", "--batch", "none", "--wait", socket_path=daemon.socket_path)
    assert missing.returncode == 1 and "has no jobs" in missing.stderr
