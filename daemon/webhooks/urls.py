"""A webhook's URL as the config checks it and as status and logs show it. The URL
comes only from the config file (no request names one), so the checks are the
operator's guard rails, not an SSRF filter: http(s), a host, nothing hidden."""

from __future__ import annotations

from urllib.parse import urlsplit


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook's, or None."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"must start with http:// or https://, got {url[:40]!r}"
    if not parts.hostname:
        return "needs a host (http://HOST[:PORT]/PATH)"
    if parts.username is not None or parts.password is not None:
        # Status and logs show the URL; deliveries are authenticated by their signature.
        return (
            "credentials in the URL are not allowed (the URL is shown in status and "
            "logs); receivers authenticate deliveries by their Vigil-Signature"
        )
    if parts.fragment:
        return "a fragment (#...) is never sent: remove it"
    return None


def display_url(url: str) -> str:
    """The URL for status and logs: scheme, host, port and the path's first segment;
    the rest of the path and a query show as `/…` and `?[redacted]`, since services
    put the secret there (Slack's /services/T/B/<token>, Discord's .../<id>/<token>)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(invalid URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port_text = f":{port}" if port else ""
    query = "?[redacted]" if parts.query else ""
    first, more, _ = parts.path.lstrip("/").partition("/")
    path = f"/{first}" + ("/…" if more else "") if first else parts.path
    return f"{parts.scheme}://{host}{port_text}{path}{query}"
