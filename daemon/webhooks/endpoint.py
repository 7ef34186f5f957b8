"""One webhook's delivery loop: claim due deliveries from the store's outbox, POST
them concurrently (at most `max_concurrency` at once), record each outcome.

The store holds everything waiting: a receiver that is down costs no memory here, only
rows. A claim holds a delivery for `timeout_s` + LEASE_MARGIN_S; a POST cut off by a
crash is due again when that lapses (at-least-once, the same `Vigil-Delivery` id).
After HOLD_AFTER failures in a row the receiver is taken for down: the loop waits a
backoff (at most HOLD_MAX_S) and then probes with one delivery at a time until one
gets through, so a dead receiver costs a write now and then, not a storm of them."""

from __future__ import annotations

import random
import time
from typing import Any

import aiohttp
import anyio
import structlog
from anyio.abc import TaskGroup

from daemon import __version__
from daemon.backoff import backoff_s
from daemon.config import WebhookConfig
from daemon.store.base import JobStore, StoreError
from daemon.store.outbox import Delivery, DeliveryEnd, WebhookCounts
from daemon.wakeup import Wakeup
from daemon.webhooks.body import render
from daemon.webhooks.post import PostResult, post
from daemon.webhooks.sign import signature
from daemon.webhooks.urls import display_url

log = structlog.get_logger("vigil.webhooks")
USER_AGENT = f"vigil/{__version__}"
POLL_S = 1.0  # jobs ended where no wake-up reaches (a bulk cancel, another node): found this soon
COALESCE_S = 0.05  # after a job's end: ends that come together are claimed together
LEASE_MARGIN_S = 5.0  # a claim outlives its POST's timeout by this much
RECORD_S = 5.0  # the bound on recording an attempt's end
RELEASE_S = 1.0  # the bound on giving back an interrupted one at shutdown
STORE_RETRY_S = 1.0
HOLD_AFTER = 5  # failures in a row before the receiver is taken for down
HOLD_MAX_S = 60.0  # a receiver taken for down is probed at least this often
INTERRUPTED = "interrupted: the daemon stopped or the webhook was removed"


