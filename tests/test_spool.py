"""The spool directory intake: files become jobs exactly once and end in done/ or
failed/ with their outcome beside them.

In-process tests run the component on a real store and real directories (crash
windows are set up by hand, deterministically); end-to-end tests run the daemon as
a subprocess and SIGKILL it."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from daemon.analyzers import build_analyzers
from daemon.config import Config, ConfigError, parse_config
from daemon.intake.spool import SpoolIntake
from daemon.intake.spool_files import NAME_MAX, Changed, Sig, Text, fit, read_text
from daemon.intake.submit import Intake
from daemon.jobs import ErrorInfo
from daemon.live import Live
from daemon.store.base import AttemptEnd
from daemon.store.sqlite import Store
from tests.daemon_proc import DaemonProcess, db_rows, run_cli, sim_config, wait_until
from tests.spool_files import drop, spool_toml

StartDaemon = Callable[..., DaemonProcess]
TIMEOUT_S = 20.0


def listing(inbox: Path, sub: str = "") -> list[str]:
    return sorted(n for n in os.listdir(inbox / sub) if not n.startswith("."))


# -- in process ------------------------------------------------------------------------


@dataclass
class Env:
    config: Config
    store: Store
    intake: Intake
    live: Live
    inbox: Path

    def spool(self) -> SpoolIntake:
        return SpoolIntake(self.intake, self.store, self.live)


@asynccontextmanager
async def open_env(tmp_path: Path, spool_extra: str = "", **queue: Any) -> AsyncIterator[Env]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = parse_config(sim_config(extra=spool_toml(inbox, spool_extra), **queue))
    async with Store(tmp_path / "vigil.db", synchronous="NORMAL") as store:
        live = Live(config, build_analyzers(config))
        yield Env(config, store, Intake(store, live), live, inbox)


@asynccontextmanager
async def running(spool: SpoolIntake) -> AsyncIterator[SpoolIntake]:
    """Run the spool; leaving cancels it, which is what a crash looks like to the
    directories and the database (nothing is cleaned up but the lock)."""
    async with anyio.create_task_group() as tg:
        await tg.start(spool.run)
        yield spool
        tg.cancel_scope.cancel()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition on the component's state (bounded)."""
    with anyio.fail_after(TIMEOUT_S):
        while True:
            if predicate():
                return
            await anyio.sleep(0.02)


async def finish_all(store: Store) -> None:
    """Play the worker: every queued job succeeds."""
    for job in await store.claim(100):
        result = f"summary of {job.input['filename']}"
        await store.finish(job, AttemptEnd(outcome="succeeded", result=result))


async def jobs_in(store: Store) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(j) for j in await store.list_jobs(limit=1000)]


@pytest.mark.anyio
async def test_a_claimed_file_is_resumed_exactly_once_after_crashes(tmp_path: Path) -> None:
    """Crash after the claim (no job yet), then after the submit: still one job."""
    async with open_env(tmp_path) as env:
        processing = env.inbox / "processing"
        processing.mkdir()
        (processing / "a.txt").write_text("claimed before the crash")
        async with running(env.spool()) as first:
            await until(lambda: env.store.counts["queued"] == 1)
            assert first.status()["resumed"] == 1
        # The crash came after the submit: the file is still in processing/.
        assert listing(env.inbox, "processing") == ["a.txt"]
        async with running(env.spool()) as second:
            await until(lambda: second.status()["in_flight"] == 1)
            await anyio.sleep(0.2)  # a few polls: it must not submit again
            assert env.store.counts["queued"] == 1
            await finish_all(env.store)
            await until(lambda: listing(env.inbox, "done") == ["a.txt"])
        [job] = await jobs_in(env.store)
        assert job["input"] == {"text": "claimed before the crash", "filename": "a.txt"}
        out = msgspec.json.decode((env.inbox / "out" / "a.txt.json").read_bytes())
        assert out["job_id"] == job["id"]
        assert out["state"] == "succeeded"
        assert out["result"] == "summary of a.txt"
        assert listing(env.inbox, "processing") == []


