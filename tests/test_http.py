"""The HTTP API against a real daemon subprocess on 127.0.0.1 (port 0), through a real
aiohttp client: status codes, auth, the error shape, limits and backpressure."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anyio
import pytest

from tests.daemon_proc import DaemonProcess, sim_config

pytestmark = pytest.mark.anyio

StartDaemon = Callable[..., DaemonProcess]
TOKEN = "test-token-7d1f0c9e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB = {"analyzer": "summarize", "input": {"text": "hello"}}
WAIT_S = 30.0


def http_config(*, max_body_bytes: int | None = None, **kwargs: Any) -> str:
    config = sim_config(http_listen="127.0.0.1:0", **kwargs)
    if max_body_bytes is not None:
        config = config.replace("[http]\n", f"[http]\nmax_body_bytes = {max_body_bytes}\n", 1)
    return config


@pytest.fixture
def daemon(start_daemon: StartDaemon) -> DaemonProcess:
    """A paused daemon (jobs stay queued) whose /v1 needs the bearer token."""
    proc = start_daemon(http_config(max_backlog=5), env={"VIGIL_HTTP_TOKEN": TOKEN})
    proc.call("pause")
    return proc


@pytest.fixture
def base_url(daemon: DaemonProcess) -> str:
    """The URL the daemon publishes in `status`."""
    return daemon.http_url()


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client bound to the daemon's URL."""
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(base_url, timeout=timeout) as session:
        yield session


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> Any:
    """The response is an error of that status and code, in the one shared shape."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


async def test_probes_and_status(
    daemon: DaemonProcess, base_url: str, client: aiohttp.ClientSession
) -> None:
    """/healthz and /readyz answer 200 on a healthy paused daemon; /status is the socket's."""
    async with client.get("/healthz") as r:
        assert (r.status, await r.json()) == (200, {"live": True, "reasons": []})
    async with client.get("/readyz") as r:
        assert (r.status, await r.json()) == (200, {"ready": True, "reasons": []})
    async with client.get("/status") as r:
        assert r.status == 200
        http_status = await r.json()
    socket_status = await daemon.acall("status")
    assert set(http_status) == set(socket_status)
    assert http_status["jobs"] == socket_status["jobs"]
    assert http_status["state"] == "paused"
    assert http_status["http"] == {"url": base_url, "auth": True}


