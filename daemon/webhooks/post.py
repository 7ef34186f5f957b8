"""One POST of a delivery and what came of it. Redirects are not followed (a 3xx is a
failed attempt: the URL is the config's alone), and of an answer only a few KiB are
read, for the error message: a receiver cannot make the sender hold much."""

from __future__ import annotations

import math

import aiohttp
import msgspec

MAX_READ_BYTES = 4096  # of a response body: enough to say what went wrong
MAX_ERROR_CHARS = 300


class PostResult(msgspec.Struct, frozen=True, kw_only=True):
    """`status` None: no answer (timeout, refused connection); `retry_after_s`: the
    receiver's Retry-After, in seconds, on a 429 or 503."""

    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
) -> PostResult:
    """POST `body`; every failure comes back as a result, never raised (cancellation
    aside)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.post(
            url, data=body, headers=headers, allow_redirects=False, timeout=timeout
        ) as resp:
            # Read a little even on success: a body read to its end lets the
            # connection be reused.
            text = await resp.content.read(MAX_READ_BYTES)
            if 200 <= resp.status < 300:
                return PostResult(ok=True, status=resp.status)
            return PostResult(
                ok=False,
                status=resp.status,
                error=_answer_error(resp.status, text),
                retry_after_s=_retry_after(resp) if resp.status in (429, 503) else None,
            )
    except TimeoutError:
        return PostResult(ok=False, error=f"no answer within timeout_s ({timeout_s:g} s)")
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc)
        return PostResult(ok=False, error=_clip(f"cannot connect: {reason}"))
    except (aiohttp.ClientError, OSError) as exc:
        return PostResult(ok=False, error=_clip(f"{type(exc).__name__}: {exc}"))


def _answer_error(status: int, text: bytes) -> str:
    if 300 <= status < 400:
        return f"HTTP {status}: a redirect, not followed (set the final URL in the config)"
    snippet = " ".join(text.decode("utf-8", "replace").split())
    return _clip(f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}")


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """Retry-After in seconds (its HTTP-date form is rare here and ignored)."""
    try:
        value = float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _clip(text: str) -> str:
    """A receiver's words, fit to store and log: no control characters (PostgreSQL
    refuses a NUL in text, and the delivery's end would never be recorded), cut short."""
    text = text.translate(_CONTROLS)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


_CONTROLS = dict.fromkeys([*range(0x20), 0x7F], " ")