@pytest.mark.anyio
async def test_a_claimed_file_resubmitted_under_new_settings_keeps_its_job(
    tmp_path: Path,
) -> None:
    """A file submitted before a crash, taken up again after the spool's analyzer was
    changed: the spool finds the file's job by its key and keeps it (no resubmit, so
    no idempotency conflict to retry forever), and the file ends done."""
    async with open_env(tmp_path) as env:
        processing = env.inbox / "processing"
        processing.mkdir()
        (processing / "a.txt").write_text("claimed before the crash")
        async with running(env.spool()):
            await until(lambda: env.store.counts["queued"] == 1)
        digest = '[analyzers.digest]\nprovider = "sim"\nmodel = "m"\nprompt = "{text}"\n'
        spool = spool_toml(env.inbox).replace('analyzer = "summarize"', 'analyzer = "digest"')
        env.live.config = parse_config(sim_config(extra=digest + spool))
        env.live.analyzers = build_analyzers(env.live.config)
        async with running(env.spool()) as second:
            await until(lambda: second.status()["in_flight"] == 1)
            assert env.store.counts["queued"] == 1  # no second job
            await finish_all(env.store)
            await until(lambda: listing(env.inbox, "done") == ["a.txt"])
        [job] = await jobs_in(env.store)
        assert job["analyzer"] == "summarize"
        out = msgspec.json.decode((env.inbox / "out" / "a.txt.json").read_bytes())
        assert out["job_id"] == job["id"] and out["state"] == "succeeded"


@pytest.mark.anyio
async def test_a_new_file_with_a_used_name_keeps_both_outcomes(tmp_path: Path) -> None:
    """A second a.txt is a new job; it waits while the first is in flight and ends
    beside it under a suffixed name, the first outcome untouched."""
    async with open_env(tmp_path) as env, running(env.spool()) as spool:
        drop(env.inbox, "a.txt", "first")
        await until(lambda: env.store.counts["queued"] == 1)
        drop(env.inbox, "a.txt", "second")
        await anyio.sleep(0.2)
        assert listing(env.inbox) == ["a.txt", "done", "failed", "out", "processing"]
        await finish_all(env.store)
        await until(lambda: env.store.counts["queued"] == 1 and spool.status()["done"] == 1)
        await finish_all(env.store)
        await until(lambda: spool.status()["done"] == 2)
        done = listing(env.inbox, "done")
        assert len(done) == 2 and done[0] == "a.txt" and done[1].startswith("a.txt.")
        assert (env.inbox / "done" / "a.txt").read_text() == "first"
        assert (env.inbox / "done" / done[1]).read_text() == "second"
        outs = {
            n: msgspec.json.decode((env.inbox / "out" / n).read_bytes())
            for n in listing(env.inbox, "out")
        }
        assert set(outs) == {"a.txt.json", f"{done[1]}.json"}
        assert outs["a.txt.json"]["job_id"] != outs[f"{done[1]}.json"]["job_id"]
        assert len(await jobs_in(env.store)) == 2


@pytest.mark.anyio
async def test_bad_files_fail_with_a_reason(tmp_path: Path) -> None:
    """Oversize, empty, non-UTF-8, NUL-bearing, symlinked, directory and refused-by-
    intake entries go to failed/ with a reason file; no job is made for them."""
    async with open_env(tmp_path, "max_file_bytes = 100\n", max_backlog=100) as env:
        cases: dict[str, tuple[str | bytes, str]] = {
            "big.txt": ("x" * 101, "too large: 101 bytes"),
            "empty.txt": ("", "empty file"),
            "latin1.txt": (b"caf\xe9", "binary: not UTF-8"),
            "nul.txt": (b"a\x00b", "binary: contains NUL"),
        }
        for name, (data, _) in cases.items():
            drop(env.inbox, name, data)
        os.symlink(tmp_path / "elsewhere.txt", env.inbox / "link.txt")
        (tmp_path / "elsewhere.txt").write_text("not to be read through a link")
        (env.inbox / "dir.txt").mkdir()
        async with running(env.spool()) as spool:
            await until(lambda: spool.status()["failed"] == 6)
        reasons = {
            n.removesuffix(".reason"): (env.inbox / "failed" / n).read_text()
            for n in listing(env.inbox, "failed")
            if n.endswith(".reason")
        }
        assert sorted(reasons) == sorted([*cases, "link.txt", "dir.txt"])
        for name, (_, reason) in cases.items():
            assert reasons[name].startswith(reason), reasons[name]
        assert reasons["link.txt"].startswith("symbolic link")
        assert reasons["dir.txt"].startswith("not a regular file")
        assert (env.inbox / "failed" / "link.txt").is_symlink()
        assert (env.inbox / "failed" / "dir.txt").is_dir()
        assert await jobs_in(env.store) == []
        assert listing(env.inbox, "processing") == []


