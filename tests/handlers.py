"""A Python handler analyzer used by the end-to-end tests (imported by the daemon)."""

from __future__ import annotations

from typing import Any

import anyio

from daemon.analyzers import HandlerContext


async def two_calls(input: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Two LLM calls through the throttled provider, combined into one result."""
    summary = await ctx.complete(f"Summarize: {input['text']}")
    labels = await ctx.complete(f"Label: {input['text']}", json_mode=True, max_tokens=100)
    return {"summary": summary, "labels": labels, "job": ctx.job.id}


async def sleeps(input: dict[str, Any], ctx: HandlerContext) -> str:
    """Takes exactly `seconds` (no API call): attempts of known length."""
    await anyio.sleep(float(input["seconds"]))
    return "slept"
