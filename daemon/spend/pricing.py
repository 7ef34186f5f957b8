"""What a call costs, and the most it can cost before it is made."""

from __future__ import annotations

from daemon.config import PriceConfig
from daemon.providers.base import ChatRequest, Completion

MESSAGE_OVERHEAD_TOKENS = 16
"""Tokens an API may add per message (role, separators): counted in the worst case."""


def cost_usd(completion: Completion, price: PriceConfig) -> float:
    """What an answer cost: cached input and cache writes at their own prices where
    set (else as other input), the rest of the input and the output at theirs."""
    cached, written = completion.cached_tokens, completion.cache_write_tokens
    plain = max(0, completion.prompt_tokens - cached - written)
    return (
        plain * price.prompt_per_mtok
        + cached * _cached_price(price)
        + written * _write_price(price)
        + completion.completion_tokens * price.completion_per_mtok
    ) / 1e6


def worst_cost_usd(request: ChatRequest, price: PriceConfig) -> float:
    """The most a request can cost: every input byte a token (no tokenizer makes more
    tokens than UTF-8 bytes), at the dearest input price, plus `max_tokens` of output.
    Never under-estimated, so a reservation of it cannot be passed by the answer."""
    input_tokens = sum(len(m.content.encode()) + MESSAGE_OVERHEAD_TOKENS for m in request.messages)
    dearest = max(price.prompt_per_mtok, _cached_price(price), _write_price(price))
    return (input_tokens * dearest + request.max_tokens * price.completion_per_mtok) / 1e6


def _cached_price(price: PriceConfig) -> float:
    if price.cached_prompt_per_mtok is None:
        return price.prompt_per_mtok
    return price.cached_prompt_per_mtok


def _write_price(price: PriceConfig) -> float:
    if price.cache_write_per_mtok is None:
        return price.prompt_per_mtok
    return price.cache_write_per_mtok
