"""The `GET /` status page: one static HTML file (daemon/data/status.html) with its
CSS and JS inline, no build step. Its script fetches /status every 2 s.

The page is served with a Content-Security-Policy that allows exactly its own inline
script and style (by hash) and fetches to its own origin, so nothing a job or a
provider puts into /status can run as script (the page also writes text, never HTML).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class StatusPage:
    body: bytes
    headers: dict[str, str]


def _sha256(source: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source).digest()).decode() + "'"


def build_page(html: bytes) -> StatusPage:
    """Headers for `html`: its inline blocks' hashes make up the CSP."""
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for match in _INLINE.finditer(html):
        hashes[match.group(1)].append(_sha256(match.group(2)))
    scripts = " ".join(hashes[b"script"]) or "'none'"
    styles = " ".join(hashes[b"style"]) or "'none'"
    csp = (
        f"default-src 'none'; connect-src 'self'; script-src {scripts}; style-src {styles}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return StatusPage(
        body=html,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def load_page() -> StatusPage:
    """Read the page from the package (file I/O: call it in a worker thread)."""
    return build_page((resources.files("daemon.data") / "status.html").read_bytes())