@pytest.mark.anyio
async def test_input_refused_by_intake_fails_the_file(tmp_path: Path) -> None:
    """A file intake refuses (over queue.max_input_bytes) fails with intake's words;
    a good file in the same batch still becomes a job."""
    async with open_env(tmp_path) as env:
        config = parse_config(
            sim_config(extra=spool_toml(env.inbox)).replace(
                "[queue]", "[queue]\nmax_input_bytes = 200"
            )
        )
        env.live.config = config
        drop(env.inbox, "long.txt", "y" * 300)
        drop(env.inbox, "short.txt", "fine")
        async with running(env.spool()) as spool:
            await until(lambda: spool.status()["failed"] == 1 and env.store.counts["queued"] == 1)
        reason = (env.inbox / "failed" / "long.txt.reason").read_text()
        assert reason.startswith("refused: input:") and "max_input_bytes" in reason
        [job] = await jobs_in(env.store)
        assert job["input"]["filename"] == "short.txt"


@pytest.mark.anyio
async def test_a_failed_job_ends_in_failed_with_its_error(tmp_path: Path) -> None:
    """A job that fails moves its file to failed/, with the error in the reason
    file and the whole outcome in out/."""
    async with open_env(tmp_path) as env, running(env.spool()) as spool:
        drop(env.inbox, "doomed.txt", "text")
        await until(lambda: env.store.counts["queued"] == 1)
        [job] = await env.store.claim(1)
        await env.store.finish(
            job, AttemptEnd(outcome="error", error=ErrorInfo("BadRequest", "no"))
        )
        await until(lambda: spool.status()["failed"] == 1)
        reason = (env.inbox / "failed" / "doomed.txt.reason").read_text()
        assert reason == f"job {job.id} failed: BadRequest: no\n"
        out = msgspec.json.decode((env.inbox / "out" / "doomed.txt.json").read_bytes())
        assert out["state"] == "failed"
        assert out["error"] == {"type": "BadRequest", "message": "no"}


@pytest.mark.anyio
async def test_nothing_is_claimed_while_intake_is_closed(tmp_path: Path) -> None:
    """Draining or stopping: files stay in the inbox, and are taken once it reopens."""
    async with open_env(tmp_path) as env:
        env.intake.closed_reason = "the daemon is draining"
        drop(env.inbox, "wait.txt", "later")
        async with running(env.spool()) as spool:
            await until(lambda: spool.status()["held"] is not None)
            await anyio.sleep(0.2)
            assert spool.status()["held"] == "intake closed: the daemon is draining"
            assert spool.status()["waiting"] == 1
            assert listing(env.inbox, "processing") == []
            env.intake.closed_reason = None
            await until(lambda: env.store.counts["queued"] == 1)
            assert spool.status()["held"] is None


@pytest.mark.anyio
async def test_one_daemon_per_spool_directory(tmp_path: Path) -> None:
    """A second spool on the same directory reports the lock and claims nothing."""
    async with open_env(tmp_path) as env, running(env.spool()) as first:
        await until(lambda: first._lock_fd is not None)  # set once the lock is held
        async with running(env.spool()) as second:
            await until(lambda: second.status()["error"] is not None)
            assert "another vigil daemon owns" in str(second.status()["error"])
            assert second.check().ok is False
        assert first.check().ok is True


def test_read_text_notices_a_file_written_after_its_claim(tmp_path: Path) -> None:
    """A file that changed since it was judged settled is not read as that version."""
    path = tmp_path / "f.txt"
    path.write_text("one")
    sig = Sig.of(path.stat())
    assert read_text(path, sig, 100) == Text("one")
    with path.open("a") as f:
        f.write(" two")
    assert read_text(path, sig, 100) == Changed()


def test_long_names_still_fit_with_a_suffix() -> None:
    """Suffixes never push a name past one path component."""
    name = "é" * 127 + ".txt"  # 258 bytes would not fit; 254 + .txt does
    fitted = fit(name, ".json")
    assert len(os.fsencode(fitted)) == NAME_MAX and fitted.endswith(".json")


