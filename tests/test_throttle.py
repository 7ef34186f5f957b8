"""Throttling parts in isolation, on fake clocks: rate-limit headers, budget sync and
learned limits, AIMD concurrency, the circuit breaker."""

from __future__ import annotations

import datetime as dt
import itertools

import anyio
import pytest
from structlog.testing import capture_logs

from daemon.providers.adaptive import AdaptiveConcurrency
from daemon.providers.base import ProviderError
from daemon.providers.breaker import CircuitBreaker
from daemon.providers.bucket import Ticket, TokenBucket
from daemon.providers.limits import Cost, ProviderLimits, Reservation
from daemon.providers.ratelimit_headers import (
    Budget,
    RateLimitHeaders,
    parse_duration_s,
    parse_rate_limit_headers,
    retry_after_s,
)

NOW = 1_700_000_000.0  # a fixed unix time for RFC 3339 resets


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sent(bucket: TokenBucket, units: float) -> Ticket:
    """Book `units` and mark them sent, as a request leaving now does."""
    ticket = bucket.book(units)
    bucket.mark_sent(ticket)
    return ticket


# --- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("120ms", 0.12), ("1s", 1.0), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("2.5", 2.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """OpenAI's reset durations, and bare seconds, parse."""
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "5s later"])
def test_parse_duration_rejects_junk(text: str) -> None:
    """Anything else is not a duration."""
    assert parse_duration_s(text) is None


def test_openai_headers_parse() -> None:
    """x-ratelimit-* give limit, remaining and reset per budget."""
    parsed = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-remaining-requests": "2999",
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-limit-tokens": "600000",
            "x-ratelimit-remaining-tokens": "599000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert parsed.requests == Budget(limit=3000, remaining=2999, reset_s=0.02)
    assert parsed.tokens == Budget(limit=600000, remaining=599000, reset_s=300.0)  # capped
    assert parsed.input_tokens is None


def test_anthropic_headers_parse() -> None:
    """anthropic-ratelimit-* parse, resets as RFC 3339 times, token counts as rounded."""
    reset = dt.datetime.fromtimestamp(NOW + 12, dt.UTC).isoformat().replace("+00:00", "Z")
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-input-tokens-limit": "40000",
        "anthropic-ratelimit-input-tokens-remaining": "39000",
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-tokens-limit": "8000",
        "anthropic-ratelimit-tokens-remaining": "7000",
    }
    parsed = parse_rate_limit_headers(headers, now=NOW)
    assert parsed.requests is not None
    assert (parsed.requests.limit, parsed.requests.remaining) == (50, 49)
    assert parsed.requests.reset_s == pytest.approx(12.0)
    assert parsed.tokens is not None and parsed.tokens.rounding == 1000
    assert parsed.input_tokens == Budget(limit=40000, remaining=39000, rounding=1000)
    assert parsed.output_tokens == Budget(limit=8000, rounding=1000)


def test_garbage_headers_are_ignored() -> None:
    """Unparseable or negative values are dropped, not trusted."""
    parsed = parse_rate_limit_headers(
        {"x-ratelimit-limit-requests": "lots", "x-ratelimit-remaining-requests": "-5"}
    )
    assert parsed.empty


def test_retry_hint_prefers_retry_after_ms_then_retry_after() -> None:
    """retry-after-ms wins over retry-after, which wins over the rate-limit headers."""
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "9", "x-ratelimit-reset-requests": "1s"}) == 9.0


def test_retry_hint_http_date() -> None:
    """retry-after may be an HTTP date."""
    assert retry_after_s({"retry-after": "Tue, 14 Nov 2023 22:13:30 GMT"}, now=NOW) == 10.0


def test_retry_hint_from_rate_limit_headers_is_time_for_one_request() -> None:
    """With limit and remaining known, the hint is the refill time of what is missing,
    not the time until the whole bucket is full."""
    headers = {
        "x-ratelimit-limit-requests": "3000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "60s",
    }
    assert retry_after_s(headers) == pytest.approx(0.02)
    tokens = {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "60s",
    }
    assert retry_after_s(tokens, tokens_needed=500) == pytest.approx(30.0)


