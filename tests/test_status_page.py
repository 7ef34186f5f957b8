"""GET /: the status page is served with a strict CSP and, in headless Chromium, shows
what /status reports and `vigil top` shows: job counts, rates from two successive
fetches, each provider's limits and budgets, and the watchdog's headline figures."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from daemon.observe.page import build_page, load_page
from tests.daemon_proc import DaemonProcess, sim_config

StartDaemon = Callable[..., DaemonProcess]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
JOB = {"analyzer": "summarize", "input": {"text": "hello"}}
BUDGETS = "max_concurrency = 16\nrequests_per_minute = 600\ntokens_per_minute = 90000\n"


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


@pytest.mark.anyio
async def test_page_is_served_with_a_strict_csp(start_daemon: StartDaemon) -> None:
    """The page is HTML whose CSP allows its own inline script and style by hash only."""
    proc = start_daemon(sim_config(http_listen="127.0.0.1:0"))
    url = await anyio.to_thread.run_sync(proc.http_url)
    async with aiohttp.ClientSession(url) as session, session.get("/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = r.headers["Content-Security-Policy"]
        html = await r.text()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert f"script-src {_hash(script)};" in csp
    assert f"style-src {_hash(style)};" in csp
    assert "default-src 'none'" in csp and "unsafe" not in csp
    assert 'fetch("status"' in script and "setTimeout(refresh, REFRESH_MS)" in script
    assert "innerHTML" not in script  # text only: nothing from /status runs as markup


@pytest.mark.anyio
async def test_page_keeps_to_its_csp_and_the_token_to_the_tab() -> None:
    """No inline event handlers, no eval, no markup from data; the job browser's token
    goes to sessionStorage and the Authorization header only, never a cookie."""
    page = await anyio.to_thread.run_sync(load_page)
    html = page.body.decode()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", html)  # onclick= and the like
    assert not re.search(r"\beval\(|new Function|setTimeout\(\s*[\"'`]", script)
    for markup in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert markup not in script, markup
    assert "localStorage" not in script and "document.cookie" not in script
    assert "sessionStorage.setItem(TOKEN_KEY" in script
    assert 'headers.Authorization = "Bearer " + sent' in script
    assert 'api("v1/jobs?state=failed&limit=20")' in script
    assert "JSON.stringify({ ids: [openId] })" in script  # retry one job by id


def test_a_page_without_script_allows_none() -> None:
    """No inline block means nothing is allowed, rather than everything."""
    page = build_page(b"<!doctype html><p>hi</p>")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'none';" in csp and "style-src 'none';" in csp


async def page_dom(url: str, tmp_path: Path) -> str:
    """The status page at `url` as headless Chromium renders it after its script ran
    (fetches at 0, 2 and 4 s of virtual time: rates from the last two)."""
    profile = tmp_path / "chromium-profile"
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                f"{url}/",
            ],
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode()


@pytest.mark.anyio
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
async def test_page_shows_the_status_in_chromium(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Headless Chromium runs the page's script: counts, rates, provider limits and budgets."""
    config = sim_config(http_listen="127.0.0.1:0", max_backlog=2)
    proc = start_daemon(config.replace("max_concurrency = 16\n", BUDGETS, 1))  # in [providers.sim]
    proc.call("pause")
    ids = proc.call("submit", jobs=[JOB, JOB])["ids"]
    proc.call("cancel", id=ids[0])
    proc.call("submit", jobs=JOB)  # queued 2 = backlog full: the page shows why not ready
    url = proc.http_url()
    status = proc.call("status")
    counts = status["jobs"]
    assert counts == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "canceled": 1}
    budgets = status["providers"]["sim"]["budgets"]
    assert (budgets["requests"]["per_minute"], budgets["tokens"]["per_minute"]) == (600, 90000)
    dom = await page_dom(url, tmp_path)
    for state, n in counts.items():
        assert re.search(rf'id="count-{state}"[^>]*>{n}<', dom), (state, dom[:3000])
    assert re.search(r'id="state"[^>]*>paused<', dom)
    assert re.search(r'id="ready"[^>]*>not ready<', dom)
    assert "backlog full" in dom
    assert re.search(r"<td>sim</td>", dom)  # the providers table
    # Paused, nothing submitted while the page runs: both rates are 0, not the cumulative counts.
    assert re.search(r'id="rate-accepted"[^>]*>0\.0/s<', dom), dom[:3000]
    assert re.search(r'id="rate-finished"[^>]*>0\.0/s<', dom)
    assert "accepted 3 in all · attempts ended 0 in all (retries included)" in dom
    sim = dom[dom.index("<td>sim</td>") : dom.index("</tr>", dom.index("<td>sim</td>"))]
    # In flight / limit; what a request could take now: one second's slice of the
    # minute (600 and 90,000 a minute) less the 100 ms margin; calls waiting; cool-down.
    for figure in ("0 / 16", "0.0/s", "9 / 600", "1350 / 90000", "0", "0.0 s"):
        assert f'<td class="num">{figure}</td>' in sim, (figure, sim)
    assert '<td class="ok">closed</td><td>no</td>' in sim  # circuit, not paused
    assert re.search(r"loop lag p50 / p99 / max [\d.]+ / [\d.]+ / [\d.]+ ms · blocked \d+", dom)
    assert re.search(r"rss [\d.]+ MB", dom)
    assert '<section id="budgets-section" hidden="">' in dom  # no budgets configured


