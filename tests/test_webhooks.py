"""Webhooks: job ends POSTed from the store's outbox, signed, at-least-once.

End to end with real parts: the daemon as a subprocess on the simulated API, a real
aiohttp receiver on 127.0.0.1 that checks every signature with the README's snippet,
fails a seeded 30 % of deliveries, is down for a while, and a SIGKILL of the daemon
mid-run: every ended job is delivered, repeats carry the same `Vigil-Delivery` id, a
dead-lettered delivery goes out after `vigil webhooks retry`, a redirect is not
followed, the secret shows nowhere. Plus the pieces: the signature, the body, the
config's errors (exit 78 for a missing key)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web

from daemon.config import ConfigError, WebhookConfig, parse_config
from daemon.jobs import ErrorInfo, Job, Usage
from daemon.observe.section_metrics import webhook_metrics
from daemon.reload import _plan, describe
from daemon.store.base import AttemptEnd
from daemon.store.outbox import Delivery, WebhookRoute
from daemon.store.sqlite import Store
from daemon.webhooks.body import render
from daemon.webhooks.endpoint import INTERRUPTED
from daemon.webhooks.sender import WebhookSender
from daemon.webhooks.sign import signature
from daemon.webhooks.urls import display_url
from tests.daemon_proc import DaemonProcess, daemon_config, db_rows, run_cli
from tests.test_metrics import render as families
from tests.test_store import BIG, new_job

StartDaemon = Callable[..., DaemonProcess]
REPO = Path(__file__).parent.parent
SECRET = "whsec-test-5d1c0e9a7b3f4a2e"
ENV = {"VIGIL_WEBHOOK_SECRET": SECRET}
ENDED = ("succeeded", "failed", "canceled")

# The README's verification snippet, run here as written there.
VERIFY = """\
import hashlib, hmac, time


def verify(secret: bytes, header: str, body: bytes, max_age_s: int = 300) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    mac = hmac.new(secret, f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["v1"]) and time.time() - int(fields["t"]) <= max_age_s
"""


def readme_verify() -> Callable[[bytes, str, bytes], bool]:
    namespace: dict[str, Any] = {}
    exec(VERIFY, namespace)
    verify: Callable[[bytes, str, bytes], bool] = namespace["verify"]
    return verify


# --- the pieces -------------------------------------------------------------------------


def test_signature_verifies_with_the_readme_snippet() -> None:
    """The README's five lines accept a signed body and refuse a changed body, another
    key, another timestamp and an old one."""
    verify = readme_verify()
    body = b'{"id":"d1","event":"job.succeeded"}'
    now = int(time.time())
    header = signature(SECRET.encode(), now, body)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET.encode(), header, body)
    assert not verify(SECRET.encode(), header, body + b" ")
    assert not verify(b"another-key-entirely!", header, body)
    assert not verify(SECRET.encode(), header.replace(f"t={now}", f"t={now + 1}"), body)
    old = signature(SECRET.encode(), now - 3600, body)
    assert not verify(SECRET.encode(), old, body)


def test_readme_shows_the_snippet_the_tests_run() -> None:
    """README's webhooks section carries VERIFY verbatim (it is what the tests run)."""
    assert VERIFY.strip() in (REPO / "README.md").read_text()


def _job(**changes: Any) -> Job:
    job = Job(
        id="j1",
        analyzer="summarize",
        input={"text": "secret input"},
        priority=0,
        idempotency_key=None,
        state="succeeded",
        attempts=1,
        max_attempts=5,
        not_before=0.0,
        created_at=1.0,
        started_at=2.0,
        finished_at=3.0,
        result={"summary": "ok"},
        error=None,
        usage=Usage(prompt_tokens=3, completion_tokens=4),
        source="socket",
    )
    return msgspec.structs.replace(job, **changes)


def test_body_is_the_api_view_of_the_job_without_its_input() -> None:
    """The body: delivery id, event, time, job id, and the job as the API shows it,
    input left out; a purged job is null and the event still goes out."""
    delivery = Delivery(
        id="d1", webhook="crm", job_id="j1", event="job.failed", attempts=1, created_at=3.0
    )
    failed = _job(state="failed", result=None, error=ErrorInfo("Boom", "no"))
    body = json.loads(render(delivery, failed))
    assert {k: body[k] for k in ("id", "event", "created_at", "job_id")} == {
        "id": "d1",
        "event": "job.failed",
        "created_at": 3.0,
        "job_id": "j1",
    }
    job = body["job"]
    assert "input" not in job
    assert job["id"] == "j1" and job["state"] == "failed" and job["analyzer"] == "summarize"
    assert job["error"] == {"type": "Boom", "message": "no"}
    assert job["usage"]["prompt_tokens"] == 3 and job["finished_at"] == 3.0
    assert json.loads(render(delivery, None))["job"] is None


