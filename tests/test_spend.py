"""The spend guard (issue #14): budgets that stop the next call, against a real store
of each backend and a real API over HTTP (the Anthropic endpoint of test_anthropic,
scripted), with the clock injected so windows can roll over."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from daemon.analyzers import Calls, HandlerContext
from daemon.config import AnalyzerConfig, Config, PriceConfig, parse_config
from daemon.jobs import CallRecord
from daemon.providers.base import ChatRequest, Message, ProviderError
from daemon.providers.client import ApiProvider
from daemon.spend.guard import SpendGuard
from daemon.spend.pricing import worst_cost_usd
from daemon.store.base import AttemptEnd
from tests.test_anthropic import anthropic_provider, message
from tests.test_store import claim_one, new_job, submit_one

pytestmark = pytest.mark.anyio
PRICE = PriceConfig(prompt_per_mtok=1000.0, completion_per_mtok=2000.0)  # easy figures
NOON = dt.datetime(2026, 12, 5, 12, tzinfo=dt.UTC).timestamp()


class Clock:
    """Unix time the test moves by hand."""

    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(provider_budget: str = "", analyzer_budget: str = "") -> Config:
    """One priced provider `claude` and analyzer `summarize`, with the budgets given."""
    return parse_config(
        f"""
[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:9"
[providers.claude.prices]
prompt_per_mtok = {PRICE.prompt_per_mtok}
completion_per_mtok = {PRICE.completion_per_mtok}
{"[providers.claude.budget]" if provider_budget else ""}
{provider_budget}
[analyzers.summarize]
provider = "claude"
model = "m"
prompt = "{{text}}"
{"[analyzers.summarize.budget]" if analyzer_budget else ""}
{analyzer_budget}
"""
    )


def call(cost: float, at: float = NOON, analyzer: str = "summarize") -> CallRecord:
    """An answered call that cost `cost`."""
    return CallRecord(
        at=at,
        job_id="j",
        attempt=1,
        analyzer=analyzer,
        provider="claude",
        model="m",
        prompt_tokens=10,
        cached_tokens=0,
        cache_write_tokens=0,
        completion_tokens=5,
        cost=cost,
    )


def spend(guard: SpendGuard, cost: float, at: float = NOON) -> None:
    """Reserve and settle one call of `cost`."""
    guard.settle(guard.reserve("summarize", "claude", cost), call(cost, at))


async def test_a_call_that_would_pass_the_budget_is_refused(store: Any) -> None:
    """Settled plus reserved never passes the limit; the refusal names the budget and
    costs no attempt (a not-attempted kind with a retry hint)."""
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(provider_budget="daily_usd = 1.0"))
    holds = [guard.reserve("summarize", "claude", 0.3) for _ in range(3)]
    with pytest.raises(ProviderError) as info:
        guard.reserve("summarize", "claude", 0.3)  # 0.9 reserved: 1.2 would pass
    assert info.value.kind == "BudgetExhausted" and info.value.retry_after_s is not None
    assert "provider 'claude' daily budget of $1" in str(info.value)
    for hold in holds:
        guard.settle(hold, call(0.1))  # they cost less than reserved
    guard.reserve("summarize", "claude", 0.3)  # 0.3 spent + 0.3 fits now
    [row] = guard.status()
    assert row["spent_usd"] == pytest.approx(0.3) and row["reserved_usd"] == pytest.approx(0.3)
    assert row["remaining_usd"] == pytest.approx(0.4) and row["held"]


async def test_the_window_rolls_over(store: Any) -> None:
    """A reached daily budget opens at UTC midnight (logged), with the day's spend gone."""
    clock = Clock()
    guard = SpendGuard(store, clock=clock)
    guard.configure(config(provider_budget="daily_usd = 1.0"))
    spend(guard, 0.9)
    with pytest.raises(ProviderError):
        guard.reserve("summarize", "claude", 0.2)
    assert guard.held("summarize", "claude", 0.2)
    clock.now = NOON + 12 * 3600  # the next day
    with capture_logs() as logs:
        assert not guard.held("summarize", "claude", 0.2)
    assert [e["event"] for e in logs] == ["budget.reopened"]
    guard.reserve("summarize", "claude", 0.2)


async def test_monthly_and_daily_together(store: Any) -> None:
    """A new day opens the daily budget, not the monthly one the month already used."""
    clock = Clock()
    guard = SpendGuard(store, clock=clock)
    guard.configure(config(provider_budget="daily_usd = 1.0\nmonthly_usd = 1.5"))
    spend(guard, 0.9)
    clock.now = NOON + 24 * 3600
    spend(guard, 0.5)  # 1.4 this month
    with pytest.raises(ProviderError) as info:
        guard.reserve("summarize", "claude", 0.2)
    assert "monthly budget of $1.5" in str(info.value)
    clock.now = dt.datetime(2027, 1, 1, 0, 0, 1, tzinfo=dt.UTC).timestamp()
    guard.reserve("summarize", "claude", 0.2)  # a new month


async def test_the_tighter_of_provider_and_analyzer_budgets_holds(store: Any) -> None:
    """Both apply to a call; the analyzer's smaller one refuses it and is named."""
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(provider_budget="daily_usd = 10.0", analyzer_budget="daily_usd = 0.5"))
    spend(guard, 0.4)
    with pytest.raises(ProviderError) as info:
        guard.reserve("summarize", "claude", 0.2)
    assert "analyzer 'summarize' daily budget" in str(info.value)
    guard.reserve("other", "claude", 0.2)  # another analyzer on the provider still runs


