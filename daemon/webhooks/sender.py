"""The webhook sender: one `Endpoint` loop per configured webhook, in the sender's own
task group over one HTTP session. A reload adds, removes and reconfigures the loops
(`configure`); a job's end wakes them (`follow`). Its figures are the status section
`webhooks` and the metrics drawn from it; the store's pending and dead counts are
refreshed every COUNTS_EVERY_S there, as status is synchronous (`vigil webhooks`
reads them afresh)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from daemon.config import WebhookConfig
from daemon.jobs import TERMINAL
from daemon.store.base import JobStore, StoreError
from daemon.store.outbox import WebhookCounts
from daemon.wakeup import Wakeup
from daemon.webhooks.endpoint import Endpoint

if TYPE_CHECKING:
    from daemon.queue import Dispatcher

log = structlog.get_logger("vigil.webhooks")
COUNTS_EVERY_S = 5.0  # a count over every pending and dead delivery: not too often
CLOSE_S = 2.0  # the bound on closing the session's connections at shutdown
MAX_CONNECTIONS = 512  # every webhook's max_concurrency together stays below this, mostly


class WebhookSender:
    def __init__(
        self,
        store: JobStore,
        webhooks: Mapping[str, WebhookConfig],
        secrets: Mapping[str, bytes],
        sections: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        self._store = store
        self._configs = dict(webhooks)
        self._secrets = dict(secrets)
        self.endpoints: dict[str, Endpoint] = {}
        self.counts: dict[str, WebhookCounts] = {}
        self._recount = Wakeup()  # counts changed beyond the sending (a retry command)
        self._tg: TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        if sections is not None:
            sections["webhooks"] = self.status

    def follow(self, dispatcher: Dispatcher) -> None:
        """Wake the loops when a job ends here (its deliveries are committed by then);
        ends elsewhere (bulk actions, other nodes) are found by polling."""
        dispatcher.on_finish.append(
            lambda job, end, new: self.job_ended() if new in TERMINAL else None
        )
        dispatcher.on_cancel.append(lambda canceled: self.job_ended())

    def job_ended(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.job_ended()

    def kick(self, name: str) -> None:
        """`vigil webhooks retry NAME` requeued its dead deliveries: send them now."""
        endpoint = self.endpoints.get(name)
        if endpoint is not None:
            endpoint.kick()
        self._recount.notify()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. In-flight POSTs are cancelled then, not waited for: each is
        given back to the store (due at once) within a bound, or its claim lapses."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            cookie_jar=aiohttp.DummyCookieJar(),  # receivers' cookies: nothing to keep
            trust_env=False,
        )
        try:
            async with anyio.create_task_group() as tg:
                self._tg, self._session = tg, session
                self.configure(self._configs, self._secrets)
                tg.start_soon(self._refresh_counts, name="webhooks.counts")
                task_status.started()
        finally:
            self._tg = None
            with anyio.move_on_after(CLOSE_S, shield=True):
                await session.close()

    def configure(
        self, webhooks: Mapping[str, WebhookConfig], secrets: Mapping[str, bytes]
    ) -> None:
        """Run exactly these webhooks: new ones start, removed ones stop (their
        in-flight deliveries are given back), the others take the new settings."""
        self._configs, self._secrets = dict(webhooks), dict(secrets)
        if self._tg is None or self._session is None:
            return  # `run` applies them when it starts
        for name in [n for n in self.endpoints if n not in webhooks]:
            self.endpoints.pop(name).scope.cancel()
            log.info("webhook.removed", webhook=name)
        for name, config in webhooks.items():
            endpoint = self.endpoints.get(name)
            if endpoint is not None:
                endpoint.configure(config, secrets[name])
                continue
            endpoint = Endpoint(name, config, secrets[name], self._store, self._session)
            self.endpoints[name] = endpoint
            self._tg.start_soon(endpoint.run, name=f"webhook.{name}")

    async def _refresh_counts(self) -> None:
        while True:
            if self.endpoints:
                try:
                    self.counts = await self._store.webhook_counts()
                except StoreError as exc:
                    log.warning("webhook.counts_failed", error=str(exc))
            await self._recount.wait(COUNTS_EVERY_S)

    def status(self) -> dict[str, Any]:
        """Per webhook: its URL (no query), the store's pending and dead counts (as of
        the last refresh), and this daemon's figures since start."""
        return self.report(self.counts)

    def report(self, counts: Mapping[str, WebhookCounts]) -> dict[str, Any]:
        now = time.time()
        return {
            name: endpoint.status(counts.get(name, WebhookCounts()), now)
            for name, endpoint in sorted(self.endpoints.items())
        }
