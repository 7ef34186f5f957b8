"""Several daemons on one PostgreSQL database, as real processes: one queue, one view
from any node, and a node killed mid-attempt taken over by the others."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from daemon.config import SimulateConfig
from tests.daemon_proc import DaemonProcess, daemon_config, run_cli, wait_until
from tests.pg_server import PgServer
from tests.test_status_page import page_dom
from tests.torture_helpers import analyzer, openai_provider, threaded_api

StartDaemon = Callable[..., DaemonProcess]
LEASE_S = 3


def cluster_config(dsn: str, node: str, api_url: str, *, timeout_s: float = 5.0) -> str:
    store = f'\n[store]\nurl = "{dsn}"\nnode_name = "{node}"\nlease_s = {LEASE_S}\n'
    provider = openai_provider("main", api_url, max_concurrency=8, timeout_s=timeout_s)
    sections = provider + analyzer("a", "main", timeout_s=timeout_s * 2)
    return daemon_config(sections + store, max_concurrency=8)


def test_nodes_share_the_queue_and_a_killed_node_is_taken_over(
    start_daemon: StartDaemon, pg_server: PgServer, pg_dsn: str
) -> None:
    """Jobs sent to one node run on both; SIGKILL one mid-attempt and the other takes its
    attempts over within the lease (recorded `crashed`), so every job ends with one
    result and the API saw no more requests than there are attempt rows."""
    settings = SimulateConfig(latency_ms=400, latency_sigma=0.1, seed=1)
    with threaded_api(settings) as api:
        a = start_daemon(cluster_config(pg_dsn, "a", api.url), name="a")
        b = start_daemon(cluster_config(pg_dsn, "b", api.url), name="b")
        jobs = [{"analyzer": "a", "input": {"text": f"doc {i}"}} for i in range(48)]
        ids = a.call("submit", jobs=jobs)["ids"]
        # Both nodes claim from the one queue.
        wait_until(
            lambda: all(n["running"] > 0 for n in b.call("status")["nodes"]),
            what="both nodes running jobs",
        )
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        killed_at = time.monotonic()
        wait_until(lambda: b.call("status")["jobs"]["succeeded"] == len(ids), 120, "all done")
        taken_over_s = time.monotonic() - killed_at
        status = b.call("status")
        requests = api.stats()["requests"]
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["a"]["alive"] is False and nodes["b"]["alive"] is True, nodes
    # The people's views list them too: `vigil status` and `vigil top`.
    for command in (["status"], ["top", "--once"]):
        out = run_cli(*command, socket_path=b.socket_path)
        assert out.returncode == 0, out.stderr
        table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line}
        assert table["a"][4] == "NO" and table["b"][4] == "yes", out.stdout
    assert status["jobs"] == {
        "queued": 0,
        "running": 0,
        "succeeded": len(ids),
        "failed": 0,
        "canceled": 0,
    }
    rows = pg_server.psql(
        "SELECT outcome, count(*) FROM attempts GROUP BY outcome ORDER BY outcome",
        dbname=urlsplit(pg_dsn).path.lstrip("/"),
    )
    by_outcome = dict(line.split("|") for line in rows.splitlines())
    assert by_outcome["succeeded"] == str(len(ids)), by_outcome
    assert int(by_outcome.get("crashed", "0")) >= 1, by_outcome
    assert requests <= sum(int(n) for n in by_outcome.values()), (requests, by_outcome)
    one_each = pg_server.psql(
        "SELECT count(*) FROM (SELECT job_id FROM attempts WHERE outcome = 'succeeded' "
        "GROUP BY job_id HAVING count(*) > 1) t",
        dbname=urlsplit(pg_dsn).path.lstrip("/"),
    )
    assert one_each.strip() == "0"
    # Every job is readable from the surviving node, whichever node ran it.
    shown = run_cli("show", ids[0], "--json", socket_path=b.socket_path)
    assert shown.returncode == 0 and '"succeeded"' in shown.stdout
    assert taken_over_s < 120


def test_a_second_daemon_with_the_same_node_name_is_refused(
    start_daemon: StartDaemon, pg_dsn: str
) -> None:
    """Two daemons named alike would recover each other's attempts: the second exits 78
    with one line naming the clash."""
    with threaded_api() as api:
        start_daemon(cluster_config(pg_dsn, "same", api.url), name="one")
        second = start_daemon(cluster_config(pg_dsn, "same", api.url), name="two", ready=False)
        code = second.proc.wait(30)
    log = second.log()
    assert code == 78, log
    assert "another daemon named 'same'" in log
    assert "Traceback" not in log


def test_a_database_restart_mid_run_loses_nothing(
    start_daemon: StartDaemon, pg_server: PgServer, pg_dsn: str
) -> None:
    """PostgreSQL restarted (pg_ctl restart -m fast) while jobs run: the daemon does not
    exit, attempts that finished meanwhile keep retrying their record, and every
    accepted job ends succeeded."""
    settings = SimulateConfig(latency_ms=300, latency_sigma=0.1, seed=1)
    with threaded_api(settings) as api:
        daemon = start_daemon(cluster_config(pg_dsn, "a", api.url))
        jobs = [{"analyzer": "a", "input": {"text": f"doc {i}"}} for i in range(40)]
        ids = daemon.call("submit", jobs=jobs)["ids"]
        wait_until(lambda: daemon.call("status")["jobs"]["running"] > 0, what="jobs running")
        pg_server.restart()
        wait_until(
            lambda: daemon.call("status")["jobs"]["succeeded"] == len(ids), 120, "all succeeded"
        )
        assert daemon.proc.poll() is None
        assert daemon.call("status")["health"]["ready"]


def test_cancel_from_one_node_stops_the_attempt_running_on_another(
    start_daemon: StartDaemon, pg_dsn: str
) -> None:
    """A job canceled through the node that does not run it: the node that does stops
    its attempt at once (it does not wait out the API call), and the job stays canceled."""
    settings = SimulateConfig(latency_ms=20_000, latency_sigma=0.01, seed=1)
    with threaded_api(settings) as api:
        nodes = {
            name: start_daemon(cluster_config(pg_dsn, name, api.url), name=name)
            for name in ("a", "b")
        }
        [job_id] = nodes["a"].call("submit", jobs=[{"analyzer": "a", "input": {"text": "x"}}])[
            "ids"
        ]

        def runner() -> str | None:
            running = [n["name"] for n in nodes["a"].call("status")["nodes"] if n["running"]]
            return running[0] if running else None

        wait_until(lambda: runner() is not None, what="the job running on a node")
        owner = runner()
        assert owner is not None
        other = "b" if owner == "a" else "a"
        assert nodes[other].call("cancel", id=job_id)["was"] == "running"
        wait_until(
            lambda: any(e["event"] == "job.canceled_elsewhere" for e in nodes[owner].events()),
            15,
            "the owner to stop the attempt",
        )
        wait_until(lambda: nodes[owner].call("status")["queue"]["active"] == 0, 15)
        shown = nodes[owner].call("show", id=job_id)
    assert shown["job"]["state"] == "canceled"
    assert [a["outcome"] for a in shown["attempts"]] == ["canceled"]


def test_pause_resume_and_drain_with_cluster_reach_every_node(
    start_daemon: StartDaemon, pg_dsn: str
) -> None:
    """`--cluster` acts on every node sharing the store; without it only the node asked.
    A daemon running alone refuses `--cluster` rather than pretend."""
    with threaded_api() as api:
        a = start_daemon(cluster_config(pg_dsn, "a", api.url), name="a")
        b = start_daemon(cluster_config(pg_dsn, "b", api.url), name="b")
        out = run_cli("pause", socket_path=a.socket_path)
        assert out.returncode == 0, out.stderr
        assert a.call("status")["queue"]["paused"] and not b.call("status")["queue"]["paused"]
        out = run_cli("pause", "--cluster", socket_path=a.socket_path)
        assert out.returncode == 0 and "every node" in out.stdout, out
        wait_until(lambda: b.call("status")["queue"]["paused"], 15, "b to pause")
        run_cli("resume", "--cluster", socket_path=b.socket_path)
        wait_until(lambda: not a.call("status")["queue"]["paused"], 15, "a to resume")
        assert not b.call("status")["queue"]["paused"]
        run_cli("drain", "--cluster", socket_path=b.socket_path)
        wait_until(lambda: a.call("status")["state"] == "draining", 15, "a to drain")
        alone = start_daemon(
            daemon_config(openai_provider("main", api.url) + analyzer("a", "main")), name="alone"
        )
        refused = run_cli("pause", "--cluster", socket_path=alone.socket_path)
    assert refused.returncode != 0 and "store.url" in refused.stderr, refused
    assert not alone.call("status")["queue"]["paused"]


def test_a_node_stopped_past_its_lease_comes_back_to_a_refused_finish(
    start_daemon: StartDaemon, pg_dsn: str
) -> None:
    """SIGSTOP a node mid-attempt past its lease: another node takes the job over and
    records its result; SIGCONT, and the first node's late finish is refused by the
    fence (logged), so the job keeps one result and its attempts read crashed, succeeded."""
    settings = SimulateConfig(latency_ms=2500, latency_sigma=0.01, seed=1)
    with threaded_api(settings) as api:
        a = start_daemon(cluster_config(pg_dsn, "a", api.url), name="a")
        [job_id] = a.call("submit", jobs=[{"analyzer": "a", "input": {"text": "x"}}])["ids"]
        wait_until(lambda: a.call("status")["queue"]["active"] == 1, what="a running the job")
        b = start_daemon(cluster_config(pg_dsn, "b", api.url), name="b")
        a.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: b.call("show", id=job_id)["job"]["state"] == "succeeded",
                60,
                "b to take the job over and finish it",
            )
        finally:
            a.proc.send_signal(signal.SIGCONT)
        wait_until(
            lambda: any(e["event"] == "store.finish_refused" for e in a.events()),
            30,
            "a's late finish to be refused",
        )
        shown = b.call("show", id=job_id)
        assert a.proc.poll() is None
    assert [x["outcome"] for x in shown["attempts"]] == ["crashed", "succeeded"], shown
    assert shown["job"]["attempts"] == 2 and shown["job"]["result"]


def test_metrics_and_the_page_show_the_nodes(
    start_daemon: StartDaemon, pg_dsn: str, tmp_path: Path
) -> None:
    """/metrics on a cluster node: nodes by liveness, the jobs and attempts tables' size
    and dead rows, refused finishes; the status page lists the nodes (in Chromium)."""
    with threaded_api() as api:
        config = cluster_config(pg_dsn, "a", api.url).replace(
            'listen = ""', 'listen = "127.0.0.1:0"'
        )
        daemon = start_daemon(config)
        daemon.call("submit", jobs=[{"analyzer": "a", "input": {"text": "x"}}])
        daemon.wait_all_terminal()
        with urllib.request.urlopen(f"{daemon.http_url()}/metrics", timeout=30) as response:
            text = response.read().decode()
        dom = anyio.run(page_dom, daemon.http_url(), tmp_path)
    assert re.search(r'<section id="nodes-section">', dom), dom[:2000]
    assert re.search(
        r"<td>a</td><td>[^<]+</td><td[^>]*>\d+</td><td>[^<]+</td><td[^>]*>yes</td>", dom
    )
    assert 'vigil_cluster_nodes{alive="true"} 1.0' in text, text
    assert re.search(r'vigil_db_table_bytes\{table="jobs"\} [1-9]', text), text
    assert 'vigil_db_dead_tuples{table="attempts"}' in text
    assert "vigil_db_finishes_refused_total 0.0" in text


def test_a_node_cut_off_from_the_database_past_its_lease_gives_its_attempts_up(
    start_daemon: StartDaemon, pg_server: PgServer, pg_dsn: str
) -> None:
    """The database away longer than the lease while an attempt runs: the node gives
    the attempt up (another node may have taken it over), records it `interrupted`,
    uncounted, once the database is back, and the job then runs again and succeeds."""
    settings = SimulateConfig(latency_ms=6000, latency_sigma=0.01, seed=1)
    with threaded_api(settings) as api:
        daemon = start_daemon(cluster_config(pg_dsn, "a", api.url, timeout_s=20))
        [job_id] = daemon.call("submit", jobs=[{"analyzer": "a", "input": {"text": "x"}}])["ids"]
        wait_until(lambda: daemon.call("status")["queue"]["active"] == 1, what="the attempt")
        pg_server.outage(LEASE_S + 2.5)
        wait_until(
            lambda: daemon.call("show", id=job_id)["job"]["state"] == "succeeded", 60, "success"
        )
        shown = daemon.call("show", id=job_id)
        events = [e["event"] for e in daemon.events()]
    assert "queue.cut_off" in events, events
    assert [a["outcome"] for a in shown["attempts"]] == ["interrupted", "succeeded"], shown
    assert shown["job"]["attempts"] == 1


def test_a_refused_login_and_an_unreachable_database_are_one_clear_line(
    start_daemon: StartDaemon, pg_server: PgServer, pg_dsn: str, tmp_path: Path
) -> None:
    """At start: a wrong password exits 78 (a human must fix it), a database nobody
    answers at exits 1 (a restart may help); one line each naming the database, never a
    traceback, never the password. The right password starts the daemon."""
    dbname = urlsplit(pg_dsn).path.lstrip("/")
    url = pg_server.password_role("vigil_pw", "right-horse").replace("/postgres?", f"/{dbname}?")
    with threaded_api() as api:

        def config(store_url: str, node: str) -> str:
            return cluster_config(store_url, node, api.url).replace(
                "lease_s = 3", 'lease_s = 3\npassword_env = "VIGIL_TEST_DB_PW"'
            )

        wrong = start_daemon(
            config(url, "w"), name="w", env={"VIGIL_TEST_DB_PW": "wrong-battery"}, ready=False
        )
        assert wrong.proc.wait(30) == 78
        nowhere = f"postgresql://vigil@/vigil?host={tmp_path}&port=1"
        gone = start_daemon(
            config(nowhere, "g"), name="g", env={"VIGIL_TEST_DB_PW": "x"}, ready=False
        )
        assert gone.proc.wait(30) == 1
        right = start_daemon(config(url, "r"), name="r", env={"VIGIL_TEST_DB_PW": "right-horse"})
        assert right.call("status")["store"]["backend"] == "postgresql"
    for daemon, says in ((wrong, "refused the login"), (gone, "cannot connect to the database")):
        log = daemon.log()
        assert (says in log and "vigil_pw" in log) or "vigil@" in log, log
        assert "Traceback" not in log and "wrong-battery" not in log, log
