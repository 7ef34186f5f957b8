"""The database schema as numbered migrations, tracked in `PRAGMA user_version`.

Append, never edit: a database at version N gets migrations N+1.. applied in order,
each in its own transaction, so an interrupted upgrade leaves a consistent version.
"""

from __future__ import annotations

import aiosqlite

MIGRATIONS: tuple[str, ...] = (
    # 1: jobs and their attempts.
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        analyzer TEXT NOT NULL,
        input TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT UNIQUE,
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        not_before REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        result TEXT,
        error_type TEXT,
        error_message TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        cost REAL,
        source TEXT NOT NULL
    ) WITHOUT ROWID;
    -- Picking the next job: queued, highest priority first, oldest first, not
    -- before its retry time. not_before rides in the index so no row is read
    -- to skip a waiting retry.
    CREATE INDEX jobs_pick ON jobs (state, priority DESC, id, not_before);
    -- The earliest waiting retry, so the dispatcher knows when to wake up.
    CREATE INDEX jobs_wake ON jobs (state, not_before);
    CREATE INDEX jobs_analyzer ON jobs (analyzer, state);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT NOT NULL DEFAULT 'running',
        http_status INTEGER,
        error_type TEXT,
        error_message TEXT,
        latency_ms REAL
    );
    CREATE INDEX attempts_job ON attempts (job_id, n);
    """,
    # 2: 429s counted apart from attempts; what each attempt was billed and answered.
    """
    ALTER TABLE jobs ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN prompt_tokens INTEGER;
    ALTER TABLE attempts ADD COLUMN completion_tokens INTEGER;
    ALTER TABLE attempts ADD COLUMN cost REAL;
    ALTER TABLE attempts ADD COLUMN answer TEXT;
    """,
    # 3: prompt-cache tokens (cache reads and writes) and why an answer ended.
    """
    ALTER TABLE jobs ADD COLUMN cached_tokens INTEGER;
    ALTER TABLE jobs ADD COLUMN cache_write_tokens INTEGER;
    ALTER TABLE attempts ADD COLUMN cached_tokens INTEGER;
    ALTER TABLE attempts ADD COLUMN cache_write_tokens INTEGER;
    ALTER TABLE attempts ADD COLUMN stop_reason TEXT;
    """,
    # 4: every answered call (what `vigil usage` reports; kept when its job is purged)
    # and the spend per provider and analyzer per UTC day (what budgets are held to).
    """
    CREATE TABLE calls (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        analyzer TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost REAL
    );
    CREATE INDEX calls_at ON calls (at);
    CREATE TABLE spend (
        scope TEXT NOT NULL,
        name TEXT NOT NULL,
        day TEXT NOT NULL,
        usd REAL NOT NULL,
        PRIMARY KEY (scope, name, day)
    ) WITHOUT ROWID;
    """,
    # 5: finished jobs by state and age, for retention and `purge --older-than`.
    """
    CREATE INDEX jobs_finished ON jobs (state, finished_at);
    """,
    # 6: per-job metadata. Tags as the job shows them (a JSON list, NULL for none) and,
    # to find a tag's jobs without a scan, one row per tag and job; a batch id, indexed
    # with the state so a batch's progress is counted from the index alone.
    """
    ALTER TABLE jobs ADD COLUMN tags TEXT;
    ALTER TABLE jobs ADD COLUMN batch TEXT;
    CREATE INDEX jobs_batch ON jobs (batch, state) WHERE batch IS NOT NULL;
    CREATE TABLE job_tags (
        tag TEXT NOT NULL,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        PRIMARY KEY (tag, job_id)
    ) WITHOUT ROWID;
    CREATE INDEX job_tags_job ON job_tags (job_id);
    """,
    # 7: results out. Where each attempt's time went (a JSON object of phases). Every
    # job end as an event, in commit order (retention never prunes the newest, so a
    # sequence number is never reused), and for each one delivery per
    # webhook that wants it, written with the end in its transaction (`write_ends`: a
    # SIGKILL after the job's end loses no delivery). The webhooks the config names,
    # kept in step by the daemon at start and reload, and read at open, so the ends
    # that start-up recovery makes have theirs too. (PostgreSQL writes them from a
    # trigger; SQLite runs a trigger's program per row at several times these inserts'
    # cost, so its store writes them itself, where it ends jobs; PostgreSQL too since
    # its migration 8.)
    """
    ALTER TABLE attempts ADD COLUMN phases TEXT;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        analyzer TEXT NOT NULL,
        state TEXT NOT NULL,
        at REAL NOT NULL
    );
    -- The newest event retention has pruned: a cursor before it has missed some.
    CREATE TABLE events_pruned (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
    -- events and analyzers as ",a,b," lists (analyzers "" for all).
    CREATE TABLE webhooks (
        name TEXT PRIMARY KEY,
        events TEXT NOT NULL,
        analyzers TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        webhook TEXT NOT NULL,
        seq INTEGER NOT NULL,
        job_id TEXT NOT NULL,
        event TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'delivered', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL,
        last_status INTEGER,
        last_error TEXT
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries (webhook, next_at) WHERE state = 'pending';
    CREATE INDEX deliveries_ended ON deliveries (state, finished_at);
    """,
    # 8: a database migrated by an earlier build of 7 has a trigger that writes every
    # end a second time (the store writes them itself); and the counts of pending and
    # dead deliveries per webhook (status, every few seconds) read an index, not rows.
    """
    DROP TRIGGER IF EXISTS job_ended;
    CREATE INDEX deliveries_open ON deliveries (state, webhook, created_at)
        WHERE state IN ('pending', 'dead');
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was written by a newer Vigil; refusing to touch it."""


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it started at."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    start = int(row[0]) if row else 0
    if start > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"database schema version {start} is newer than this Vigil ({SCHEMA_VERSION})"
        )
    for version in range(start + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[version - 1]
        await db.executescript(
            f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {version}; COMMIT;"
        )
    return start
