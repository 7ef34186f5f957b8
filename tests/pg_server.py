"""A throwaway PostgreSQL 15 server for tests: its own data directory in a temp dir, trust
auth, a Unix socket only (no TCP), durability off; and the pytest fixtures around it.

Test modules that need PostgreSQL load this module as a plugin:

    pytest_plugins = ["tests.pg_server"]
    if TYPE_CHECKING:
        from tests.pg_server import PgServer

A plugin's fixtures are registered once, so the session gets one server whichever modules
ask; importing the fixture functions into each module would give each module its own
session-scoped server (and trips ruff's F811). Import from here only under TYPE_CHECKING:
a module imported before pytest loads it as a plugin cannot be assertion-rewritten, and
that warning is an error in this suite. (One line in tests/conftest.py,
`pytest_plugins = ["tests.pg_server"]`, would lift that limit.)

`pg_server` is session-scoped and starts on first request, so a suite that never asks for
it starts nothing. `pg_dsn` is a fresh, empty database per test, dropped afterwards.

PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres` user
(`runuser`); psql is a client and runs as the caller. Every subprocess call is bounded.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # the OS user the server runs as (when we are root) and the superuser
# Only a file name on the Unix socket (no TCP). Not 5432, so a DSN that lost its host
# fails loudly instead of reaching a system server's /run/postgresql/.s.PGSQL.5432.
PORT = 54329
INITDB_TIMEOUT_S = 60
PG_CTL_WAIT_S = 30  # pg_ctl's own -t; the subprocess gets a margin on top
PSQL_TIMEOUT_S = 30
SUBPROCESS_MARGIN_S = 10
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
LOG_TAIL_BYTES = 4000


class PgServerError(Exception):
    """initdb, pg_ctl or psql failed; the message carries its output and the log's tail."""


def pg_available() -> str | None:
    """Why a server cannot be started here, or None if it can."""
    for tool in ("initdb", "pg_ctl", "psql"):
        if not (PG_BIN / tool).is_file():
            return f"{PG_BIN / tool} is missing (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run the server as"
    return None