def test_retry_hint_anthropic_reset() -> None:
    """An Anthropic 429 without retry-after waits for its reset time."""
    reset = dt.datetime.fromtimestamp(NOW + 7, dt.UTC).isoformat()
    assert retry_after_s({"anthropic-ratelimit-tokens-reset": reset}, now=NOW) == 7.0


# --- TokenBucket: margin, sync, learned limits --------------------------------------------


def test_a_budget_holds_one_slice_of_its_limit() -> None:
    """600 a minute in one-second slices: 10 at once, then one every 0.1 s; a learned
    lower limit shrinks the slice at once, and what is left never shows below zero."""
    clock = FakeClock()
    bucket = TokenBucket(600, clock)
    assert bucket.capacity == 10
    assert [bucket.reserve(1) for _ in range(10)] == [0] * 10
    assert bucket.reserve(1) == pytest.approx(0.1)
    assert bucket.status()["left"] == 0
    clock.now += 60  # idle a minute: still only one slice in hand
    assert bucket.status()["level"] == 10
    generation = bucket.generation
    bucket.configure(60)
    assert (bucket.capacity, bucket.level, bucket.generation) == (1, 1, generation + 1)


def test_a_slice_too_small_for_the_margin_spaces_requests_by_it() -> None:
    """60 a minute in one-second slices has room for exactly one request: a request
    arriving a hair early would be refused, so requests leave margin_s further apart
    (1.1 s); where the slice has room to spare, the margin costs no rate."""
    clock = FakeClock()
    tight = TokenBucket(60, clock, margin_s=0.1)
    waits = [tight.reserve(1) for _ in range(4)]
    assert [b - a for a, b in itertools.pairwise(waits)] == pytest.approx([1.1] * 3)
    roomy = TokenBucket(3000, clock, margin_s=0.1)  # 50 a slice, 5 held back
    waits = [roomy.reserve(1) for _ in range(50)]
    assert waits[44] == 0 and waits[45] == pytest.approx(0.02)
    assert [b - a for a, b in itertools.pairwise(waits[45:])] == pytest.approx([0.02] * 4)


def test_margin_holds_back_refill_without_costing_rate() -> None:
    """A margin keeps that much refill in hand: the burst is smaller, the rate the same."""
    clock = FakeClock()
    bucket = TokenBucket(60, clock, margin_s=2.0, slice_s=60)  # 1 unit/s, 2 units held back
    assert bucket.reserve(58) == 0
    assert bucket.reserve(1) == pytest.approx(1.0)
    clock.now += 10
    # 10 s later the booked unit is paid and 10 units refilled: 9 more fit, then 1/s.
    assert bucket.reserve(9) == 0
    assert bucket.reserve(1) == pytest.approx(1.0)


def test_sync_lowers_level_when_server_has_less() -> None:
    """A server reporting less remaining than we expected lowers our level by the gap."""
    clock = FakeClock()
    bucket = TokenBucket(100, clock, slice_s=60)
    ticket = bucket.book(1)
    bucket.mark_sent(ticket)
    assert ticket.expected == 99
    taken = bucket.sync(ticket, remaining=40)  # someone else spent 59
    assert taken == pytest.approx(58)  # one unit of rounding tolerance
    assert bucket.level == pytest.approx(41)
    assert bucket.corrections == 1
    assert bucket.lowered == pytest.approx(58)


def test_sync_never_raises_and_ignores_rounding() -> None:
    """More remaining than expected, or a gap within the rounding, changes nothing."""
    bucket = TokenBucket(100, FakeClock(), slice_s=60)
    ticket = bucket.book(1)
    bucket.mark_sent(ticket)
    assert bucket.sync(ticket, remaining=100) == 0
    assert bucket.sync(ticket, remaining=98.5) == 0
    assert bucket.level == 99
    assert bucket.corrections == 0


