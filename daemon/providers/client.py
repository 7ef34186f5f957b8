"""The client of one configured AI API: one long-lived aiohttp session behind the
provider's limits, its circuit breaker and its counters. What differs between APIs
(the request's shape, the answer's, the errors', the headers that count) is the
dialect's (`dialect.py`: `openai.py`, `anthropic.py`)."""

from __future__ import annotations

import io
import os
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any, Self

import aiohttp
import anyio
import msgspec
import structlog

from daemon.config import ProviderConfig
from daemon.providers.anthropic import AnthropicDialect
from daemon.providers.base import ChatRequest, Completion, ProviderError
from daemon.providers.breaker import CircuitBreaker
from daemon.providers.dialect import Dialect, Fault
from daemon.providers.limits import Cost, ProviderLimits, Reservation
from daemon.providers.openai import OpenAIDialect
from daemon.providers.phases import PhaseTimes
from daemon.providers.ratelimit_headers import RateLimitHeaders, retry_after_s
from daemon.providers.stats import LatencyWindow, ProviderStats, StatusCounter

log = structlog.get_logger("vigil.provider")
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
DEFAULT_429_PAUSE_S = 1.0
PAUSED_RETRY_S = 30.0
NO_HEADERS = RateLimitHeaders()
SMALL_BODY_BYTES = 512 * 1024  # aiohttp warns about bytes bodies over 1 MiB


def _body(encoded: bytes) -> bytes | io.BytesIO:
    """Bytes take aiohttp's cheap path; past its large-body warning, a stream."""
    return encoded if len(encoded) <= SMALL_BODY_BYTES else io.BytesIO(encoded)


class _Reply(msgspec.Struct, frozen=True):
    status: int
    headers: Any  # aiohttp's CIMultiDictProxy
    raw: bytes
    latency_ms: float