@pytest.mark.parametrize(
    ("spool", "where"),
    [
        ('field = "filename"', "$.intake.spool.field"),
        ('glob = "sub/*.txt"', "$.intake.spool.glob"),
        ('analyzer = "classify"', "needs audience"),
        ('dir = ""', "$.intake.spool.dir"),
    ],
)
def test_spool_config_errors(spool: str, where: str) -> None:
    """Spool settings that could never work are config errors naming the key."""
    key = spool.split(" = ")[0]
    base = {"dir": '"in"', "analyzer": '"summarize"'}
    lines = [f"{k} = {v}" for k, v in base.items() if k != key] + [spool]
    with pytest.raises(ConfigError) as exc:
        parse_config(sim_config(extra="[intake.spool]\n" + "\n".join(lines)))
    assert where in str(exc.value)


def test_a_relative_spool_dir_resolves_against_the_config(tmp_path: Path) -> None:
    """dir = "inbox" means next to the config file, like the state directory."""
    config = parse_config(
        sim_config(extra='[intake.spool]\ndir = "inbox"\nanalyzer = "summarize"'),
        base_dir=tmp_path,
    )
    assert config.intake.spool is not None
    assert config.intake.spool.dir == str(tmp_path / "inbox")


# -- the daemon as a subprocess --------------------------------------------------------


def _jobs_by_file(daemon: DaemonProcess) -> dict[str, list[tuple[str, str]]]:
    """filename -> [(job id, state)] straight from the database."""
    rows = db_rows(daemon.state_dir / "vigil.db", "SELECT id, state, input FROM jobs")
    out: dict[str, list[tuple[str, str]]] = {}
    for job_id, state, raw in rows:
        out.setdefault(msgspec.json.decode(raw)["filename"], []).append((job_id, state))
    return out


def _spool_status(daemon: DaemonProcess) -> dict[str, Any]:
    status: dict[str, Any] = daemon.call("status")["spool"]
    return status


