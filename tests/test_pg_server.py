"""The throwaway PostgreSQL server the PostgreSQL-backed tests run against."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import asyncpg
import pytest

if TYPE_CHECKING:  # imported at run time, it would be imported before pytest_plugins loads it
    from tests.pg_server import PgServer

pytest_plugins = ["tests.pg_server"]  # the pg_server and pg_dsn fixtures
pytestmark = pytest.mark.anyio

TIMEOUT_S = 20
CONNECT_TIMEOUT_S = 10
# What a query on a connection the server has ended raises: "connection is closed" once
# asyncpg has seen the socket close, or the server's FATAL if it is read mid-query.
CONNECTION_LOST = (
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
)
USER_TABLES = (
    "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
)


@asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection, closed (or, if the server dropped it, just let go) on exit."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        yield conn
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)


@pytest.fixture(scope="module")
def seen_databases() -> list[str]:
    """The databases earlier tests in this module were given, in order."""
    return []


async def test_asyncpg_connects_to_pg_dsn(pg_server: PgServer, pg_dsn: str) -> None:
    """asyncpg connects to the fixture's DSN over the Unix socket and runs queries."""
    host = re.escape(str(pg_server.socket_dir))
    form = rf"postgresql://postgres@/(test_\d+)\?host={host}&port={pg_server.port}"
    match = re.fullmatch(form, pg_dsn)
    assert match is not None, pg_dsn
    name = match[1]
    with anyio.fail_after(TIMEOUT_S):
        async with connect(pg_dsn) as conn:
            assert await conn.fetchval("SELECT current_database()") == name
            assert int(await conn.fetchval("SHOW server_version_num")) // 10_000 == 15
            assert await conn.fetchval("SELECT inet_server_addr()") is None  # not TCP
            assert await conn.fetchval("SHOW listen_addresses") == ""
            assert await conn.fetchval("SHOW fsync") == "off"
            await conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, body text NOT NULL)")
            await conn.executemany("INSERT INTO t VALUES ($1, $2)", [(1, "a"), (2, "b")])
            rows = await conn.fetch("SELECT id, body FROM t ORDER BY id")
            assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]


@pytest.mark.parametrize("run", ["first", "second"])
async def test_each_test_gets_a_fresh_empty_database(
    run: str, pg_server: PgServer, pg_dsn: str, seen_databases: list[str]
) -> None:
    """Each test gets a database of its own, empty; the ones before it have been dropped."""
    with anyio.fail_after(TIMEOUT_S):
        async with connect(pg_dsn) as conn:
            name = await conn.fetchval("SELECT current_database()")
            assert name not in seen_databases
            assert await conn.fetchval(USER_TABLES) == 0
            existing = {r[0] for r in await conn.fetch("SELECT datname FROM pg_database")}
            assert not existing & set(seen_databases)
            await conn.execute(f"CREATE TABLE left_by_{run} (x int)")
            await conn.execute(f"INSERT INTO left_by_{run} VALUES (1)")
    seen_databases.append(name)


async def test_restart_disconnects_clients_and_comes_back(pg_server: PgServer, pg_dsn: str) -> None:
    """restart() really restarts: a connection from before is dead, a new one works, and
    the data committed before the restart is still there."""
    with anyio.fail_after(TIMEOUT_S):
        async with connect(pg_dsn) as before:
            await before.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
            started = await before.fetchval("SELECT pg_postmaster_start_time()")
            await anyio.to_thread.run_sync(pg_server.restart)
            with pytest.raises(CONNECTION_LOST):
                await before.fetchval("SELECT 1")
            assert before.is_closed()
        async with connect(pg_dsn) as after:
            assert await after.fetchval("SELECT pg_postmaster_start_time()") > started
            assert await after.fetchval("SELECT x FROM kept") == 7


async def test_drop_database_ends_its_open_connections(pg_server: PgServer) -> None:
    """drop_database() succeeds with a client still connected, which it disconnects."""
    name = pg_server.new_database_name()
    await anyio.to_thread.run_sync(pg_server.create_database, name)
    try:
        with anyio.fail_after(TIMEOUT_S):
            async with connect(pg_server.dsn(name)) as conn:
                assert await conn.fetchval("SELECT 1") == 1
                await anyio.to_thread.run_sync(pg_server.drop_database, name)
                with pytest.raises(CONNECTION_LOST):
                    await conn.fetchval("SELECT 1")
            async with connect(pg_server.dsn()) as admin:
                dropped = await admin.fetchval(
                    "SELECT count(*) FROM pg_database WHERE datname = $1", name
                )
                assert dropped == 0
    finally:
        await anyio.to_thread.run_sync(pg_server.drop_database, name)