def test_status_shows_the_url_without_its_query() -> None:
    """A query, or the path past its first segment, may carry a token (Slack's and
    Discord's do): status and logs show the host and the first segment."""
    assert display_url("https://crm.internal:8443/hooks/vigil?token=abc") == (
        "https://crm.internal:8443/hooks/…?[redacted]"
    )
    assert display_url("https://hooks.slack.com/services/T0/B0/XyZsecret") == (
        "https://hooks.slack.com/services/…"
    )
    assert display_url("http://[::1]/h") == "http://[::1]/h"


def test_a_receivers_words_are_stored_without_control_characters() -> None:
    """PostgreSQL refuses a NUL in text: an answer carrying one must not leave the
    delivery's end unrecordable (it would be sent again and again)."""
    from daemon.webhooks.post import _answer_error

    error = _answer_error(500, b"bad\x00gateway\r\nnext")
    assert error == "HTTP 500: bad gateway next"


def test_metrics_come_from_the_status_section() -> None:
    """Per webhook: pending, dead, oldest pending age (0 when none) and in-flight
    gauges, attempts by outcome, dead-letterings; odd rows give no series."""
    row = {"pending": 7, "dead": 2, "in_flight": 1, "delivered": 30, "failed": 5}
    section = {
        "crm": {**row, "oldest_pending_age_s": 42.5, "dead_lettered": 2},
        "idle": {**row, "oldest_pending_age_s": None, "dead_lettered": 0},
        "odd": "not a row",
    }
    m = families(webhook_metrics(section))
    assert m.value("vigil_webhook_pending", webhook="crm") == 7
    assert m.value("vigil_webhook_dead", webhook="crm") == 2
    assert m.value("vigil_webhook_in_flight", webhook="crm") == 1
    assert m.value("vigil_webhook_oldest_pending_seconds", webhook="crm") == 42.5
    assert m.value("vigil_webhook_oldest_pending_seconds", webhook="idle") == 0
    assert m.value("vigil_webhook_deliveries_total", webhook="crm", outcome="delivered") == 30
    assert m.value("vigil_webhook_deliveries_total", webhook="crm", outcome="failed") == 5
    assert m.value("vigil_webhook_dead_lettered_total", webhook="crm") == 2
    assert m.labels("vigil_webhook_pending") == {"webhook"}
    assert list(webhook_metrics(None))  # families without samples, never an error


BASE = """
[providers.sim]
kind = "simulated"

[analyzers.summarize]
provider = "sim"
model = "m"
prompt = "Summarize {text}"
"""


def test_the_example_in_vigil_toml_parses() -> None:
    """config/vigil.toml's commented [webhooks.crm] is valid as written."""
    lines = (REPO / "config" / "vigil.toml").read_text().splitlines()
    start = lines.index("# [webhooks.crm]")
    block = [line.removeprefix("# ") for line in lines[start:] if line.startswith("# ")]
    config = parse_config(f"{BASE}\n" + "\n".join(block) + "\n")
    crm = config.webhooks["crm"]
    assert crm.url == "https://crm.internal/hooks/vigil" and crm.events == [
        "job.succeeded",
        "job.failed",
    ]
    assert (crm.timeout_s, crm.max_attempts, crm.max_concurrency) == (10, 20, 8)