async def test_spend_is_stored_and_a_restart_resumes_with_it(store: Any) -> None:
    """Calls written with their attempt's end add to the day's stored spend: a new guard
    (a restarted daemon, or another node) starts from it."""
    job_id = await submit_one(store)
    job = await claim_one(store)
    assert job.id == job_id
    calls = (call(0.25), call(0.5))
    await store.finish(job, AttemptEnd(outcome="succeeded", result="ok", calls=calls))
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(provider_budget="daily_usd = 1.0"))
    await guard.load()
    [row] = guard.status()
    assert row["spent_usd"] == pytest.approx(0.75)
    with pytest.raises(ProviderError):
        guard.reserve("summarize", "claude", 0.3)


async def test_a_reload_that_raises_the_budget_applies_at_once(store: Any) -> None:
    """configure() with a higher limit lets the next call through, and says so."""
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(provider_budget="daily_usd = 1.0"))
    spend(guard, 0.9)
    with pytest.raises(ProviderError):
        guard.reserve("summarize", "claude", 0.2)
    guard.configure(config(provider_budget="daily_usd = 5.0"))
    with capture_logs() as logs:
        assert not guard.held("summarize", "claude", 0.2)
    assert any(e["event"] == "budget.reopened" for e in logs)
    guard.reserve("summarize", "claude", 0.2)


# --- through the real client ----------------------------------------------------------


@asynccontextmanager
async def priced_provider(
    monkeypatch: pytest.MonkeyPatch, body: dict[str, Any]
) -> AsyncIterator[ApiProvider]:
    """The scripted Anthropic endpoint answering `body` to every call."""

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(body)

    async with anthropic_provider(reply, monkeypatch) as (_, provider):
        yield provider


def chat(text: str = "Some text.") -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", text)], max_tokens=100)


async def test_handler_calls_are_charged(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler's ctx.complete goes through the guard like a prompt's call: each
    call is charged to the analyzer's budget and recorded."""
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(analyzer_budget="daily_usd = 100.0"))
    job_id = await submit_one(store)
    job = await claim_one(store)
    assert job.id == job_id
    async with priced_provider(monkeypatch, message(input_tokens=100, output_tokens=50)) as api:
        calls = Calls({"claude": api}, {"claude": PRICE}, job=job, guard=guard)
        ctx = HandlerContext(job, AnalyzerConfig(provider="claude", model="m"), calls)
        with anyio.fail_after(10):
            await ctx.complete("first")
            await ctx.complete("second")
    each = (100 * PRICE.prompt_per_mtok + 50 * PRICE.completion_per_mtok) / 1e6
    assert [r.cost for r in calls.records] == [pytest.approx(each)] * 2
    [row] = guard.status()
    assert row["spent_usd"] == pytest.approx(2 * each) and row["reserved_usd"] == 0


