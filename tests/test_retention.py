"""Retention ([retention] per state, the older queue.retain_finished_s): finished jobs
are deleted once that old, on a live daemon."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from tests.daemon_proc import DaemonProcess, db_rows, sim_config, wait_until

StartDaemon = Callable[..., DaemonProcess]


def test_finished_jobs_past_their_retention_are_deleted(start_daemon: StartDaemon) -> None:
    """With a one-second retention, succeeded jobs disappear by themselves (queued ones
    never do), and the purge is logged."""
    config = sim_config().replace("[queue]\n", "[queue]\nretain_finished_s = 1\n", 1)
    daemon = start_daemon(config)
    first = daemon.call("submit", jobs=[{"analyzer": "summarize", "input": {"text": "a"}}] * 3)
    wait_until(lambda: daemon.call("status")["jobs"]["succeeded"] == 3, what="jobs succeeded")
    wait_until(lambda: daemon.call("status")["jobs"]["succeeded"] == 0, 30, "the purge")
    assert daemon.request("show", id=first["ids"][0])["ok"] is False
    assert any(e["event"] == "retention.purged" for e in daemon.events())


def test_retention_by_state_counts_and_keeps_the_spend_history(
    start_daemon: StartDaemon,
) -> None:
    """[retention] per state: succeeded jobs past their age go, canceled ones kept
    forever (0) stay; status and the metric count the deletions by state; the calls
    (spend history) stay."""
    retention = "[retention]\nsucceeded_days = 0.00002\nfailed_days = 0\ncanceled_days = 0\n"
    daemon = start_daemon(sim_config(http_listen="127.0.0.1:0", extra=retention))
    daemon.call("pause")
    kept = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "k"}})["ids"]
    daemon.call("cancel", id=kept[0])
    daemon.call("resume")
    daemon.call("submit", jobs=[{"analyzer": "summarize", "input": {"text": "a"}}] * 3)
    wait_until(lambda: daemon.call("status")["retention"]["deleted"]["succeeded"] == 3, 30)
    status = daemon.call("status")
    assert status["jobs"]["succeeded"] == 0 and status["jobs"]["canceled"] == 1
    section = status["retention"]
    assert section["deleted"] == {"succeeded": 3, "failed": 0, "canceled": 0}
    assert section["keep_s"]["canceled"] == 0 and 1 < section["keep_s"]["succeeded"] < 2
    assert section["last_run"] is not None and section["last_error"] is None
    assert db_rows(daemon.state_dir / "vigil.db", "SELECT count(*) FROM calls") == [(3,)]
    metrics = urllib.request.urlopen(f"{daemon.http_url()}/metrics", timeout=10).read().decode()
    assert 'vigil_retention_deleted_total{state="succeeded"} 3.0' in metrics
    assert daemon.call("show", id=kept[0])["job"]["state"] == "canceled"
