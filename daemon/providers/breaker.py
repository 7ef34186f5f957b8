"""A circuit breaker per provider: after `failures` consecutive failures (no answer,
a timeout, a 5xx) it opens and calls fail at once, without a request, for `open_s`;
then one probe goes through (half-open): an answer closes it, a failure opens it again.

An API that is down then costs one probe per `open_s` instead of a timeout per job,
and jobs are told when to come back instead of hammering it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from daemon.providers.base import ProviderError

log = structlog.get_logger("vigil.provider")

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """`failures` = 0 turns the breaker off (it never opens)."""

    def __init__(
        self,
        provider: str,
        *,
        failures: int,
        open_s: float,
        probe_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.failures_to_open = failures
        self.open_s = open_s
        self.probe_wait_s = probe_wait_s  # hint to callers turned away while a probe runs
        self._clock = clock
        self._state: State = "closed"
        self._opened_at = 0.0
        self._probing = False
        self.consecutive_failures = 0
        self.opened = 0
        self.rejected = 0
        self.last_failure: str | None = None

    def configure(self, *, failures: int, open_s: float, probe_wait_s: float) -> None:
        self.failures_to_open, self.open_s, self.probe_wait_s = failures, open_s, probe_wait_s
        if not failures and self._state != "closed":
            self._close()

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() >= self._opened_at + self.open_s:
            self._state = "half_open"
            log.info("provider.circuit_half_open", provider=self.provider)
        return self._state

    def admit(self) -> bool:
        """Before a call: True if it is the half-open probe. Raises a retryable
        ProviderError (kind CircuitOpen) when the call must not be made."""
        state = self.state
        if state == "closed":
            return False
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        self.rejected += 1
        if state == "open":
            wait_s = self._opened_at + self.open_s - self._clock()
            why = f"circuit open after {self.consecutive_failures} failures in a row"
        else:
            wait_s = self.probe_wait_s
            why = "circuit half-open, a probe request is under way"
        raise ProviderError(
            f"provider {self.provider!r} is failing fast: {why} (last: {self.last_failure})",
            kind="CircuitOpen",
            retryable=True,
            retry_after_s=max(0.0, wait_s),
        )

    def succeeded(self, probe: bool) -> None:
        """The server answered (any status below 500)."""
        if probe:
            self._probing = False
            self._close()
        elif self._state == "closed":
            self.consecutive_failures = 0

    def failed(self, reason: str, probe: bool) -> None:
        """No answer, a timeout or a 5xx."""
        self.last_failure = reason
        if probe:
            self._probing = False
            self.consecutive_failures += 1
            self._open(reason)
            return
        if self._state != "closed":
            return  # a straggler sent before the circuit opened: already counted
        self.consecutive_failures += 1
        if self.failures_to_open and self.consecutive_failures >= self.failures_to_open:
            self._open(reason)

    def released(self, probe: bool) -> None:
        """The call ended without saying anything about the server (cancelled, refused
        before sending): a probe slot goes to the next caller."""
        if probe:
            self._probing = False

    def _open(self, reason: str) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self.opened += 1
        log.warning(
            "provider.circuit_opened",
            provider=self.provider,
            failures=self.consecutive_failures,
            open_s=self.open_s,
            last_failure=reason,
        )

    def _close(self) -> None:
        was = self._state
        self._state = "closed"
        self.consecutive_failures = 0
        if was != "closed":
            log.info("provider.circuit_closed", provider=self.provider)

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "state": state,
            "consecutive_failures": self.consecutive_failures,
            "failures_to_open": self.failures_to_open,
            "open_s": self.open_s,
            "half_open_in_s": round(max(0.0, self._opened_at + self.open_s - self._clock()), 3)
            if state == "open"
            else None,
            "opened": self.opened,
            "rejected": self.rejected,
            "last_failure": self.last_failure,
        }
