"""The control commands for webhooks: `webhooks` (each one's figures, counts read from
the store now) and `webhooks_retry` (a webhook's dead deliveries due again)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from daemon.control.protocol import Args, CommandError

if TYPE_CHECKING:
    from daemon.runtime import Runtime
    from daemon.webhooks.sender import WebhookSender

log = structlog.get_logger("vigil.webhooks")


class ListArgs(Args, frozen=True):
    pass


class RetryArgs(Args, frozen=True):
    name: str


def _sender(rt: Runtime) -> WebhookSender:
    if rt.webhooks is None:
        raise CommandError("unavailable", "the webhook sender is not running")
    return rt.webhooks


async def list_webhooks(rt: Runtime, _: ListArgs) -> Any:
    """Each configured webhook, by name, with its pending and dead counts as stored."""
    sender = _sender(rt)
    report = sender.report(await rt.store.webhook_counts())
    return {"webhooks": [{"name": name, **figures} for name, figures in report.items()]}


async def retry(rt: Runtime, args: RetryArgs) -> Any:
    """Dead-lettered deliveries of one webhook become due now, attempts reset."""
    sender = _sender(rt)
    if args.name not in rt.config.webhooks:
        known = ", ".join(sorted(rt.config.webhooks)) or "none is configured"
        raise CommandError("not_found", f"no webhook named {args.name!r} (configured: {known})")
    requeued = await rt.store.retry_dead(args.name)
    sender.kick(args.name)
    log.info("webhook.requeued", webhook=args.name, requeued=requeued)
    return {"webhook": args.name, "requeued": requeued}
