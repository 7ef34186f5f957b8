"""The SQL of a cluster's nodes: registration and heartbeat on the database's clock,
the view `vigil status` shows (counts and nodes), taking over the attempts of nodes
that fell silent, and the `--cluster` commands every node applies once."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from typing import Any

from daemon import __version__
from daemon.jobs import STATES
from daemon.store.base import PROCESS_DIED, ClusterCommand, Node, TableStats
from daemon.store.pg_outbox import ends_sql

CHANNEL = "vigil_jobs"  # NOTIFY'd in the transaction that makes jobs ready
PRUNE_AFTER_S = 86_400.0  # a dead node's row stays this long (status shows it dead)
COMMANDS_KEPT = "7 days"  # each node applies a command within seconds


def lock_key(name: str) -> str:
    """The advisory lock a node holds on its name (hashtext of this)."""
    return f"vigil.node.{name}"


async def register(conn: Any, node: str) -> None:
    await conn.execute(
        "INSERT INTO nodes (name, host, pid, version, started_at) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET host = $2, "
        "pid = $3, version = $4, started_at = $5, heartbeat_at = now()",
        node,
        socket.gethostname(),
        os.getpid(),
        __version__,
        time.time(),
    )


async def heartbeat(conn: Any, node: str) -> None:
    await conn.execute("UPDATE nodes SET heartbeat_at = now() WHERE name = $1", node)


async def read_counts(conn: Any) -> Counter[str]:
    """Jobs by state, the whole cluster's (every state present)."""
    counts: Counter[str] = Counter(dict.fromkeys(STATES, 0))
    rows = await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
    counts.update({row["state"]: row["count"] for row in rows})
    return counts


async def read_nodes(conn: Any, lease_s: float) -> list[Node]:
    rows = await conn.fetch(
        "SELECT n.name, n.host, n.pid, n.version, "
        "extract(epoch FROM now() - n.heartbeat_at)::float8 AS age, "
        "(SELECT count(*) FROM jobs j WHERE j.state = 'running' AND j.node = n.name) "
        "AS running FROM nodes n ORDER BY n.name"
    )
    return [
        Node(
            name=r["name"],
            host=r["host"],
            pid=r["pid"],
            version=r["version"],
            alive=r["age"] < lease_s,
            heartbeat_age_s=round(r["age"], 1),
            running=r["running"],
        )
        for r in rows
    ]


async def read_tables(conn: Any) -> dict[str, TableStats]:
    """The hot tables' size on disk and dead rows (what autovacuum has yet to take)."""
    rows = await conn.fetch(
        "SELECT relname, pg_total_relation_size(relid) AS bytes, n_dead_tup "
        "FROM pg_stat_user_tables WHERE relname IN ('jobs', 'attempts')"
    )
    return {r["relname"]: TableStats(bytes=r["bytes"], dead_tuples=r["n_dead_tup"]) for r in rows}


async def reap(conn: Any, me: str, lease_s: float) -> tuple[list[str], dict[str, int]]:
    """Take over the attempts of nodes silent past the lease (the caller holds the
    reaper lock, in a transaction); forget nodes long dead with nothing left running.
    Returns the dead nodes and what was requeued and failed."""
    dead = [
        row["name"]
        for row in await conn.fetch(
            "SELECT name FROM nodes WHERE name != $1 AND "
            "heartbeat_at < now() - make_interval(secs => $2)",
            me,
            lease_s,
        )
    ]
    taken = await recover(conn, dead) if dead else {"requeued": 0, "failed": 0}
    await conn.execute(
        "DELETE FROM nodes n WHERE heartbeat_at < now() - make_interval(secs => $1) "
        "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.state = 'running' AND j.node = n.name)",
        max(PRUNE_AFTER_S, lease_s * 10),
    )
    return dead, taken


async def recover(conn: Any, nodes: list[str]) -> dict[str, int]:
    """The running attempts of `nodes` count as crashed; their jobs retry or
    dead-letter (SQLite's start-up recovery, for named nodes)."""
    now = time.time()
    async with conn.transaction():
        await conn.execute(
            "UPDATE attempts a SET outcome = 'crashed', finished_at = $1, error_type = $2, "
            "error_message = $3 FROM jobs j WHERE a.job_id = j.id AND a.n = j.attempts "
            "AND a.outcome = 'running' AND j.state = 'running' AND j.node = ANY($4)",
            now,
            PROCESS_DIED.type,
            PROCESS_DIED.message,
            nodes,
        )
        failed = await conn.fetchval(
            "WITH f AS (UPDATE jobs SET state = 'failed', finished_at = $1, error_type = $2, "
            "error_message = $3, node = NULL WHERE state = 'running' AND node = ANY($4) "
            "AND attempts >= max_attempts RETURNING id, analyzer, state, finished_at AS at), "
            + ends_sql("f")
            + "SELECT count(*) FROM f",
            now,
            PROCESS_DIED.type,
            PROCESS_DIED.message,
            nodes,
        )
        requeued = await conn.fetchval(
            "WITH r AS (UPDATE jobs SET state = 'queued', not_before = 0, error_type = $1, "
            "error_message = $2, node = NULL WHERE state = 'running' AND node = ANY($3) "
            "RETURNING 1) SELECT count(*) FROM r",
            PROCESS_DIED.type,
            PROCESS_DIED.message,
            nodes,
        )
        if requeued:
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return {"requeued": int(requeued), "failed": int(failed)}


async def latest_command(conn: Any) -> int:
    """Where a starting node begins: commands given before it are not its to replay."""
    value: int = await conn.fetchval("SELECT coalesce(max(id), 0) FROM cluster_commands")
    return value


async def new_commands(conn: Any, after: int) -> list[tuple[int, ClusterCommand, str]]:
    rows = await conn.fetch(
        "SELECT id, cmd, node FROM cluster_commands WHERE id > $1 ORDER BY id", after
    )
    return [(row["id"], row["cmd"], row["node"]) for row in rows]


async def add_command(conn: Any, cmd: ClusterCommand, node: str) -> None:
    await conn.execute("INSERT INTO cluster_commands (cmd, node) VALUES ($1, $2)", cmd, node)
    await conn.execute(
        f"DELETE FROM cluster_commands WHERE issued_at < now() - interval '{COMMANDS_KEPT}'"
    )