async def test_v1_needs_the_bearer_token(
    daemon: DaemonProcess, client: aiohttp.ClientSession
) -> None:
    """Missing, wrong or non-bearer credentials get 401; the right token passes; the token
    appears in no answer and no log line."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        async with client.get("/v1/jobs", headers=headers) as r:
            error = await expect_error(r, 401, "unauthorized")
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in str(error)
    async with client.post("/v1/jobs", json=JOB, headers={"Authorization": "Bearer x"}) as r:
        await expect_error(r, 401, "unauthorized")
    async with client.get("/v1/jobs", headers=AUTH) as r:
        assert r.status == 200
    for path in ("/healthz", "/readyz", "/status", "/metrics", "/"):
        async with client.get(path) as r:
            assert r.status == 200, path
            assert TOKEN not in await r.text()
    assert (await daemon.acall("status"))["jobs"]["queued"] == 0
    assert TOKEN not in daemon.log_path.read_text()


async def test_v1_is_open_without_a_token(start_daemon: StartDaemon) -> None:
    """With the token variable unset (empty), /v1 answers without credentials."""
    proc = start_daemon(http_config(), env={"VIGIL_HTTP_TOKEN": ""})
    url = await anyio.to_thread.run_sync(proc.http_url)
    async with aiohttp.ClientSession(url) as session, session.get("/v1/jobs") as r:
        assert r.status == 200
        assert await r.json() == {"jobs": [], "next_before": None, "total": 0}
    assert (await proc.acall("status"))["http"]["auth"] is False


async def test_submit_one_a_list_and_a_repeat(client: aiohttp.ClientSession) -> None:
    """POST /v1/jobs takes one job or a list (202 with ids); a repeated idempotency key
    returns the first job; jobs record that they came over HTTP."""
    async with client.post("/v1/jobs", json=JOB, headers=AUTH) as r:
        assert r.status == 202
        one = await r.json()
    assert one["created"] == 1 and one["existing"] == 0 and len(one["ids"]) == 1
    keyed = {**JOB, "idempotency_key": "k1", "priority": 3}
    async with client.post("/v1/jobs", json=[keyed, JOB], headers=AUTH) as r:
        assert r.status == 202
        two = await r.json()
    assert two["created"] == 2 and len(set(two["ids"])) == 2
    async with client.post("/v1/jobs", json=keyed, headers=AUTH) as r:
        again = await r.json()
    assert (r.status, again["ids"], again["existing"]) == (202, [two["ids"][0]], 1)
    async with client.get(f"/v1/jobs/{one['ids'][0]}", headers=AUTH) as r:
        shown = await r.json()
    assert shown["job"]["source"] == "http" and shown["job"]["state"] == "queued"
    assert shown["attempts"] == []


async def test_invalid_jobs_get_400_with_field_errors(
    daemon: DaemonProcess, client: aiohttp.ClientSession
) -> None:
    """Bad jobs are refused whole with 400 and the field list; nothing is written."""
    jobs = [JOB, {"analyzer": "summarize"}, {"analyzer": "nope", "input": {}}]
    async with client.post("/v1/jobs", json=jobs, headers=AUTH) as r:
        error = await expect_error(r, 400, "invalid_job")
    assert error["details"][0] == {"index": 1, "field": "input", "message": "required"}
    assert error["details"][1]["index"] == 2 and error["details"][1]["field"] == "analyzer"
    async with client.post(
        "/v1/jobs", json={"analyzer": "classify", "input": {"text": "x"}}, headers=AUTH
    ) as r:
        error = await expect_error(r, 400, "invalid_job")
    assert [(d["index"], d["field"]) for d in error["details"]] == [(None, "input.audience")]
    assert (await daemon.acall("status"))["jobs"]["queued"] == 0


MALFORMED: list[tuple[bytes, str]] = [
    (b"{bad", "bad_request"),
    (b"", "bad_request"),
    (b"\xff\xfe\x00", "bad_request"),
    (b"[" * 100_000, "bad_request"),
    (b'"a string"', "invalid_job"),
    (b"[]", "invalid_job"),
    (b'{"analyzer": 5, "input": {}}', "invalid_job"),
    (b'{"analyzer": "summarize", "input": {"text": "x"}, "priority": "high"}', "invalid_job"),
    (b'{"analyzer": "summarize", "input": {"text": "x"}, "extra": 1}', "invalid_job"),
]


JSON_TYPE = {"Content-Type": "application/json"}


async def test_a_change_from_another_site_is_refused(
    daemon: DaemonProcess, client: aiohttp.ClientSession, base_url: str
) -> None:
    """A page on another site cannot change anything: a body that is not JSON (what a
    form or a no-cors fetch sends) is a 415, a cross-site or foreign-origin request a
    403, and nothing is written; the same request from the page's own origin works."""
    body = b'{"all": true}'
    async with client.post("/v1/jobs:cancel", data=body, headers=AUTH) as r:
        await expect_error(r, 415, "unsupported_media_type")
    text_plain = AUTH | {"Content-Type": "text/plain"}
    async with client.post("/v1/jobs:purge", data=body, headers=text_plain) as r:
        await expect_error(r, 415, "unsupported_media_type")
    for foreign in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        async with client.post(
            "/v1/jobs:cancel", data=body, headers=AUTH | JSON_TYPE | foreign
        ) as r:
            await expect_error(r, 403, "forbidden")
        async with client.delete("/v1/jobs/some-id", headers=AUTH | foreign) as r:
            await expect_error(r, 403, "forbidden")
    own = {"Origin": base_url.rstrip("/"), "Sec-Fetch-Site": "same-origin"}
    async with client.post("/v1/jobs:cancel", json={"state": "queued"}, headers=AUTH | own) as r:
        assert r.status == 200, await r.text()


