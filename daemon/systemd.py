"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, never blocking."""

from __future__ import annotations

import os
import socket


def enabled() -> bool:
    """Whether a service manager listens (we run under systemd with Type=notify)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str) -> bool:
    """Send `READY=1`, `STATUS=...` and friends; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True