class Endpoint:
    """A configured webhook: its loop (`run`), settings a reload replaces in place,
    and its figures since start."""

    def __init__(
        self,
        name: str,
        config: WebhookConfig,
        secret: bytes,
        store: JobStore,
        session: aiohttp.ClientSession,
    ) -> None:
        self.name = name
        self.config = config
        self._secret = secret
        self._store = store
        self._session = session
        self.wake = Wakeup()
        self.scope = anyio.CancelScope()  # cancelled when a reload removes the webhook
        self.in_flight = 0
        self.delivered = 0
        self.failed = 0  # failed attempts, dead-lettering ones included
        self.dead_lettered = 0
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_delivered_at: float | None = None
        self._failures = 0  # in a row
        self._ended = False  # woken by a job's end (not a slot freed): wait for company
        self._held_until = 0.0  # monotonic clock
        self._rng = random.Random()

    def configure(self, config: WebhookConfig, secret: bytes) -> None:
        """A reload's settings: the next claim and the next POST use them."""
        self.config, self._secret = config, secret
        self.wake.notify()

    def job_ended(self) -> None:
        """A job ended here: its deliveries are committed; claim them shortly, with the
        ends that come with it."""
        self._ended = True
        self.wake.notify()

    def kick(self) -> None:
        """Dead deliveries were requeued: try now, whatever the hold says."""
        self._held_until = 0.0
        self.wake.notify()

    @property
    def held_s(self) -> float:
        return max(0.0, self._held_until - time.monotonic())

    def status(self, counts: WebhookCounts, now: float) -> dict[str, Any]:
        oldest = counts.oldest_pending_at
        return {
            "url": display_url(self.config.url),
            "events": list(self.config.events),
            "analyzers": list(self.config.analyzers),
            "pending": counts.pending,
            "dead": counts.dead,
            "in_flight": self.in_flight,
            "delivered": self.delivered,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_delivered_at": self.last_delivered_at,
            "held_s": round(self.held_s, 1),
        }

    async def run(self) -> None:
        """Until cancelled: shutdown, or a reload that removes the webhook."""
        with self.scope:
            async with anyio.create_task_group() as posts:
                while True:
                    try:
                        await self._round(posts)
                    except StoreError as exc:
                        log.warning("webhook.store_failed", webhook=self.name, error=str(exc))
                        await anyio.sleep(STORE_RETRY_S)

    async def _round(self, posts: TaskGroup) -> None:
        """Claim what is due into the free slots, or wait: for a slot, a job's end, the
        next retry (at most POLL_S). Reading when the next one is due is a read; only a
        claim writes."""
        if (held := self.held_s) > 0:
            await self._wait(held)
            return
        capacity = 1 if self._failures >= HOLD_AFTER else self.config.max_concurrency
        free = capacity - self.in_flight
        if free <= 0:
            await self._wait(POLL_S)  # an ending POST wakes this
            return
        due = await self._store.next_delivery_at(self.name)
        now = time.time()
        if due is not None and due <= now:
            lease_s = self.config.timeout_s + LEASE_MARGIN_S
            claimed = await self._store.claim_deliveries(self.name, free, lease_s)
            for delivery in claimed:
                self.in_flight += 1
                posts.start_soon(self._deliver, delivery, name=f"webhook.{self.name}.post")
            if claimed:
                return
        await self._wait(POLL_S if due is None or due <= now else min(POLL_S, due - now))

    async def _wait(self, timeout_s: float) -> None:
        """Until woken or `timeout_s`. Only a job's end waits COALESCE_S more, for the
        ends that come with it; a freed slot claims at once (a fast receiver is fed
        as fast as it answers)."""
        if await self.wake.wait(timeout_s) and self._ended:
            self._ended = False
            await anyio.sleep(COALESCE_S)

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            try:
                end = await self._attempt(delivery)
            except anyio.get_cancelled_exc_class():
                # Due again at once, so it goes out right after a restart rather than
                # when its claim lapses; the receiver may have it already (at-least-once).
                retry = DeliveryEnd(delivered=False, error=INTERRUPTED, retry_at=time.time())
                await self._record(delivery, retry, RELEASE_S)
                raise
            except StoreError as exc:  # reading the job
                error = f"cannot read the job: {exc}"
                end = DeliveryEnd(delivered=False, error=error, retry_at=time.time() + POLL_S)
            except Exception as exc:  # a bug here fails the attempt, not the daemon
                log.exception("webhook.error", webhook=self.name, delivery_id=delivery.id)
                failed = PostResult(ok=False, error=f"internal error: {type(exc).__name__}")
                end = self._outcome(delivery, self.config, failed)
            await self._record(delivery, end, RECORD_S)
        finally:
            self.in_flight -= 1
            self.wake.notify()

    async def _record(self, delivery: Delivery, end: DeliveryEnd, bound_s: float) -> None:
        """Shielded and bounded: an end not recorded leaves the claim to lapse, and the
        delivery goes out again."""
        with anyio.move_on_after(bound_s, shield=True):
            try:
                await self._store.end_delivery(delivery.id, end)
                return
            except StoreError as exc:
                log.warning(
                    "webhook.record_failed",
                    webhook=self.name,
                    delivery_id=delivery.id,
                    error=str(exc),
                )
                return
        log.warning("webhook.record_timeout", webhook=self.name, delivery_id=delivery.id)

    async def _attempt(self, delivery: Delivery) -> DeliveryEnd:
        config, secret = self.config, self._secret  # this attempt's, whatever a reload does
        body = render(delivery, await self._store.get(delivery.job_id))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Vigil-Event": delivery.event,
            "Vigil-Delivery": delivery.id,
            "Vigil-Signature": signature(secret, int(time.time()), body),
        }
        result = await post(self._session, config.url, body, headers, config.timeout_s)
        return self._outcome(delivery, config, result)

    def _outcome(
        self, delivery: Delivery, config: WebhookConfig, result: PostResult
    ) -> DeliveryEnd:
        self.last_status = result.status
        fields = {"webhook": self.name, "delivery_id": delivery.id, "job_id": delivery.job_id}
        if result.ok:
            self.delivered += 1
            self.last_delivered_at = time.time()
            if self._failures >= HOLD_AFTER:
                log.info("webhook.recovered", webhook=self.name, failures=self._failures)
                self.wake.notify()  # back to full concurrency now
            self._failures, self._held_until = 0, 0.0
            log.debug("webhook.delivered", **fields, attempts=delivery.attempts)
            return DeliveryEnd(delivered=True, status=result.status)
        self.failed += 1
        self.last_error = result.error
        self._hold(config, result)
        if delivery.attempts >= config.max_attempts:
            self.dead_lettered += 1
            log.warning(
                "webhook.dead",
                **fields,
                attempts=delivery.attempts,
                status=result.status,
                error=result.error,
            )
            return DeliveryEnd(delivered=False, status=result.status, error=result.error)
        delay = backoff_s(
            delivery.attempts,
            base_s=config.backoff_base_s,
            max_s=config.backoff_max_s,
            hint_s=result.retry_after_s,
            rng=self._rng,
        )
        log.info(
            "webhook.retry",
            **fields,
            attempts=delivery.attempts,
            status=result.status,
            error=result.error,
            retry_in_s=round(delay, 3),
        )
        return DeliveryEnd(
            delivered=False, status=result.status, error=result.error, retry_at=time.time() + delay
        )

    def _hold(self, config: WebhookConfig, result: PostResult) -> None:
        """Another failure in a row; from HOLD_AFTER on, claims wait a growing backoff."""
        self._failures += 1
        if self._failures < HOLD_AFTER:
            return
        if self._failures == HOLD_AFTER:
            log.warning(
                "webhook.receiver_failing",
                webhook=self.name,
                failures=self._failures,
                error=result.error,
            )
        hold = backoff_s(
            self._failures - HOLD_AFTER + 1,
            base_s=config.backoff_base_s,
            max_s=min(config.backoff_max_s, HOLD_MAX_S),
            hint_s=result.retry_after_s,
            rng=self._rng,
        )
        self._held_until = max(self._held_until, time.monotonic() + hold)
