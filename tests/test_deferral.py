"""A paused provider (refused key) holds jobs without spending their attempts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from daemon.jobs import ErrorInfo, Job, JobIds
from daemon.queue import Dispatcher
from daemon.store.base import AttemptEnd, NewJob
from daemon.store.sqlite import Store
from tests.daemon_proc import DaemonProcess, run_cli, wait_until
from tests.scripted_api import ScriptedAPI

StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def api() -> Iterator[ScriptedAPI]:
    """An API that refuses the key (401) until told otherwise, stopped at the end."""
    with ScriptedAPI(down_status=401) as server:
        server.down = True
        yield server


def _config(url: str) -> str:
    return f"""
[http]
listen = ""
[queue]
backoff_base_s = 0.05
backoff_max_s = 0.2
[log]
format = "json"
[providers.main]
kind = "openai"
base_url = "{url}"
api_key_env = "VIGIL_TEST_DEFERRAL_KEY"
breaker_failures = 0
[analyzers.summarize]
provider = "main"
model = "m"
prompt = "Summarize {{text}}"
max_attempts = 2
"""


def test_paused_provider_defers_jobs_without_spending_attempts(
    start_daemon: StartDaemon, api: ScriptedAPI
) -> None:
    """After a 401 pauses the provider, new jobs wait (attempts 0) until `resume`."""
    daemon = start_daemon(_config(api.url), env={"VIGIL_TEST_DEFERRAL_KEY": "sk-deferral-test"})
    first = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "a"}})
    wait_until(lambda: daemon.call("show", id=first["ids"][0])["job"]["state"] == "failed")
    status = daemon.call("status")["providers"]["main"]
    assert "VIGIL_TEST_DEFERRAL_KEY" in status["paused"]

    second = daemon.call("submit", jobs={"analyzer": "summarize", "input": {"text": "b"}})
    job_id = second["ids"][0]
    time.sleep(1.5)  # several dispatcher rounds: none may claim the held job
    held = daemon.call("show", id=job_id)
    assert held["job"]["state"] == "queued" and held["job"]["attempts"] == 0
    assert held["attempts"] == []
    assert len(api.statuses) == 1, "a paused provider sends nothing"

    api.down = False
    assert run_cli("resume", socket_path=daemon.socket_path).returncode == 0
    wait_until(lambda: daemon.call("show", id=job_id)["job"]["state"] == "succeeded", 60)
    done = daemon.call("show", id=job_id)
    assert done["job"]["attempts"] == 1
    assert done["attempts"][-1]["outcome"] == "succeeded"


@pytest.mark.anyio
async def test_a_deferred_attempt_is_given_back(tmp_path: Path) -> None:
    """An attempt refused before any request is requeued uncounted, for later."""
    calls: list[int] = []

    async def refuse(job: Job) -> AttemptEnd:
        calls.append(job.attempts)
        return AttemptEnd(
            outcome="deferred", error=ErrorInfo("CircuitOpen", "open"), retry_at=time.time() + 3600
        )

    with anyio.fail_after(20):
        async with Store(tmp_path / "v.db") as store:
            await store.submit(
                [
                    NewJob(
                        id=JobIds().new(),
                        analyzer="a",
                        input={},
                        priority=0,
                        idempotency_key=None,
                        max_attempts=1,
                        source="t",
                    )
                ],
                max_backlog=10,
            )
            dispatcher = Dispatcher(store, refuse, max_concurrency=4)
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                while True:  # the dispatcher has no event for this; poll, bounded above
                    if dispatcher.outcomes["deferred"]:
                        break
                    await anyio.sleep(0.01)
                await dispatcher.drain(1)
            [job] = await store.list_jobs()
            attempts = await store.attempts(job.id)
    assert calls == [1]
    assert (job.state, job.attempts, job.max_attempts) == ("queued", 0, 1)
    assert job.not_before > time.time() + 3000
    assert [(a.n, a.outcome) for a in attempts] == [(1, "deferred")]
