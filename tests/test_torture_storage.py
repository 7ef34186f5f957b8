"""Storage faults, injected for real: the database locked by another process, a disk
that fills up (a small tmpfs), a filesystem that turns read-only under the daemon (ext4
on a loop device, errors=remount-ro), a read-only state directory at start (a read-only
bind mount), the WAL deleted while stopped, and a database from every earlier schema
version.

For each: readiness goes false naming the reason, intake refuses with a clear error,
nothing acknowledged is lost, and processing resumes once the fault clears. Mounting
needs root (this machine and CI are root); those tests skip, saying why, elsewhere."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.store.schema import MIGRATIONS, SCHEMA_VERSION
from daemon.store.sqlite import Store
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows, run_cli, wait_until
from tests.torture_helpers import (
    RawResponse,
    analyzer,
    host_port,
    http_request,
    ledger_problems,
    need_root,
    raw_http,
    simulated_provider,
)

StartDaemon = Callable[..., DaemonProcess]
MiB = 1024 * 1024


def socket_in(tmp_path: Path) -> Path:
    """Where `start_daemon` (name "d") expects the control socket."""
    return tmp_path / "d" / "vigil.sock"


def storage_config(
    *,
    latency_ms: float = 100.0,
    state_dir: Path | None = None,
    socket: Path | None = None,
    min_free_mb: int | None = None,
) -> str:
    """The built-in simulated API, HTTP on; the database optionally elsewhere (a test
    mount) with the socket kept where DaemonProcess looks (`socket`)."""
    lines = []
    if state_dir is not None:
        assert socket is not None, "the socket stays in DaemonProcess's directory"
        lines += [f'state_dir = "{state_dir}"', f'socket = "{socket}"']
    if min_free_mb is not None:
        lines.append(f"min_free_mb = {min_free_mb}")
    return daemon_config(
        simulated_provider(latency_ms=latency_ms) + analyzer("summarize", "sim", max_attempts=3),
        http_listen="127.0.0.1:0",
        max_concurrency=8,
        daemon_extra="\n".join(lines),
    )


def jobs(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "analyzer": "summarize",
            "input": {"text": f"{prefix} {i}"},
            "idempotency_key": f"{prefix}-{i}",
        }
        for i in range(n)
    ]


def readyz(daemon: DaemonProcess) -> RawResponse:
    return raw_http(*host_port(daemon.http_url()), http_request("GET", "/readyz"), timeout_s=30)


def not_ready_because(daemon: DaemonProcess, *words: str) -> bool:
    answer = readyz(daemon)
    if answer.status != 503:
        return False
    reasons = " ".join(answer.json()["reasons"]).lower()
    return all(word in reasons for word in words)


def refused_while_not_ready(daemon: DaemonProcess, *why: str) -> dict[str, Any]:
    """Wait until /readyz says 503 with every word of `why` in its reasons; a submit is
    then refused with store_error. Returns that refusal."""
    wait_until(lambda: not_ready_because(daemon, *why), timeout_s=60, what=f"not ready: {why}")
    reply = daemon.request("submit", jobs=jobs("refused", 2))
    assert reply["ok"] is False and reply["error"]["code"] == "store_error", reply
    return reply


def post_jobs(daemon: DaemonProcess, body: list[dict[str, Any]]) -> RawResponse:
    data = http_request(
        "POST",
        "/v1/jobs",
        headers={"Content-Type": "application/json"},
        body=msgspec.json.encode(body),
    )
    return raw_http(*host_port(daemon.http_url()), data, timeout_s=60)


def keys_in(db: Path) -> set[str]:
    return {row[0] for row in db_rows(db, "SELECT idempotency_key FROM jobs")}


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A small tmpfs at `path`, unmounted at the end."""
    need_root("mounting a test filesystem")
    path.mkdir(parents=True, exist_ok=True)
    mounted = run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if run("umount", str(path)).returncode != 0:
            run("umount", "-l", str(path))