def _budget(scope: str, name: str, window: str, limit: float, spent: float) -> dict[str, Any]:
    """A `status["budgets"]` row, with what calls in flight reserve and when it resets."""
    reserved = 0.5 if scope == "provider" else 0.0
    return {
        "scope": scope,
        "name": name,
        "window": window,
        "limit_usd": limit,
        "spent_usd": spent,
        "reserved_usd": reserved,
        "remaining_usd": max(0.0, limit - spent - reserved),
        "resets_at": time.time() + 5 * 3600 + 12 * 60 + 40,
        "held": spent + reserved >= limit,
        "held_jobs": 12 if spent + reserved >= limit else 0,
    }


@asynccontextmanager
async def serve_page(status: dict[str, Any]) -> AsyncIterator[str]:
    """The status page (with its CSP) and a fixed /status payload on 127.0.0.1: its URL."""
    page = await anyio.to_thread.run_sync(load_page)

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page.body, headers=page.headers)

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(status)

    app = web.Application()
    app.add_routes([web.get("/", index), web.get("/status", status_json)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.anyio
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
async def test_page_shows_the_budgets_in_chromium(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A daemon's status with budgets added: one row each, a meter of use, HELD as a warning."""
    proc = start_daemon(sim_config())
    status = await proc.acall("status")
    status["budgets"] = [
        _budget("provider", "sim", "day", 10.0, 3.0),
        _budget("analyzer", "summarize", "month", 0.004, 0.004),
    ]
    async with serve_page(status) as url:
        dom = await page_dom(url, tmp_path)
    assert '<section id="budgets-section">' in dom, dom[:3000]
    rows = re.findall(r"<tr>(.*?)</tr>", dom[dom.index('id="budgets"') :], re.DOTALL)
    sim, summarize = rows[:2]
    assert sim.startswith("<td>provider/sim</td><td>day</td>")
    for figure in ("$3.00 / $10.00", "$0.50", "$6.50", "5h 12m"):
        assert f'<td class="num">{figure}</td>' in sim, (figure, sim)
    assert re.search(r'<td><meter [^>]*value="0.35"[^>]*>35%</meter> 35%</td>', sim)
    assert sim.endswith("<td>no</td>")
    assert summarize.startswith("<td>analyzer/summarize</td><td>month</td>")
    assert '<td class="num">$0.0040 / $0.0040</td>' in summarize
    assert re.search(
        r'<td class="warn"><meter [^>]*value="1"[^>]*>100%</meter> 100%</td>', summarize
    )
    assert summarize.endswith('<td class="warn">HELD (12 jobs)</td>')