def test_reload_names_webhook_changes_without_url_queries() -> None:
    """A reload applies webhook changes live and names each key, like any other; a
    URL shows without its query (a token may be there)."""
    hook = '[webhooks.crm]\nsecret_env = "S"\nurl = "https://crm/{path}?token={token}"\n'
    old = parse_config(BASE + hook.format(path="a", token="old-token"))
    new = parse_config(
        BASE
        + hook.format(path="b", token="new-token")
        + "max_attempts = 5\n"
        + '[webhooks.erp]\nsecret_env = "S"\nurl = "http://erp/h"\n'
    )
    planned, applied, restart = _plan(old, new)
    assert planned == new and applied == ["webhooks"] and restart == []
    changes = {c.key: (c.before, c.to, c.needs_restart) for c in describe(old, new, planned)}
    assert changes["webhooks.crm.url"] == (
        "https://crm/a?[redacted]",
        "https://crm/b?[redacted]",
        False,
    )
    assert changes["webhooks.crm.max_attempts"] == (20, 5, False)
    assert changes["webhooks.erp"][0] is None and changes["webhooks.erp"][2] is False
    assert "token" not in repr(changes)


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ('url = "ftp://crm/h"', "$.webhooks.crm.url: must start with http:// or https://"),
        ('url = "https:///h"', "$.webhooks.crm.url: needs a host"),
        ('url = "https://u:pw@crm/h"', "$.webhooks.crm.url: credentials in the URL"),
        ('url = "https://crm:99999/h"', "$.webhooks.crm.url: not a valid URL"),
        (
            'url = "https://crm/h"\nevents = ["job.done"]',
            '$.webhooks.crm.events: unknown event "job.done"; expected some of '
            '"job.succeeded", "job.failed", "job.canceled"',
        ),
        ('url = "https://crm/h"\nevents = []', "$.webhooks.crm.events"),
        (
            'url = "https://crm/h"\nanalyzers = ["triage"]',
            "$.webhooks.crm.analyzers: no analyzer named 'triage' (known: summarize)",
        ),
        ('url = "https://crm/h"\nmax_attempt = 3', 'did you mean "max_attempts"?'),
        ('url = "https://crm/h"\nmax_concurrency = 0', "$.webhooks.crm.max_concurrency"),
    ],
)
def test_config_errors_name_the_key(hook: str, expected: str) -> None:
    """Each bad webhook setting is refused with its key path and why."""
    text = f'{BASE}\n[webhooks.crm]\nsecret_env = "VIGIL_WEBHOOK_SECRET"\n{hook}\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert expected in str(caught.value)


def test_a_missing_or_short_secret_refuses_to_start_with_exit_78(tmp_path: Path) -> None:
    """`vigil run` and `check-config` exit 78 naming the variable, never its value."""
    config = tmp_path / "vigil.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n{BASE}\n[webhooks.crm]\n'
        'url = "http://127.0.0.1:9/h"\nsecret_env = "VIGIL_WEBHOOK_SECRET"\n'
    )
    missing = run_cli("run", "--config", str(config), env={"VIGIL_WEBHOOK_SECRET": ""})
    assert missing.returncode == 78, missing.stderr
    assert "$.webhooks.crm.secret_env: $VIGIL_WEBHOOK_SECRET" in missing.stderr
    assert "not set or empty" in missing.stderr
    short = run_cli("check-config", str(config), env={"VIGIL_WEBHOOK_SECRET": "tiny-key"})
    assert short.returncode == 78, short.stderr
    assert "shorter than 16" in short.stderr and "tiny-key" not in short.stderr
    good = run_cli("check-config", str(config), env=ENV)
    assert good.returncode == 0 and "1 webhook(s)" in good.stdout, good.stderr


@pytest.mark.anyio
async def test_shutdown_cuts_off_a_hanging_post_and_gives_the_delivery_back(
    tmp_path: Path,
) -> None:
    """A receiver that never answers does not hold the sender up: cancelled, it stops
    at once, and the delivery it was sending is due again (sent first after a restart)
    rather than waiting for its claim to lapse."""
    got, release = anyio.Event(), anyio.Event()

    async def hang(request: web.Request) -> web.Response:
        got.set()
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/slow", hang)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/slow"
    try:
        async with Store(tmp_path / "vigil.db", synchronous="NORMAL") as store:
            await store.sync_webhooks([WebhookRoute("slow", ("job.succeeded",), ())])
            [submitted] = await store.submit([new_job(max_attempts=1)], max_backlog=BIG)
            [job] = await store.claim(1)
            await store.finish(job, AttemptEnd(outcome="succeeded", result="ok", latency_ms=1))
            hook = WebhookConfig(url=url, secret_env="X", timeout_s=60)
            sender = WebhookSender(store, {"slow": hook}, {"slow": SECRET.encode()})
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    await tg.start(sender.run)
                    await got.wait()
                    assert sender.status()["slow"]["in_flight"] == 1
                    tg.cancel_scope.cancel()
            [(job_id, state, last_error, next_at)] = db_rows(
                tmp_path / "vigil.db", "SELECT job_id, state, last_error, next_at FROM deliveries"
            )
            assert (job_id, state, last_error) == (submitted.id, "pending", INTERRUPTED)
            assert next_at <= time.time()
    finally:
        release.set()
        await runner.cleanup()


