"""The status page's job browser (issue #17) in headless Chromium, against a real daemon
with the simulated API: recent failures, the filterable and paged job list, a job's
view (input, attempts, answer, result, usage), cancel and retry through its buttons,
and the bearer token, asked for when the daemon has one and kept in the tab only.

Chromium is driven over the DevTools protocol (aiohttp's WebSocket client): clicks
and typing are real input events, and the page runs under the CSP the daemon serves
(a violation or an uncaught exception fails the test)."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream

from tests.daemon_proc import DaemonProcess, sim_config
from tests.test_status_page import CHROMIUM, StartDaemon

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed"),
]

TOKEN = "page-token-5f1c0e7a9b"
OK_JOB = {"analyzer": "summarize", "input": {"text": "hello"}}
BAD_JOB = {"analyzer": "strict", "input": {"text": "rate me"}}
# An analyzer whose answers always lack the required key: its jobs fail at once
# (OutputInvalid, not retried), keeping the model's answer on the attempt.
STRICT = """
[analyzers.strict]
provider = "sim"
model = "sim-small"
prompt = "Rate {text}"
output = "json"
required_keys = ["no_such_key"]
max_attempts = 3
"""
WAIT_S = 20.0
DASH = "\u2013"  # the page's "none" and ranges


class PageError(AssertionError):
    """The page threw, or Chromium reported a CSP violation or a failed evaluation."""


class Page:
    """One Chromium tab over the DevTools protocol: evaluate, wait, click, type."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, MemoryObjectSendStream[dict[str, Any]]] = {}
        self.problems: list[str] = []  # exceptions and CSP violations seen so far

    async def read(self) -> None:
        """Route answers to their callers; keep the events that mean the page broke."""
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                sender = self._waiting.pop(data["id"], None)
                with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    if sender is not None:  # (its caller may have given up)
                        sender.send_nowait(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.problems.append(details.get("exception", {}).get("description", str(details)))
            elif data.get("method") == "Log.entryAdded":
                entry = data["params"]["entry"]
                if entry.get("source") in (
                    "security",
                    "violation",
                ) or "Content Security" in entry.get("text", ""):
                    self.problems.append(entry["text"])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result."""
        call_id = next(self._ids)
        sender, receiver = anyio.create_memory_object_stream[dict[str, Any]](1)
        self._waiting[call_id] = sender
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        with anyio.fail_after(WAIT_S), receiver, sender:
            answer = await receiver.receive()
        if "error" in answer:
            raise PageError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise PageError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        """Open `url` and wait until the page has loaded the status, the failures and the
        first page of jobs (so no section moves the others afterwards)."""
        await self.send("Page.navigate", url=url)
        await self.wait(
            "document.readyState === 'complete' && location.href !== 'about:blank'"
            " && /^updated /.test(document.querySelector('#updated')?.textContent)"
            " && ['#failures-note', '#jobs-note'].every("
            "(id) => document.querySelector(id).textContent !== 'loading…')",
            "the page loaded",
        )

    async def wait(self, expression: str, what: str = "") -> Any:
        """Poll until `expression` is truthy (bounded); its value."""
        with anyio.move_on_after(WAIT_S):
            while not (value := await self.eval(expression)):  # noqa: ASYNC110  (the page's state)
                await anyio.sleep(0.05)
            self.check()
            return value
        body = await self.eval("document.body.innerText")
        raise AssertionError(f"not within {WAIT_S} s: {what or expression}\n{body[:4000]}")

    def check(self) -> None:
        """No exception thrown and no CSP violation so far."""
        if self.problems:
            raise PageError("; ".join(self.problems))

    async def click(self, selector: str) -> None:
        """A real mouse click at the middle of the (visible) element."""
        box = await self.wait(
            f"""(() => {{
              const e = document.querySelector({json.dumps(selector)});
              if (!e || !e.getClientRects().length || e.disabled) return null;
              e.scrollIntoView({{block: "center"}});
              const r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
              return e.contains(document.elementFromPoint(x, y)) ? [x, y] : null;
            }})()""",
            f"{selector} visible and enabled",
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    async def type(self, selector: str, text: str) -> None:
        """Focus a text box, clear it, and type `text` as keyboard input."""
        await self.click(selector)
        await self.eval(f"document.querySelector({json.dumps(selector)}).select()")
        if text:
            await self.send("Input.insertText", text=text)
        else:
            await self.send(
                "Input.dispatchKeyEvent", type="keyDown", key="Backspace", windowsVirtualKeyCode=8
            )
            await self.send("Input.dispatchKeyEvent", type="keyUp", key="Backspace")

    async def choose(self, selector: str, value: str) -> None:
        """Pick an option of a <select>, as a user's choice does (a change event)."""
        await self.eval(
            f"""(() => {{
              const s = document.querySelector({json.dumps(selector)});
              s.value = {json.dumps(value)};
              s.dispatchEvent(new Event("change", {{bubbles: true}}));
            }})()"""
        )

    async def text(self, selector: str) -> str:
        """An element's text ("" when absent)."""
        value = await self.eval(f"document.querySelector({json.dumps(selector)})?.textContent")
        return str(value or "")

    async def rows(self, tbody: str) -> list[list[str]]:
        """The cells' text of each row of a table body."""
        rows: list[list[str]] = await self.eval(
            f"[...document.querySelectorAll('#{tbody} > tr')]"
            ".map((tr) => [...tr.cells].map((td) => td.textContent))"
        )
        return rows

    async def visible(self, selector: str) -> bool:
        """Whether the element is rendered (not hidden)."""
        return bool(
            await self.eval(
                f"!!document.querySelector({json.dumps(selector)})?.getClientRects().length"
            )
        )


@asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab; killed on the way out."""
    profile = tmp_path / "chromium-cdp"
    process = await anyio.open_process(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
    )
    try:
        port_file = profile / "DevToolsActivePort"
        with anyio.fail_after(60):
            while len(lines := _lines(port_file)) < 2:  # noqa: ASYNC110  (a file Chromium writes)
                await anyio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{lines[0]}/json/list") as r:
                targets = await r.json()
            tab = next(t for t in targets if t["type"] == "page")
            async with (
                http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws,
                anyio.create_task_group() as tg,
            ):
                page = Page(ws)
                tg.start_soon(page.read)
                for domain in ("Page", "Runtime", "Log"):
                    await page.send(f"{domain}.enable")
                yield page
                page.check()
                tg.cancel_scope.cancel()
    finally:
        process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


def _lines(path: Path) -> list[str]:
    """The words of a file Chromium may still be writing ([] before it exists)."""
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def daemon(start_daemon: StartDaemon, *, token: str | None = None) -> DaemonProcess:
    """A daemon with HTTP on a free port, the simulated API and the failing `strict`
    analyzer; with `token`, VIGIL_HTTP_TOKEN is set."""
    env = {"VIGIL_HTTP_TOKEN": token} if token else None
    return start_daemon(sim_config(http_listen="127.0.0.1:0", extra=STRICT), env=env)


async def submit(proc: DaemonProcess, *jobs: dict[str, Any]) -> list[str]:
    """Submit over the socket; the new ids."""
    ids: list[str] = (await proc.acall("submit", jobs=list(jobs)))["ids"]
    return ids


async def settle(proc: DaemonProcess) -> None:
    """Until nothing is queued or running."""
    await proc.wait_for_status(lambda s: s["jobs"]["queued"] + s["jobs"]["running"] == 0)


async def job_state(proc: DaemonProcess, job_id: str) -> str:
    """The job's state as the daemon has it (over the socket)."""
    state: str = (await proc.acall("show", id=job_id))["job"]["state"]
    return state


async def test_failures_list_shows_a_failed_job(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A failed job is in the recent failures (analyzer, error, message, attempts); a
    succeeded one is not, and a click on the row opens the job."""
    proc = daemon(start_daemon)
    ok_id, bad_id = await submit(proc, OK_JOB, BAD_JOB)
    await settle(proc)
    async with chromium(tmp_path) as page:
        await page.goto(proc.http_url() + "/")
        await page.wait("document.querySelectorAll('#failures-rows > tr').length === 1")
        [row] = await page.rows("failures-rows")
        assert row[0] == bad_id and row[1] == "strict" and row[2] == "OutputInvalid", row
        assert "no_such_key" in row[3] and row[4].endswith(" ago") and row[5] == "1 / 3", row
        assert ok_id not in await page.text("#failures-rows")
        assert await page.text("#failures-note") == "the last 1 of 1 failed jobs, newest first"
        await page.click("#failures-rows > tr:first-child > td:nth-child(4)")
        await page.wait(f"location.hash === '#job={bad_id}'")
        await page.wait("document.querySelector('#job-state').textContent === 'failed'")
        # A job that fails later shows up without a reload (the page follows /status).
        [later_id] = await submit(proc, BAD_JOB)
        await page.wait("document.querySelectorAll('#failures-rows > tr').length === 2")
        assert (await page.rows("failures-rows"))[0][0] == later_id  # newest first


async def test_job_list_filters_by_state_and_id_text(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The list shows every job; the state select and the id text narrow it; the
    analyzer box filters on the name; older and newer page through 50 at a time."""
    proc = daemon(start_daemon)
    ok_ids = await submit(proc, *[OK_JOB] * 54)
    bad_ids = await submit(proc, BAD_JOB, BAD_JOB)
    await settle(proc)
    newest_first = [*reversed(bad_ids), *reversed(ok_ids)]
    async with chromium(tmp_path) as page:
        await page.goto(proc.http_url() + "/")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 50")
        rows = await page.rows("jobs-rows")
        assert [r[0] for r in rows] == newest_first[:50]
        assert rows[0][1:4] == ["strict", "failed", "1 / 3"] and rows[0][5] == "OutputInvalid"
        assert rows[2][1:4] == ["summarize", "succeeded", "1 / 5"] and rows[2][5] == ""
        assert await page.text("#jobs-note") == f"jobs 1{DASH}50 of 56, newest first"

        await page.click("#jobs-older")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 6")
        assert [r[0] for r in await page.rows("jobs-rows")] == newest_first[50:]
        assert await page.text("#jobs-note") == f"jobs 51{DASH}56 of 56, newest first"
        assert await page.eval("document.querySelector('#jobs-older').disabled")
        await page.click("#jobs-newer")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 50")

        await page.choose("#filter-state", "failed")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 2")
        assert [r[0] for r in await page.rows("jobs-rows")] == list(reversed(bad_ids))
        assert await page.text("#jobs-note") == f"jobs 1{DASH}2 of 2, newest first"
        await page.choose("#filter-state", "")
        await page.type("#filter-analyzer", "strict")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 2")
        await page.type("#filter-analyzer", "")

        # Text in the id: the random tail of one id matches that job alone.
        target = ok_ids[7]
        await page.type("#filter-q", target[-10:])
        await page.wait(
            "document.querySelectorAll('#jobs-rows > tr').length === 1", "one job matches the text"
        )
        assert [r[0] for r in await page.rows("jobs-rows")] == [target]
        await page.type("#filter-q", "no-such-id-text")
        await page.wait("document.querySelector('#jobs-note').textContent === 'no jobs match'")


async def test_job_list_filters_by_tag_and_batch(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """The tag and batch boxes narrow the list to those jobs; their view names both."""
    proc = daemon(start_daemon)
    nightly = {**OK_JOB, "tags": ["nightly", "eu"], "batch": "run-7"}
    [plain_id] = await submit(proc, OK_JOB)
    tagged = await submit(proc, nightly, {**nightly, "batch": "run-8"})
    await settle(proc)
    async with chromium(tmp_path) as page:
        await page.goto(proc.http_url() + "/")
        assert len(await page.rows("jobs-rows")) == 3
        await page.type("#filter-tag", "nightly")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 2")
        assert [r[0] for r in await page.rows("jobs-rows")] == list(reversed(tagged))
        await page.type("#filter-batch", "run-7")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 1")
        assert [r[0] for r in await page.rows("jobs-rows")] == [tagged[0]]
        await page.type("#filter-tag", "")
        await page.type("#filter-batch", "")
        await page.wait("document.querySelectorAll('#jobs-rows > tr').length === 3")
        assert plain_id in await page.text("#jobs-rows")
        await page.click(f'#jobs-rows > tr[data-id="{tagged[0]}"] a')
        await page.wait("document.querySelector('#job-state').textContent === 'succeeded'")
        fields = await page.text("#job-fields")
        assert "tagseu, nightly" in fields and "batchrun-7" in fields, fields


async def test_job_view_shows_input_attempts_and_result(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A click on a row opens the job: input as JSON, each attempt, the result, usage;
    `#job=ID` in the URL opens a failed one with its attempt's answer; text from a job
    is shown as text, never run as markup."""
    proc = daemon(start_daemon)
    markup = '<img src=x id="injected"><script>window.pwned = 1</script>'
    ok_id, bad_id = await submit(
        proc, {"analyzer": "summarize", "input": {"text": markup, "n": [1, 2]}}, BAD_JOB
    )
    await settle(proc)
    shown = await proc.acall("show", id=ok_id)
    async with chromium(tmp_path) as page:
        await page.goto(proc.http_url() + "/")
        await page.wait(f"!!document.querySelector('#jobs-rows > tr[data-id=\"{ok_id}\"]')")
        await page.click(f'#jobs-rows > tr[data-id="{ok_id}"] > td:nth-child(2)')
        await page.wait("document.querySelector('#job-state').textContent === 'succeeded'")
        assert await page.text("#job-id") == ok_id
        assert json.loads(await page.text("#job-input")) == {"text": markup, "n": [1, 2]}
        assert "\n  " in await page.text("#job-input")  # pretty-printed
        assert await page.eval("document.querySelector('#injected') === null && !window.pwned")
        [attempt] = await page.rows("job-attempts")
        usage = shown["attempts"][0]["usage"]
        assert attempt[0] == "1" and attempt[2:4] == ["succeeded", "200"], attempt
        assert attempt[4].endswith(" ms") and attempt[5] == (
            f"{usage['prompt_tokens']} / {usage['completion_tokens']}"
        )
        assert await page.text("#job-result") == shown["job"]["result"]
        assert f"out {usage['completion_tokens']}" in await page.text("#job-usage")
        fields = await page.text("#job-fields")
        assert "analyzersummarize" in fields and "sourcesocket" in fields
        assert not await page.visible("#job-cancel") and not await page.visible("#job-retry")

        await page.goto(f"{proc.http_url()}/#job={bad_id}")
        await page.wait("document.querySelector('#job-state').textContent === 'failed'")
        rows = await page.rows("job-attempts")
        assert rows[0][2] == "error" and rows[0][7].startswith("OutputInvalid: "), rows
        assert rows[1][0].startswith("attempt 1 answered:"), rows  # the model's answer
        assert await page.text("#job-result") == DASH  # none
        assert "errorOutputInvalid: " in await page.text("#job-fields")
        assert await page.visible("#job-retry") and not await page.visible("#job-cancel")

        await page.click("#job-close")
        await page.wait("document.querySelector('#job-view').hidden && location.hash === ''")
        await page.goto(f"{proc.http_url()}/#job=nope")
        await page.wait("document.querySelector('#job-note').textContent.includes('nope')")


async def test_cancel_and_retry_through_the_buttons(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With the daemon paused, cancel takes a queued job to canceled and retry puts a
    failed one back in the queue: as the daemon's own state says after each click."""
    proc = daemon(start_daemon)
    [bad_id] = await submit(proc, BAD_JOB)
    await settle(proc)
    await proc.acall("pause")
    [queued_id] = await submit(proc, OK_JOB)
    async with chromium(tmp_path) as page:
        await page.goto(f"{proc.http_url()}/#job={queued_id}")
        await page.wait("document.querySelector('#job-state').textContent === 'queued'")
        assert not await page.visible("#token-section")  # no token configured: none asked for
        await page.click("#job-cancel")
        await page.wait("document.querySelector('#job-state').textContent === 'canceled'")
        assert await page.text("#job-action-note") == "canceled (it was queued)"
        assert await job_state(proc, queued_id) == "canceled"
        assert await page.visible("#job-retry") and not await page.visible("#job-cancel")

        await page.goto(f"{proc.http_url()}/#job={bad_id}")
        await page.wait("document.querySelector('#job-state').textContent === 'failed'")
        await page.click("#job-retry")
        await page.wait(
            "document.querySelector('#job-state').textContent === 'queued'",
            "retried (POST /v1/jobs:retry {ids})",
        )
        assert await page.text("#job-action-note") == "queued again"
        assert await job_state(proc, bad_id) == "queued"
        await proc.acall("resume")  # it runs again (and fails again) in view
        await page.wait("document.querySelectorAll('#job-attempts > tr.answer').length === 2")
        assert await job_state(proc, bad_id) == "failed"


async def test_the_token_is_asked_for_and_kept_in_the_tab_only(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With VIGIL_HTTP_TOKEN set the page asks for the token; a wrong one is refused
    and asked for again; the right one shows the jobs and cancels, and lives in
    sessionStorage only: not in localStorage, a cookie or the URL."""
    proc = daemon(start_daemon, token=TOKEN)
    [bad_id] = await submit(proc, BAD_JOB)
    await settle(proc)
    await proc.acall("pause")
    [queued_id] = await submit(proc, OK_JOB)
    async with chromium(tmp_path) as page:
        await page.goto(f"{proc.http_url()}/#job={queued_id}")
        await page.wait("!document.querySelector('#token-section').hidden", "the token asked for")
        assert "needs its HTTP token" in await page.text("#token-why")
        assert await page.text("#failures-note") == "needs the HTTP token (above)."
        assert not await page.visible("#job-cancel")

        await page.type("#token-input", "wrong-token")
        await page.click("#token-form button[type=submit]")
        await page.wait(
            "document.querySelector('#token-why').textContent.includes('refused')",
            "a wrong token refused",
        )
        assert await page.eval("sessionStorage.length") == 0

        await page.type("#token-input", TOKEN)
        await page.click("#token-form button[type=submit]")
        await page.wait("document.querySelectorAll('#failures-rows > tr').length === 1")
        assert (await page.rows("failures-rows"))[0][0] == bad_id
        await page.wait("document.querySelector('#job-state').textContent === 'queued'")
        assert not await page.visible("#token-section") and await page.visible("#token-held")
        await page.click("#job-cancel")
        await page.wait("document.querySelector('#job-state').textContent === 'canceled'")
        assert await job_state(proc, queued_id) == "canceled"

        stored = await page.eval(
            "({local: localStorage.length, cookie: document.cookie, url: location.href,"
            " session: sessionStorage.getItem('vigil.token'),"
            " field: document.querySelector('#token-input').value})"
        )
        assert stored == {
            "local": 0,
            "cookie": "",
            "url": f"{proc.http_url()}/#job={queued_id}",
            "session": TOKEN,
            "field": "",
        }
        cookies = await page.send("Storage.getCookies")
        assert cookies["cookies"] == []

        await page.click("#token-forget")
        await page.wait("!document.querySelector('#token-section').hidden")
        assert await page.eval("sessionStorage.length") == 0