def test_sync_does_not_correct_the_same_gap_twice() -> None:
    """Answers of requests in flight all show one gap; it is taken off once."""
    clock = FakeClock()
    bucket = TokenBucket(1000, clock, margin_s=0.001, slice_s=60)
    tickets = []
    for _ in range(5):
        tickets.append(sent(bucket, 10))
        clock.now += 0.002  # sent apart: none can overtake another
    # The server had 300 fewer from the start; it reports after each of ours.
    for n, ticket in enumerate(tickets, 1):
        bucket.sync(ticket, remaining=1000 - 300 - 10 * n)
    assert bucket.lowered == pytest.approx(299, abs=0.5)  # not 5 x 299


def test_sync_allows_for_requests_that_overtook() -> None:
    """Requests sent just after ours may reach the server first: no correction for them."""
    clock = FakeClock()
    bucket = TokenBucket(1000, clock, margin_s=0.1, slice_s=60)
    first = sent(bucket, 10)
    clock.now += 0.01
    sent(bucket, 10)  # arrived first at the server
    assert bucket.sync(first, remaining=1000 - 20) == 0


def test_learn_adopts_lower_server_limit_once() -> None:
    """A lower limit from the server is adopted and caps the level; the same one again
    changes nothing; a higher one falls back to the configured limit."""
    clock = FakeClock()
    bucket = TokenBucket(3600, clock, slice_s=60)
    ticket = sent(bucket, 1)
    assert bucket.learn(3000, None, ticket)
    assert bucket.per_minute == 3000
    assert bucket.level == 3000
    assert bucket.server_limit == 3000
    assert not bucket.learn(3000, None, ticket)
    assert bucket.learn(5000, None, ticket)
    assert bucket.per_minute == 3600


def test_learn_when_unconfigured_starts_from_server_remaining() -> None:
    """With no configured limit the server's applies, starting from what it has left
    minus what we sent since."""
    clock = FakeClock()
    bucket = TokenBucket(0, clock, slice_s=60)
    ticket = sent(bucket, 1)
    sent(bucket, 1)
    sent(bucket, 1)
    assert bucket.learn(60, 10, ticket)
    assert bucket.per_minute == 60
    assert bucket.level == pytest.approx(8)


def test_observe_maps_headers_to_buckets() -> None:
    """ProviderLimits.observe learns limits and syncs both budgets from one snapshot."""
    clock = FakeClock()
    limits = ProviderLimits(
        max_concurrency=4,
        requests_per_minute=600,
        tokens_per_minute=10_000,
        clock=clock,
        slice_s=60,
    )
    tickets = tuple(
        bucket.book(units) for bucket, units in zip(limits.buckets, (1, 100, 0, 0), strict=True)
    )
    for bucket, ticket in zip(limits.buckets, tickets, strict=True):
        bucket.mark_sent(ticket)
    changes = limits.observe(
        RateLimitHeaders(
            requests=Budget(limit=500, remaining=400),
            tokens=Budget(limit=20_000, remaining=5_000),
        ),
        Reservation(tickets, Cost(100), 0),
    )
    assert [(c.budget, c.old_per_minute, c.per_minute) for c in changes] == [("requests", 600, 500)]
    assert limits.requests.level == pytest.approx(401)
    assert limits.tokens.per_minute == 10_000  # the server's is higher: ours stays
    assert limits.tokens.level == pytest.approx(5_001)


# --- AIMD ---------------------------------------------------------------------------------


def test_aimd_halves_once_per_window_and_recovers() -> None:
    """A 429 halves the limit; others from the same window do not; successes add one
    per step up to the maximum."""
    limiter = anyio.CapacityLimiter(16)
    aimd = AdaptiveConcurrency(limiter, maximum=16, successes_per_step=3, enabled=True)
    epoch = aimd.epoch
    assert aimd.congested(epoch)
    assert not aimd.congested(epoch)  # same window: already acted on
    assert aimd.limit == 8 and limiter.total_tokens == 8
    assert aimd.congested(aimd.epoch)
    assert aimd.limit == 4
    for _ in range(3):
        aimd.succeeded()
    assert aimd.limit == 5 and limiter.total_tokens == 5
    for _ in range(3 * 20):
        aimd.succeeded()
    assert aimd.limit == 16