# --- end to end -------------------------------------------------------------------------


@dataclass
class Seen:
    """One request the receiver got."""

    path: str
    query: str
    delivery: str
    event: str
    job_id: str
    signed: bool  # the signature checked out
    consistent: bool  # headers and body agree
    accepted: bool = False


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: every signature checked with the README's
    snippet; /hook fails a seeded 30 %; /strict fails until opened; /redirect answers
    302. `down()` closes its socket and its connections; `up()` listens again on the
    same port."""

    fail_rate: float = 0.3
    strict_open: bool = False
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(15))
    _verify: Callable[[bytes, str, bytes], bool] = field(default_factory=readme_verify)
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None

    def accepted(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path and s.accepted]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = json.loads(body)
        seen = Seen(
            path=request.path,
            query=request.query_string,
            delivery=request.headers.get("Vigil-Delivery", ""),
            event=request.headers.get("Vigil-Event", ""),
            job_id=payload["job_id"],
            signed=self._verify(SECRET.encode(), request.headers["Vigil-Signature"], body),
            consistent=(
                payload["id"] == request.headers.get("Vigil-Delivery")
                and payload["event"] == request.headers.get("Vigil-Event")
                and request.content_type == "application/json"
                and request.headers.get("User-Agent", "").startswith("vigil/")
                and (payload["job"] is None or "input" not in payload["job"])
                and (payload["job"] is None or f"job.{payload['job']['state']}" == payload["event"])
            ),
        )
        self.seen.append(seen)
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": "/hook?redirected=1"})
        if request.path == "/hook" and self._rng.random() < self.fail_rate:
            return web.Response(status=500, text="try again later")
        if request.path == "/strict" and not self.strict_open:
            return web.Response(status=503, text="closed")
        seen.accepted = True
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self.up()

    async def up(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.port = self._runner.addresses[0][1]  # the one site listening

    async def down(self) -> None:
        assert self._runner is not None and self._site is not None
        await self._site.stop()
        server = self._runner.server
        assert server is not None
        for connection in server.connections:
            connection.force_close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def hooks_config(
    port: int, *, removed: bool = False, secret_env: str = "VIGIL_WEBHOOK_SECRET"
) -> str:
    """The simulated API (slow enough for a kill to land mid-run), three analyzers
    (`broken` always fails), and three webhooks on the receiver."""
    url = f"http://127.0.0.1:{port}"
    fast = "timeout_s = 2\nbackoff_base_s = 0.05\nbackoff_max_s = 0.5\n"
    moved = (
        ""
        if removed
        else f'[webhooks.moved]\nurl = "{url}/redirect"\nsecret_env = "{secret_env}"\n'
        f'analyzers = ["classify"]\nmax_attempts = 2\n{fast}'
    )
    sections = f"""
[providers.sim]
kind = "simulated"
max_concurrency = 16

[providers.sim.simulate]
latency_ms = 150
latency_sigma = 0.2
error_rate = 0.2
seed = 3

[analyzers.summarize]
provider = "sim"
model = "sim-small"
prompt = "Summarize:\\n\\n{{text}}"
max_tokens = 40
max_attempts = 2

[analyzers.classify]
provider = "sim"
model = "sim-small"
prompt = "Classify {{text}}"
output = "json"
required_keys = ["sentiment"]
max_attempts = 2

[analyzers.broken]
provider = "sim"
model = "sim-small"
prompt = "Classify {{text}}"
output = "json"
required_keys = ["no_such_key"]
max_attempts = 1