def fill(directory: Path, leave_bytes: int) -> Path:
    """Write a filler file until only about `leave_bytes` stay free."""
    filler = directory / "filler"
    chunk = b"\0" * MiB
    with filler.open("ab") as f:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave_bytes:
                break
            try:
                f.write(chunk[: min(len(chunk), free - leave_bytes)])
                f.flush()
            except OSError:
                break
    return filler


# -- a lock held by another process ---------------------------------------------------


def test_database_locked_by_another_process(start_daemon: StartDaemon) -> None:
    """Another process holds the write lock: results that cannot be recorded wait,
    readiness says the database is locked, submits are refused with store_error and
    nothing of them is written; once the lock goes, every job finishes, once."""
    daemon = start_daemon(storage_config(latency_ms=500))
    db = daemon.state_dir / "vigil.db"
    accepted = daemon.call("submit", jobs=jobs("before", 8))["ids"]
    wait_until(lambda: daemon.call("status")["jobs"]["running"] == 8, what="8 running")
    daemon.call("pause")
    locker = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        # The running attempts end now and cannot record their results.
        wait_until(
            lambda: not_ready_because(daemon, "store", "locked"),
            timeout_s=60,
            what="readiness false: database locked",
        )
        reply = daemon.request("submit", jobs=jobs("during", 3))
        assert reply["ok"] is False, reply
        assert reply["error"]["code"] == "store_error", reply
        assert "locked" in reply["error"]["message"], reply
        status = daemon.call("status")  # status is served from memory meanwhile
        assert status["health"]["ready"] is False
        assert status["jobs"]["running"] == 8, "the unrecorded attempts still hold the jobs"
        assert not_ready_because(daemon, "locked"), "still not ready while the lock holds"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    daemon.call("resume")
    final = daemon.wait_all_terminal(timeout_s=60)
    assert final["succeeded"] == len(accepted) == 8, final
    wait_until(lambda: readyz(daemon).status == 200, what="ready again")
    assert not {k for k in keys_in(db) if k.startswith("during")}, "a refused job was written"
    assert not ledger_problems(db)
    assert daemon.terminate() == 0


