"""Shared fixtures: the anyio backend, clean logging, and a real daemon subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.daemon_proc import DaemonProcess

pytest_plugins = ["tests.pg_server"]  # the PostgreSQL fixtures; a server starts only if asked

SLOW_TIMEOUT_S = 1800  # the long runs bound their own loops; this is the backstop


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests outlast the suite's per-test timeout (300 s) by design; a --timeout
    given on the command line still wins."""
    if config.getoption("timeout", None) is not None:
        return
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp and aiosqlite are asyncio-only; anyio runs on asyncio."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts from structlog's defaults, whatever the previous one set."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Start `vigil run` subprocesses with a given config; all are killed at the end."""
    started: list[DaemonProcess] = []

    def start(
        config: str, *, name: str = "d", env: dict[str, str] | None = None, ready: bool = True
    ) -> DaemonProcess:
        proc = DaemonProcess.start(tmp_path / name, config, env=env, ready=ready)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An open store of each backend: a fresh SQLite file, or a fresh database on the
    session's throwaway PostgreSQL server. The contract is the same (a test module
    may define its own `store` for one backend)."""
    from daemon.config import StoreConfig
    from daemon.store.postgres import PostgresStore
    from daemon.store.sqlite import Store

    if request.param == "sqlite":
        async with Store(tmp_path / "vigil.db", synchronous="NORMAL") as opened:
            yield opened
        return
    dsn = request.getfixturevalue("pg_dsn")
    async with PostgresStore(StoreConfig(url=dsn, node_name="test-node")) as pg:
        yield pg