[webhooks.crm]
url = "{url}/hook"
secret_env = "{secret_env}"
max_attempts = 20
max_concurrency = 4
{fast}
[webhooks.strict]
url = "{url}/strict"
secret_env = "{secret_env}"
events = ["job.succeeded"]
analyzers = ["classify"]
max_attempts = 1
{fast}
{moved}"""
    return daemon_config(sections, max_concurrency=4)


def jobs(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Mostly summaries, every fifth a classification, every tenth broken."""
    out = []
    for i in range(start, start + n):
        analyzer = "broken" if i % 10 == 9 else "classify" if i % 5 == 0 else "summarize"
        out.append({"analyzer": analyzer, "input": {"text": f"document {i} " * 5}})
    return out


def ended(proc: DaemonProcess, analyzer: str | None = None, state: str | None = None) -> set[str]:
    rows = db_rows(
        proc.state_dir / "vigil.db",
        "SELECT id FROM jobs WHERE state IN (?, ?, ?) AND analyzer = coalesce(?, analyzer) "
        "AND state = coalesce(?, state)",
        (*ENDED, analyzer, state),
    )
    return {row[0] for row in rows}


def webhooks(proc: DaemonProcess) -> dict[str, dict[str, Any]]:
    """`webhooks` over the socket, by name (counts read from the store now)."""
    return {hook["name"]: hook for hook in proc.call("webhooks")["webhooks"]}