async def test_malformed_bodies_get_400(
    daemon: DaemonProcess, client: aiohttp.ClientSession
) -> None:
    """Malformed JSON and wrong types get a 400 in the error shape; the daemon serves on."""
    for body, code in MALFORMED:
        async with client.post("/v1/jobs", data=body, headers=AUTH | JSON_TYPE) as r:
            assert r.status == 400, (body[:40], await r.text())
            await expect_error(r, 400, code)
    async with client.get("/healthz") as r:
        assert r.status == 200
    assert (await daemon.acall("status"))["jobs"]["queued"] == 0


async def test_garbage_and_huge_headers_do_not_hurt(
    daemon: DaemonProcess, base_url: str, client: aiohttp.ClientSession
) -> None:
    """Non-HTTP bytes and oversize headers are refused; the daemon serves on."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    for raw in (
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    ):
        with anyio.fail_after(WAIT_S):
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(raw)
                answer = await stream.receive()
        assert answer.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), answer[:100]
    async with client.get("/v1/jobs", headers={**AUTH, "X-Big": "b" * 100_000}) as r:
        assert 400 <= r.status < 500
    async with client.get("/healthz") as r:
        assert r.status == 200
    assert daemon.proc.poll() is None


async def test_body_over_the_limit_gets_413(start_daemon: StartDaemon) -> None:
    """A body over http.max_body_bytes is refused with 413, naming the setting."""
    proc = start_daemon(http_config(max_body_bytes=4096))
    url = await anyio.to_thread.run_sync(proc.http_url)
    big = {"analyzer": "summarize", "input": {"text": "x" * 10_000}}
    async with aiohttp.ClientSession(url) as session:
        async with session.post("/v1/jobs", json=big) as r:
            error = await expect_error(r, 413, "too_large")
        assert "http.max_body_bytes" in error["message"]
        async with session.post("/v1/jobs", json=JOB) as r:
            assert r.status == 202


async def test_backlog_full_gets_429_then_recovers(
    daemon: DaemonProcess, client: aiohttp.ClientSession
) -> None:
    """Over queue.max_backlog: 429 with Retry-After, /readyz 503 naming the backlog, the
    socket says backlog_full; once the backlog drains, intake and readiness come back."""
    async with client.post("/v1/jobs", json=[JOB] * 5, headers=AUTH) as r:
        assert r.status == 202
    async with client.post("/v1/jobs", json=JOB, headers=AUTH) as r:
        error = await expect_error(r, 429, "backlog_full")
        assert int(r.headers["Retry-After"]) >= 1
    assert "backlog full" in error["message"]
    async with client.get("/readyz") as r:
        ready = await r.json()
    assert r.status == 503 and ready["ready"] is False
    assert any("backlog" in reason for reason in ready["reasons"])
    async with client.get("/healthz") as r:
        assert r.status == 200  # full is not dead
    reply = await anyio.to_thread.run_sync(functools.partial(daemon.request, "submit", jobs=JOB))
    assert reply["error"]["code"] == "backlog_full"

    await daemon.acall("resume")
    await daemon.wait_for_status(lambda s: s["jobs"]["queued"] == 0)
    async with client.get("/readyz") as r:
        assert r.status == 200
    async with client.post("/v1/jobs", json=JOB, headers=AUTH) as r:
        assert r.status == 202


async def test_paused_daemon_is_ready(client: aiohttp.ClientSession) -> None:
    """Paused stops attempts, not intake: /readyz stays 200 and jobs are accepted."""
    async with client.get("/status") as r:
        assert (await r.json())["queue"]["paused"] is True
    async with client.get("/readyz") as r:
        assert r.status == 200
    async with client.post("/v1/jobs", json=JOB, headers=AUTH) as r:
        assert r.status == 202


async def test_list_filters_and_pages(client: aiohttp.ClientSession) -> None:
    """GET /v1/jobs: newest first, filters, `limit` and the `before` cursor; bad
    parameters get 400 naming them."""
    async with client.post("/v1/jobs", json=[JOB] * 5, headers=AUTH) as r:
        ids = (await r.json())["ids"]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params = {"limit": "2", **({"before": cursor} if cursor else {})}
        async with client.get("/v1/jobs", params=params, headers=AUTH) as r:
            assert r.status == 200
            page = await r.json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_before"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    filters = {"state": "queued", "analyzer": "summarize", "limit": "10"}
    async with client.get("/v1/jobs", params=filters, headers=AUTH) as r:
        assert len((await r.json())["jobs"]) == 5
    async with client.get("/v1/jobs", params={"state": "failed"}, headers=AUTH) as r:
        assert (await r.json())["jobs"] == []
    async with client.get("/v1/jobs", params={"limit": "x", "stat": "queued"}, headers=AUTH) as r:
        error = await expect_error(r, 400, "bad_args")
    assert {d["field"] for d in error["details"]} == {"limit", "stat"}
    bad: list[list[tuple[str, str]]] = [[("state", "bogus")], [("limit", "0")]]
    for query in [*bad, [("limit", "1"), ("limit", "2")]]:
        async with client.get("/v1/jobs", params=query, headers=AUTH) as r:
            await expect_error(r, 400, "bad_args")


async def test_next_before_is_null_on_a_full_last_page(client: aiohttp.ClientSession) -> None:
    """A last page that is exactly full has no cursor; one job more gives one, and
    following it yields that last job with no cursor."""

    async def page(**params: str) -> tuple[list[str], str | None]:
        async with client.get("/v1/jobs", params={"limit": "2", **params}, headers=AUTH) as r:
            assert r.status == 200
            body = await r.json()
        return [job["id"] for job in body["jobs"]], body["next_before"]

    async with client.post("/v1/jobs", json=[JOB] * 2, headers=AUTH) as r:
        ids = (await r.json())["ids"]
    assert await page() == (sorted(ids, reverse=True), None)
    async with client.post("/v1/jobs", json=JOB, headers=AUTH) as r:
        ids += (await r.json())["ids"]
    newest = sorted(ids, reverse=True)
    assert await page() == (newest[:2], newest[1])
    assert await page(before=newest[1]) == (newest[2:], None)


async def test_bad_list_values_name_the_field(client: aiohttp.ClientSession) -> None:
    """A value the command refuses gets 400 with field details, as an unknown
    parameter does."""
    for query, field in (("limit=0", "limit"), ("limit=10001", "limit"), ("state=weird", "state")):
        async with client.get(f"/v1/jobs?{query}", headers=AUTH) as r:
            error = await expect_error(r, 400, "bad_args")
        assert [(d["index"], d["field"]) for d in error["details"]] == [(None, field)], query
        assert error["details"][0]["message"] and field in error["message"]


async def test_show_and_cancel(client: aiohttp.ClientSession) -> None:
    """GET and DELETE /v1/jobs/{id}: the job, its cancel, 409 when already over, 404
    for an unknown id."""
    async with client.post("/v1/jobs", json=JOB, headers=AUTH) as r:
        (job_id,) = (await r.json())["ids"]
    async with client.delete(f"/v1/jobs/{job_id}", headers=AUTH) as r:
        assert (r.status, await r.json()) == (
            200,
            {"id": job_id, "was": "queued", "state": "canceled"},
        )
    async with client.get(f"/v1/jobs/{job_id}", headers=AUTH) as r:
        assert (await r.json())["job"]["state"] == "canceled"
    async with client.delete(f"/v1/jobs/{job_id}", headers=AUTH) as r:
        await expect_error(r, 409, "invalid_state")
    for method in ("GET", "DELETE"):
        async with client.request(method, "/v1/jobs/no-such-job", headers=AUTH) as r:
            await expect_error(r, 404, "not_found")


async def test_unknown_routes_and_methods(client: aiohttp.ClientSession) -> None:
    """404 and 405 come in the shared error shape; 405 names the allowed methods."""
    async with client.get("/nope") as r:
        await expect_error(r, 404, "not_found")
    async with client.get("/v1/nope", headers=AUTH) as r:
        await expect_error(r, 404, "not_found")
    async with client.put("/v1/jobs", headers=AUTH) as r:
        await expect_error(r, 405, "method_not_allowed")
        assert "POST" in r.headers["Allow"]
    async with client.post("/status") as r:
        await expect_error(r, 405, "method_not_allowed")


async def test_draining_daemon_refuses_work_with_503(start_daemon: StartDaemon) -> None:
    """After SIGTERM, while a hung attempt holds the drain open, /readyz says why and
    submits get 503 intake_closed."""
    proc = start_daemon(http_config(hang_rate=1.0, grace_s=60.0))
    url = await anyio.to_thread.run_sync(proc.http_url)
    await proc.acall("submit", jobs=JOB)
    await proc.wait_for_status(lambda s: s["jobs"]["running"] > 0)
    async with aiohttp.ClientSession(url) as session:
        proc.proc.terminate()
        with anyio.fail_after(WAIT_S):
            while True:
                async with session.get("/readyz") as r:
                    if r.status == 503:
                        ready = await r.json()
                        break
                await anyio.sleep(0.05)
        assert any("shutting down" in reason for reason in ready["reasons"])
        async with session.post("/v1/jobs", json=JOB) as r:
            await expect_error(r, 503, "intake_closed")
        async with session.get("/status") as r:
            assert (await r.json())["state"] == "stopping"


def test_http_off_publishes_nothing(start_daemon: StartDaemon) -> None:
    """With http.listen = "" no server starts and status has no http section."""
    proc = start_daemon(sim_config())
    assert "http" not in proc.call("status")


def test_address_in_use_fails_startup(start_daemon: StartDaemon) -> None:
    """A taken http.listen address stops startup with exit 1 and a message naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:  # the control socket comes up first, so `start` may see the daemon briefly
            proc = start_daemon(sim_config(http_listen=f"127.0.0.1:{port}"))
        except RuntimeError as exc:
            message = str(exc)
            assert "exited with 1" in message
        else:
            assert proc.proc.wait(WAIT_S) == 1
            message = proc.log()
    assert f"cannot listen on 127.0.0.1:{port} (http.listen)" in message


