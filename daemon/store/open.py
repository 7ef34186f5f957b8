"""Which store a config asks for: SQLite in state_dir (the default), or PostgreSQL
when `store.url` is set. The PostgreSQL driver loads only then."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from daemon.config import Config
from daemon.store.base import JobStore


def open_store(config: Config) -> AbstractAsyncContextManager[JobStore]:
    if config.store.url:
        from daemon.store.postgres import PostgresStore

        return PostgresStore(config.store)
    from daemon.store.sqlite import Store

    return Store(
        config.db_path,
        synchronous=config.daemon.synchronous,
        min_free_mb=config.daemon.min_free_mb,
    )