async def until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll `check` on a worker thread (it calls the daemon and reads its database),
    so the receiver in this loop keeps answering; bounded."""
    try:
        with anyio.fail_after(timeout_s):
            while True:
                if await anyio.to_thread.run_sync(check):
                    return
                await anyio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not reached in {timeout_s} s: {what}") from None


async def cli(*args: str, proc: DaemonProcess) -> Any:
    return await anyio.to_thread.run_sync(
        lambda: run_cli(*args, socket_path=proc.socket_path, env=ENV)
    )


@pytest.mark.anyio
async def test_every_ended_job_is_delivered_through_failures_an_outage_and_a_sigkill(
    start_daemon: StartDaemon,
) -> None:
    """Through a receiver that fails 30 %, is down for a while, and a SIGKILL of the
    daemon mid-run: each ended job reaches /hook, every signature checks out, repeats
    carry the same delivery id; dead-lettered /strict deliveries go out after `vigil
    webhooks retry`; /redirect is not followed; a reload removes a webhook and refuses a
    missing key; the secret is in no log line and no status."""
    receiver = Receiver()
    await receiver.start()
    try:
        await _run(receiver, start_daemon)
    finally:
        await receiver.close()


async def _run(receiver: Receiver, start_daemon: StartDaemon) -> None:
    proc = await anyio.to_thread.run_sync(
        lambda: start_daemon(hooks_config(receiver.port), env=ENV)
    )
    # Down from the start: job ends pile up in the store, jobs go on finishing.
    await receiver.down()
    await proc.acall("submit", jobs=jobs(60))
    later = await proc.acall(
        "submit", jobs={"analyzer": "summarize", "input": {"text": "x"}, "not_before": "+1h"}
    )
    await proc.acall("cancel", id=later["ids"][0])
    await until(lambda: len(ended(proc)) >= 10, "jobs end while the receiver is down")
    await until(lambda: _failed(proc, "crm"), "the sender met the closed socket", timeout_s=10)
    assert not receiver.accepted("/hook")
    await receiver.up()

    # Mid-run: some delivered, jobs still running. SIGKILL, restart, more jobs.
    await until(lambda: len(receiver.accepted("/hook")) >= 10, "deliveries resume")
    running = (await proc.acall("status"))["jobs"]
    proc.proc.send_signal(signal.SIGKILL)
    await anyio.to_thread.run_sync(proc.proc.wait, 10)
    await anyio.to_thread.run_sync(proc.restart)
    await proc.acall("submit", jobs=jobs(20, start=60))

    # Every ended job delivered to /hook at least once (jobs requeued by the kill end
    # after the restart and count too).
    def all_delivered() -> bool:
        done = ended(proc)
        return len(done) == 81 and done <= {s.job_id for s in receiver.accepted("/hook")}

    await until(all_delivered, "every ended job delivered to /hook", timeout_s=60)
    assert running["queued"] + running["running"] > 0, "the kill came after the run"
    assert {s.job_id for s in receiver.accepted("/hook")} == ended(proc)
    assert ended(proc, state="canceled") == {later["ids"][0]}
    assert ended(proc, analyzer="broken", state="failed")
    assert all(s.signed for s in receiver.seen), "a signature did not check out"
    assert all(s.consistent for s in receiver.seen)
    ids_per_job: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in receiver.seen:
        ids_per_job[(s.path, s.job_id)].add(s.delivery)
    assert all(len(ids) == 1 for ids in ids_per_job.values()), "a repeat with a new id"
    assert len([s for s in receiver.seen if s.path == "/hook" and not s.accepted]) > 5

    # /strict: max_attempts = 1, so every delivery is dead; `retry` sends them again.
    strict_jobs = ended(proc, analyzer="classify", state="succeeded")
    assert strict_jobs and not receiver.accepted("/strict")

    def strict_all_dead() -> bool:
        hook = webhooks(proc)["strict"]
        return bool(hook["dead"] == len(strict_jobs) and hook["pending"] == 0)

    await until(strict_all_dead, "every /strict delivery dead-lettered")
    receiver.strict_open = True
    retried = await cli("webhooks", "retry", "strict", proc=proc)
    assert retried.returncode == 0, retried.stderr
    assert f"strict: {len(strict_jobs)} dead delivery(ies) requeued" in retried.stdout
    await until(
        lambda: {s.job_id for s in receiver.accepted("/strict")} == strict_jobs,
        "the requeued deliveries reach /strict",
    )
    unknown = await cli("webhooks", "retry", "nosuch", proc=proc)
    assert unknown.returncode == 1 and "no webhook named 'nosuch'" in unknown.stderr

    # /redirect: a 302 is a failed attempt; nothing follows it to /hook.
    moved_jobs = ended(proc, analyzer="classify")
    await until(
        lambda: webhooks(proc)["moved"]["dead"] == len(moved_jobs),
        "every /redirect delivery dead-lettered",
    )
    assert any(s.path == "/redirect" for s in receiver.seen)
    assert not [s for s in receiver.seen if s.query], "a redirect was followed"
    dead = [e for e in proc.events() if e.get("event") == "webhook.dead"]
    assert any(
        e["webhook"] == "moved" and "HTTP 302: a redirect, not followed" in e["error"] for e in dead
    )
    assert all(e["delivery_id"] and e["job_id"] for e in dead)

    # The CLI's table and the status section; the secret in neither, nor in the log.
    table = await cli("webhooks", proc=proc)
    assert table.returncode == 0 and "crm" in table.stdout and "moved" in table.stdout
    status = await proc.acall("status")
    crm = status["webhooks"]["crm"]
    assert crm["url"] == f"http://127.0.0.1:{receiver.port}/hook" and crm["delivered"] > 0
    for text in (table.stdout, json.dumps(status), proc.log_path.read_text()):
        assert SECRET not in text

    # Reload: a key variable that is not set is refused; removing a webhook applies.
    proc.config_path.write_text(hooks_config(receiver.port, secret_env="VIGIL_NO_SUCH_KEY"))
    refused = await _reload(proc)
    assert not refused["ok"] and "$VIGIL_NO_SUCH_KEY" in refused["error"]["message"]
    proc.config_path.write_text(hooks_config(receiver.port, removed=True))
    applied = await _reload(proc)
    assert applied["ok"], applied
    assert "webhooks" in applied["data"]["applied"]
    assert {"key": "webhooks.moved", "to": None} in [
        {"key": c["key"], "to": c["to"]} for c in applied["data"]["changes"]
    ]
    assert "moved" not in (await proc.acall("status"))["webhooks"]
    assert await anyio.to_thread.run_sync(proc.terminate) == 0


def _failed(proc: DaemonProcess, name: str) -> bool:
    hook = webhooks(proc)[name]
    return bool(hook["failed"]) and "cannot connect" in (hook["last_error"] or "")


async def _reload(proc: DaemonProcess) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(lambda: proc.request("reload"))


def test_vigil_status_prints_a_line_per_webhook() -> None:
    """The human status shows each webhook's backlog, and its last error while
    deliveries wait."""
    import io

    from daemon.cli.render import sections

    out = io.StringIO()
    hook = {"pending": 3, "dead": 1, "delivered": 1204, "oldest_pending_age_s": 12.5}
    sections({"webhooks": {"crm": {**hook, "last_status": 500, "last_error": "HTTP 500"}}}, out)
    assert (
        "webhook crm: 3 pending (oldest 12.5 s), 1 dead, 1,204 delivered, last 500: HTTP 500"
        in (out.getvalue())
    )
