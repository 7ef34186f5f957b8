"""One health model for every surface: `vigil status`, /healthz, /readyz, and the
systemd watchdog pings.

A check says whether one part is fine and, if not, why. `affects` says what a
failing check takes away: `live` (the process is wedged: systemd should restart it),
`ready` (it should not be sent work now), or nothing (worth showing, not acting on).
Components register their own checks, so the model knows nothing of their insides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

Affects = Literal["live", "ready", "none"]


class Check(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    ok: bool
    affects: Affects = "ready"
    reason: str = ""  # why it fails; empty once the report holds it and it passes


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    live: bool
    ready: bool
    checks: list[Check]

    def reasons(self, affects: Affects) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.ok and c.affects == affects]


CheckFn = Callable[[], Check | list[Check]]


class Health:
    """A registry of checks, evaluated on demand (they are cheap reads of state)."""

    def __init__(self) -> None:
        self._checks: list[CheckFn] = []

    def register(self, check: CheckFn) -> None:
        self._checks.append(check)

    def report(self) -> HealthReport:
        checks: list[Check] = []
        for fn in self._checks:
            out = fn()
            checks.extend(_as_reported(c) for c in (out if isinstance(out, list) else [out]))
        live = all(c.ok for c in checks if c.affects == "live")
        ready = live and all(c.ok for c in checks if c.affects == "ready")
        return HealthReport(live=live, ready=ready, checks=checks)


def _as_reported(check: Check) -> Check:
    """A passing check has nothing to explain. Producers may word their failure
    unconditionally ("backlog full: ..."); that text must not reach a reader of a
    passing check, on any surface."""
    return msgspec.structs.replace(check, reason="") if check.ok and check.reason else check
