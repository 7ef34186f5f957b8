"""The simulated API's prompt cache: which prompt prefixes were seen lately, so a
repeated one is reported as read from cache, as the real APIs do (Anthropic's
`cache_control` breakpoints). Only hashes and times are kept, never text, and only so
many: memory stays flat however many distinct prompts arrive.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import msgspec

MIN_CACHED_TOKENS = 1024
"""Shorter prefixes are not cached (Anthropic's minimum for most models)."""
CACHE_TTL_S = 300.0
"""A prefix not used for this long is gone (Anthropic's default 5-minute cache)."""
MAX_CACHED_PREFIXES = 1024


class Breakpoint(msgspec.Struct, frozen=True):
    """A cacheable prompt prefix: the hash of everything up to it, and its tokens."""

    key: bytes
    tokens: int


class CacheUse(msgspec.Struct, frozen=True):
    """What one request would read from and write to the cache; `writes` are stored
    (or refreshed) only once it is answered, so a rejected request changes nothing."""

    read: int = 0
    creation: int = 0
    writes: tuple[bytes, ...] = ()


class PrefixHasher:
    """Hashes a prompt piece by piece, for the breakpoints along it: each piece is
    framed by its kind and length, so different splits never collide."""

    def __init__(self, *scope: str) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        for part in scope:  # the dialect and model: a prefix is cached per model
            self.add("scope", part)

    def add(self, kind: str, text: str) -> None:
        data = text.encode()
        self._hash.update(f"{kind}\0{len(data)}\0".encode())
        self._hash.update(data)

    def key(self) -> bytes:
        return self._hash.copy().digest()


class PromptCache:
    """Prefix hashes by last use, oldest first: lookups and expiry are O(1) each."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        ttl_s: float = CACHE_TTL_S,
        max_entries: int = MAX_CACHED_PREFIXES,
        min_tokens: int = MIN_CACHED_TOKENS,
    ) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._max = max_entries
        self._min_tokens = min_tokens
        self._used: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._used)

    def use(self, breakpoints: Iterable[Breakpoint]) -> CacheUse:
        """The longest live prefix is read; the rest, up to the last breakpoint, is
        written. Prefixes under `min_tokens` are neither."""
        self._expire()
        eligible = [b for b in breakpoints if b.tokens >= self._min_tokens]
        if not eligible:
            return CacheUse()
        read = max((b.tokens for b in eligible if b.key in self._used), default=0)
        longest = max(b.tokens for b in eligible)
        return CacheUse(read, max(0, longest - read), tuple(b.key for b in eligible))

    def commit(self, use: CacheUse) -> None:
        """Store or refresh `use.writes` (a hit restarts its TTL, as Anthropic's do)."""
        now = self._clock()
        for key in use.writes:
            self._used[key] = now
            self._used.move_to_end(key)
        while len(self._used) > self._max:
            self._used.popitem(last=False)

    def _expire(self) -> None:
        cutoff = self._clock() - self._ttl_s
        while self._used:
            key, used = next(iter(self._used.items()))
            if used > cutoff:
                return
            del self._used[key]