def test_aimd_floor_and_off() -> None:
    """The limit never drops below one; switched off, it stays at the maximum."""
    limiter = anyio.CapacityLimiter(2)
    aimd = AdaptiveConcurrency(limiter, maximum=2, successes_per_step=1, enabled=True)
    for _ in range(5):
        aimd.congested(aimd.epoch)
    assert aimd.limit == 1
    aimd.configure(maximum=10, successes_per_step=1, enabled=False)
    assert aimd.limit == 10 and limiter.total_tokens == 10
    assert not aimd.congested(aimd.epoch)
    assert aimd.limit == 10


# --- circuit breaker ----------------------------------------------------------------------


def breaker(clock: FakeClock, failures: int = 3) -> CircuitBreaker:
    """A breaker on a fake clock: opens after `failures`, for 10 s."""
    return CircuitBreaker("main", failures=failures, open_s=10.0, probe_wait_s=2.0, clock=clock)


@pytest.mark.anyio
async def test_breaker_opens_after_consecutive_failures() -> None:
    """N failures in a row open it; a success in between resets the count."""
    clock = FakeClock()
    cb = breaker(clock)
    cb.failed("HTTP 500", probe=False)
    cb.failed("HTTP 500", probe=False)
    cb.succeeded(probe=False)
    cb.failed("Timeout", probe=False)
    cb.failed("Timeout", probe=False)
    assert cb.status()["state"] == "closed"
    with capture_logs() as logs:
        cb.failed("ConnectionError", probe=False)
    assert cb.status()["state"] == "open"
    assert [e["event"] for e in logs] == ["provider.circuit_opened"]
    clock.now += 4
    with pytest.raises(ProviderError) as info:
        await cb.admit()
    assert info.value.kind == "CircuitOpen"
    assert info.value.retryable is True
    assert info.value.retry_after_s == pytest.approx(6.0)
    assert "circuit open after 3 failures (ConnectionError), probe in 6 s" in str(info.value)
    assert cb.rejected == 1
    assert cb.accepting() is False


@pytest.mark.anyio
async def test_breaker_callers_during_the_probe_wait_for_its_verdict() -> None:
    """While the probe is under way the circuit accepts no new work and other callers
    wait for it: its success lets them go at once (and wakes the dispatcher), not
    after a probe's length."""
    clock = FakeClock()
    woken: list[str] = []
    cb = CircuitBreaker(
        "main", failures=1, open_s=10.0, probe_wait_s=30.0, clock=clock,
        on_close=lambda: woken.append("closed"),
    )  # fmt: skip
    cb.failed("HTTP 503", probe=False)
    clock.now += 10
    assert cb.status()["state"] == "half_open"
    assert cb.accepting() is True  # the next call is the probe
    assert await cb.admit() is True
    assert cb.accepting() is False
    assert "a probe request is under way" in (cb.reason() or "")
    verdicts: list[bool] = []

    async def caller() -> None:
        verdicts.append(await cb.admit())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            assert verdicts == []  # waiting, not turned away
            cb.succeeded(probe=True)
    assert verdicts == [False, False, False]
    assert woken == ["closed"]
    assert cb.status()["state"] == "closed"
    assert cb.reason() is None
    assert cb.rejected == 0