async def test_bulk_routes_take_a_filter_and_need_the_token(
    daemon: DaemonProcess, client: aiohttp.ClientSession
) -> None:
    """POST /v1/jobs:cancel|retry|purge: token-guarded; a filter body (the CLI's time
    forms too) answers matched/changed/by_state/sample; a dry run changes nothing;
    no filter is refused (400 filter_required) unless "all"; a bad field is named."""
    other = {"analyzer": "classify", "input": {"text": "t", "audience": "a"}}
    async with client.post("/v1/jobs", json=[JOB, JOB, other], headers=AUTH) as r:
        ids = (await r.json())["ids"]
    async with client.post("/v1/jobs:cancel", json={"analyzer": "summarize"}) as r:
        await expect_error(r, 401, "unauthorized")
    body = {"analyzer": "summarize", "since": "1h", "dry_run": True}
    async with client.post("/v1/jobs:cancel", json=body, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        dry = await r.json()
    assert (dry["matched"], dry["changed"], dry["sample"]) == (2, 0, ids[:2])
    async with client.post("/v1/jobs:cancel", json={**body, "dry_run": False}, headers=AUTH) as r:
        done = await r.json()
    assert (done["changed"], done["by_state"]) == (2, {"queued": 2, "running": 0})
    async with client.post("/v1/jobs:purge", headers=AUTH) as r:
        refused = await expect_error(r, 400, "filter_required")
    assert refused["details"]["matched"] == 2
    for bad, field in (({"color": "red"}, "color"), ({"since": "soon"}, "since")):
        async with client.post("/v1/jobs:purge", json=bad, headers=AUTH) as r:
            error = await expect_error(r, 400, "bad_args")
        assert field in error["message"], error
    async with client.post("/v1/jobs:purge", json=[1], headers=AUTH) as r:
        await expect_error(r, 400, "bad_request")
    async with client.post("/v1/jobs:retry", json={"state": "canceled"}, headers=AUTH) as r:
        assert (await r.json())["changed"] == 2
    async with client.post("/v1/jobs:cancel", json={"all": True}, headers=AUTH) as r:
        assert (await r.json())["by_state"]["queued"] == 3
    async with client.post("/v1/jobs:purge", json={"all": True}, headers=AUTH) as r:
        assert (await r.json())["deleted"] == 3
    assert (await daemon.acall("status"))["jobs"]["canceled"] == 0


async def test_idempotency_conflict_gets_409(client: aiohttp.ClientSession) -> None:
    """A reused idempotency key with another input: 409 idempotency_conflict naming the
    key and the first job; the same job again still answers 202 with the first id."""
    job = {**JOB, "idempotency_key": "order-7"}
    async with client.post("/v1/jobs", json=job, headers=AUTH) as r:
        (first,) = (await r.json())["ids"]
    async with client.post("/v1/jobs", json=job, headers=AUTH) as r:
        assert (r.status, (await r.json())["ids"]) == (202, [first])
    changed = {**job, "input": {"text": "other"}}
    async with client.post("/v1/jobs", json=changed, headers=AUTH) as r:
        error = await expect_error(r, 409, "idempotency_conflict")
    assert error["details"] == {"key": "order-7", "id": first}


async def test_metadata_filters_and_one_job_by_ids(client: aiohttp.ClientSession) -> None:
    """Jobs carry tags, batch and not_before over HTTP; GET /v1/jobs filters by tag,
    batch and q (text in the id, any case; no total); bulk bodies take tag, batch and
    ids, so one job is canceled and retried by `{"ids": [ID]}`; bad values are 400s
    naming the field."""
    jobs = [
        {**JOB, "tags": ["red"], "batch": "b1", "not_before": "+1h"},
        {**JOB, "batch": "b1"},
        {**JOB, "tags": ["red", "blue"]},
    ]
    async with client.post("/v1/jobs", json=jobs, headers=AUTH) as r:
        assert r.status == 202, await r.text()
        ids = (await r.json())["ids"]
    async with client.get(f"/v1/jobs/{ids[0]}", headers=AUTH) as r:
        job = (await r.json())["job"]
    assert (job["tags"], job["batch"]) == (["red"], "b1") and job["not_before"] > 0

    async def listed(**params: str) -> tuple[list[str], int | None]:
        async with client.get("/v1/jobs", params=params, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        return [j["id"] for j in body["jobs"]], body["total"]

    assert await listed(tag="red") == ([ids[2], ids[0]], 2)
    assert await listed(batch="b1", tag="red") == ([ids[0]], 1)
    assert await listed(q=ids[1][-8:].upper(), limit="5") == ([ids[1]], None)
    async with client.get("/v1/jobs", params={"batch": "a b"}, headers=AUTH) as r:
        error = await expect_error(r, 400, "bad_args")
    assert error["details"][0]["field"] == "batch"
    async with client.post("/v1/jobs:cancel", json={"ids": [ids[1]]}, headers=AUTH) as r:
        assert (await r.json())["changed"] == 1
    async with client.post("/v1/jobs:retry", json={"ids": [ids[1]]}, headers=AUTH) as r:
        assert (await r.json())["changed"] == 1
    body = {"tag": "blue", "batch": "b1", "dry_run": True}
    async with client.post("/v1/jobs:cancel", json=body, headers=AUTH) as r:
        assert (await r.json())["matched"] == 0
    async with client.post("/v1/jobs:cancel", json={"ids": ["x"] * 1001}, headers=AUTH) as r:
        error = await expect_error(r, 400, "bad_args")
    assert error["details"][0]["field"] == "ids"
    bad = {**JOB, "tags": ["ok"] * 9}
    async with client.post("/v1/jobs", json=[JOB, bad], headers=AUTH) as r:
        error = await expect_error(r, 400, "invalid_job")
    assert [(d["index"], d["field"]) for d in error["details"]] == [(1, "tags")]
    async with client.post("/v1/jobs", json={**JOB, "not_before": "soon"}, headers=AUTH) as r:
        error = await expect_error(r, 400, "invalid_job")
    assert error["details"][0]["field"] == "not_before"
