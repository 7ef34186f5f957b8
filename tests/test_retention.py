"""queue.retain_finished_s: finished jobs are deleted once that old, on a live daemon."""

from __future__ import annotations

from collections.abc import Callable

from tests.daemon_proc import DaemonProcess, sim_config, wait_until

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