def test_start_with_the_database_locked(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Started while another process holds the write lock: the daemon exits 1 with a
    message naming the database and the lock (no traceback); started again once the
    lock is gone, it serves every job it had."""
    daemon = start_daemon(storage_config())
    ids = daemon.call("submit", jobs=jobs("kept", 5))["ids"]
    daemon.wait_all_terminal()
    assert daemon.terminate() == 0
    db = daemon.state_dir / "vigil.db"
    locker = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        out = run_cli("run", "--config", str(daemon.config_path), env=daemon.env)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert out.returncode == 1, out
    assert "database is locked" in out.stderr and str(db) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    daemon.restart()
    assert {j["id"] for j in daemon.call("jobs", limit=100)["jobs"]} == set(ids)


# -- a full disk -----------------------------------------------------------------------


def test_disk_nearly_full(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Free space under the database drops below daemon.min_free_mb: readiness false
    naming it, submits refused over the socket and HTTP (503), while accepted jobs run on
    and record their results in the reserve; freed, intake reopens by itself."""
    with tmpfs(tmp_path / "mnt", 32) as mnt:
        daemon = start_daemon(
            storage_config(state_dir=mnt, socket=socket_in(tmp_path), min_free_mb=8, latency_ms=200)
        )
        db = mnt / "vigil.db"
        assert (daemon.state_dir / "vigil.sock").exists() and db.exists()
        accepted = daemon.call("submit", jobs=jobs("before", 60))["ids"]
        filler = fill(mnt, leave_bytes=4 * MiB)
        reply = refused_while_not_ready(daemon, "disk", "min_free_mb")
        assert "min_free_mb" in reply["error"]["message"], reply
        answer = post_jobs(daemon, jobs("refused-http", 2))
        assert answer.status == 503 and answer.json()["error"]["code"] == "store_error"
        # Accepted work goes on in the reserve and is recorded.
        final = daemon.wait_all_terminal(timeout_s=120)
        assert final["succeeded"] == len(accepted), final
        filler.unlink()
        wait_until(lambda: readyz(daemon).status == 200, timeout_s=30, what="ready again")
        after = daemon.call("submit", jobs=jobs("after", 5))["ids"]
        daemon.wait_all_terminal()
        assert daemon.terminate() == 0
        assert len(after) == 5
        assert not {k for k in keys_in(db) if k.startswith("refused")}
        assert len(keys_in(db)) == 65
        assert not ledger_problems(db)


def test_disk_completely_full(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Something else fills the disk to the last byte while attempts run (no
    min_free_mb reserve): readiness false naming SQLite's error, submits refused,
    writes that cannot land retried, not dropped; freed, readiness returns by itself
    and every accepted job ends, once."""
    with tmpfs(tmp_path / "mnt", 32) as mnt:
        daemon = start_daemon(
            storage_config(state_dir=mnt, socket=socket_in(tmp_path), min_free_mb=0, latency_ms=300)
        )
        db = mnt / "vigil.db"
        accepted = daemon.call("submit", jobs=jobs("before", 40))["ids"]
        wait_until(lambda: daemon.call("status")["jobs"]["succeeded"] > 0, what="running")
        filler = fill(mnt, leave_bytes=0)
        # Attempts end against the full disk (the WAL may still have room for some; the
        # rest fail and wait).
        refused_while_not_ready(daemon, "store", "full")
        filler.unlink()
        wait_until(lambda: readyz(daemon).status == 200, timeout_s=30, what="ready again")
        final = daemon.wait_all_terminal(timeout_s=120)
        assert final["succeeded"] + final["failed"] == len(accepted), final
        assert daemon.terminate() == 0
        assert not {k for k in keys_in(db) if k.startswith("refused")}
        assert len(keys_in(db)) == len(accepted)
        assert not ledger_problems(db)


# -- a filesystem that turns read-only -------------------------------------------------


@contextmanager
def ext4_loop(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """A 64 MiB ext4 image mounted with errors=remount-ro: yields (mount, image, the
    kernel's name for its device)."""
    need_root("mounting a test filesystem")
    image, mnt = tmp_path / "fs.img", tmp_path / "ext4"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    made = run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 unavailable: {made.stderr.strip()}")
    mounted = run("mount", "-o", "loop,errors=remount-ro", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    device = run("findmnt", "-n", "-o", "SOURCE", str(mnt)).stdout.strip()
    try:
        yield mnt, image, Path(device).name
    finally:
        if run("umount", str(mnt)).returncode != 0:
            run("umount", "-l", str(mnt))
        for line in run("losetup", "-j", str(image)).stdout.splitlines():
            run("losetup", "-d", line.split(":")[0])


def test_filesystem_turns_read_only(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """The kernel remounts the database's filesystem read-only (an ext4 error):
    readiness false naming the I/O error, submits refused, status served; SIGTERM still
    ends the daemon; after fsck and a remount, every acknowledged job is there and runs."""
    with ext4_loop(tmp_path) as (mnt, image, device):
        trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")
        if not trigger.exists():
            pytest.skip(f"{trigger} missing: cannot make ext4 fail on demand")
        state = mnt / "state"
        daemon = start_daemon(
            storage_config(
                state_dir=state, socket=socket_in(tmp_path), min_free_mb=0, latency_ms=300
            )
        )
        accepted = daemon.call("submit", jobs=jobs("before", 50))["ids"]
        wait_until(lambda: daemon.call("status")["jobs"]["succeeded"] > 0, what="running")
        trigger.write_text("vigil torture test\n")
        wait_until(lambda: not_ready_because(daemon, "store"), timeout_s=60, what="readiness false")
        reasons = " ".join(readyz(daemon).json()["reasons"]).lower()
        assert "i/o" in reasons or "read-only" in reasons or "readonly" in reasons, reasons
        reply = daemon.request("submit", jobs=jobs("refused", 2))
        assert reply["ok"] is False and reply["error"]["code"] == "store_error", reply
        assert daemon.call("status")["health"]["ready"] is False
        daemon.proc.terminate()
        code = daemon.proc.wait(60)
        print("exit code on a read-only filesystem:", code)
        assert code in (0, 1), daemon.log()
        assert "Traceback" not in daemon.log(), daemon.log()
        run("umount", str(mnt))
        assert run("e2fsck", "-f", "-y", str(image)).returncode in (0, 1, 2)
        assert run("mount", "-o", "loop", str(image), str(mnt)).returncode == 0
        daemon.restart()
        final = daemon.wait_all_terminal(timeout_s=120)
        db = state / "vigil.db"
        stored = keys_in(db)
        assert {f"before-{i}" for i in range(50)} <= stored, "an acknowledged job was lost"
        assert not {k for k in stored if k.startswith("refused")}
        assert final["succeeded"] + final["failed"] == len(stored) >= len(accepted)
        assert daemon.terminate() == 0
        assert not ledger_problems(db)


def test_read_only_state_dir_at_start(start_daemon: StartDaemon) -> None:
    """A state directory mounted read-only: the daemon refuses to start with exit 1 and
    a message naming it (no traceback, nothing touched); writable again, it starts with
    every job it had."""
    need_root("mounting a test filesystem")
    daemon = start_daemon(storage_config())
    ids = daemon.call("submit", jobs=jobs("kept", 5))["ids"]
    daemon.wait_all_terminal()
    assert daemon.terminate() == 0
    state = daemon.state_dir
    if run("mount", "--bind", str(state), str(state)).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        remounted = run("mount", "-o", "remount,bind,ro", str(state))
        if remounted.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount: {remounted.stderr.strip()}")
        before = {p.name: p.stat().st_mtime_ns for p in state.iterdir() if p.is_file()}
        out = run_cli("run", "--config", str(daemon.config_path), env=daemon.env)
        after = {p.name: p.stat().st_mtime_ns for p in state.iterdir() if p.is_file()}
    finally:
        run("umount", str(state))
    assert out.returncode == 1, out
    assert "Read-only file system" in out.stderr and str(state) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert before == after
    daemon.restart()
    assert {j["id"] for j in daemon.call("jobs", limit=100)["jobs"]} == set(ids)


# -- the WAL deleted while stopped ----------------------------------------------------


def _drop_wal(db: Path) -> list[str]:
    gone = []
    for suffix in ("-wal", "-shm"):
        path = db.with_name(db.name + suffix)
        if path.exists():
            path.unlink()
            gone.append(path.name)
    return gone


def test_wal_deleted_after_a_clean_stop(start_daemon: StartDaemon) -> None:
    """SIGTERM checkpoints the WAL into the database, so deleting the WAL afterwards
    loses nothing: every job, result and attempt is there after the restart."""
    daemon = start_daemon(storage_config(latency_ms=20))
    daemon.call("submit", jobs=jobs("done", 50))
    daemon.wait_all_terminal()
    daemon.call("pause")
    daemon.call("submit", jobs=jobs("waiting", 20))
    assert daemon.terminate() == 0
    db = daemon.state_dir / "vigil.db"
    before = db_rows(db, "SELECT id, state, result FROM jobs ORDER BY id")
    assert [r[1] for r in before].count("queued") == 20
    _drop_wal(db)
    daemon.restart()  # not paused: a pause lasts one run
    final = daemon.wait_all_terminal()
    assert daemon.terminate() == 0
    assert final["succeeded"] == 70, final
    after = db_rows(db, "SELECT id, state, result FROM jobs ORDER BY id")
    assert [r[0] for r in after] == [r[0] for r in before]
    assert [r for r in after if r[1] == "succeeded"] == after
    finished_before = [r for r in before if r[1] == "succeeded"]
    assert [r for r in after if r[0] in {b[0] for b in finished_before}] == finished_before
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert not ledger_problems(db)


@pytest.mark.slow
def test_wal_deleted_after_a_crash_is_the_documented_loss(start_daemon: StartDaemon) -> None:
    """After SIGKILL, the WAL holds what was committed since the last checkpoint;
    deleting it discards exactly that (SQLite's rule, stated in Guarantees). What
    remains is a consistent earlier state: the database is intact, every invariant
    holds, and the daemon starts and serves."""
    daemon = start_daemon(storage_config(latency_ms=20))
    early = set(daemon.call("submit", jobs=jobs("early", 30))["ids"])
    daemon.wait_all_terminal()
    assert daemon.terminate() == 0  # a clean stop checkpoints: the early jobs are in vigil.db
    daemon.restart()
    daemon.call("pause")
    acked = daemon.call("submit", jobs=jobs("late", 30))["ids"]
    daemon.kill()
    db = daemon.state_dir / "vigil.db"
    assert _drop_wal(db), "a crash leaves the WAL behind"
    daemon.restart()
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    stored = {r[0] for r in db_rows(db, "SELECT id FROM jobs")}
    assert early <= stored, "a checkpointed job was lost with the WAL"
    assert stored - early <= set(acked), "a job nobody submitted"
    print(
        "jobs left after deleting the WAL:",
        len(stored),
        "of 60; late ones:",
        len(stored & set(acked)),
    )
    daemon.call("resume")
    daemon.wait_all_terminal()
    assert daemon.terminate() == 0
    assert not ledger_problems(db)


# -- migrations -------------------------------------------------------------------------

# Jobs in every state, as the first schema stores them (its columns exist in every
# later version: migrations only add).
V1_JOBS = [
    ("q", "queued", 0, None, None),
    ("r", "running", 1, None, None),
    ("s", "succeeded", 1, '"a result"', None),
    ("f", "failed", 3, None, "HTTPError"),
    ("c", "canceled", 0, None, None),
]


def _database_at(path: Path, version: int) -> None:
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for n in range(1, version + 1):
            db.executescript(f"BEGIN; {MIGRATIONS[n - 1]}; PRAGMA user_version = {n}; COMMIT;")
        for job_id, state, attempts, result, error in V1_JOBS:
            db.execute(
                "INSERT INTO jobs (id, analyzer, input, priority, state, attempts, "
                "max_attempts, created_at, result, error_type, error_message, source) "
                "VALUES (?, 'summarize', '{\"text\": \"t\"}', 0, ?, ?, 3, 1.0, ?, ?, ?, 'socket')",
                (job_id, state, attempts, result, error, error and "boom"),
            )
            for n in range(1, attempts + 1):
                outcome = "running" if state == "running" else "error"
                if state == "succeeded":
                    outcome = "succeeded"
                db.execute(
                    "INSERT INTO attempts (job_id, n, started_at, outcome) VALUES (?, ?, 1.0, ?)",
                    (job_id, n, outcome),
                )


@pytest.mark.anyio
@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
async def test_migration_keeps_every_job(tmp_path: Path, version: int) -> None:
    """A database at each earlier schema version (and the current one) opens at the
    current version with every job and attempt kept; the running one is recovered."""
    path = tmp_path / "vigil.db"
    _database_at(path, version)
    async with Store(path, synchronous="NORMAL") as store:
        assert store.recovered == {"requeued": 1, "failed": 0}
        kept = {job_id: await store.get(job_id) for job_id, *_ in V1_JOBS}
        attempts = {job_id: await store.attempts(job_id) for job_id, *_ in V1_JOBS}
    assert all(job is not None for job in kept.values())
    states = {job_id: job.state for job_id, job in kept.items() if job is not None}
    assert states == {
        "q": "queued",
        "r": "queued",
        "s": "succeeded",
        "f": "failed",
        "c": "canceled",
    }
    assert kept["s"] is not None and kept["s"].result == "a result"
    assert [len(a) for a in attempts.values()] == [v[2] for v in V1_JOBS]
    assert attempts["r"][0].outcome == "crashed"
    assert db_rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert db_rows(path, "PRAGMA integrity_check") == [("ok",)]