class ApiProvider(anyio.AsyncContextManagerMixin):
    """Owns the HTTP session, the limits and the breaker of one configured provider.
    `configure` applies a reloaded config without a restart."""

    def __init__(self, name: str, config: ProviderConfig, base_url: str | None = None) -> None:
        self.name = name
        self.config = config
        self._fixed_base_url = base_url  # the built-in simulated API's address, if any
        self.base_url = (base_url or config.base_url).rstrip("/")
        self.dialect = dialect_for(config, self.base_url)
        self.limits = ProviderLimits(**_limit_settings(config))
        self.breaker = CircuitBreaker(
            name,
            failures=config.breaker_failures,
            open_s=config.breaker_open_s,
            probe_wait_s=min(config.breaker_open_s, config.timeout_s),
        )
        self.stats = ProviderStats()
        self.latency = LatencyWindow()
        self._statuses = StatusCounter(self.stats)
        self.paused_reason: str | None = None
        self._succeeded_at = time.monotonic()  # the last 200 (or the start)
        self._cached_hint = 0  # input tokens the last cached-prefix call read from the cache
        self.pause_changes = 0  # pauses and lifts this node made (to share in a cluster)
        self._session: aiohttp.ClientSession | None = None
        self._key()  # a key missing from the start pauses the provider at once, loudly

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    def configure(self, config: ProviderConfig) -> None:
        """Apply a reloaded config to the next requests: limits, concurrency, timeout,
        breaker, base URL, dialect and API version. What it cannot change (kind, pool
        size, key variable) the reload keeps as it was (daemon/reload.py RESTART_ONLY)."""
        self.config = config
        self.limits.configure(**_limit_settings(config))
        self.breaker.configure(
            failures=config.breaker_failures,
            open_s=config.breaker_open_s,
            probe_wait_s=min(config.breaker_open_s, config.timeout_s),
        )
        if self._fixed_base_url is None:
            self.base_url = config.base_url.rstrip("/")
        self.dialect = dialect_for(config, self.base_url)
        log.info("provider.configured", provider=self.name)

    def _key(self) -> str | None:
        """The API key, read at use. A missing one pauses the provider, as a refused
        one does: its jobs wait for a restart with the key set (the environment is read
        at start) instead of the whole backlog failing."""
        env = self.config.api_key_env
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            self.paused_reason = self._missing_key()
            log.error("provider.paused", provider=self.name, reason=self.paused_reason)
        return key

    def _missing_key(self) -> str:
        return (
            f"${self.config.api_key_env} (the API key) is not set in the daemon's "
            "environment: restart the daemon with it set"
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = ""
        if self.config.api_key_env:
            key = self._key() or ""
            if not key:
                raise self._paused()
        headers.update(self.dialect.auth_headers(key))
        return headers

    def _paused(self) -> ProviderError:
        return ProviderError(
            f"provider {self.name!r} is paused: {self.paused_reason}",
            kind="ProviderPaused",
            retryable=True,
            retry_after_s=PAUSED_RETRY_S,
        )

    def available(self) -> bool:
        """Whether a call would be attempted now: not paused, and the circuit closed
        or half-open with no probe under way (the next call probes)."""
        return self.paused_reason is None and self.breaker.accepting()

    def pause(self, reason: str) -> None:
        """A pause the account's state causes (a refused key, no quota): in a cluster
        every node takes it (daemon/providers/shared_state.py). A missing key variable
        is this daemon's alone and does not come here."""
        self.paused_reason = reason
        self.pause_changes += 1
        log.error("provider.paused", provider=self.name, reason=reason)

    def adopt_pause(self, reason: str | None) -> None:
        """Another node paused this provider (or lifted its pause): follow, unless our
        own environment lacks the key, which only a restart here can fix."""
        if self.paused_reason is not None and self.paused_reason == self._missing_key():
            return
        if reason is None:
            if self.paused_reason is not None:
                log.info("provider.resumed", provider=self.name, by="another node")
            self.paused_reason = None
            return
        self.paused_reason = reason
        log.error("provider.paused", provider=self.name, reason=reason, by="another node")

    def held_reason(self) -> str | None:
        """Why calls are held back now (paused, circuit open or probing), or None."""
        if self.paused_reason:
            return f"paused: {self.paused_reason}"
        return self.breaker.reason()

    def resume(self) -> str | None:
        """Lift a pause (the operator says the key or quota is fixed). Returns why the
        provider stays paused, or None: a key variable that is not set cannot be
        fixed without a restart (the daemon's environment is read at start)."""
        env = self.config.api_key_env
        if env and not os.environ.get(env):
            self.paused_reason = self._missing_key()
            return self.paused_reason
        if self.paused_reason is not None:
            self.paused_reason = None
            self.pause_changes += 1  # lifted for every node
        return None

    async def complete(self, request: ChatRequest, times: PhaseTimes | None = None) -> Completion:
        """One throttled call; raises ProviderError on every kind of failure. Its waits
        and its request's time are added to `times` (the attempt's phases)."""
        if self.paused_reason:
            raise self._paused()
        headers = self._headers()  # a missing key pauses before taking budget
        dialect = self.dialect
        cost = dialect.cost(request)
        if request.cache_system and self._cached_hint and dialect.cache_reads_free:
            # A cached prefix costs the input budget nothing: book what it did not cover
            # last time (a miss is charged in full when its answer says so).
            cost = Cost(max(1, cost.input_tokens - self._cached_hint), cost.output_tokens)
        asked = time.monotonic()
        try:  # an open circuit fails here, before any budget; a probe's verdict is awaited
            probe = await self.breaker.admit()
        finally:
            if times is not None:
                times.cooldown_s += time.monotonic() - asked
        verdict = "released"  # what the breaker is told: released, succeeded or a failure
        try:
            async with self.limits.slot(cost, times) as reservation:
                try:
                    self.breaker.recheck(probe)
                except ProviderError:
                    self.limits.give_back(reservation)  # never sent
                    raise
                self.stats.in_flight += 1
                sent = time.monotonic()
                try:
                    reply = await self._send(dialect, request, headers)
                except ProviderError as exc:
                    verdict = exc.kind
                    if exc.kind == "Timeout":
                        self._congested(reservation, "timeout")
                    raise
                finally:
                    self.stats.in_flight -= 1
                    if times is not None:
                        times.api_s += time.monotonic() - sent
            rate_limits = self._observe(dialect, reply.headers, reservation)
            if reply.status == 200:
                verdict = "succeeded"
                self._succeeded_at = time.monotonic()
                completion = self._settle(dialect, reply, reservation, rate_limits)
                if self.limits.shared is not None:
                    await self.limits.charge_shared(completion.completion_tokens)
                if request.cache_system:
                    self._cached_hint = completion.cached_tokens
                return completion
            if 300 <= reply.status < 400:
                raise _redirected(reply)
            fault = dialect.fault(reply.status, self._scrubbed(reply.raw))
            if reply.status < 500:
                verdict = "succeeded"  # the API answered: it is up
            elif not fault.overloaded or self._overloaded_too_long():
                verdict = f"HTTP {reply.status}"
            error = self._http_error(fault, reply, reservation)
            if fault.rate_limited:  # the other nodes hold back too
                hint = error.retry_after_s
                await self.limits.hold_shared(DEFAULT_429_PAUSE_S if hint is None else hint)
            raise error
        finally:
            if verdict == "succeeded":
                self.breaker.succeeded(probe)
            elif verdict == "released":
                self.breaker.released(probe)
            else:
                self.breaker.failed(verdict, probe)

    async def _send(
        self, dialect: Dialect, request: ChatRequest, headers: dict[str, str]
    ) -> _Reply:
        assert self._session is not None, "provider used outside its context"
        timeout_s = self.config.timeout_s
        started = time.monotonic()
        self.stats.requests += 1
        try:
            # aiohttp's own total timeout: it keeps a timer per request anyway, and a
            # cancel scope more would cost as much again as the rest of this method.
            async with self._session.post(
                dialect.url(self.base_url, request),
                data=_body(msgspec.json.encode(dialect.body(request))),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                raw = await _read_bounded(response, MAX_RESPONSE_BYTES + 1)
                status = response.status
                answer_headers = response.headers
        except TimeoutError:
            self._statuses.add("timeout")
            raise ProviderError(f"no answer within {timeout_s:g} s", kind="Timeout") from None
        except aiohttp.ClientError as exc:
            self._statuses.add("connection_error")
            raise ProviderError(
                f"cannot reach {self.base_url}: {type(exc).__name__}", kind="ConnectionError"
            ) from None
        latency_ms = (time.monotonic() - started) * 1000
        self.stats.answered += 1
        self.stats.latency_ms_total += latency_ms
        self.latency.add(latency_ms)
        self._statuses.add(str(status))
        return _Reply(status, answer_headers, raw, latency_ms)

    def _settle(
        self, dialect: Dialect, reply: _Reply, reservation: Reservation, limits: RateLimitHeaders
    ) -> Completion:
        """The answer as a Completion, and the budgets corrected by what it took."""
        if len(reply.raw) > MAX_RESPONSE_BYTES:
            raise ProviderError("answer larger than 8 MiB", kind="BadResponse", status=200)
        completion = dialect.decode(reply.raw, reply.status)
        self.limits.adaptive.succeeded()
        input_used = completion.prompt_tokens
        if dialect.cache_reads_free:  # Anthropic's input budget does not count cache reads
            input_used -= completion.cached_tokens
        self.limits.settle(reservation, limits, input_used, completion.completion_tokens)
        stats = self.stats
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        stats.cached_tokens += completion.cached_tokens
        stats.cache_write_tokens += completion.cache_write_tokens
        return msgspec.structs.replace(completion, latency_ms=reply.latency_ms)

    def _observe(
        self, dialect: Dialect, headers: Any, reservation: Reservation
    ) -> RateLimitHeaders:
        if not self.config.sync_rate_limit_headers:
            return NO_HEADERS
        rate_limits = dialect.rate_limits(headers)
        if rate_limits.empty:
            return rate_limits
        for change in self.limits.observe(rate_limits, reservation):
            log.warning(
                "provider.limit_learned",
                provider=self.name,
                budget=change.budget,
                server_limit=change.server_limit,
                per_minute=change.per_minute,
                was=change.old_per_minute,
                configured=getattr(self.config, f"{change.budget}_per_minute"),
            )
        return rate_limits

    def _overloaded_too_long(self) -> bool:
        """An API that has answered nothing but "overloaded" for longer than the
        breaker stays open is failing, not busy: from then on each overloaded answer
        counts for the breaker (so a gateway whose upstream is gone opens it). Time,
        not a count in a row: under concurrency a burst of quick 529s can outrun the
        slower successes of the same moment."""
        return time.monotonic() - self._succeeded_at > self.config.breaker_open_s

    def _congested(self, reservation: Reservation, why: str) -> None:
        if self.limits.adaptive.congested(reservation.epoch):
            log.info(
                "provider.concurrency_lowered",
                provider=self.name,
                reason=why,
                limit=self.limits.adaptive.limit,
            )

    def _scrubbed(self, raw: bytes) -> bytes:
        """Some APIs echo the key back: scrubbed before the message is cut to length,
        or a key straddling the cut would leave its first part behind."""
        key = os.environ.get(self.config.api_key_env) if self.config.api_key_env else None
        return raw.replace(key.encode(), b"[redacted]") if key else raw

    def _http_error(self, fault: Fault, reply: _Reply, reservation: Reservation) -> ProviderError:
        """Act on an error answer (pause, cool down, back off) and describe it."""
        status = reply.status
        cost = reservation.cost
        hint = retry_after_s(
            reply.headers,
            tokens_needed=cost.input_tokens + cost.output_tokens,
            input_tokens_needed=cost.input_tokens,
            snapshot=self.dialect.rate_limits(reply.headers),
        )
        if status == 429:
            self.stats.rate_limited += 1
        if fault.pause is not None:
            self.pause(fault.pause)
        if fault.rate_limited:
            self.limits.rate_limited(hint if hint is not None else DEFAULT_429_PAUSE_S)
            self._congested(reservation, "429")
        elif fault.overloaded:
            self.stats.overloaded += 1
            self._congested(reservation, "overloaded")
        return ProviderError(
            fault.message,
            kind=fault.kind,
            status=status,
            retryable=fault.retryable,
            retry_after_s=hint,
        )

    def status(self) -> dict[str, Any]:
        """This provider's part of `vigil status`."""
        stats, limits = self.stats, self.limits
        avg = stats.latency_ms_total / stats.answered if stats.answered else None
        p50, p99 = self.latency.percentile(50), self.latency.percentile(99)
        return {
            "kind": self.config.kind,
            "dialect": self.dialect.name,
            "base_url": self.base_url,
            "paused": self.paused_reason,
            "held": self.held_reason(),
            "in_flight": stats.in_flight,
            "waiting_for_budget": limits.waiting,
            "requests": stats.requests,
            "by_status": stats.by_status,
            "rate_limited": stats.rate_limited,
            "overloaded": stats.overloaded,
            "cooldown_s": round(limits.cooldown_left(), 3),
            "cooldowns": limits.cooldowns,
            "tokens_in": stats.prompt_tokens,
            "tokens_out": stats.completion_tokens,
            "tokens_cached": stats.cached_tokens,
            "tokens_cache_write": stats.cache_write_tokens,
            "avg_latency_ms": None if avg is None else round(avg, 1),
            "p50_latency_ms": None if p50 is None else round(p50, 1),
            "p99_latency_ms": None if p99 is None else round(p99, 1),
            "max_concurrency": self.config.max_concurrency,
            "concurrency_limit": limits.adaptive.limit,
            "adaptive_concurrency": limits.adaptive.enabled,
            "concurrency_decreases": limits.adaptive.decreases,
            "requests_per_minute": limits.requests.per_minute,
            "tokens_per_minute": limits.tokens.per_minute,
            "input_tokens_per_minute": limits.input_tokens.per_minute,
            "output_tokens_per_minute": limits.output_tokens.per_minute,
            "budgets": limits.status(),
            "circuit": self.breaker.status(),
        }


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to `limit` bytes: `read(n)` returns what has arrived so far, so a
    body that comes in pieces needs a loop."""
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await response.content.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _limit_settings(config: ProviderConfig) -> dict[str, Any]:
    """What ProviderLimits takes from a provider's config, at start and on reload."""
    return {
        "max_concurrency": config.max_concurrency,
        "requests_per_minute": config.requests_per_minute,
        "tokens_per_minute": config.tokens_per_minute,
        "input_tokens_per_minute": config.input_tokens_per_minute,
        "output_tokens_per_minute": config.output_tokens_per_minute,
        "margin_s": config.budget_margin_ms / 1000,
        "slice_s": config.budget_slice_s,
        "adaptive": config.adaptive_concurrency,
        "successes_per_step": config.adaptive_successes_per_step,
    }


def _redirected(reply: _Reply) -> ProviderError:
    """Redirects are not followed (the key would go along): a base URL that redirects
    is a configuration error, named as such rather than retried."""
    where = str(reply.headers.get("Location", "?"))[:200]
    return ProviderError(
        f"HTTP {reply.status}: base_url redirects to {where}: set base_url to the final address",
        kind="Redirected",
        status=reply.status,
        retryable=False,
    )


def dialect_for(config: ProviderConfig, base_url: str) -> Dialect:
    """The dialect a provider speaks: Anthropic's Messages API, or one of the
    OpenAI-compatible servers (README "Providers")."""
    if config.kind == "anthropic" or (
        config.kind == "simulated" and config.simulate.dialect == "anthropic"
    ):
        return AnthropicDialect(config.api_version, config.api_key_env)
    return OpenAIDialect.for_server(
        config.dialect, base_url, config.api_version, config.api_key_env
    )
