"""The PostgreSQL schema as numbered migrations, run under an advisory lock so two
daemons starting at once on an empty database migrate it once.

Append, never edit. Times are unix seconds from each node's clock, as in SQLite, except
the node heartbeat, which is the database's clock: liveness is judged on one clock."""

from __future__ import annotations

from typing import Any

MIGRATE_LOCK = 0x76_69_67_01  # pg_advisory_lock keys ("vig" + a number)
REAPER_LOCK = 0x76_69_67_02

MIGRATIONS: tuple[str, ...] = (
    # 1: jobs, attempts, the daemons sharing them.
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        analyzer text NOT NULL,
        input text NOT NULL,
        priority integer NOT NULL DEFAULT 0,
        idempotency_key text UNIQUE,
        state text NOT NULL CHECK (state IN
            ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        attempts integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL,
        not_before double precision NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision,
        result text,
        error_type text,
        error_message text,
        prompt_tokens bigint,
        completion_tokens bigint,
        cost double precision,
        source text NOT NULL,
        rate_limited integer NOT NULL DEFAULT 0,
        node text  -- the node whose attempt runs it (state running)
    );
    -- Picking: queued only, highest priority first, oldest first.
    CREATE INDEX jobs_pick ON jobs (priority DESC, id) WHERE state = 'queued';
    CREATE INDEX jobs_wake ON jobs (not_before) WHERE state = 'queued';
    CREATE INDEX jobs_running ON jobs (node) WHERE state = 'running';
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE INDEX jobs_analyzer ON jobs (analyzer, state);
    CREATE INDEX jobs_finished ON jobs (finished_at)
        WHERE state IN ('succeeded', 'failed', 'canceled');
    CREATE TABLE attempts (
        id bigserial PRIMARY KEY,
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        n integer NOT NULL,
        node text,
        started_at double precision NOT NULL,
        finished_at double precision,
        outcome text NOT NULL DEFAULT 'running',
        http_status integer,
        error_type text,
        error_message text,
        latency_ms double precision,
        prompt_tokens bigint,
        completion_tokens bigint,
        cost double precision,
        answer text
    );
    CREATE INDEX attempts_job ON attempts (job_id, n);
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        version text NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: the cluster's shared rate budgets: one GCRA row per provider budget, its
    # theoretical arrival time on the database's clock (unix seconds).
    """
    CREATE TABLE rate_budgets (
        key text PRIMARY KEY,
        tat double precision NOT NULL
    );
    -- One circuit breaker and one pause state per provider: the last node to open or
    -- close, pause or lift, writes here (seq from one sequence), the others follow.
    CREATE SEQUENCE provider_state_seq;
    CREATE TABLE provider_states (
        provider text PRIMARY KEY,
        circuit_seq bigint NOT NULL DEFAULT 0,
        open_until double precision NOT NULL DEFAULT 0,
        circuit_by text NOT NULL DEFAULT '',
        pause_seq bigint NOT NULL DEFAULT 0,
        paused text,
        paused_by text NOT NULL DEFAULT ''
    );
    -- `vigil pause|resume|drain --cluster`: every node applies each one once.
    CREATE TABLE cluster_commands (
        id bigserial PRIMARY KEY,
        cmd text NOT NULL,
        node text NOT NULL,
        issued_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 3: prompt-cache tokens (cache reads and writes) and why an answer ended.
    """
    ALTER TABLE jobs ADD COLUMN cached_tokens bigint, ADD COLUMN cache_write_tokens bigint;
    ALTER TABLE attempts ADD COLUMN cached_tokens bigint, ADD COLUMN cache_write_tokens bigint,
        ADD COLUMN stop_reason text;
    """,
    # 4: every answered call (what `vigil usage` reports; kept when its job is purged)
    # and the spend per provider and analyzer per UTC day (what budgets are held to).
    """
    CREATE TABLE calls (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        job_id text NOT NULL,
        attempt integer NOT NULL,
        analyzer text NOT NULL,
        provider text NOT NULL,
        model text NOT NULL,
        prompt_tokens bigint NOT NULL,
        cached_tokens bigint NOT NULL,
        cache_write_tokens bigint NOT NULL,
        completion_tokens bigint NOT NULL,
        cost double precision
    );
    CREATE INDEX calls_at ON calls (at);
    CREATE TABLE spend (
        scope text NOT NULL,
        name text NOT NULL,
        day text NOT NULL,
        usd double precision NOT NULL,
        PRIMARY KEY (scope, name, day)
    );
    """,
    # 5: per-job metadata (SQLite's migration 6). Tags as the job shows them (a JSON
    # list, NULL for none) and, to find a tag's jobs without a scan, one row per tag
    # and job; a batch id, indexed with the state for a batch's progress.
    """
    ALTER TABLE jobs ADD COLUMN tags text, ADD COLUMN batch text;
    CREATE INDEX jobs_batch ON jobs (batch, state) WHERE batch IS NOT NULL;
    CREATE TABLE job_tags (
        tag text NOT NULL,
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        PRIMARY KEY (tag, job_id)
    );
    CREATE INDEX job_tags_job ON job_tags (job_id);
    """,
    # 6: results out (SQLite's migration 7): attempt phases; every job end as an event
    # and a delivery per webhook that wants it, both written by a trigger in the
    # transaction that ends the job. Events are read in the order of their
    # transactions' ids, only below the oldest transaction still running (see
    # pg_events): a sequence number alone is taken before commit, so a reader could
    # pass one that commits later.
    """
    ALTER TABLE attempts ADD COLUMN phases text;
    CREATE TABLE events (
        seq bigserial PRIMARY KEY,
        xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
        job_id text NOT NULL,
        analyzer text NOT NULL,
        state text NOT NULL,
        at double precision NOT NULL
    );
    CREATE INDEX events_order ON events (xid, seq);
    CREATE TABLE events_pruned (
        id integer PRIMARY KEY CHECK (id = 1),
        xid bigint NOT NULL,
        seq bigint NOT NULL
    );
    CREATE TABLE webhooks (
        name text PRIMARY KEY,
        events text[] NOT NULL,
        analyzers text[] NOT NULL  -- empty: all
    );
    CREATE TABLE deliveries (
        id text PRIMARY KEY DEFAULT replace(gen_random_uuid()::text, '-', ''),
        webhook text NOT NULL,
        seq bigint NOT NULL,
        job_id text NOT NULL,
        event text NOT NULL,
        state text NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'delivered', 'dead')),
        attempts integer NOT NULL DEFAULT 0,
        next_at double precision NOT NULL,
        created_at double precision NOT NULL,
        finished_at double precision,
        last_status integer,
        last_error text
    );
    CREATE INDEX deliveries_due ON deliveries (webhook, next_at) WHERE state = 'pending';
    CREATE INDEX deliveries_ended ON deliveries (state, finished_at);
    CREATE FUNCTION vigil_job_ended() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        s bigint;
        t double precision := coalesce(NEW.finished_at, extract(epoch FROM clock_timestamp()));
    BEGIN
        INSERT INTO events (job_id, analyzer, state, at)
            VALUES (NEW.id, NEW.analyzer, NEW.state, t) RETURNING seq INTO s;
        INSERT INTO deliveries (webhook, seq, job_id, event, next_at, created_at)
            SELECT w.name, s, NEW.id, 'job.' || NEW.state, t, t FROM webhooks w
            WHERE ('job.' || NEW.state) = ANY (w.events)
            AND (cardinality(w.analyzers) = 0 OR NEW.analyzer = ANY (w.analyzers));
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_ended AFTER UPDATE OF state ON jobs FOR EACH ROW
        WHEN (NEW.state IN ('succeeded', 'failed', 'canceled')
              AND OLD.state IS DISTINCT FROM NEW.state)
        EXECUTE FUNCTION vigil_job_ended();
    """,
    # 7: the counts of pending and dead deliveries per webhook (status, every few
    # seconds) read an index, not rows.
    """
    CREATE INDEX deliveries_open ON deliveries (state, webhook, created_at)
        WHERE state IN ('pending', 'dead');
    """,
    # 8: each end's event and deliveries are written by the statement that ends the job
    # (`pg_outbox.ends_sql`): the row trigger of 6 cost 4-7 % of a cluster's throughput.
    """
    DROP TRIGGER IF EXISTS job_ended ON jobs;
    DROP FUNCTION IF EXISTS vigil_job_ended();
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: Any) -> int:
    """Bring the database to SCHEMA_VERSION under the migration lock; returns the
    version found. Raises SchemaTooNew for a database a newer Vigil wrote."""
    from daemon.store.schema import SchemaTooNew

    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS vigil_schema (version integer NOT NULL)")
        start = await conn.fetchval("SELECT max(version) FROM vigil_schema") or 0
        if start > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database schema version {start} is newer than this Vigil ({SCHEMA_VERSION}): "
                "upgrade this daemon"
            )
        for version in range(start + 1, SCHEMA_VERSION + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute("INSERT INTO vigil_schema (version) VALUES ($1)", version)
        return int(start)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