def _clean_env() -> dict[str, str]:
    """The caller's environment without PG* variables (PGHOST, PGSERVICE, PGPASSWORD, ...),
    which would otherwise steer initdb, pg_ctl and psql."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PgServer:
    """One PostgreSQL 15 server in its own temp dir; start with `PgServer.start()`.

    Layout: `root/` (owned by the server's user) holds the socket `.s.PGSQL.<port>`,
    `data/` and `server.log`.
    """

    def __init__(self, root: Path, *, port: int = PORT) -> None:
        self.root = root
        self.socket_dir = root
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        self.port = port
        self._names = itertools.count(1)
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def start(cls, *, port: int = PORT) -> PgServer:
        """initdb a new cluster in a fresh temp dir and start it; on any failure, stop
        and remove what was made, then raise."""
        why_not = pg_available()
        if why_not is not None:
            raise PgServerError(why_not)
        server = cls(Path(tempfile.mkdtemp(prefix="vigil-pg-")), port=port)
        socket_path = server.socket_dir / f".s.PGSQL.{port}"
        if len(os.fsencode(socket_path)) > SOCKET_PATH_MAX:
            server._remove_root()
            raise PgServerError(f"socket path too long for a Unix socket: {socket_path}")
        atexit.register(server.stop)
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(PG_USER)
                os.chown(server.root, user.pw_uid, user.pw_gid)
            server._run_as_server(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(server.data_dir),
                    "-U",
                    PG_USER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                    "--no-instructions",
                ],
                timeout_s=INITDB_TIMEOUT_S,
            )
            server._pg_ctl("start", "-o", server._server_options())
        except BaseException:
            server.stop()
            raise
        return server

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: clients are disconnected, the server comes back on the
        same socket with the same data; returns once it accepts connections."""
        self._pg_ctl("restart", "-m", "fast", "-o", self._server_options())

    def outage(self, seconds: float) -> None:
        """The server away for `seconds` (`pg_ctl stop -m fast`, then start again on the
        same socket with the same data); returns once it accepts connections again."""
        self._pg_ctl("stop", "-m", "fast")
        time.sleep(seconds)
        self._pg_ctl("start", "-o", self._server_options())

    def stop(self) -> None:
        """Stop the server (`-m immediate`) and remove its directory. Idempotent; never
        raises, so it is safe in finalizers and at exit."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if (self.data_dir / "postmaster.pid").exists():
                try:
                    self._pg_ctl("stop", "-m", "immediate")
                except (PgServerError, subprocess.TimeoutExpired, OSError):
                    self._kill_postmaster()
        finally:
            self._remove_root()

    def __enter__(self) -> PgServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases ------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URL asyncpg and psql accept: the superuser, no password, over the Unix
        socket (`host` is the socket's directory)."""
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{PG_USER}@/{quote(dbname, safe='')}?host={host}&port={self.port}"

    def password_role(self, role: str, password: str) -> str:
        """A login role that must give `password` (scram, over the socket; every other
        role stays on trust), created once; returns the DSN prefix with it as user."""
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'").strip():
            self.psql(f"CREATE ROLE {_ident(role)} LOGIN SUPERUSER PASSWORD '{password}'")
            hba = self.data_dir / "pg_hba.conf"
            rule = f"local all {role} scram-sha-256\n"
            self._run_as_server(
                [
                    "sh",
                    "-c",
                    f"printf '%s' '{rule}' | cat - {hba} > {hba}.new && mv {hba}.new {hba}",
                ],
                timeout_s=PSQL_TIMEOUT_S,
            )
            self._pg_ctl("reload")
        return self.dsn().replace(f"{PG_USER}@", f"{role}@", 1)

    def new_database_name(self) -> str:
        """A database name not used before on this server: test_1, test_2, ..."""
        return f"test_{next(self._names)}"

    def create_database(self, name: str, *, template: str = "template0") -> None:
        """CREATE DATABASE name TEMPLATE template (template0: empty, UTF8)."""
        self.psql(f"CREATE DATABASE {_ident(name)} TEMPLATE {_ident(template)}")

    def drop_database(self, name: str) -> None:
        """Drop the database if it exists; its open connections are terminated first
        (`WITH (FORCE)` is pg_terminate_backend on each of them, done by the server)."""
        self.psql(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    def psql(self, sql: str, *, dbname: str = "postgres") -> str:
        """Run SQL through psql as the superuser; rows come back unaligned, one a line."""
        cmd = [str(PG_BIN / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-d", self.dsn(dbname), "-c", sql]
        return self._run(cmd, timeout_s=PSQL_TIMEOUT_S)

    # -- internals ------------------------------------------------------------------

    def _server_options(self) -> str:
        """The postgres options pg_ctl passes through its shell (hence quoted)."""
        return shlex.join(
            [
                "-k",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        )

    def _pg_ctl(self, action: str, *args: str) -> str:
        cmd = [str(PG_BIN / "pg_ctl"), action, "-D", str(self.data_dir), "-w", "-s"]
        cmd += ["-t", str(PG_CTL_WAIT_S), "-l", str(self.log_path), *args]
        return self._run_as_server(cmd, timeout_s=PG_CTL_WAIT_S + SUBPROCESS_MARGIN_S)

    def _run_as_server(self, cmd: list[str], *, timeout_s: float) -> str:
        """Run as the server's user: `runuser -u postgres --` when we are root."""
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return self._run(cmd, timeout_s=timeout_s)

    def _run(self, cmd: list[str], *, timeout_s: float) -> str:
        # cwd: the server's user may not be allowed into the caller's directory.
        # stdin: pg_ctl's postmaster must not hold our pipes; -l sends its output to the log.
        proc = subprocess.run(
            cmd,
            cwd=self.root,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise PgServerError(
                f"{shlex.join(cmd)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}\n"
                f"{self._log_tail()}"
            )
        return proc.stdout

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return "server.log (tail):\n" + f.read().decode(errors="replace")
        except OSError:
            return "server.log: none"

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl stop failed: SIGKILL the postmaster named in
        postmaster.pid (its children exit when they see it gone), if that pid is still
        our postgres (its command line names our socket dir) and not a reused pid."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if os.fsencode(self.socket_dir) not in cmdline:
                return
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + PG_CTL_WAIT_S
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises ProcessLookupError once it is gone
                time.sleep(0.05)

    def _remove_root(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _ident(name: str) -> str:
    """A database name as a quoted identifier; only plain lowercase names are accepted."""
    if not DB_NAME.fullmatch(name):
        raise ValueError(f"not a plain database name: {name!r}")
    return f'"{name}"'


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL 15 server for the session, started on first request, stopped at the
    end; skips (saying why) where PostgreSQL 15 is not installed."""
    why_not = pg_available()
    if why_not is not None:
        pytest.skip(f"no PostgreSQL server for tests: {why_not}")
    server = PgServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A DSN for a fresh, empty database of its own, dropped after the test."""
    name = pg_server.new_database_name()
    pg_server.create_database(name)
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)