async def test_an_answer_without_usage_is_charged_its_reservation(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No usage in the answer: the call costs its whole worst case, and it is logged."""
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(provider_budget="daily_usd = 100.0"))
    body = message()
    del body["usage"]
    async with priced_provider(monkeypatch, body) as api:
        calls = Calls({"claude": api}, {"claude": PRICE}, guard=guard)
        with capture_logs() as logs, anyio.fail_after(10):
            await calls.complete("claude", chat())
    worst = worst_cost_usd(chat(), PRICE)
    assert calls.records[0].cost == pytest.approx(worst)
    assert guard.status()[0]["spent_usd"] == pytest.approx(worst, abs=1e-6)
    assert [e for e in logs if e["event"] == "spend.no_usage"]


async def test_a_failed_call_releases_its_reservation(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error answer costs nothing: its reservation goes back."""
    guard = SpendGuard(store, clock=Clock())
    guard.configure(config(provider_budget="daily_usd = 100.0"))
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}

    async def reply(request: web.Request) -> web.Response:
        return web.json_response(body, status=400)

    async with anthropic_provider(reply, monkeypatch) as (_, api):
        calls = Calls({"claude": api}, {"claude": PRICE}, guard=guard)
        with pytest.raises(ProviderError), anyio.fail_after(10):
            await calls.complete("claude", chat())
    [row] = guard.status()
    assert row["reserved_usd"] == 0 and row["spent_usd"] == 0


def test_the_worst_case_is_never_under_the_real_cost() -> None:
    """Every input byte a token at the dearest input price, plus max_tokens: above
    what any answer to the request can be billed, multibyte text included."""
    price = PriceConfig(
        prompt_per_mtok=3.0,
        completion_per_mtok=15.0,
        cached_prompt_per_mtok=0.3,
        cache_write_per_mtok=3.75,
    )
    request = ChatRequest(
        model="m", messages=[Message("user", "日本語のテキスト" * 50)], max_tokens=10
    )
    tokens_at_most = len("日本語のテキスト".encode()) * 50
    billed = (tokens_at_most * 3.75 + 10 * 15.0) / 1e6
    assert worst_cost_usd(request, price) >= billed


async def test_cluster_nodes_see_each_others_spend(pg_dsn: str) -> None:
    """Two nodes on one database: what one node's calls cost reaches the other's
    budget within its refresh, and holds its calls back."""
    from daemon.config import StoreConfig
    from daemon.store.postgres import PostgresStore

    async with (
        PostgresStore(StoreConfig(url=pg_dsn, node_name="a")) as node_a,
        PostgresStore(StoreConfig(url=pg_dsn, node_name="b")) as node_b,
    ):
        watcher = SpendGuard(node_b, clock=Clock())
        watcher.configure(config(provider_budget="daily_usd = 1.0"))
        await watcher.load()
        await node_a.submit([new_job()], max_backlog=100)
        [job] = await node_a.claim(1)
        calls = (call(0.6), call(0.3))
        await node_a.finish(job, AttemptEnd(outcome="succeeded", result="ok", calls=calls))
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.run)
            for _ in range(100):  # the refresh runs every second
                if watcher.status()[0]["spent_usd"] >= 0.9 - 1e-9:
                    break
                await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        assert watcher.status()[0]["spent_usd"] == pytest.approx(0.9)
        with pytest.raises(ProviderError):
            watcher.reserve("summarize", "claude", 0.2)


async def test_the_books_forget_days_before_this_month(store: Any) -> None:
    """A daemon running for months keeps only this month's days in memory, and the
    month's spend is unchanged by forgetting the last month's."""
    clock = Clock()
    guard = SpendGuard(store, clock=clock)
    guard.configure(config(provider_budget="monthly_usd = 10.0"))
    spend(guard, 0.4)  # December
    clock.now = dt.datetime(2027, 1, 2, 12, tzinfo=dt.UTC).timestamp()
    spend(guard, 0.2, at=clock.now)  # January
    guard._forget_before("2027-01")  # what run() does each second
    assert all(day >= "2027-01" for book in (guard._db, guard._local) for _, _, day in book)
    assert guard.status()[0]["spent_usd"] == pytest.approx(0.2)