@pytest.mark.anyio
async def test_breaker_failed_probe_turns_its_waiters_away_until_the_next_half_open() -> None:
    """A failed probe reopens for another open_s; the callers that waited for it are
    told the time left; a probe that never ran frees its turn."""
    clock = FakeClock()
    cb = breaker(clock, failures=1)
    cb.failed("HTTP 500", probe=False)
    clock.now += 10
    assert await cb.admit() is True
    cb.released(probe=True)  # cancelled before sending
    assert await cb.admit() is True
    errors: list[ProviderError] = []

    async def caller() -> None:
        try:
            await cb.admit()
        except ProviderError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            cb.failed("HTTP 500", probe=True)
    assert [e.retry_after_s for e in errors] == [10.0]
    assert cb.status()["state"] == "open"
    assert cb.opened == 2
    status = cb.status()
    assert status["half_open_in_s"] == 10.0
    assert status["last_failure"] == "HTTP 500"
    clock.now += 10
    assert cb.status()["state"] == "half_open"


@pytest.mark.anyio
async def test_breaker_zero_failures_is_off() -> None:
    """breaker_failures = 0 never opens."""
    cb = breaker(FakeClock(), failures=0)
    for _ in range(100):
        cb.failed("HTTP 500", probe=False)
    assert cb.status()["state"] == "closed"
    assert await cb.admit() is False


@pytest.mark.anyio
async def test_a_caller_waiting_for_the_probe_is_turned_away_before_its_own_deadline() -> None:
    """The wait for the probe's verdict stops short of the attempt's deadline: the call
    is turned away unsent (CircuitOpen: no attempt spent) instead of timing out."""
    clock = FakeClock()
    cb = CircuitBreaker("main", failures=1, open_s=10.0, probe_wait_s=30.0, clock=clock)
    cb.failed("HTTP 503", probe=False)
    clock.now += 10  # due to half-open
    assert await cb.admit() is True  # the probe, under way and never answering here
    deadline = anyio.current_time() + 0.6
    with (
        anyio.fail_after(5),
        anyio.CancelScope(deadline=deadline) as scope,
        pytest.raises(ProviderError) as info,
    ):
        await cb.admit()
    assert info.value.kind == "CircuitOpen"
    assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_switching_the_breaker_off_during_a_probe_frees_its_waiters() -> None:
    """breaker_failures = 0 reloaded while a probe is under way: the waiters go at once,
    and that probe's failure, arriving later, does not open a breaker that is off."""
    clock = FakeClock()
    cb = breaker(clock, failures=1)
    cb.failed("HTTP 503", probe=False)
    clock.now += 10
    assert await cb.admit() is True
    verdicts: list[bool] = []

    async def caller() -> None:
        verdicts.append(await cb.admit())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            cb.configure(failures=0, open_s=10.0, probe_wait_s=2.0)
    assert verdicts == [False]
    cb.failed("HTTP 503", probe=True)  # the stale probe's answer
    assert cb.status()["state"] == "closed"


@pytest.mark.anyio
async def test_a_429_while_the_head_waits_sends_it_back_to_book_after_the_cool_down() -> None:
    """60 a minute: the second caller is booked for 1 s on. A 429 at 0.2 s (cool-down
    0.5 s) means the server had nothing left: on waking it books again from an empty
    budget, so it goes a whole interval after the 429's cool-down began, not on its old
    schedule."""
    limits = ProviderLimits(max_concurrency=4, requests_per_minute=60, tokens_per_minute=0)
    sent: list[float] = []

    async def call() -> None:
        async with limits.slot(Cost(10)):
            sent.append(anyio.current_time())

    with anyio.fail_after(10):
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call)
            await anyio.sleep(0.2)
            limits.rate_limited(0.5)
    assert sent[0] - start < 0.5
    assert sent[1] - start >= 1.8, sent  # booked again: not at its old 1.0 s


@pytest.mark.anyio
async def test_a_429_empties_a_full_budget() -> None:
    """An idle budget is full; a 429 says the server's is not: the next call waits for
    refill past the cool-down instead of going the moment it ends."""
    limits = ProviderLimits(max_concurrency=4, requests_per_minute=60, tokens_per_minute=0)
    with anyio.fail_after(10):
        limits.rate_limited(0.2)
        held_at = anyio.current_time()
        async with limits.slot(Cost(10)):
            waited = anyio.current_time() - held_at
    assert waited >= 0.9, waited
