"""A throwaway PostgreSQL server for `vigil bench cluster`: its own data directory in a
temp dir, trust authentication, a Unix socket only (no TCP), the server's default
durability unless told otherwise; stopped (`pg_ctl stop -m immediate`, then SIGKILL
of its postmaster if that fails) and removed however the block ends.

PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres`
user through `runuser`. Every subprocess is bounded in time."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency

from daemon.bench.run import BenchError

PG_BIN = Path(os.environ.get("VIGIL_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"  # the OS user the server runs as (when we are root), and the superuser
PORT = 54331  # only the socket's file name: nothing listens on TCP
TIMEOUT_S = 60
# What the figures depend on, read back from the running server and reported.
SHOWN = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_connections",
    "max_wal_size",
)
FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")  # tests' setting


def unavailable() -> str | None:
    """Why no server can be started here, or None if one can."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).is_file():
            return f"{PG_BIN / tool} is missing (apt-get install postgresql-15, or VIGIL_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as"
    return None


@dataclass
class Postgres:
    """A running server; `dsn(name)` reaches a database on it over its socket."""

    root: Path
    port: int
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        host = quote(str(self.root), safe="/")
        return f"postgresql://{PG_USER}@/{quote(dbname, safe='')}?host={host}&port={self.port}"

    async def create_database(self, name: str) -> str:
        """A new empty database (a plain lowercase name); its DSN."""
        if not name.replace("_", "").isalnum() or not name.islower():
            raise ValueError(f"not a plain database name: {name!r}")
        await self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    async def execute(self, sql: str, dbname: str = "postgres") -> None:
        conn = await asyncpg.connect(self.dsn(dbname), timeout=TIMEOUT_S)
        try:
            await conn.execute(sql, timeout=TIMEOUT_S)
        finally:
            await conn.close()

    def postmaster(self) -> psutil.Process | None:
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            return psutil.Process(pid)
        return None

    def cpu_s(self) -> float:
        """CPU seconds of the whole server so far: the postmaster, its live backends,
        and those already gone (the postmaster reaps them: its children's times)."""
        main = self.postmaster()
        if main is None:
            return 0.0
        total = 0.0
        with contextlib.suppress(psutil.Error):
            t = main.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
            for child in main.children():
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
        return total


def _env() -> dict[str, str]:
    """Without PG* variables (PGHOST, PGDATA, ...), which would steer the tools."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}


async def _as_server(pg: Postgres, *command: str) -> None:
    """A PostgreSQL tool as the server's user; its output goes to `tools.log`, not to a
    pipe (the postmaster that pg_ctl leaves behind must hold nothing of ours)."""
    argv = [str(PG_BIN / command[0]), *command[1:]]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", *argv]
    out = pg.root / "tools.log"
    try:
        with out.open("ab") as log, anyio.fail_after(TIMEOUT_S + 10):
            done = await anyio.run_process(
                argv, cwd=pg.root, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                check=False,
            )  # fmt: skip
    except TimeoutError:
        raise BenchError(f"{command[0]} did not finish in {TIMEOUT_S + 10} s") from None
    if done.returncode != 0:
        tail = "".join(
            path.read_text(errors="replace")[-1500:]
            for path in (out, pg.root / "server.log")
            if path.exists()
        )
        raise BenchError(f"{shlex.join(argv)} exited {done.returncode}:\n{tail}")


def _kill(pg: Postgres) -> None:
    """Last resort: SIGKILL the postmaster (its backends exit when it is gone), only if
    it is ours (its command line names our directory)."""
    main = pg.postmaster()
    with contextlib.suppress(psutil.Error):
        if main is not None and str(pg.root) in main.cmdline():
            main.send_signal(signal.SIGKILL)
            main.wait(TIMEOUT_S)


async def _stop(pg: Postgres) -> None:
    with anyio.CancelScope(shield=True):
        try:
            if (pg.data / "postmaster.pid").exists():
                try:
                    await _as_server(pg, "pg_ctl", "stop", "-D", str(pg.data), "-m", "immediate",
                                     "-w", "-t", str(TIMEOUT_S))  # fmt: skip
                except (BenchError, OSError):
                    await anyio.to_thread.run_sync(_kill, pg)
        finally:
            shutil.rmtree(pg.root, ignore_errors=True)


@asynccontextmanager
async def postgres(*, durable: bool = True, port: int = PORT) -> AsyncIterator[Postgres]:
    """initdb and start a server; `durable=False` turns fsync, synchronous commit and
    full-page writes off (as the tests do). Stopped and removed on exit."""
    why_not = unavailable()
    if why_not is not None:
        raise BenchError(f"cannot start PostgreSQL: {why_not}")
    pg = Postgres(Path(tempfile.mkdtemp(prefix="vigil-bench-pg-")), port)
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_USER)
            os.chown(pg.root, user.pw_uid, user.pw_gid)
        await _as_server(pg, "initdb", "-D", str(pg.data), "-U", PG_USER, "-A", "trust",
                         "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")  # fmt: skip
        options = ["-k", str(pg.root), "-p", str(port), "-c", "listen_addresses="]
        for setting in () if durable else FAST:
            options += ["-c", setting]
        await _as_server(pg, "pg_ctl", "start", "-D", str(pg.data), "-w", "-t", str(TIMEOUT_S),
                         "-l", str(pg.root / "server.log"), "-o", shlex.join(options))  # fmt: skip
        pg.settings = await _settings(pg)
        yield pg
    finally:
        await _stop(pg)


async def _settings(pg: Postgres) -> dict[str, str]:
    conn: Any = await asyncpg.connect(pg.dsn(), timeout=TIMEOUT_S)
    try:
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in SHOWN}
    finally:
        await conn.close()