def test_dropped_files_become_jobs_and_end_in_done(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Files renamed in (odd names too) run once and end in done/ with out/ JSON."""
    inbox = tmp_path / "inbox"
    daemon = start_daemon(sim_config(extra=spool_toml(inbox)))
    names = ["a.txt", "with space.txt", "new\nline.txt", os.fsdecode(b"bytes\xff.txt")]
    for i, name in enumerate(names):
        drop(inbox, name, f"document {i}")
    drop(inbox, "notes.md", "not matched by the glob")
    wait_until(lambda: _spool_status(daemon)["done"] == len(names))
    assert listing(inbox, "done") == sorted(names)
    assert listing(inbox) == ["done", "failed", "notes.md", "out", "processing"]
    jobs = _jobs_by_file(daemon)
    shown = ["a.txt", "with space.txt", "new\nline.txt", "bytes\\xff.txt"]
    assert sorted(jobs) == sorted(shown)
    for name, label in zip(names, shown, strict=True):
        [(job_id, state)] = jobs[label]
        out = msgspec.json.decode((inbox / "out" / f"{name}.json").read_bytes())
        assert (out["job_id"], out["state"], out["file"]) == (job_id, "succeeded", label)
        assert out["result"] and out["usage"]["prompt_tokens"] > 0
        assert state == "succeeded"
    status = _spool_status(daemon)
    assert status["dir"] == str(inbox)
    assert (status["claimed"], status["in_flight"], status["failed"]) == (4, 0, 0)
    assert daemon.terminate() == 0


def test_a_reload_applies_spool_settings_but_not_its_directory(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """`vigil reload` applies a new glob, analyzer and poll interval at once (it wakes
    a spool that would sleep for ten minutes); a new directory is named as needing a
    restart and the spool keeps the old one; a reload that would leave the kept spool
    with no analyzer is refused whole."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    slow = spool_toml(inbox).replace("poll_s = 0.05", "poll_s = 600")
    assert "poll_s = 600" in slow
    daemon = start_daemon(sim_config(extra=slow))
    wait_until(lambda: (inbox / "processing").is_dir(), what="the first poll")
    drop(inbox, "notes.md", "not matched yet")
    text = daemon.config_path.read_text()
    new_spool = spool_toml(elsewhere, 'glob = "*.md"\n').replace("summarize", "shout")
    new_spool += '\n[analyzers.shout]\nprovider = "sim"\nmodel = "m"\nprompt = "Shout {text}"\n'
    daemon.config_path.write_text(text.replace(slow, new_spool))
    out = run_cli("reload", "--json", socket_path=daemon.socket_path)
    assert out.returncode == 0, out.stderr
    result = msgspec.json.decode(out.stdout)
    assert "intake" in result["applied"] and "intake.spool.dir" in result["needs_restart"]
    wait_until(lambda: _spool_status(daemon)["done"] == 1, timeout_s=30)
    status = _spool_status(daemon)
    assert (status["dir"], status["glob"], status["analyzer"]) == (str(inbox), "*.md", "shout")
    [(job_id, _)] = _jobs_by_file(daemon)["notes.md"]
    assert daemon.call("show", id=job_id)["job"]["analyzer"] == "shout"
    assert not elsewhere.exists()
    daemon.config_path.write_text(text.replace(slow, ""))  # no spool, and no shout
    out = run_cli("reload", socket_path=daemon.socket_path)
    assert out.returncode == 1 and "intake.spool.analyzer" in out.stderr, out.stderr
    assert _spool_status(daemon)["analyzer"] == "shout"


def test_a_file_written_in_place_waits_until_it_settles(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A file still being written is left alone; once quiet it runs, whole."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()  # as the operator would: the daemon makes it at its first poll
    daemon = start_daemon(
        sim_config(extra=spool_toml(inbox).replace("settle_s = 0", "settle_s = 2"))
    )
    lines = [f"line {i}\n" for i in range(30)]
    staged = tmp_path / "quick.txt"
    staged.write_text("written elsewhere a minute ago")
    os.utime(staged, (time.time() - 60, time.time() - 60))
    with (inbox / "slow.txt").open("w") as f:
        os.rename(staged, inbox / "quick.txt")  # quiet for a minute: taken at once
        for line in lines:
            f.write(line)
            f.flush()
            time.sleep(0.1)
            assert (inbox / "slow.txt").exists(), "claimed while still being written"
        # The spool was working meanwhile: the renamed-in file is done already.
        wait_until(lambda: listing(inbox, "done") == ["quick.txt"])
    wait_until(lambda: listing(inbox, "done") == ["quick.txt", "slow.txt"])
    [(job_id, _)] = _jobs_by_file(daemon)["slow.txt"]
    assert daemon.call("show", id=job_id)["job"]["input"]["text"] == "".join(lines)


def test_a_full_backlog_leaves_files_in_the_inbox(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Backlog full: files wait in the inbox, nothing dropped; after resume, all run."""
    inbox = tmp_path / "inbox"
    daemon = start_daemon(sim_config(max_backlog=3, extra=spool_toml(inbox)))
    daemon.call("pause")
    for i in range(8):
        drop(inbox, f"f{i}.txt", f"doc {i}")
    wait_until(
        lambda: (
            (s := _spool_status(daemon))["in_flight"] == 3
            and s["waiting"] == 5
            and str(s["held"]).startswith("backlog full")
        )
    )
    time.sleep(0.3)  # several polls: still nothing more taken, nothing lost
    status = _spool_status(daemon)
    assert (status["in_flight"], status["waiting"]) == (3, 5)
    assert len([n for n in listing(inbox) if n.endswith(".txt")]) == 5
    assert daemon.call("status")["jobs"]["queued"] == 3
    daemon.call("resume")
    wait_until(lambda: len(listing(inbox, "done")) == 8)
    assert all(len(v) == 1 for v in _jobs_by_file(daemon).values())
    assert _spool_status(daemon)["held"] is None


def test_sigkill_while_processing_each_file_runs_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """SIGKILL twice mid-flow; after restarts every file has exactly one job and ends
    in done/ with its own job's outcome."""
    inbox = tmp_path / "inbox"
    config = sim_config(latency_ms=100, max_concurrency=8, extra=spool_toml(inbox))
    daemon = start_daemon(config)
    n = 200
    for i in range(n):
        drop(inbox, f"doc{i:03}.txt", f"document number {i}")
    for done_at_least in (10, 60):
        wait_until(lambda: len(listing(inbox, "done")) >= done_at_least)  # noqa: B023
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        daemon.restart()
        # Files the killed run had claimed are taken up again from processing/.
        wait_until(lambda: _spool_status(daemon)["resumed"] > 0)
    wait_until(lambda: len(listing(inbox, "done")) == n, timeout_s=120)
    assert listing(inbox, "processing") == []
    assert listing(inbox, "failed") == []
    jobs = _jobs_by_file(daemon)
    assert Counter(len(v) for v in jobs.values()) == {1: n}
    for name, [(job_id, state)] in jobs.items():
        out = msgspec.json.decode((inbox / "out" / f"{name}.json").read_bytes())
        assert (out["job_id"], out["state"]) == (job_id, "succeeded") == (job_id, state)
    assert daemon.terminate() == 0
